"""The Client Task Agent (``python -m agent.cta --config FILE``).

Wakes on a signed wake-up from the objecthost (127.0.0.1 only) or on its
poll timer, pulls the pending tasks, records each new one durably as
``received`` and runs it in a worker, ``max_concurrent_tasks`` at a time.

- Wake-ups that arrive during a pull fold into one more pull.
- A pull is paged (§3 v1.1): ``[cta] pull_batch`` tasks in at most
  MAX_DOCUMENT_BYTES; on ``more="true"`` the next page is pulled once this
  page's statuses are at the server (it lists a task until it has one), so a
  page never repeats the last. An ``oversize`` task goes received -> failed.
- Back-off (§3): a failed pull is retried after an exponential delay with
  full jitter (a tickle still pulls, at most once a second); a 503/429 with
  ``Retry-After`` is obeyed to the second (plus jitter), tickles or not. The
  poll timer is jittered (±10 %). A pull that works tells the uploader,
  which ends its back-off only if it had not reached the server at all.
- A task id already known is never run again: a running one is skipped, a
  finished one has its terminal event re-sent with its original event_id.
- On start, tasks a previous CTA received but never started are run; tasks it
  had started are reported ``failed`` (interrupted), never run twice.
- serve() = startup -> main loop -> shutdown (signals in the main thread);
  shutdown stops pulling and drains running tasks, cancelling what is left
  after the grace period.
- A Reboot task starts only once every task received before it has ended.
  Once its ``succeeded`` is committed, the CTA starts no new task and writes
  the reboot request ``dsagent run`` acts on (agent/cta/reboot.py).
"""

from __future__ import annotations

import logging
import random
import selectors
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait as futures_wait
from typing import Any

from agent.common.config import Config, parse_hostport
from agent.common.errors import (ConfigError, DsagentError, ServerBusy, ServerError,
                                 TaskDocumentError, TickleRefused)
from agent.common.events import TERMINAL
from agent.common.logsetup import task_context
from agent.common import process
from agent.common.statusfile import StatusFile
from agent.common.notify import SERVER_BACK, Notifier
from agent.cta import reboot
from agent.cta.runner import execute, fail_unrun
from agent.common.serverapi import ServerAPI, is_loopback_host
from agent.common.statedb import db_path
from agent.cta.taskdb import AgentDB, Change
from agent.common.taskxml import MAX_DOCUMENT_BYTES, parse_client_tasks
from agent.common.task import Task
from agent.common.tickle import MAX_LINE, ReplayCache, check_wake, load_hop_key
from agent.cta.workerpool import WorkerPool
from ctdataloader.recorder import OutboxRecorder

log = logging.getLogger("dsagent.cta")

SHUTDOWN_GRACE_S = 10.0
TICKLE_PULL_GAP_S = 1.0   # while backing off, tickles still pull, at most once a second
RETRY_MIN_S = 2.0         # the first failed pull's back-off bound (doubling to the poll interval)
POLL_JITTER = 0.2         # each poll fires within +0..20 % of its slot: ±10 % around the middle
PAGE_ACK_WAIT_S = 30.0    # for a page's statuses to reach the server before the next page
PAGES_PER_PULL = 100      # pages pulled one after another at most, per wake-up
SKIPPED_LOG_LINES = 20   # per pulled document; the rest are counted
PRUNE_AFTER_S = 7 * 24 * 3600


