"""``dsagent-server packages``: packages, their source of truth and the site
servers that hold them (taskserver/packages.py, docs/replication.md).

    dsagent-server packages add    --db F ID --kind driver|image --source URL [--to CLIENT ...]
    dsagent-server packages remove --db F ID [--from CLIENT ...]
    dsagent-server packages check  --db F [ID ...] [--resync]
    dsagent-server packages list   --db F [--json]

``add`` and ``check`` read the sources' manifests, queue a ReplicatePackage
for every holder that needs one and tickle it (``--no-tickle``: they pull at
their next poll). ``serve`` does the same on a schedule (``--package-check-s``,
``--package-resync-s``: PackageSchedule below).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from taskserver.cligroup import command_group
from taskserver.packages import KINDS, PackageStore, Queued
from taskserver.store import TaskStore

log = logging.getLogger("taskserver.packages")


def _report(store: TaskStore, queued: list[Queued], errors: dict[str, str],
            tickle: bool) -> int:
    for q in queued:
        print(f"{q.package}\t{q.client_id}\t{q.task_id}")
    for package, why in errors.items():
        print(f"dsagent-server: package '{package}': its source cannot be read: {why}",
              file=sys.stderr)
    if not queued:
        print("dsagent-server: no replication needed", file=sys.stderr)
    sys.stdout.flush()
    if tickle and queued:
        store._tickle([q.client_id for q in queued])
    return 1 if errors else 0


def cmd_add(args: argparse.Namespace) -> int:
    with TaskStore(args.db) as store:
        packages = PackageStore(store)
        packages.add(args.package, args.kind, args.source, args.to)
        return _report(store, *packages.check([args.package]), not args.no_tickle)


def cmd_check(args: argparse.Namespace) -> int:
    with TaskStore(args.db) as store:
        queued, errors = PackageStore(store).check(args.package or None, resync=args.resync)
        return _report(store, queued, errors, not args.no_tickle)


def cmd_remove(args: argparse.Namespace) -> int:
    with TaskStore(args.db) as store:
        if not PackageStore(store).remove(args.package, args.holders):
            print(f"dsagent-server: nothing removed: no package '{args.package}'"
                  + (" held by " + ", ".join(args.holders) if args.holders else ""),
                  file=sys.stderr)
            return 1
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with TaskStore(args.db) as store:
        packages = PackageStore(store).packages()
    if args.json:
        print(json.dumps(packages, indent=2))
        return 0
    if not packages:
        print("no packages (dsagent-server packages add)")
        return 0
    for p in packages:
        source = ("gone from its source" if p["manifest_sha256"] == "gone" else
                  f"manifest {p['manifest_sha256'][:12]}" if p["manifest_sha256"] else
                  "never checked")
        error = f"; last check failed: {p['check_error']}" if p["check_error"] else ""
        print(f"{p['package_id']} ({p['kind']}) from {p['source']}: {source}, checked "
              f"{p['checked_at'] or 'never'}{error}")
        width = max((len(h["client_id"]) for h in p["holders"]), default=0)
        for h in p["holders"]:
            print(f"  {h['client_id']:<{width}}  {h['state']:<16} {h['detail']}".rstrip())
        if not p["holders"]:
            print("  (no site server holds it: packages add … --to CLIENT)")
    return 0


def add_packages_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``packages`` and its sub-commands to dsagent-server's sub-parsers."""
    command = command_group(sub, "packages", "packages, their source of truth and the site "
                            "servers that hold them (replication)",
                            "Packages and their replication (docs/replication.md).",
                            "queue only (the site servers pull at their next poll)")

    p = command("add", "add a package (or change its source) and the site servers that "
                "should hold it; queue their replications", cmd_add)
    p.add_argument("package", metavar="ID")
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--source", required=True, metavar="URL",
                   help="its folder at the source of truth (http(s)://…/, holding manifest.json)")
    p.add_argument("--to", action="append", default=[], metavar="CLIENT",
                   help="a site server that should hold it (repeat for several)")

    p = command("remove", "forget a package, or some of its holders (their copies stay)",
                cmd_remove, change=False)
    p.add_argument("package", metavar="ID")
    p.add_argument("--from", dest="holders", action="append", default=[], metavar="CLIENT")

    p = command("check", "read the sources' manifests; queue a replication for every holder "
                "whose copy differs (--resync: for every holder)", cmd_check)
    p.add_argument("package", nargs="*", metavar="ID", help="these only (default: all)")
    p.add_argument("--resync", action="store_true",
                   help="replicate to every holder, changed or not (repairs a damaged replica)")

    p = command("list", "each package, its source and each holder's state", cmd_list,
                change=False)
    p.add_argument("--json", action="store_true")


class PackageSchedule:
    """``serve``'s package jobs (apscheduler): check the sources every
    ``check_s`` and resync every holder every ``resync_s`` (0: never)."""

    def __init__(self, store: TaskStore, check_s: int, resync_s: int):
        from apscheduler.schedulers.background import BackgroundScheduler

        self.store = store
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True,
                                                           "max_instances": 1})
        if check_s:
            self.scheduler.add_job(self.run, "interval", seconds=check_s, args=(False,),
                                   id="package-check", jitter=max(1, check_s // 10))
        if resync_s:
            self.scheduler.add_job(self.run, "interval", seconds=resync_s, args=(True,),
                                   id="package-resync", jitter=max(1, resync_s // 10))

    def run(self, resync: bool) -> None:
        try:
            queued, _ = PackageStore(self.store).check(resync=resync)
        except Exception:
            log.exception("package %s failed", "resync" if resync else "check")
            return
        if queued:
            log.info("package %s: %d replication(s) queued", "resync" if resync else "check",
                     len(queued))
            self.store._tickle([q.client_id for q in queued])

    def __enter__(self) -> "PackageSchedule":
        if self.scheduler.get_jobs():
            self.scheduler.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
