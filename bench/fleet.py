"""``python -m bench fleet [--quick]``: thousands of simulated agents against the reference server.

The fleet simulator, as osquery-perf is for Fleet: the task server runs in
its own process (``TaskServer`` over ``TaskStore``, as ``dsagent-server
serve`` runs it, plus a control pipe for its fault switch, which ``serve``
does not expose), and K shard processes each run N/K agents on one asyncio
loop (bench/fleetagent.py: a tickle listener each on its own 127.x.y.z, pulls,
status posts, the outbox's back-off). The clients are enrolled with
``TaskStore.enroll`` at their listeners' addresses; agents start over a ramp;
all randomness comes from ``random.Random`` seeded with ``--seed`` and the
shard's number (the order of draws still follows the network's timing).

Measured, one after the other on the same fleet:

1. **Steady state**: every agent polling (interval scaled down, ±10 %
   jitter): request rate, pull latency, errors, the server's CPU and threads.
2. **Fan-out**: one task queued for every agent, then ``tickle_clients`` (the
   server's own sender): time until every agent pulled it and until every
   terminal status is stored (the events' ``received_at`` at the server),
   tickle → ``received`` accepted.
3. **Outage and return**: status posts answer 503 from the moment a second
   task is queued and tickled (pulls go on, statuses pile up), then every
   endpoint for the rest of T s; then the server is back: the request rate
   in 1-s bins after the return (the thundering herd, jitter in place),
   time until every status is stored, and whether any event was lost or
   stored twice.

Request times and rates are the agents' own (sent → whole answer read,
connect included), in wall-clock time shared by all processes. Nothing is
asserted.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil

from bench.chain import at_epoch
from bench.fleetagent import (NO_ANSWER, REQUEST_TIMEOUT_S, STATUS, TASKS, TIMED_OUT, AgentSpec,
                              Records, loopback_address, raise_open_files_limit, shard_process)
from bench.report import Conditions, Row, machine_lines, mb, ms, percentile, table
from taskserver.app import TaskServer, tickle_clients
from taskserver.store import TaskStore

HEADING = "## Fleet"
FANOUT_TYPE, OUTAGE_TYPE = "FleetFanout", "FleetOutage"
PULLED_GOAL_S, STORED_GOAL_S, HERD_GOAL = 10.0, 60.0, 3.0   # issue #14, for 10,000 agents
SETTLE_S = 3.0
STATUS_ONLY_S = 2.0        # of the outage: posts refused while pulls go on


@dataclass
class Plan:
    agents: int
    shards: int
    ramp_s: float
    poll_s: float
    steady_s: float
    outage_s: float
    herd_s: float            # how long after the return the rate is watched
    seed: int = 14
    tickle_port: int = 51122

    def mode(self, quick: bool) -> str:
        return (f"{'quick' if quick else 'full'}: {self.agents} agents in {self.shards} shard "
                f"process(es), ramp {self.ramp_s:g} s, poll {self.poll_s:g} s ±10 %, steady "
                f"window {self.steady_s:g} s, outage {self.outage_s:g} s, seed {self.seed}")


QUICK = Plan(agents=500, shards=1, ramp_s=10, poll_s=30, steady_s=20, outage_s=15, herd_s=30)
FULL = Plan(agents=10000, shards=2, ramp_s=30, poll_s=60, steady_s=60, outage_s=60, herd_s=60)


def say(message: str) -> None:
    print(f"[bench fleet {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the server's process --------------------------------------------------------------------

def serve_process(conn, db: str, poll_s: float, log_path: str) -> None:
    """The task server in a process of its own, its stderr to ``log_path``:
    sends its port, then takes ("fault", status, endpoints) until ("stop",)."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    raise_open_files_limit()
    store = TaskStore(db)
    server = TaskServer(store, "127.0.0.1", 0, poll_interval_s=int(poll_s)).start()
    conn.send(server.port)
    while (command := conn.recv())[0] == "fault":
        server.set_fault(command[1], command[2])
    server.stop()
    store.close()


@dataclass
class ServerSample:
    at: float
    cpu_s: float
    rss: int
    threads: int


