"""``make demo``: the whole chain on loopback, as a newcomer first sees it.

Starts the reference task server and ``dsagent run`` (objecthost, CTA,
ctdataloader) on free loopback ports under ./demo-run, queues a few tasks,
sends one signed tickle, and prints each task's status history as the server
recorded it, then the first task followed through the agent's logs (what
``dsagent logs --task`` shows). Exits 0 only if every task's terminal status
arrived.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from agent.tools.logview import format_record, read_records
from taskserver.cli import format_history
from taskserver.loopback import LoopbackChain

TASKS = [
    ("RunScript", {"script": "echo \"hello from $(hostname)\"; uname -sr"}, None),
    ("RunScript", {"script": "echo 'about to fail' >&2; exit 3"}, None),
    ("RunScript", {"script": "sleep 30"}, 1),  # times out; the script is killed
    ("Example.Echo", {"text": "third-party handler"}, None),
    ("NoSuchTaskType", {"anything": "x"}, None),
]


def main(workdir: str = "demo-run") -> int:
    root = Path(workdir)
    shutil.rmtree(root, ignore_errors=True)
    chain = LoopbackChain(root, client_id="demo-pc")
    print(f"dsagent demo: task server + agent on loopback (files and logs in {root}/)")
    started = time.monotonic()
    try:
        chain.start()
        print(f"  task server   {chain.server.url}")
        print(f"  objecthost    127.0.0.1:{chain.objecthost_port}  (tickles)")
        print(f"  CTA           127.0.0.1:{chain.cta_port}  (wake-ups, loopback only)")
        chain.wait_first_pull()
        ids = [chain.queue(type_, params, timeout) for type_, params, timeout in TASKS]
        print(f"queued {len(ids)} tasks; tickle answer: {chain.tickle()}")
        arrived = chain.wait(ids, timeout=60)
        elapsed = time.monotonic() - started
        print()
        print(format_history([h for h in chain.store.history(chain.client_id)
                              if h["task_id"] in ids], show_client=False))
        print()
        if arrived:
            print(f"all {len(ids)} terminal statuses arrived at the server "
                  f"({elapsed:.1f} s including start-up)")
            _show_task_logs(chain, ids[0])
        else:
            print(f"NOT all statuses arrived; see {chain.log_path}", file=sys.stderr)
        return 0 if arrived else 1
    finally:
        chain.stop()
        print(f"agent log: {chain.log_path}")


def _show_task_logs(chain: LoopbackChain, task_id: str) -> None:
    """The first task across objecthost -> CTA -> worker -> ctdataloader."""
    time.sleep(0.3)  # the uploader logs the server's last answer just after it
    print()
    print(f"the first task in the agent's logs (dsagent logs --config {chain.config_path} "
          f"--task {task_id[:8]}):")
    for record in read_records(chain.workdir / "state" / "logs", task=task_id):
        print("  " + format_record(record))


if __name__ == "__main__":
    sys.exit(main())
