"""Measurements of the whole chain: task server -> objecthost -> CTA -> worker
-> outbox -> ctdataloader -> task server, all on loopback.

All times are wall-clock ``time.time()`` on one machine, so timestamps taken
here, in the agent's processes (event ``at``, RFC 3339 with milliseconds,
truncated) and inside a handler (``date +%s.%N``) can be compared directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil

from taskserver.loopback import LoopbackChain

# The objecthost's token bucket refills 50 tickles/s; stay below it so no
# sample is an `ERR busy` retry.
MIN_TICKLE_GAP_S = 0.025
AGENT_CHILDREN = ("objecthost", "cta", "ctdataloader")


def at_epoch(at: str) -> float:
    """An event's RFC 3339 ``at`` as a Unix timestamp."""
    return datetime.fromisoformat(at.replace("Z", "+00:00").replace("z", "+00:00")).timestamp()


def start_chain(workdir: Path, max_concurrent_tasks: int) -> LoopbackChain:
    chain = LoopbackChain(workdir, max_concurrent_tasks=max_concurrent_tasks)
    chain.start()
    return chain


def warm_up(chain: LoopbackChain, n: int = 6) -> None:
    """Run a few tasks (a batch, then one at a time) so workers are started and warm."""
    ids = [chain.queue("RunScript", {"script": "true"}) for _ in range(n)]
    _tickle(chain)
    if not chain.wait(ids, 60):
        raise RuntimeError(f"warm-up tasks did not finish; see {chain.log_path}")
    for _ in range(3):
        task = chain.queue("RunScript", {"script": "true"})
        _tickle(chain)
        if not chain.wait([task], 30):
            raise RuntimeError(f"warm-up task did not finish; see {chain.log_path}")
        time.sleep(MIN_TICKLE_GAP_S)


_last_tickle = 0.0


def _tickle(chain: LoopbackChain) -> tuple[float, float, int]:
    """Tickle (paced, retried on ``busy``); return (t_before, t_answered, busy_count)."""
    global _last_tickle
    busy = 0
    while True:
        gap = _last_tickle + MIN_TICKLE_GAP_S - time.monotonic()
        if gap > 0:
            time.sleep(gap)
        _last_tickle = time.monotonic()
        t0 = time.time()
        answer = chain.tickle()
        t1 = time.time()
        if answer == "OK":
            return t0, t1, busy
        if answer == "ERR busy" and busy < 20:
            busy += 1
            time.sleep(0.1)
            continue
        raise RuntimeError(f"tickle refused: {answer}")


@dataclass
class LatencyResult:
    n: int = 0
    busy: int = 0
    lost: int = 0
    tickle_ok: list[float] = field(default_factory=list)     # answer of the objecthost
    received: list[float] = field(default_factory=list)      # `received` at - t0
    running: list[float] = field(default_factory=list)       # `running` at - t0   (a)
    handler: list[float] = field(default_factory=list)       # date in script - t0 (b)
    validate: list[float] = field(default_factory=list)      # running at - received at
    go_to_sh: list[float] = field(default_factory=list)      # handler date - running at
    terminal_at: list[float] = field(default_factory=list)   # terminal `at` - t0
    at_server: list[float] = field(default_factory=list)     # terminal seen at server - t0


def tickle_latency(chain: LoopbackChain, n: int, scratch: Path) -> LatencyResult:
    """One task, one tickle, wait for its end; ``n`` times, sequentially."""
    scratch.mkdir(parents=True, exist_ok=True)
    result = LatencyResult(n=n)
    for i in range(n):
        stamp = scratch / f"handler-{i}.txt"
        task = chain.queue("RunScript", {"script": f"date +%s.%N > {stamp}"})
        t0, t_ok, busy = _tickle(chain)
        result.busy += busy
        if not chain.wait([task], 30):
            result.lost += 1
            continue
        t_done = time.time()
        events = {e["state"]: e for e in chain.events(task)}
        if "running" not in events or "succeeded" not in events or not stamp.exists():
            result.lost += 1
            continue
        received = at_epoch(events["received"]["at"])
        running = at_epoch(events["running"]["at"])
        handler = float(stamp.read_text().strip())
        result.tickle_ok.append(t_ok - t0)
        result.received.append(received - t0)
        result.running.append(running - t0)
        result.handler.append(handler - t0)
        result.validate.append(running - received)
        result.go_to_sh.append(handler - running)
        result.terminal_at.append(at_epoch(events["succeeded"]["at"]) - t0)
        result.at_server.append(t_done - t0)
    return result