class ServerWatch(threading.Thread):
    """Samples the server process's CPU time, RSS and thread count every 0.5 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.samples: list[ServerSample] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            try:
                with self.process.oneshot():
                    cpu = self.process.cpu_times()
                    self.samples.append(ServerSample(time.time(), cpu.user + cpu.system,
                                                     self.process.memory_info().rss,
                                                     self.process.num_threads()))
            except psutil.Error:
                return

    def between(self, start: float, end: float) -> tuple[float, int, int]:
        """(cores busy on average, peak RSS, peak threads) over [start, end]."""
        inside = [s for s in self.samples if start <= s.at <= end]
        if len(inside) < 2:
            return 0.0, 0, 0
        busy = (inside[-1].cpu_s - inside[0].cpu_s) / (inside[-1].at - inside[0].at)
        return busy, max(s.rss for s in inside), max(s.threads for s in inside)


# -- the run -----------------------------------------------------------------------------

@dataclass
class Run:
    plan: Plan
    marks: dict[str, float] = field(default_factory=dict)
    records: list[Records] = field(default_factory=list)
    tickles: dict[str, dict[str, int]] = field(default_factory=dict)   # phase -> answer -> n
    stored_at: dict[str, float | None] = field(default_factory=dict)   # phase -> last stored
    integrity: tuple[int, int, int] = (0, 0, 0)    # outage tasks: events, tasks with 1-2-3, tasks
    enroll_s: float = 0.0
    server_errors: dict[str, int] = field(default_factory=dict)   # tracebacks in its stderr
    listen: dict[str, dict[str, int]] = field(default_factory=dict)  # mark -> TCP counters
    watch: ServerWatch | None = None


def run_fleet(plan: Plan, workdir: Path) -> Run:
    workdir.mkdir(parents=True, exist_ok=True)
    db = str(workdir / "fleet.db")
    store = TaskStore(db)
    ctx = multiprocessing.get_context("spawn")
    run, processes, pipes, finished = Run(plan), [], [], False
    try:
        server_pipe, child = ctx.Pipe()
        server = ctx.Process(target=serve_process, daemon=True,
                             args=(child, db, plan.poll_s, str(workdir / "server.log")))
        server.start()
        processes.append(server)
        port = server_pipe.recv()
        run.watch = ServerWatch(server.pid)
        run.watch.start()
        specs = [AgentSpec(f"sim-{i:05d}", loopback_address(i)) for i in range(plan.agents)]
        for index in range(plan.shards):
            pipe, child = ctx.Pipe()
            shard = ctx.Process(target=shard_process, daemon=True, args=(
                child, specs[index::plan.shards], plan.tickle_port, f"{plan.seed}:{index}",
                plan.poll_s))
            shard.start()
            processes.append(shard)
            pipes.append(pipe)
        say(f"{plan.agents} agents in {plan.shards} shard(s): binding tickle listeners")
        creds = enroll(store, specs, pipes, run)
        run.marks["start"] = t0 = time.time() + 1.0
        for index, pipe in enumerate(pipes):
            pipe.send(({s.client_id: creds[s.client_id] for s in specs[index::plan.shards]},
                       "127.0.0.1", port, t0, plan.ramp_s))
        say(f"ramp {plan.ramp_s:g} s, then steady state for {plan.steady_s:g} s")
        sleep_until(t0 + plan.ramp_s + SETTLE_S)
        mark(run, "steady")
        sleep_until(run.marks["steady"] + plan.steady_s)
        mark(run, "steady_end")
        ids = [s.client_id for s in specs]
        fan_out(store, db, ids, run)
        time.sleep(SETTLE_S)
        outage(store, db, ids, server_pipe, run)
        run.integrity = integrity(db, OUTAGE_TYPE)
        for pipe in pipes:
            pipe.send(("stop",))
        run.records = [pipe.recv() for pipe in pipes]
        server_pipe.send(("stop",))
        server.join(10)
        run.server_errors = tracebacks(workdir / "server.log")
        finished = True
    finally:
        if run.watch is not None:
            run.watch.done.set()
        for process in processes:
            process.join(10 if finished else 0)
            if process.is_alive():
                process.terminate()
                process.join(5)
        store.close()
    return run


def enroll(store: TaskStore, specs: list[AgentSpec], pipes, run: Run) -> dict[str, tuple]:
    addrs: dict[str, str] = {}
    for index, pipe in enumerate(pipes):
        kind, answer = pipe.recv()
        if kind != "ready":
            raise RuntimeError(f"shard {index}: {answer}")
        addrs.update(zip((s.client_id for s in specs[index::len(pipes)]), answer))
    began = time.monotonic()
    creds = {}
    for spec in specs:
        enrolled = store.enroll(spec.client_id, tickle_addr=addrs[spec.client_id])
        creds[spec.client_id] = (enrolled["token"], enrolled["tickle_key"])
    run.enroll_s = time.monotonic() - began
    return creds


def tracebacks(log: Path) -> dict[str, int]:
    """How many tracebacks a log holds, by their last line's exception type."""
    counts: dict[str, int] = {}
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    for before, line in zip(lines, lines[1:]):
        if before.startswith(" ") and (found := re.match(r"([\w.]+(?:Error|Exception)): ", line)):
            counts[found.group(1)] = counts.get(found.group(1), 0) + 1
    return counts


