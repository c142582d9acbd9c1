"""The dsagent reference task server: PROTOCOL.md §3 over SQLite, standard library only.

    from taskserver import TaskStore, TaskServer
    store = TaskStore("server.db")
    server = TaskServer(store, enrollment_key="k").start()   # server.url
    creds = store.enroll("pc-0042", tickle_addr="127.0.0.1:50122")
    task_id = store.queue_task("pc-0042", "RunScript", {"script": "echo hi"})
    server.tickle("pc-0042")                                 # "OK"
    store.wait_terminal([task_id], timeout=30)

Command line: ``dsagent-server`` / ``python -m taskserver`` (see taskserver.cli).
"""

from taskserver.app import TaskServer, TickleFailed, tickle_client
from taskserver.checks import (
    STATES,
    TERMINAL_STATES,
    InvalidRequest,
    RegistrationRefused,
    StoreError,
    UnknownClient,
)
from taskserver.store import TaskStore

__all__ = [
    "STATES", "TERMINAL_STATES", "InvalidRequest", "RegistrationRefused", "StoreError",
    "TaskServer", "TaskStore", "TickleFailed", "UnknownClient", "tickle_client",
]