@dataclass
class ThroughputResult:
    n: int
    concurrency: int
    queue_s: float = 0.0
    elapsed_s: float = 0.0
    done: int = 0
    succeeded: int = 0
    first_received_s: float = 0.0   # first `received` at - tickle
    last_received_s: float = 0.0    # last `received` at - tickle (end of the pull)
    last_terminal_s: float = 0.0    # last terminal `at` - tickle (CTA finished)
    cpu_s: dict[str, float] = field(default_factory=dict)   # CPU used during the run, by process

    @property
    def rate(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s else 0.0


def throughput(chain: LoopbackChain, n: int, timeout: float) -> ThroughputResult:
    """Queue ``n`` no-op RunScript tasks, one tickle, time until all are terminal at the server."""
    result = ThroughputResult(n, chain.max_concurrent_tasks)
    q0 = time.perf_counter()
    ids = [chain.store.queue_task(chain.client_id, "RunScript", {"script": "true"})
           for _ in range(n)]
    result.queue_s = time.perf_counter() - q0
    before = _cpu_snapshot(chain)
    t0, _, _ = _tickle(chain)
    p0 = time.perf_counter()
    all_done = chain.wait(ids, timeout)
    result.elapsed_s = time.perf_counter() - p0
    after = _cpu_snapshot(chain)
    result.cpu_s = {name: after[name] - before.get(name, 0.0) for name in after}
    wanted = set(ids)
    history = [t for t in chain.store.history(chain.client_id) if t["task_id"] in wanted]
    received, terminal = [], []
    for task in history:
        for event in task["events"]:
            if event["state"] == "received":
                received.append(at_epoch(event["at"]))
            elif event["state"] in ("succeeded", "failed", "cancelled", "timed_out"):
                terminal.append(at_epoch(event["at"]))
        result.done += task["state"] in ("succeeded", "failed", "cancelled", "timed_out")
        result.succeeded += task["state"] == "succeeded"
    if not all_done:
        result.elapsed_s = timeout
    if received:
        result.first_received_s = min(received) - t0
        result.last_received_s = max(received) - t0
    if terminal:
        result.last_terminal_s = max(terminal) - t0
    return result


@dataclass
class ProcInfo:
    name: str
    pid: int
    rss: int
    uss: int
    pss: int
    cpu_s: float = 0.0   # user+system over the idle window


@dataclass
class IdleResult:
    agents: list[ProcInfo]
    workers: list[ProcInfo]
    supervisor: ProcInfo | None
    window_s: float


def _procs(chain: LoopbackChain) -> tuple[list[tuple[str, psutil.Process]],
                                          list[tuple[str, psutil.Process]],
                                          psutil.Process | None]:
    agents = []
    for name in AGENT_CHILDREN:
        proc = chain.child(name)
        if proc is None:
            raise RuntimeError(f"agent child {name} is not running; see {chain.log_path}")
        agents.append((name, proc))
    cta = dict(agents)["cta"]
    workers = [(f"worker {p.pid}", p) for p in cta.children()]
    supervisor = psutil.Process(chain.agent.pid) if chain.agent else None
    return agents, workers, supervisor


def _info(name: str, proc: psutil.Process) -> ProcInfo:
    mem = proc.memory_full_info()
    return ProcInfo(name, proc.pid, mem.rss, mem.uss, getattr(mem, "pss", 0))


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def _cpu_snapshot(chain: LoopbackChain) -> dict[str, float]:
    """CPU seconds so far, by role; workers include the scripts they ran (reaped children)."""
    agents, workers, supervisor = _procs(chain)
    snap = {name: _cpu(proc) for name, proc in agents}
    snap["workers (+ their sh)"] = 0.0
    for _, proc in workers:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        snap["workers (+ their sh)"] += t.user + t.system + t.children_user + t.children_system
    me = psutil.Process().cpu_times()
    snap["task server + bench"] = me.user + me.system
    return snap


def memory(chain: LoopbackChain) -> tuple[int, int]:
    """(RSS, USS) of objecthost + CTA + ctdataloader now."""
    agents, _, _ = _procs(chain)
    infos = [_info(name, proc) for name, proc in agents]
    return sum(i.rss for i in infos), sum(i.uss for i in infos)


def idle(chain: LoopbackChain, settle_s: float = 3.0, window_s: float = 5.0) -> IdleResult:
    """Memory after ``settle_s`` idle, then CPU used over ``window_s`` more."""
    time.sleep(settle_s)
    agents, workers, supervisor = _procs(chain)
    everyone = agents + workers + ([("supervisor", supervisor)] if supervisor else [])
    infos = {proc.pid: _info(name, proc) for name, proc in everyone}
    before = {proc.pid: _cpu(proc) for _, proc in everyone}
    time.sleep(window_s)
    for _, proc in everyone:
        infos[proc.pid].cpu_s = _cpu(proc) - before[proc.pid]
    return IdleResult(
        agents=[infos[p.pid] for _, p in agents],
        workers=[infos[p.pid] for _, p in workers],
        supervisor=infos[supervisor.pid] if supervisor else None,
        window_s=window_s)