def mark(run: Run, name: str) -> None:
    """Note the time (and the kernel's listen-queue counters) a phase began or ended."""
    run.marks[name] = time.time()
    run.listen[name] = listen_counters()


def listen_counters() -> dict[str, int]:
    """The kernel's (machine-wide) counts of SYNs a full listen queue dropped."""
    names = ("ListenOverflows", "ListenDrops", "SyncookiesSent")
    try:
        lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()
                 if line.startswith("TcpExt:")]
        return {name: int(lines[1][lines[0].index(name)]) for name in names}
    except (OSError, IndexError, ValueError):
        return dict.fromkeys(names, 0)


def sleep_until(at: float) -> None:
    if (left := at - time.time()) > 0:
        time.sleep(left)


def queue_and_tickle(store: TaskStore, ids: list[str], task_type: str, run: Run,
                     phase: str) -> None:
    """One task of ``task_type`` for every client, then the server's tickle sender."""
    mark(run, phase + "_queue")
    for client_id in ids:
        store.queue_task(client_id, task_type)
    mark(run, phase)
    answers = tickle_clients(store, ids)
    mark(run, phase + "_tickled")
    counts: dict[str, int] = {}
    for answer in answers.values():
        key = answer if isinstance(answer, str) else "failed: " + str(answer).split(": ")[-1]
        counts[key] = counts.get(key, 0) + 1
    run.tickles[phase] = counts


def fan_out(store: TaskStore, db: str, ids: list[str], run: Run) -> None:
    say(f"fan-out: one task for each of {len(ids)} agents, tickled")
    queue_and_tickle(store, ids, FANOUT_TYPE, run, "fanout")
    run.stored_at["fanout"] = wait_stored(db, FANOUT_TYPE, len(ids), run.marks["fanout"] + 180)
    mark(run, "fanout_stored")


def outage(store: TaskStore, db: str, ids: list[str], server_pipe, run: Run) -> None:
    plan = run.plan
    say(f"outage: status posts 503, a task for each agent, then every endpoint 503 until "
        f"{plan.outage_s:g} s")
    server_pipe.send(("fault", 503, [STATUS]))
    mark(run, "outage")
    queue_and_tickle(store, ids, OUTAGE_TYPE, run, "outage_task")
    sleep_until(run.marks["outage_task_tickled"] + STATUS_ONLY_S)
    server_pipe.send(("fault", 503, None))
    mark(run, "outage_all")
    sleep_until(run.marks["outage"] + plan.outage_s)
    server_pipe.send(("fault", None, None))
    mark(run, "back")
    say(f"server back; watching the return for {plan.herd_s:g} s")
    run.stored_at["outage"] = wait_stored(db, OUTAGE_TYPE, len(ids), run.marks["back"] + 180)
    sleep_until(run.marks["back"] + plan.herd_s)
    mark(run, "end")


