"""The agent's writes to its state DB, run under the iolog shim (a child process).

``python -m tests.powercut.workload DB ACK_FD SEED STEPS [--cta-sync S]
[--autocheckpoint N]``: seeded random steps of the CTA's path (tasks received
in groups, then running, progress, one terminal state, each group one
``AgentDB.record_many`` transaction; terminal events re-queued with
``resend_terminal``) interleaved with the ctdataloader's (``Outbox.batch``
oldest first, the "server" accepts all or some, ``Outbox.delete``), with the
project's own classes and settings.

After each call returns, one JSON line goes to ACK_FD (a pipe to the parent;
the shim also logs it, at its exact place among the file operations):
``{"k": "rec", "e": [[event_id, task_id, seq, state], ...]}`` for recorded
(or re-queued) events, ``{"k": "del?", "e": [...]}`` *before* a delete (the
delete may reach the disk without returning), ``{"k": "del", "ids": [...]}``
after it returned.
"""

from __future__ import annotations

import argparse
import json
import os
import random

from agent.common.events import TERMINAL
from agent.cta.taskdb import AgentDB, Change
from agent.common.task import Task
from ctdataloader.outbox import Outbox

NEXT = {"received": ("running", "running", "running", "failed"),
        "running": ("progress", "succeeded", "failed"),
        "progress": ("progress", "succeeded", "timed_out", "cancelled")}


def key(event: dict) -> list:
    return [event["event_id"], event["task_id"], event["seq"], event["state"]]


class Workload:
    def __init__(self, db_path: str, ack_fd: int, rng: random.Random):
        self.db, self.outbox = AgentDB(db_path), Outbox(db_path)
        self.ack_fd, self.rng = ack_fd, rng
        # like a restarted CTA, carry on with the tasks an earlier run left open
        self.state = {tid: state for tid, state, _ in self.db.unfinished()}
        self.terminal: dict[str, dict] = {}
        self.prefix, self.n = f"t{rng.randrange(10**9)}", 0

    def ack(self, kind: str, **fields) -> None:
        os.write(self.ack_fd, (json.dumps({"k": kind, **fields}) + "\n").encode())

    def step(self) -> None:
        rng = self.rng
        active = [t for t, s in self.state.items() if s not in TERMINAL]
        roll = rng.random()
        if roll < 0.2 or not active:
            changes = []
            for _ in range(rng.randint(1, 3)):
                self.n += 1
                tid = f"{self.prefix}-{self.n}"
                changes.append(Change(tid, "received", task=Task(tid, "RunScript",
                                                                 {"script": "echo " + "x" * rng.randint(0, 300)})))
        elif roll < 0.7:
            changes = [self._advance(tid) for tid in rng.sample(active, min(len(active), rng.randint(1, 3)))]
        elif roll < 0.95:
            self._upload()
            return
        else:
            self._resend()
            return
        done = self.db.record_many(changes)
        for change in done:
            self.state[change.task_id] = change.state
            if change.state in TERMINAL:
                self.terminal[change.task_id] = change.event
        self.ack("rec", e=[key(c.event) for c in done])

    def _advance(self, tid: str) -> Change:
        state = self.rng.choice(NEXT[self.state[tid]])
        details = {"stdout_tail": "y" * self.rng.randint(0, 2000)} if state in TERMINAL else None
        return Change(tid, state, progress=self.rng.uniform(0, 100) if state == "progress" else None,
                      details=details)

    def _upload(self) -> None:
        batch = self.outbox.batch(limit=self.rng.randint(1, 40))
        accepted = [e for e in batch if self.rng.random() < 0.9]
        if not accepted:
            return
        self.ack("del?", e=[key(e) for e in accepted])
        self.outbox.delete([e["event_id"] for e in accepted])
        self.ack("del", ids=[e["event_id"] for e in accepted])

    def _resend(self) -> None:
        if not self.terminal:
            return
        tid = self.rng.choice(sorted(self.terminal))
        if self.db.resend_terminal(tid):
            self.ack("rec", e=[key(self.terminal[tid])])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("ack_fd", type=int)
    parser.add_argument("seed", type=int)
    parser.add_argument("steps", type=int)
    parser.add_argument("--cta-sync", default="FULL", choices=("FULL", "NORMAL", "OFF"),
                        help="override the CTA connection's synchronous (negative controls)")
    parser.add_argument("--autocheckpoint", type=int,
                        help="wal_autocheckpoint pages for both connections, to put many "
                             "checkpoints and WAL restarts in a short run")
    args = parser.parse_args(argv)
    work = Workload(args.db, args.ack_fd, random.Random(args.seed))
    if args.cta_sync != "FULL":
        work.db._conn.execute(f"PRAGMA synchronous={args.cta_sync}")
        if args.cta_sync == "OFF":
            work.outbox._conn.execute("PRAGMA synchronous=OFF")
    if args.autocheckpoint:
        for conn in (work.db._conn, work.outbox._conn):
            conn.execute(f"PRAGMA wal_autocheckpoint={args.autocheckpoint}")
    for _ in range(args.steps):
        work.step()
    work.ack("done")
    os._exit(0)   # no close, no final checkpoint: leave the files as a kill would


if __name__ == "__main__":
    main()
