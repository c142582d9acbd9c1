"""``python -m bench [chain|imaging|pxe|deployment|replication|multicast|fleet|all]
[--quick]``: measure, print a table.

``chain`` (the default) measures the real chain on loopback; ``imaging``
(also ``--only imaging``) measures disk capture/deploy of an ext4 disk against
zstd and partclone (bench/imaging.py) and of an NTFS one against partclone.ntfs
and ntfsclone (bench/imaging_ntfs.py; ``--fs ext4|ntfs`` measures only one,
the other's table kept); ``pxe`` three PXE site servers answering a
console change and serving boot scripts (bench/pxe.py; root and dnsmasq);
``deployment`` DeployImage over HTTP vs a folder, the automation initrd and a
VM's PXE boot until its agent registers (bench/deployment.py; root and QEMU);
``fleet`` thousands of simulated agents against the reference task servers,
the built-in one on SQLite and the ASGI one on PostgreSQL side by side
(``--server``): steady polling, a tickled fan-out, an outage and the return
(bench/fleet.py; ``--agents``, ``--shards``, ``--seed``, ``--workers``; minutes,
so not part of ``all``); ``replication`` ReplicatePackage of a 1 GiB image and a
driver package from nginx on loopback vs ``curl`` of the same files, then
re-replication after one changed file and with nothing changed
(bench/replication.py; nginx and curl; about a minute, 10 s with ``--quick``);
``multicast`` DeployImage to 4 receivers over multicast (udpcast) against one
over HTTP, between network namespaces (bench/multicast.py; root, udpcast;
a few minutes, 30 s with ``--quick``);
``all`` (also ``--all``) runs all but ``fleet``.

Progress goes to stderr; the Markdown tables go to stdout and to
``bench/results.md``: the chain section first, then a ``## Imaging`` section,
then a ``## PXE site server`` section, then ``## Initial deployment``, then
``## Fleet``, then ``## Replication``, then ``## Multicast``. A run
replaces the section(s) it measured and keeps the others as they were. Nothing
is asserted.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import chain as chain_bench
from bench import deployment as deployment_bench
from bench import fleet as fleet_bench
from bench import imaging as imaging_bench
from bench import micro
from bench import multicast as multicast_bench
from bench import pxe as pxe_bench
from bench import replication as replication_bench
from bench.report import (Conditions, Row, cpu_row, machine_lines, mb, ms, percentile,
                          split_section, table, unwind_on_sigterm)

RESULTS = Path(__file__).with_name("results.md")
IMAGING_HEADING = "## Imaging"
PXE_HEADING = pxe_bench.HEADING

LATENCY_GOAL_S = 0.005
THROUGHPUT_GOAL = 200.0
RSS_GOAL = 64 * 1024 * 1024
IDLE_CPU_GOAL = 0.005   # fraction of one core


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def p50_p99(values: list[float]) -> str:
    if not values:
        return "no samples"
    return f"p50 {ms(percentile(values, 50))} · p99 {ms(percentile(values, 99))}"


def latency_rows(lat: chain_bench.LatencyResult) -> list[Row]:
    n = len(lat.running)
    note = f" (n={n}" + (f", {lat.lost} lost" if lat.lost else "") + \
        (f", {lat.busy} busy retries" if lat.busy else "") + ")"
    rows = []
    for label, values in (("(a) `running` event `at`", lat.running),
                          ("(b) in the handler (`date +%s.%N`, incl. sh spawn)", lat.handler)):
        if not values:
            rows.append(Row(f"Tickle → handler start {label}", "no samples", "p50 ≤ 5 ms", False))
            continue
        p50 = percentile(values, 50)
        rows.append(Row(f"Tickle → handler start {label}, p50{note}", ms(p50), "≤ 5 ms",
                        p50 <= LATENCY_GOAL_S))
        rows.append(Row(f"Tickle → handler start {label}, p99", ms(percentile(values, 99))))
    rows += [
        Row("  ↳ tickle sent → `OK` from objecthost", p50_p99(lat.tickle_ok)),
        Row("  ↳ tickle sent → `received` `at` (wake-up hop, GET tasks, XML parse)",
            p50_p99(lat.received)),
        Row("  ↳ `received` → `running` `at` (received commit, executor, worker validate)",
            p50_p99(lat.validate)),
        Row("  ↳ `running` `at` → handler's sh runs (running commit, go, sh spawn)",
            p50_p99(lat.go_to_sh)),
        Row("  ↳ tickle sent → terminal `at` (task done in CTA)", p50_p99(lat.terminal_at)),
        Row("  ↳ tickle sent → terminal status stored at server", p50_p99(lat.at_server)),
    ]
    return rows


def throughput_rows(res: chain_bench.ThroughputResult) -> list[Row]:
    done = f"{res.done}/{res.n}" + ("" if res.done == res.n else " (timed out)")
    failed = res.done - res.succeeded
    rows = [Row(f"{res.n} no-op RunScript tasks, one tickle, max_concurrent_tasks={res.concurrency}",
                f"{res.rate:.0f} tasks/s ({done} terminal at server in {res.elapsed_s:.2f} s"
                + (f", {failed} not succeeded" if failed else "") + ")",
                f"≥ {THROUGHPUT_GOAL:.0f} tasks/s", res.rate >= THROUGHPUT_GOAL and res.done == res.n),
            Row("  ↳ timeline after the tickle (event `at`s)",
                f"first `received` +{res.first_received_s:.2f} s, last `received` "
                f"+{res.last_received_s:.2f} s, last terminal +{res.last_terminal_s:.2f} s, "
                f"all at server +{res.elapsed_s:.2f} s (queueing took {res.queue_s:.2f} s, untimed)")]
    if res.cpu_s and res.done:
        rows.append(cpu_row(res.cpu_s, res.done, res.elapsed_s))
    return rows


def idle_rows(idle: chain_bench.IdleResult, after_rss: tuple[int, int] | None,
              after_n: int) -> list[Row]:
    rss = sum(p.rss for p in idle.agents)
    uss = sum(p.uss for p in idle.agents)
    cpu = sum(p.cpu_s for p in idle.agents)
    each = ", ".join(f"{p.name} {mb(p.rss)}" for p in idle.agents)
    each_uss = ", ".join(f"{p.name} {mb(p.uss)}" for p in idle.agents)
    pss = sum(p.pss for p in idle.agents)
    share = cpu / idle.window_s
    rows = [
        Row("Idle RSS, objecthost + CTA + ctdataloader (after 3 s idle)", f"{mb(rss)} ({each})",
            f"≤ {mb(RSS_GOAL)}", rss <= RSS_GOAL),
        Row("Idle USS, same three", f"{mb(uss)} ({each_uss})"),
        Row("Idle PSS, same three (shared pages split between sharers)", mb(pss)),
        Row(f"Idle CPU over {idle.window_s:.0f} s, same three",
            f"{cpu * 1000:.0f} ms ({share * 100:.2f} % of a core; "
            + ", ".join(f"{p.name} {p.cpu_s * 1000:.0f} ms" for p in idle.agents) + ")",
            "≈ 0 (≤ 0.5 % of a core)", share <= IDLE_CPU_GOAL),
    ]
    if idle.workers:
        rows.append(Row(f"  info: {len(idle.workers)} idle worker(s) (children of the CTA)",
                        "RSS " + " + ".join(mb(w.rss) for w in idle.workers)
                        + ", USS " + " + ".join(mb(w.uss) for w in idle.workers)
                        + f"; CPU {sum(w.cpu_s for w in idle.workers) * 1000:.0f} ms"))
    if idle.supervisor:
        sup = idle.supervisor
        rows.append(Row("  info: supervisor (`dsagent run`)",
                        f"RSS {mb(sup.rss)}, USS {mb(sup.uss)}; CPU {sup.cpu_s * 1000:.0f} ms"))
    if after_rss:
        rows.append(Row(f"  info: RSS of the three after the {after_n}-task run",
                        f"{mb(after_rss[0])} (USS {mb(after_rss[1])})"))
    return rows


def micro_rows(workdir: Path, quick: bool) -> list[Row]:
    n = 300 if quick else 1000
    rows = []
    say("micro: loopback TCP")
    rows.append(Row("Floor: loopback TCP round trip (open connection, NODELAY)",
                    p50_p99(micro.tcp_round_trip(n))))
    rows.append(Row("Floor: loopback TCP connect + line + answer + close",
                    p50_p99(micro.tcp_connect_exchange(n // 2))))
    say("micro: httpx")
    tasks, missing = micro.http_get(workdir, n // 2)
    rows.append(Row("Floor: httpx keep-alive GET tasks (reference server, empty list)",
                    p50_p99(tasks)))
    rows.append(Row("Floor: httpx keep-alive GET of a 404 path (no SQLite)", p50_p99(missing)))
    say("micro: sqlite")
    rows.append(Row("Floor: SQLite commit, WAL + synchronous=FULL (state dir)",
                    p50_p99(micro.sqlite_commit(workdir, 100 if quick else 300))))
    say("micro: xml")
    samples, size = micro.xml_parse(100 if quick else 300)
    rows.append(Row(f"Floor: parse_client_tasks, 50-task document ({size // 1024} KiB)",
                    p50_p99(samples)))
    say("micro: sh spawn")
    rows.append(Row("Floor: spawn + wait `/bin/sh -c true` from Python",
                    p50_p99(micro.sh_spawn(50 if quick else 200))))
    return rows


NOTES = """\
Notes: (a) is the `running` event's `at` (taken in the CTA just before the
worker is told to go; RFC 3339 with milliseconds, truncated, so up to 1 ms
low) minus `time.time()` taken just before the tickle was sent; (b) is the
time written by `date +%s.%N` in the task's script, so it includes the `sh`
spawn. Tickles are paced at most 40/s (the objecthost's rate limit is 50/s)
and each task finishes before the next tickle. Throughput is timed from just
before the tickle until every task's terminal status is stored at the server;
"CPU per task" is user+system time of each process over that window (workers
include the scripts they reaped; "task server + bench" is this process).
RSS counts shared library pages once per process (libpython, libcrypto, ...);
PSS splits them. Expect run-to-run spread of tens of percent on a small VM.
"""


def merge_results(old: str, chain: str | None, imaging: str | None,
                  pxe: str | None = None) -> str:
    """results.md with the given sections replaced and the others kept from ``old``."""
    cut = old.find("\n" + PXE_HEADING + "\n")       # the PXE section is the last one
    old, old_pxe = (old[:cut], old[cut + 1:]) if cut >= 0 else (old, "")
    if old.startswith(PXE_HEADING + "\n"):
        old, old_pxe = "", old
    cut = old.find("\n" + IMAGING_HEADING + "\n")
    old_chain, old_imaging = (old[:cut], old[cut + 1:]) if cut >= 0 else (old, "")
    if old.startswith(IMAGING_HEADING + "\n"):
        old_chain, old_imaging = "", old
    parts = [p.strip() for p in (chain if chain is not None else old_chain,
                                 imaging if imaging is not None else old_imaging,
                                 pxe if pxe is not None else old_pxe) if p.strip()]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", nargs="?",
                        choices=("chain", "imaging", "pxe", "deployment", "replication",
                                 "multicast", "fleet", "all"),
                        help="what to measure (default: chain)")
    parser.add_argument("--only", choices=("chain", "imaging", "pxe", "deployment",
                                           "replication", "multicast", "fleet"),
                        help="same as SUITE")
    parser.add_argument("--all", action="store_true", help="same as SUITE=all")
    parser.add_argument("--quick", action="store_true",
                        help="smaller run: 50 tickles, 200 tasks; imaging: 1 run per tool; "
                             "fleet: 500 agents, shorter phases")
    parser.add_argument("--runs", type=int, help="imaging: runs per tool; replication: rounds "
                                                 "per package (default 3, quick 1)")
    parser.add_argument("--cold", action="store_true",
                        help="imaging: drop the page cache before every run of every tool "
                             "(default: warm cache, the disk read once before)")
    parser.add_argument("--fs", "--only-fs", dest="fs", choices=imaging_bench.FILESYSTEMS,
                        help="imaging: measure only this file system's disk (default: both); "
                             "results.md keeps the other's table")
    parser.add_argument("--tickles", type=int, help="latency samples (default 200, quick 50)")
    parser.add_argument("--tasks", type=int, help="throughput tasks (default 1000, quick 200)")
    parser.add_argument("--agents", type=int,
                        help="fleet: simulated agents (default 10000, quick 500)")
    parser.add_argument("--shards", type=int,
                        help="fleet: processes the agents are spread over (default 2, quick 1)")
    parser.add_argument("--seed", type=int, help="fleet: seed of all its randomness (default 14)")
    parser.add_argument("--server", choices=("builtin", "asgi", "both"), default="both",
                        help="fleet: the built-in server (SQLite), the ASGI one (PostgreSQL, "
                             "uvicorn), or both one after the other (default)")
    parser.add_argument("--workers", type=int,
                        help="fleet: uvicorn worker processes of the ASGI server (default 2)")
    parser.add_argument("--workdir",
                        help="where to put the chain and the disks (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, DBs)")
    parser.add_argument("--out", default=str(RESULTS),
                        help="Markdown file to update (default bench/results.md)")
    args = parser.parse_args(argv)
    suite = "all" if args.all else (args.suite or args.only or "chain")
    if args.suite and args.only and args.suite != args.only:
        parser.error("give the suite once (SUITE or --only)")
    n_tickles = args.tickles or (50 if args.quick else 200)
    n_tasks = args.tasks or (200 if args.quick else 1000)
    timeout = 45.0 if args.quick else 90.0
    if suite in ("pxe", "all"):
        try:
            pxe_bench.check()           # before anything runs: root, dnsmasq, ip, ipxe
        except pxe_bench.Unavailable as exc:
            parser.exit(2, f"python -m bench: error: {exc}\n")
        unwind_on_sigterm()
    if suite in ("deployment", "all"):
        try:
            deployment_bench.check()    # root, QEMU, dnsmasq, iPXE, e2fsprogs, fdisk, zstd
        except deployment_bench.Unavailable as exc:
            parser.exit(2, f"python -m bench: error: {exc}\n")
        unwind_on_sigterm()

    if suite in ("replication", "all"):
        try:
            replication_bench.check()   # nginx, curl, the test extra
        except replication_bench.Unavailable as exc:
            parser.exit(2, f"python -m bench: error: {exc}\n")
        unwind_on_sigterm()             # nginx stops on the way out
    if suite in ("multicast", "all"):
        try:
            multicast_bench.check()     # root, iproute2, udpcast, e2fsprogs
        except multicast_bench.Unavailable as exc:
            parser.exit(2, f"python -m bench: error: {exc}\n")
        unwind_on_sigterm()             # the lab's namespaces go on the way out
    if suite == "fleet":
        unwind_on_sigterm()             # the server and shard processes stop on the way out
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dsagent-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    chain_text = imaging_text = pxe_text = deployment_text = fleet_text = None
    replication_text = multicast_text = None
    try:
        if suite in ("chain", "all"):
            chain_text = run_chain(args, workdir, n_tickles, n_tasks, timeout)
        if suite in ("imaging", "all"):
            runs = args.runs or (1 if args.quick else 3)
            imaging_text = imaging_bench.section(
                workdir / "imaging", runs, args.cold, args.quick,
                (args.fs,) if args.fs else imaging_bench.FILESYSTEMS)
        if suite in ("pxe", "all"):
            pxe_text = pxe_bench.section(workdir / "pxe", args.quick)
        if suite in ("deployment", "all"):
            deployment_text = deployment_bench.section(workdir / "deployment", args.quick)
        if suite in ("replication", "all"):
            replication_text = replication_bench.section(workdir / "replication", args.quick,
                                                         args.runs)
        if suite in ("multicast", "all"):
            multicast_text = multicast_bench.section(workdir / "multicast", args.quick, args.runs)
        if suite == "fleet":
            fleet_text = fleet_bench.section(workdir, args.quick, args.agents, args.shards,
                                             args.seed, args.server, args.workers)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.keep:
            say(f"kept {workdir}")
    out = Path(args.out)
    old = out.read_text(encoding="utf-8") if out.exists() else ""
    # these first: merge_results's PXE cut takes everything after the PXE heading
    old, old_multicast = split_section(old, multicast_bench.HEADING)
    old, old_replication = split_section(old, replication_bench.HEADING)
    old, old_fleet = split_section(old, fleet_bench.HEADING)
    old, old_deployment = split_section(old, deployment_bench.HEADING)
    print("\n\n".join(t for t in (chain_text, imaging_text, pxe_text, deployment_text,
                                  fleet_text, replication_text, multicast_text) if t))
    if imaging_text is not None and args.fs:    # the other file system's table as it was
        imaging_text = imaging_bench.merge_section(split_section(old, IMAGING_HEADING)[1],
                                                   imaging_text)
    text = deployment_bench.join_section(
        merge_results(old, chain_text, imaging_text, pxe_text),
        deployment_text if deployment_text is not None else old_deployment)
    text = deployment_bench.join_section(
        text, fleet_text if fleet_text is not None else old_fleet)
    text = deployment_bench.join_section(
        text, replication_text if replication_text is not None else old_replication)
    out.write_text(deployment_bench.join_section(
        text, multicast_text if multicast_text is not None else old_multicast), encoding="utf-8")
    say(f"done in {time.monotonic() - began:.0f} s; written to {args.out}")
    return 0


def run_chain(args, workdir: Path, n_tickles: int, n_tasks: int, timeout: float) -> str:
    conditions = Conditions()
    rows: list[Row] = []
    mode = ("quick" if args.quick else "full") + \
        f": {n_tickles} tickles, {n_tasks} tasks per throughput run"
    chain = None
    try:
        say(f"starting the chain in {workdir} (max_concurrent_tasks=2)")
        chain = chain_bench.start_chain(workdir / "chain2", 2)
        chain_bench.warm_up(chain)
        say("idle: 3 s settle + 5 s CPU window")
        idle = chain_bench.idle(chain)
        say(f"latency: {n_tickles} sequential tickles")
        lat = chain_bench.tickle_latency(chain, n_tickles, workdir / "stamps")
        say(f"throughput: {n_tasks} tasks, max_concurrent_tasks=2")
        tp2 = chain_bench.throughput(chain, n_tasks, timeout)
        after = chain_bench.memory(chain)
        chain.stop()
        chain = None

        say("starting the chain again with max_concurrent_tasks=4")
        chain = chain_bench.start_chain(workdir / "chain4", 4)
        chain_bench.warm_up(chain)
        say(f"throughput: {n_tasks} tasks, max_concurrent_tasks=4")
        tp4 = chain_bench.throughput(chain, n_tasks, timeout)
        chain.stop()
        chain = None

        rows += latency_rows(lat)
        rows += throughput_rows(tp2) + throughput_rows(tp4)
        rows += idle_rows(idle, after, n_tasks)
        rows += micro_rows(workdir, args.quick)
    finally:
        if chain is not None:
            chain.stop()

    return "\n".join(["# dsagent bench", "", *machine_lines(workdir, mode), conditions.line(), "",
                      table(rows), "", NOTES])


if __name__ == "__main__":
    sys.exit(main())