def wait_stored(db: str, task_type: str, n: int, deadline: float) -> float | None:
    """When the last of the ``n`` tasks' terminal statuses was stored (its
    ``received_at``), once all are; None if not all by ``deadline``."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        while time.time() < deadline:
            done = conn.execute("SELECT COUNT(*) FROM tasks WHERE type = ? AND terminal_state "
                                "IS NOT NULL", (task_type,)).fetchone()[0]
            if done >= n:
                last = conn.execute(
                    "SELECT MAX(e.received_at) FROM events e JOIN tasks t USING (task_id) "
                    "WHERE t.type = ? AND e.state IN ('succeeded', 'failed')",
                    (task_type,)).fetchone()[0]
                return at_epoch(last)
            time.sleep(0.2)
        return None
    finally:
        conn.close()


def integrity(db: str, task_type: str) -> tuple[int, int, int]:
    """(events stored, tasks whose events are exactly seq 1, 2, 3, tasks) for ``task_type``."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        events = conn.execute("SELECT COUNT(*) FROM events e JOIN tasks t USING (task_id) "
                              "WHERE t.type = ?", (task_type,)).fetchone()[0]
        whole = conn.execute(
            "SELECT COUNT(*) FROM (SELECT t.task_id FROM tasks t JOIN events e USING (task_id) "
            "WHERE t.type = ? GROUP BY t.task_id HAVING COUNT(*) = 3 "
            "AND SUM(e.seq = 1 AND e.state = 'received') = 1 "
            "AND SUM(e.seq = 2 AND e.state = 'running') = 1 "
            "AND SUM(e.seq = 3 AND e.state = 'succeeded') = 1)",
            (task_type,)).fetchone()[0]
        tasks = conn.execute("SELECT COUNT(*) FROM tasks WHERE type = ?",
                             (task_type,)).fetchone()[0]
    finally:
        conn.close()
    return events, whole, tasks


# -- the table -----------------------------------------------------------------------------

def requests_in(run: Run, start: float, end: float, endpoint: str | None = None) -> list[tuple]:
    return [r for rec in run.records for r in rec.requests
            if start <= r[0] < end and (endpoint is None or r[1] == endpoint)]


def p50_p99(values: list[float], unit=ms) -> str:
    if not values:
        return "no samples"
    return f"p50 {unit(percentile(values, 50))} · p99 {unit(percentile(values, 99))}"


def seconds(value: float) -> str:
    return f"{value:.2f} s"


def latency(requests: list[tuple]) -> str:
    return p50_p99([r[2] for r in requests if r[3] == 200])


def errors(requests: list[tuple]) -> str:
    counts: dict[int, int] = {}
    for r in requests:
        if r[3] != 200:
            counts[r[3]] = counts.get(r[3], 0) + 1
    names = {NO_ANSWER: "connection failed", TIMED_OUT: f"no answer in {REQUEST_TIMEOUT_S:g} s"}
    return ", ".join(f"{n} × {names.get(code, code)}"
                     for code, n in sorted(counts.items())) or "no errors"


def per_second(requests: list[tuple], start: float, end: float) -> list[int]:
    bins = [0] * max(1, int(end - start + 0.999))
    for r in requests:
        if start <= r[0] < end:
            bins[int(r[0] - start)] += 1
    return bins


def tasks_between(run: Run, start: float, end: float) -> list[list[float]]:
    """Task records first pulled in [start, end): [tickle at, pulled, received ok, terminal ok]."""
    return [t for rec in run.records for t in rec.tasks.values() if start <= t[1] < end]


def connections(run: Run, start: str, end: str) -> str:
    """Connect times between two marks, and how often a full listen queue dropped a SYN."""
    began, ended = run.marks[start], run.marks[end]
    took = [t for rec in run.records for at, t in rec.connects if began <= at < ended]
    dropped = {name: run.listen[end][name] - run.listen[start][name] for name in run.listen[end]}
    return (f"{len(took)} connects, {p50_p99(took)}, max {ms(max(took, default=0))}; listen "
            f"queue overflows {dropped['ListenOverflows']}, SYN cookies sent "
            f"{dropped['SyncookiesSent']} (machine-wide)")


def server_row(run: Run, start: float, end: float) -> Row:
    busy, rss, threads = run.watch.between(start, end)
    return Row("  ↳ task server process", f"{busy * 100:.0f} % of a core on average, peak RSS "
               f"{mb(rss)}, peak {threads} threads (one per open connection)")