class CTA:
    def __init__(self, config: Config):
        self.config = config
        creds = config.credentials()
        if creds is None:
            raise ConfigError(f"{config.path}: no client_id/token/tickle_key and no "
                              f"registration in {config.state_dir}; run `dsagent run` to register")
        self.client_id = creds.client_id
        self.listen = parse_hostport(config.get("cta", "listen"), "[cta] listen")
        if not is_loopback_host(self.listen[0]):
            raise ConfigError(f"{config.path}: [cta] listen must be a loopback address, "
                              f"got {self.listen[0]}")
        self.poll_interval = config.get("cta", "poll_interval_s")
        self.max_tasks = config.get("cta", "max_concurrent_tasks")
        self.pull_batch = config.get("cta", "pull_batch")
        self.api = ServerAPI(config.get("agent", "server_url"), creds.client_id, creds.token)
        self.db = AgentDB(db_path(config.state_dir))
        self.notifier = Notifier(config.state_dir)
        self.status = StatusFile(config.state_dir, "cta")
        self.stopping = threading.Event()   # cancel running tasks
        self.recorder = OutboxRecorder(self.db, self.notifier, self.stopping)
        self.pool = WorkerPool(self.max_tasks)
        # twice as many threads as handler slots: a thread committing a finished
        # task's terminal event does not hold up the next task (the pool caps
        # running handlers at max_concurrent_tasks)
        self.executor = ThreadPoolExecutor(2 * self.max_tasks, thread_name_prefix="task")
        self.hop_key = load_hop_key(config.state_dir, create=True)
        self.draining = threading.Event()   # start no new task
        self.wake_event = threading.Event()
        self._tickled = threading.Event()   # a wake-up other than the timers since the last pull
        self._last_pull = 0.0
        self._woken_by: tuple[str, str | None] = ("start", None)   # (why, tickle nonce)
        self.running: dict[str, Any] = {}
        self._retry_at = 0.0
        self._retry_delay = 0.0
        self._obey_retry_after = False     # _retry_at came from Retry-After: tickles wait too
        self.scheduler = None
        self.listener: socket.socket | None = None
        self.port = self.listen[1]

    # ---- startup ---------------------------------------------------------
    def startup(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self.listener = socket.create_server(self.listen, backlog=64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept_wakeups, name="wake-listener", daemon=True).start()
        self.pool.prestart()  # from the main thread: workers die with the thread that made them
        self._recover()
        self.scheduler = BackgroundScheduler(daemon=True)
        self.scheduler.add_job(self.wake, "interval", seconds=self.poll_interval,
                               jitter=max(1, round(POLL_JITTER * self.poll_interval)),
                               args=("poll timer",), id="poll")
        self.scheduler.add_job(self._prune, "interval", hours=6, id="prune")
        self.scheduler.start()
        threading.Thread(target=self._pull_loop, name="puller", daemon=True).start()
        self.wake("startup")
        log.info("CTA listening on %s:%d, polling every %d s, %d task(s) at a time",
                 self.listen[0], self.port, self.poll_interval, self.max_tasks)

    def _recover(self) -> None:
        for task_id, state, task in self.db.unfinished():
            if state == "received" and task is not None:
                log.info("task %s was received before a restart and never started; running it",
                         task_id)
                self._submit(task)
            else:
                with task_context(task_id):
                    log.warning("task %s was %s when the agent stopped; reporting it failed",
                                task_id, state)
                    self.db.record(task_id, "failed", message="interrupted: the agent stopped "
                                   f"while the task was {state}; it was not restarted")
        self.notifier.notify()

    def _prune(self) -> None:
        removed = self.db.prune(PRUNE_AFTER_S)
        if removed:
            log.info("forgot %d finished task(s) older than %d days", removed, PRUNE_AFTER_S // 86400)

    # ---- wake-ups --------------------------------------------------------
    def wake(self, why: str = "", tickle: str | None = None) -> None:
        """Pull soon; ``tickle`` is the nonce of the tickle behind a wake-up."""
        if why and why != "poll timer":
            log.debug("wake-up: %s", why)
        if why not in ("poll timer", "retry"):
            self._tickled.set()
        if why:  # the next pull's log lines say what caused it
            self._woken_by = (why, tickle)
        self.wake_event.set()

    def _accept_wakeups(self) -> None:
        """Serve wake-up connections in this one thread (no thread per connection).

        Each connection may send one line within 2 s; at most 64 are open at once.
        """
        cache = ReplayCache()
        sel = selectors.DefaultSelector()
        self.listener.setblocking(False)
        sel.register(self.listener, selectors.EVENT_READ)
        pending: dict[socket.socket, tuple[bytearray, float]] = {}
        while not self.stopping.is_set():
            try:
                ready = sel.select(timeout=1.0 if pending else None)
            except (OSError, ValueError):
                return  # listener closed at shutdown
            for key, _ in ready:
                if key.fileobj is self.listener:
                    self._accept_one(sel, pending)
                else:
                    self._read_wakeup(key.fileobj, sel, pending, cache)
            now = time.monotonic()
            for conn in [c for c, (_, deadline) in pending.items() if deadline < now]:
                self._close_wakeup(conn, sel, pending)

    def _accept_one(self, sel, pending) -> None:
        try:
            conn, peer = self.listener.accept()
        except OSError:
            return
        if not is_loopback_host(peer[0]) or len(pending) >= 64:
            conn.close()
            return
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ)
        pending[conn] = (bytearray(), time.monotonic() + 2.0)

    def _read_wakeup(self, conn, sel, pending, cache: ReplayCache) -> None:
        data = pending[conn][0]
        try:
            chunk = conn.recv(MAX_LINE + 1 - len(data))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        data += chunk
        if chunk and not data.endswith(b"\n") and len(data) <= MAX_LINE:
            return  # wait for the rest of the line
        answer = b""
        if data:  # an empty connection is a port probe: nothing to answer
            try:
                nonce = check_wake(bytes(data), self.hop_key, cache)
                self.wake(f"tickle {nonce}", tickle=nonce)
                answer = b"OK\n"
            except TickleRefused as exc:
                log.warning("refused a wake-up on the CTA port: %s", exc)
                answer = f"ERR {exc.code}\n".encode()
        try:
            conn.send(answer)
        except OSError:
            pass
        self._close_wakeup(conn, sel, pending)

    @staticmethod
    def _close_wakeup(conn, sel, pending) -> None:
        sel.unregister(conn)
        pending.pop(conn, None)
        conn.close()

    # ---- pulling ---------------------------------------------------------
    def _pull_loop(self) -> None:
        while not self.stopping.is_set():
            self.wake_event.wait()
            self._back_off()
            if self.stopping.is_set():
                return
            self.wake_event.clear()
            self._tickled.clear()
            self._last_pull = time.monotonic()
            woken_by, self._woken_by = self._woken_by, ("poll timer", None)
            try:
                self.pull_once(*woken_by)
                # the server answers: an uploader backing off because it could not
                # reach it need not wait on (one refused by /status itself does:
                # ctdataloader/uploader.py)
                self.notifier.notify(SERVER_BACK)
                self._retry_delay = self._retry_at = 0.0
                self._obey_retry_after = False
                self.status.update(last_pull_ok_at=time.time())
            except ServerBusy as exc:
                self._pull_failed(exc, exc.retry_after)
            except (ServerError, TaskDocumentError) as exc:
                self._pull_failed(exc, None)
            except Exception:
                log.exception("unexpected error while pulling tasks")
                self._schedule_retry(self.poll_interval)

    def _pull_failed(self, exc: DsagentError, retry_after: float | None) -> None:
        """Schedule the retry: ``Retry-After`` (plus up to 10 % jitter) when the
        server gave one, else exponential back-off with full jitter."""
        if retry_after is not None:
            delay = retry_after + random.uniform(0, max(1.0, 0.1 * retry_after))
            self._obey_retry_after = True
        else:
            self._retry_delay = min(max(2 * self._retry_delay, RETRY_MIN_S), self.poll_interval)
            delay = random.uniform(0, self._retry_delay)
            self._obey_retry_after = False
        log.error("pull failed: %s; retrying in %.1f s%s", exc, delay,
                  " (as the server asked)" if retry_after is not None else "")
        self.status.update(last_pull_error={"at": time.time(), "message": str(exc)})
        self._schedule_retry(delay)

    def _back_off(self) -> None:
        """After a failed pull, wait for the retry time: poll-timer wake-ups fold
        into the retry; a tickle still pulls within TICKLE_PULL_GAP_S (§2: the
        CTA pulls within 1 s of an accepted tickle), never more often, except
        while the server's Retry-After runs: then tickles wait for it too."""
        while not self.stopping.is_set():
            not_before = self._retry_at
            if self._tickled.is_set() and not self._obey_retry_after:
                not_before = min(not_before, self._last_pull + TICKLE_PULL_GAP_S)
            wait = not_before - time.monotonic()
            if wait <= 0:
                return
            # woken early by a tickle (or by shutdown, which sets _tickled too)
            (self.stopping if self._tickled.is_set() else self._tickled).wait(wait)

    def _schedule_retry(self, delay: float) -> None:
        """Pull again in ``delay`` s, not sooner (one retry pending, never a pile)."""
        self._retry_at = time.monotonic() + delay
        self.wake_event.set()

    def pull_once(self, why: str = "", tickle: str | None = None) -> None:
        """Pull page after page while the server has more (module docstring)."""
        for page in range(1, PAGES_PER_PULL + 1):
            document = parse_client_tasks(
                self.api.get_tasks(MAX_DOCUMENT_BYTES, self.pull_batch), self.client_id)
            changes = self._take(document, why, tickle)
            if not document.more:
                return
            if not changes:
                log.warning("the server says it has more tasks but listed none new; the rest "
                            "come with the next poll or tickle")
                return
            if not self._at_server(changes):
                log.warning("the server has more tasks; this page's statuses are not at the "
                            "server after %.0f s, so the next page waits for the next poll "
                            "or tickle", PAGE_ACK_WAIT_S)
                return
            why, tickle = f"page {page} said more", None
        log.warning("pulled %d pages in a row and the server still has more; going on at the "
                    "next poll or tickle", PAGES_PER_PULL)

    def _at_server(self, changes: list[Change]) -> bool:
        """Wait until the ctdataloader has delivered these events (or give up)."""
        ids = [c.event["event_id"] for c in changes]
        deadline = time.monotonic() + PAGE_ACK_WAIT_S
        while self.db.waiting(ids):
            if self.stopping.is_set() or time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _take(self, document, why: str, tickle: str | None) -> list[Change]:
        """Record and start the new tasks of one page; the changes recorded."""
        for message in document.skipped[:SKIPPED_LOG_LINES]:
            log.warning("task document: %s", message)
        if len(document.skipped) > SKIPPED_LOG_LINES:
            log.warning("task document: %d more problem(s) like these not logged",
                        len(document.skipped) - SKIPPED_LOG_LINES)
        changes: list[Change] = []
        for bad in document.rejected:
            if not self._known(bad.task_id):
                log.error("task %s refused: %s", bad.task_id, bad.message,
                          extra={"task_id": bad.task_id})
                changes += [Change(bad.task_id, "received", bad.type or "?"),
                            Change(bad.task_id, "failed", message=bad.message)]
        new = [task for task in document.tasks if not self._known(task.id)]
        for task in new:
            changes.append(Change(task.id, "received", task.type, task))
        if not changes:
            return changes
        # One fsync for the whole pull; workers start validating meanwhile
        # (validation has no side effects; `running` is queued after these).
        self.db.enqueue(changes)
        for task in new:
            self._submit(task)
        self.db.wait(changes)
        for change in changes:
            log.info("task %s%s %s%s", change.task_id,
                     f" ({change.type_name})" if change.type_name else "", change.state,
                     f" (pulled after {why})" if why and change.state == "received" else "",
                     extra={"task_id": change.task_id, "event_id": change.event["event_id"],
                            "tickle": tickle if change.state == "received" else None})
        self.notifier.notify()
        return changes

    def _known(self, task_id: str) -> bool:
        """True if this task id was seen before (and re-send its end if it ended)."""
        state = self.db.state_of(task_id)
        if state is None:
            return False
        if state in TERMINAL and self.db.resend_terminal(task_id):
            log.info("task %s listed again; re-sending its %s status", task_id, state)
            self.notifier.notify()
        return True

    def _submit(self, task: Task) -> None:
        run = execute
        if task.type == reboot.TASK_TYPE and self.running:
            # A Reboot ends what was queued before it (DeployImage, then Reboot): it
            # starts only once every task received before it has ended, never beside
            # one, and not at all if one of them failed: a computer whose deploy
            # failed stays where it is (in automation), its PXE answer unchanged.
            earlier = dict(self.running)
            log.info("task %s (Reboot) starts once the %d task(s) received before it have "
                     "ended", task.id, len(earlier), extra={"task_id": task.id})

            def run(*args):
                futures_wait(earlier.values())
                ended = {tid: ("failed" if f.exception() else f.result())
                         for tid, f in earlier.items()}
                bad = [f"{tid} ({state})" for tid, state in ended.items()
                       if state not in ("succeeded", "received")]
                if bad:
                    return fail_unrun(task, self.recorder, "not restarting: task(s) received "
                                      "before this Reboot did not succeed: " + ", ".join(bad))
                return execute(*args)
        future = self.executor.submit(run, task, self.pool, self.recorder,
                                      self.config.handlers, self.draining, self.stopping)
        self.running[task.id] = future
        future.add_done_callback(lambda f, t=task: self._done(f, t))

    def _done(self, future, task: Task) -> None:
        task_id = task.id
        self.running.pop(task_id, None)
        if future.cancelled():
            return
        if future.exception() is None:
            if task.type == reboot.TASK_TYPE and future.result() == "succeeded":
                self._request_reboot(task)
            return
        with task_context(task_id):  # never silent: the task may be stuck until a restart
            log.error("task %s: unexpected error; the task stays as recorded until the "
                      "agent restarts", task_id, exc_info=future.exception())

    def _request_reboot(self, task: Task) -> None:
        """A Reboot succeeded (its event committed): no new task starts, and the
        supervisor is asked to restart the machine once every status is accepted."""
        self.draining.set()
        to = task.parameters.get("to", "")
        with task_context(task.id):
            try:
                path = reboot.write_request(self.config.state_dir, task.id, to)
            except (OSError, ValueError) as exc:
                log.error("task %s: cannot ask for the reboot to %s: %s; the machine is not "
                          "restarted", task.id, to, exc)
                return
            log.info("reboot to %s requested by task %s (%s): no new task starts; dsagent run "
                     "restarts the machine once every status has reached the server",
                     to, task.id, path)
        self.notifier.notify()

    # ---- shutdown --------------------------------------------------------
    def shutdown(self) -> None:
        log.info("CTA shutting down; %d task(s) running or queued", len(self.running))
        self.draining.set()
        if self.scheduler:
            self.scheduler.shutdown(wait=False)
        if self.listener:
            self.listener.close()
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stopping.set()
        self._tickled.set()
        self.wake_event.set()
        self.executor.shutdown(wait=True, cancel_futures=False)
        self.pool.close()
        self.api.close()
        self.db.close()
        self.status.close()
        log.info("CTA stopped")

    def serve(self) -> None:
        """startup -> main loop (until SIGTERM/SIGINT) -> shutdown."""
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        self.startup()
        try:
            while not stop.wait(1.0):
                pass
        finally:
            self.shutdown()


def main(argv: list[str] | None = None) -> int:
    try:
        cta = CTA(process.start("cta", argv, "dsagent-cta"))   # logging set up for its workers too
    except DsagentError as exc:
        log.error("%s", exc)
        return 2
    cta.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
