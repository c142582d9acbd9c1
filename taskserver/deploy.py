"""``dsagent-server deploy`` and ``capture``: imaging one computer from
automation, as one job.

    dsagent-server deploy  --db F --mac M --image I [--target /dev/vda] [--config C]
                           [--timeout S] [--no-wait]
    dsagent-server capture --db F --mac M --image I [--source /dev/vda] [--config C]
                           [--timeout S] [--no-wait]

The seed's Initial Deployment and "Disk Imaging in Automation" (PROTOCOL.md
§8): the computer (listed on the console, predefined or managed) is set to
``automation`` so that its next PXE boot loads the automation environment;
DeployImage (``image``, ``target``) or CreateImage (``source``, ``image``),
then ``Reboot`` to production, are queued for it, to be pulled once its agent
registers from automation; every PXE server is told and tickled. Then the job
is followed: each status as the server receives it, until Reboot succeeded
(exit 0), a task failed (exit 1, with why) or ``--timeout`` passed (exit 1,
naming what it still waits for). Parameters may hold tokens
(taskserver/tokens.py), replaced for this computer. A capture uploads to the
server's image store with the per-boot credentials the agent got when it
registered (agent/common/config.py ``lend_credentials``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from taskserver.app import tickle_clients
from taskserver.automation import computer_client_id
from taskserver.pxe import PXEStore, normalise_mac
from taskserver.checks import InvalidRequest
from taskserver.store import TaskStore
from taskserver.tokens import expand, facts_of

DEFAULT_TARGET = "/dev/vda"
POLL_S = 0.5




@dataclass(frozen=True)
class Kind:
    """What a job does in automation: its task type, the parameter naming the
    disk, and the words its progress uses."""
    command: str
    task_type: str
    disk_param: str
    done: str


DEPLOY = Kind("deploy", "DeployImage", "target", "deployed")
CAPTURE = Kind("capture", "CreateImage", "source", "captured")


@dataclass
class Job:
    client_id: str
    mac: str
    task_ids: list[str]       # DeployImage or CreateImage, then Reboot
    pxe_servers: list[str]    # told of the automation action
    kind: Kind = DEPLOY


def start(store: TaskStore, mac: str, image: str, disk: str = DEFAULT_TARGET,
          config: str | None = None, kind: Kind = DEPLOY) -> Job:
    """Set ``mac`` to automation and queue its imaging task and Reboot; one
    transaction each (the PXE change first, so the computer boots automation)."""
    pxe = PXEStore(store)
    mac = normalise_mac(mac)
    computer = pxe.computer(mac)
    if computer is None:
        raise InvalidRequest(f"no computer with MAC {mac} is listed: add it first "
                             "(dsagent-server pxe add-computer --mac … --name …)")
    config = config or computer.config or pxe.settings().get("automation_config")
    if not config:
        raise InvalidRequest(f"{mac}: which automation configuration? give --config, or set "
                             "the computer's config or the automation_config setting")
    client_id = computer_client_id(computer)
    facts = facts_of(store.client(client_id), client_id, pxe_name=computer.name, pxe_mac=mac,
                     image=image)
    params = expand({"image": image, kind.disk_param: disk}, facts, client_id)
    sent = pxe.set_action(mac, "automation", config)
    ids = [store.queue_task(client_id, kind.task_type, params),
           store.queue_task(client_id, "Reboot", {"to": "production"})]
    servers = list(sent.tasks)
    tickle_clients(store, servers)
    return Job(client_id, mac, ids, servers, kind)


def follow(store: TaskStore, job: Job, timeout: float, out: TextIO = sys.stdout) -> int:
    """Print each new status of the job's tasks; 0 when all succeeded, 1 otherwise."""
    names = dict(zip(job.task_ids, (job.kind.task_type, "Reboot")))
    shown: set[str] = set()
    deadline = time.monotonic() + timeout
    while True:
        done = 0
        for task_id in job.task_ids:
            for event in store.events(task_id):
                if event["event_id"] in shown:
                    continue
                shown.add(event["event_id"])
                progress = (f" {event['progress']:.0f}%" if event.get("progress") is not None
                            else "")
                print(f"{event['at']}  {job.client_id}  {names[task_id]:<11} "
                      f"{event['state']}{progress}  {event.get('message') or ''}".rstrip(),
                      file=out, flush=True)
                if event["state"] in ("failed", "cancelled"):
                    print(f"{job.kind.command} stopped: {names[task_id]} {event['state']}: "
                          f"{event.get('message') or 'no message'}", file=out, flush=True)
                    return 1
            if store.is_terminal(task_id):
                done += 1
        if done == len(job.task_ids):
            print(f"{job.kind.command} done: {job.client_id} ({job.mac}) {job.kind.done} and "
                  "restarted to production", file=out, flush=True)
            return 0
        if time.monotonic() > deadline:
            waiting = [names[t] for t in job.task_ids if not store.is_terminal(t)]
            print(f"{job.kind.command} not finished after {timeout:g} s: waiting for "
                  f"{', '.join(waiting)} (has {job.client_id} PXE-booted into automation? "
                  "see `dsagent-server pxe servers` and the automation log)", file=out,
                  flush=True)
            return 1
        time.sleep(POLL_S)


def add_commands(sub, command) -> None:
    """The ``deploy`` and ``capture`` subcommands (``command`` is cli.py's parser maker)."""
    for kind, help_, disk_help in (
            (DEPLOY, "deploy an image to a listed computer from automation, then restart it "
             "to production; follow it until done", "the disk to write"),
            (CAPTURE, "capture a listed computer's disk into the image store from automation, "
             "then restart it to production; follow it until done", "the disk to read")):
        p = command(kind.command, help_)
        p.add_argument("--mac", required=True, help="the computer (listed: pxe add-computer)")
        p.add_argument("--image", required=True,
                       help="a capture image in the image store" if kind is DEPLOY else
                       "the name of the image made (a new version if it exists)")
        p.add_argument(f"--{kind.disk_param}", dest="disk", default=DEFAULT_TARGET,
                       help=f"{disk_help}, as the automation environment sees it "
                            f"(default {DEFAULT_TARGET}; tokens allowed)")
        p.add_argument("--config", help="the automation configuration it boots (default: "
                       "the computer's, else the automation_config setting)")
        p.add_argument("--timeout", type=float, default=3600.0, metavar="S",
                       help="stop following after S seconds (default 3600)")
        p.add_argument("--no-wait", action="store_true", help="queue it and return")
        p.set_defaults(func=cmd_job, kind=kind)


def cmd_job(args: argparse.Namespace) -> int:
    with TaskStore(args.db) as store:
        job = start(store, args.mac, args.image, args.disk, args.config, args.kind)
        print(f"{job.client_id} ({job.mac}) set to automation on "
              f"{len(job.pxe_servers)} PXE server(s); queued {job.kind.task_type} "
              f"{job.task_ids[0]}, Reboot {job.task_ids[1]}", flush=True)
        if args.no_wait:
            return 0
        return follow(store, job, args.timeout)