def steady_rows(run: Run) -> tuple[list[Row], float]:
    plan, marks = run.plan, run.marks
    ramp = requests_in(run, marks["start"], marks["start"] + plan.ramp_s)
    steady = requests_in(run, marks["steady"], marks["steady_end"])
    rate = len(steady) / plan.steady_s
    return [
        Row("Fleet", f"{plan.agents} agents in {plan.shards} shard process(es), each on its own "
            f"127.x.y.z; enrolled ({plan.agents} `TaskStore.enroll`) in {run.enroll_s:.1f} s"),
        Row(f"Start ramp ({plan.ramp_s:g} s): first pulls",
            f"{len(ramp)} requests ({len(ramp) / plan.ramp_s:.0f}/s); {latency(ramp)}; "
            f"{errors(ramp)}"),
        Row(f"Steady state ({plan.steady_s:g} s, poll {plan.poll_s:g} s ±10 %): requests served",
            f"{rate:.1f} req/s (offered ≈ {plan.agents / plan.poll_s:.1f}/s); {errors(steady)}"),
        Row("  ↳ pull latency (sent → whole answer, connect included)", latency(steady)),
        server_row(run, marks["steady"], marks["steady_end"]),
    ], rate


def fanout_rows(run: Run) -> list[Row]:
    marks, n = run.marks, run.plan.agents
    t_f, stored = marks["fanout"], run.stored_at["fanout"]
    tasks = tasks_between(run, marks["fanout_queue"], marks["outage"])
    pulled = [t[1] - t_f for t in tasks]
    end = (stored or marks["outage"]) + 1
    window = requests_in(run, t_f, end)
    arrived = [at - t_f for rec in run.records for at, answer in rec.tickles
               if t_f <= at <= marks["fanout_tickled"]]
    stored_s = None if stored is None else stored - t_f
    all_pulled = len(tasks) == n
    return [
        Row(f"Fan-out: `tickle_clients` (16 threads) to {n} agents",
            f"{marks['fanout_tickled'] - t_f:.1f} s; answers {run.tickles['fanout']}"),
        Row(f"Fan-out: all {n} pulled their task (tickling began → last pull)",
            (f"{max(pulled):.1f} s" if all_pulled else f"only {len(tasks)} pulled")
            + f" ({p50_p99(pulled, seconds)}; {sum(p < 0 for p in pulled)} by a poll during "
            "queueing)", f"< {PULLED_GOAL_S:.0f} s", all_pulled and max(pulled) < PULLED_GOAL_S),
        Row(f"Fan-out: all {n} terminal statuses stored (tickling began → last stored)",
            "not all within 180 s" if stored_s is None else f"{stored_s:.1f} s",
            f"< {STORED_GOAL_S:.0f} s", stored_s is not None and stored_s < STORED_GOAL_S),
        Row("  ↳ tickling began → tickle at the agent", p50_p99(arrived, seconds)),
        Row("  ↳ tickle at the agent → `received` accepted by the server",
            p50_p99([t[2] - t[0] for t in tasks if t[0] and t[2]], seconds)),
        Row("  ↳ requests", f"peak {max(per_second(window, t_f, end))}/s; "
            f"pulls {latency([r for r in window if r[1] == TASKS])}; posts "
            f"{latency([r for r in window if r[1] == STATUS])}; {errors(window)}"),
        Row("  ↳ new connections (the server listens with a backlog of 128)",
            connections(run, "fanout", "fanout_stored")),
        server_row(run, t_f, stored or marks["outage"]),
    ]


def outage_rows(run: Run, steady_rate: float) -> list[Row]:
    plan, marks, n = run.plan, run.marks, run.plan.agents
    during = requests_in(run, marks["outage"], marks["back"])
    back, stored = marks["back"], run.stored_at["outage"]
    after = requests_in(run, back, back + plan.herd_s)
    bins = per_second(after, back, back + plan.herd_s)
    mean = len(after) / plan.herd_s
    ratio = mean / steady_rate if steady_rate else float("inf")
    events, whole, tasks = run.integrity
    pulled = len(tasks_between(run, marks["outage_task_queue"], back))
    return [
        Row(f"Outage: {plan.outage_s:g} s of 503 (posts from the second task's queueing, every "
            f"endpoint {STATUS_ONLY_S:g} s after its tickles)",
            f"{len(during)} requests during it ({len(during) / plan.outage_s:.1f}/s: "
            f"{sum(r[1] == TASKS for r in during)} pulls, {sum(r[1] == STATUS for r in during)} "
            f"posts); {pulled} of {n} tasks pulled before every endpoint failed"),
        Row(f"Return: request rate over the first {plan.herd_s:g} s",
            f"mean {mean:.1f}/s = {ratio:.1f}× steady ({steady_rate:.1f}/s); peak 1-s bin "
            f"{max(bins)}/s at +{bins.index(max(bins))} s ({max(bins) / steady_rate:.1f}× steady)"
            if steady_rate else f"mean {mean:.1f}/s", f"mean < {HERD_GOAL:g}× steady",
            ratio < HERD_GOAL),
        Row("  ↳ requests per second after the return, first 20 s", ", ".join(map(str, bins[:20]))),
        Row("  ↳ requests after the return", f"pulls {latency([r for r in after if r[1] == TASKS])};"
            f" posts {latency([r for r in after if r[1] == STATUS])}; {errors(after)}"),
        Row(f"Return: all {n} statuses stored (server back → last stored)",
            "not all within 180 s" if stored is None else f"{stored - back:.1f} s"),
        Row("Nothing lost, nothing stored twice (the outage's tasks)",
            f"{events} events for {tasks} tasks; {whole} tasks with exactly received, running, "
            "succeeded as seq 1, 2, 3", f"{3 * n} events, {n} whole",
            events == 3 * n and whole == tasks == n),
        Row("  ↳ new connections after the return", connections(run, "back", "end")),
        server_row(run, back, back + plan.herd_s),
    ]


def simulator_rows(run: Run) -> list[Row]:
    span = run.marks["end"] - run.marks["start"]
    lag = [x for rec in run.records for x in rec.loop_lag]
    crashes = [c for rec in run.records for c in rec.crashes]
    return [Row("Simulator: CPU by shard, event-loop lag",
                ", ".join(f"{rec.cpu_s / span * 100:.0f} %" for rec in run.records)
                + f" of a core; timer lag {p50_p99(lag)}, max {ms(max(lag, default=0))}; "
                f"{sum(len(rec.connects) for rec in run.records)} connections opened; "
                + (f"{len(crashes)} agent coroutines crashed, e.g. {crashes[0]}" if crashes
                   else "no agent crashed")),
            Row("Task server's stderr", ", ".join(f"{n} tracebacks of {name}" for name, n in
                                                  sorted(run.server_errors.items()))
                or "no tracebacks")]


NOTES = """\
Notes: every agent binds its tickle listener and its outgoing connections
to its own 127.x.y.z, so neither listening ports nor ephemeral ports run
out; every process (shards and server) raises its soft open-files limit to
the hard one. Agents honour `Retry-After` on 503/429 (the server sends one
when it sheds load); the outage's fault switch sends none, so there they
back off exponentially with full jitter: uploads 0.5 s doubling to 60 s,
pulls 2 s doubling to the poll interval, uniform in [0, b]. The agents
speak HTTP/1.1 over asyncio streams, two keep-alive connections each (the
CTA's and the ctdataloader's), closed after 5 s idle: measured while
writing this bench (100 agents × 30 GETs against this server), that costs
~60-70 µs of client CPU per request; httpx costs ~1.6 ms with one
`AsyncClient` per agent and ~3.9 ms with one shared client (100
connections), too much to load the server from the same two cores. The
server runs as `dsagent-server serve` runs it, in its own process (its
stderr to a log whose tracebacks are counted), plus a pipe to its fault
switch. Times come from `time.time()` in each process (one clock);
"stored" is the server's `received_at` of the last terminal event; the
listen-queue counters are /proc/net/netstat's, for the whole machine.
"""


def section(workdir: Path, quick: bool, agents: int | None = None, shards: int | None = None,
            seed: int | None = None) -> str:
    """Run the fleet and return the ``## Fleet`` Markdown section."""
    plan = QUICK if quick else FULL
    plan = replace(plan, agents=agents or plan.agents, shards=shards or plan.shards,
                   seed=plan.seed if seed is None else seed)
    conditions = Conditions()
    run = run_fleet(plan, workdir / "fleet")
    rows, steady_rate = steady_rows(run)
    rows += fanout_rows(run) + outage_rows(run, steady_rate) + simulator_rows(run)
    return "\n".join([HEADING, "", *machine_lines(workdir, plan.mode(quick)), conditions.line(),
                      "", table(rows), "", NOTES])

