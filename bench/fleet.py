"""``python -m bench fleet [--quick] [--server builtin|asgi|both]``: thousands of
simulated agents against the reference task servers, side by side.

The fleet simulator, as osquery-perf is for Fleet. Each server runs as
``dsagent-server serve`` runs it (bench/fleetservers.py): ``builtin`` on an
SQLite file (``http.server``, one process), ``asgi`` on a PostgreSQL cluster
the bench starts (uvicorn, ``--workers`` processes); one after the other,
never at once, on the same fleet with the same seed. K shard processes each
run N/K agents on one asyncio loop (bench/fleetagent.py: a tickle listener
each on its own 127.x.y.z, pulls, status posts, the outbox's back-off). The
clients are enrolled with ``TaskStore.enroll`` at their listeners'
addresses; agents start over a ramp; all randomness comes from
``random.Random`` seeded with ``--seed`` and the shard's number (the order of
draws still follows the network's timing). Completion is read through
``TaskStore.db.read`` (one aggregate query per poll), the same SQL on both
engines.

Measured, one after the other on the same fleet:

1. **Steady state**: every agent polling (interval scaled down, ±10 %
   jitter): request rate, pull latency, errors, the server's CPU.
2. **Fan-out**: one task queued for every agent, then ``tickle_clients`` (the
   server's own sender): time until every agent pulled it and until every
   terminal status is stored (the events' ``received_at`` at the server),
   tickle → ``received`` accepted.
3. **Outage and return**: a second task for every agent, tickled; ``lead_s``
   after the tickling began the server is stopped (SIGTERM) for ``outage_s``
   and started again on the same port. The task "runs" ``lead_s`` + 3 s, so
   every agent that pulled it before the stop holds its terminal status
   until the server is back. Then: the request rate in 1-s bins after the
   return (the thundering herd, jitter in place), time until every status
   is stored, and whether any event was lost or stored twice.

Request times and rates are the agents' own (sent → whole answer read,
connect included), in wall-clock time shared by all processes. Nothing is
asserted.
"""

from __future__ import annotations

import multiprocessing
import re
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.chain import at_epoch
from bench.fleetagent import (NO_ANSWER, REQUEST_TIMEOUT_S, RUN_PARAM, STATUS, TASKS,
                              TIMED_OUT, AgentSpec, Records, loopback_address,
                              raise_open_files_limit, shard_process)
from bench.fleetservers import SERVERS, ServerProcess, TreeWatch, database
from bench.report import Conditions, Row, machine_lines, mb, ms, percentile
from taskserver.app import tickle_clients
from taskserver.store import TaskStore

HEADING = "## Fleet"
FANOUT_TYPE, OUTAGE_TYPE = "FleetFanout", "FleetOutage"
# the bench's own targets for 10,000 agents (issue #14 sets none): what a console user
# would call "at once", and a return no harsher than 3x the steady load
PULLED_GOAL_S, STORED_GOAL_S, HERD_GOAL = 10.0, 60.0, 3.0
SETTLE_S = 3.0
HOLD_S = 3.0               # the outage's task runs this much past the stop
STORED_WAIT_S = 180.0


@dataclass
class Plan:
    agents: int
    shards: int
    ramp_s: float
    poll_s: float
    steady_s: float
    lead_s: float            # the outage's tickling began → the server stopped
    outage_s: float
    herd_s: float            # how long after the return the rate is watched
    seed: int = 14
    workers: int = 2         # uvicorn's, for asgi
    tickle_port: int = 51122

    def mode(self, quick: bool, servers: tuple[str, ...]) -> str:
        return (f"{'quick' if quick else 'full'}: {' then '.join(servers)}; {self.agents} agents "
                f"in {self.shards} shard process(es), ramp {self.ramp_s:g} s, poll "
                f"{self.poll_s:g} s ±10 %, steady window {self.steady_s:g} s, outage "
                f"{self.outage_s:g} s, seed {self.seed}")


QUICK = Plan(agents=500, shards=1, ramp_s=10, poll_s=30, steady_s=15, lead_s=5, outage_s=15,
             herd_s=30)
FULL = Plan(agents=10000, shards=2, ramp_s=30, poll_s=60, steady_s=60, lead_s=10, outage_s=60,
            herd_s=60)


def say(message: str) -> None:
    print(f"[bench fleet {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the run -----------------------------------------------------------------------------

@dataclass
class Run:
    plan: Plan
    server: str                                    # builtin or asgi
    engine: str = ""
    marks: dict[str, float] = field(default_factory=dict)
    records: list[Records] = field(default_factory=list)
    tickles: dict[str, dict[str, int]] = field(default_factory=dict)   # phase -> answer -> n
    stored_at: dict[str, float | None] = field(default_factory=dict)   # phase -> last stored
    integrity: tuple[int, int, int] = (0, 0, 0)    # outage tasks: events, tasks with 1-2-3, tasks
    enroll_s: float = 0.0
    server_errors: dict[str, int] = field(default_factory=dict)   # tracebacks in its stderr
    listen: dict[str, dict[str, int]] = field(default_factory=dict)  # mark -> TCP counters
    watch: TreeWatch | None = None


def run_fleet(plan: Plan, workdir: Path, kind: str) -> Run:
    """The three phases against server ``kind`` (builtin or asgi) on a new database."""
    workdir.mkdir(parents=True, exist_ok=True)
    raise_open_files_limit()            # inherited by the server: a socket per connection
    ctx = multiprocessing.get_context("spawn")
    run, processes, pipes, finished = Run(plan, kind), [], [], False
    with database(kind, workdir) as db:
        run.engine = db.engine
        store = TaskStore(db.target)
        server = ServerProcess(db.target, workdir / "server.log", plan.poll_s,
                               plan.workers if kind == "asgi" else None)
        run.watch = TreeWatch(lambda: {"server": [server.pid], "postgres": [db.postmaster]})
        try:
            say(f"{kind}: starting `dsagent-server serve` on {db.engine}")
            server.start()
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
                           "127.0.0.1", server.port, t0, plan.ramp_s))
            say(f"ramp {plan.ramp_s:g} s, then steady state for {plan.steady_s:g} s")
            sleep_until(t0 + plan.ramp_s + SETTLE_S)
            mark(run, "steady")
            sleep_until(run.marks["steady"] + plan.steady_s)
            mark(run, "steady_end")
            ids = [s.client_id for s in specs]
            fan_out(store, ids, run)
            time.sleep(SETTLE_S)
            outage(store, server, ids, run)
            run.integrity = integrity(store, OUTAGE_TYPE)
            for pipe in pipes:
                pipe.send(("stop",))
            run.records = [pipe.recv() for pipe in pipes]
            finished = True
        finally:
            run.watch.done.set()
            server.stop()
            for process in processes:
                process.join(10 if finished else 0)
                if process.is_alive():
                    process.terminate()
                    process.join(5)
            store.close()
    run.server_errors = tracebacks(workdir / "server.log")
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


def queue(store: TaskStore, ids: list[str], task_type: str, run: Run, phase: str,
          params: dict[str, str] | None = None) -> None:
    """One task of ``task_type`` for every client."""
    mark(run, phase + "_queue")
    for client_id in ids:
        store.queue_task(client_id, task_type, params)
    mark(run, phase)


def tickle(store: TaskStore, ids: list[str], run: Run, phase: str) -> None:
    """The server's tickle sender to every client; its answers counted."""
    answers = tickle_clients(store, ids)
    mark(run, phase + "_tickled")
    counts: dict[str, int] = {}
    for answer in answers.values():
        key = answer if isinstance(answer, str) else "failed: " + str(answer).split(": ")[-1]
        counts[key] = counts.get(key, 0) + 1
    run.tickles[phase] = counts


def fan_out(store: TaskStore, ids: list[str], run: Run) -> None:
    say(f"fan-out: one task for each of {len(ids)} agents, tickled")
    queue(store, ids, FANOUT_TYPE, run, "fanout")
    tickle(store, ids, run, "fanout")
    run.stored_at["fanout"] = wait_stored(store, FANOUT_TYPE, len(ids),
                                          run.marks["fanout"] + STORED_WAIT_S)
    mark(run, "fanout_stored")


def outage(store: TaskStore, server: ServerProcess, ids: list[str], run: Run) -> None:
    plan = run.plan
    say(f"outage: a task for each agent, tickled; the server stopped {plan.lead_s:g} s later "
        f"for {plan.outage_s:g} s")
    queue(store, ids, OUTAGE_TYPE, run, "outage", {RUN_PARAM: f"{plan.lead_s + HOLD_S:g}"})
    tickler = threading.Thread(target=tickle, args=(store, ids, run, "outage"), daemon=True)
    tickler.start()
    sleep_until(run.marks["outage"] + plan.lead_s)
    mark(run, "down")
    server.stop()
    mark(run, "stopped")
    sleep_until(run.marks["down"] + plan.outage_s)
    mark(run, "restart")
    server.start()
    mark(run, "back")
    say(f"server back; watching the return for {plan.herd_s:g} s")
    run.stored_at["outage"] = wait_stored(store, OUTAGE_TYPE, len(ids),
                                          run.marks["back"] + STORED_WAIT_S)
    sleep_until(run.marks["back"] + plan.herd_s)
    tickler.join()
    mark(run, "end")


def wait_stored(store: TaskStore, task_type: str, n: int, deadline: float) -> float | None:
    """When the last of the ``n`` tasks' terminal statuses was stored (its
    ``received_at``), once all are; None if not all by ``deadline``. One
    aggregate query per poll, in SQL both engines take."""
    while time.time() < deadline:
        done = store.db.read("SELECT COUNT(*) FROM tasks WHERE type = ? AND terminal_state "
                             "IS NOT NULL", (task_type,))[0][0]
        if done >= n:
            last = store.db.read(
                "SELECT MAX(e.received_at) FROM events e JOIN tasks t ON t.task_id = e.task_id "
                "WHERE t.type = ? AND e.state IN ('succeeded', 'failed')", (task_type,))[0][0]
            return at_epoch(last)
        time.sleep(0.2)
    return None


def integrity(store: TaskStore, task_type: str) -> tuple[int, int, int]:
    """(events stored, tasks whose events are exactly seq 1, 2, 3, tasks) for ``task_type``."""
    def one(sql: str) -> int:
        return int(store.db.read(sql, (task_type,))[0][0])

    def exactly(seq: int, state: str) -> str:
        return f"SUM(CASE WHEN e.seq = {seq} AND e.state = '{state}' THEN 1 ELSE 0 END) = 1"

    return (one("SELECT COUNT(*) FROM events e JOIN tasks t ON t.task_id = e.task_id "
                "WHERE t.type = ?"),
            one("SELECT COUNT(*) FROM (SELECT t.task_id FROM tasks t JOIN events e ON "
                "e.task_id = t.task_id WHERE t.type = ? GROUP BY t.task_id HAVING COUNT(*) = 3 "
                f"AND {exactly(1, 'received')} AND {exactly(2, 'running')} AND "
                f"{exactly(3, 'succeeded')}) whole"),
            one("SELECT COUNT(*) FROM tasks WHERE type = ?"))


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


def server_rows(run: Run, start: float, end: float) -> list[Row]:
    """The server's processes (uvicorn's workers summed), and PostgreSQL's."""
    busy, rss, threads = run.watch.between("server", start, end)
    pg_busy = run.watch.between("postgres", start, end)[0]
    return [Row("  ↳ task server process(es): CPU, peak RSS and threads (summed over "
                "uvicorn's workers)", f"{busy * 100:.0f} % of a core on average, peak RSS "
                f"{mb(rss)}, peak {threads} threads"),
            Row("  ↳ PostgreSQL processes: CPU", f"{pg_busy * 100:.0f} % of a core on average"
                if run.server == "asgi" else "none (SQLite runs in the server's process)")]


def steady_rows(run: Run) -> tuple[list[Row], float]:
    plan, marks = run.plan, run.marks
    ramp = requests_in(run, marks["start"], marks["start"] + plan.ramp_s)
    steady = requests_in(run, marks["steady"], marks["steady_end"])
    rate = len(steady) / plan.steady_s
    return [
        Row(f"Fleet: {plan.agents} agents in {plan.shards} shard process(es), each on its own "
            f"127.x.y.z; enrolled with `TaskStore.enroll`", f"enrolled in {run.enroll_s:.1f} s"),
        Row(f"Start ramp ({plan.ramp_s:g} s): first pulls",
            f"{len(ramp)} requests ({len(ramp) / plan.ramp_s:.0f}/s); {latency(ramp)}; "
            f"{errors(ramp)}"),
        Row(f"Steady state ({plan.steady_s:g} s, poll {plan.poll_s:g} s ±10 %, offered ≈ "
            f"{plan.agents / plan.poll_s:.1f} req/s): requests served",
            f"{rate:.1f} req/s; {errors(steady)}"),
        Row("  ↳ pull latency (sent → whole answer, connect included)", latency(steady)),
        *server_rows(run, marks["steady"], marks["steady_end"]),
    ], rate


def fanout_rows(run: Run) -> list[Row]:
    marks, n = run.marks, run.plan.agents
    t_f, stored = marks["fanout"], run.stored_at["fanout"]
    tasks = tasks_between(run, marks["fanout_queue"], marks["outage_queue"])
    pulled = [t[1] - t_f for t in tasks]
    end = (stored or marks["outage_queue"]) + 1
    window = requests_in(run, t_f, end)
    arrived = [at - t_f for rec in run.records for at, answer in rec.tickles
               if t_f <= at <= marks["fanout_tickled"]]
    stored_s = None if stored is None else stored - t_f
    all_pulled = len(tasks) == n
    return [
        Row(f"Fan-out: {n} tasks queued (`TaskStore.queue_task`)",
            f"{t_f - marks['fanout_queue']:.1f} s"),
        Row(f"Fan-out: `tickle_clients` (16 threads) to {n} agents",
            f"{marks['fanout_tickled'] - t_f:.1f} s; answers {run.tickles['fanout']}"),
        Row(f"Fan-out: all {n} pulled their task (tickling began → last pull)",
            (f"{max(pulled):.1f} s" if all_pulled else f"only {len(tasks)} pulled")
            + f" ({p50_p99(pulled, seconds)}; {sum(p < 0 for p in pulled)} by a poll during "
            "queueing)", f"< {PULLED_GOAL_S:.0f} s", all_pulled and max(pulled) < PULLED_GOAL_S),
        Row(f"Fan-out: all {n} terminal statuses stored (tickling began → last stored)",
            f"not all within {STORED_WAIT_S:g} s" if stored_s is None else f"{stored_s:.1f} s",
            f"< {STORED_GOAL_S:.0f} s", stored_s is not None and stored_s < STORED_GOAL_S),
        Row("  ↳ tickling began → tickle at the agent", p50_p99(arrived, seconds)),
        Row("  ↳ tickle at the agent → `received` accepted by the server",
            p50_p99([t[2] - t[0] for t in tasks if t[0] and t[2]], seconds)),
        Row("  ↳ requests", f"peak {max(per_second(window, t_f, end))}/s; "
            f"pulls {latency([r for r in window if r[1] == TASKS])}; posts "
            f"{latency([r for r in window if r[1] == STATUS])}; {errors(window)}"),
        Row("  ↳ new connections (listen backlog: builtin 4096, uvicorn 2048)",
            connections(run, "fanout", "fanout_stored")),
        *server_rows(run, t_f, stored or marks["outage_queue"]),
    ]


def outage_rows(run: Run, steady_rate: float) -> list[Row]:
    plan, marks, n = run.plan, run.marks, run.plan.agents
    down, back, stored = marks["down"], marks["back"], run.stored_at["outage"]
    during = requests_in(run, down, back)
    after = requests_in(run, back, back + plan.herd_s)
    bins = per_second(after, back, back + plan.herd_s)
    mean = len(after) / plan.herd_s
    ratio = mean / steady_rate if steady_rate else float("inf")
    events, whole, tasks = run.integrity
    pulled = len(tasks_between(run, marks["outage_queue"], down))
    return [
        Row(f"Outage: a task for every agent, tickled; {plan.lead_s:g} s later the server "
            f"stopped (SIGTERM), started again on its port {plan.outage_s:g} s after that",
            f"{pulled} of {n} tasks pulled before the stop; stopping took "
            f"{marks['stopped'] - down:.1f} s, the new server answered "
            f"{back - marks['restart']:.1f} s after its start; tickles {run.tickles['outage']}"),
        Row("  ↳ requests while it was down", f"{len(during)} ({len(during) / (back - down):.1f}"
            f"/s: {sum(r[1] == TASKS for r in during)} pulls, "
            f"{sum(r[1] == STATUS for r in during)} posts); {errors(during)}"),
        Row(f"Return: request rate over the first {plan.herd_s:g} s",
            f"mean {mean:.1f}/s = {ratio:.1f}× steady ({steady_rate:.1f}/s); peak 1-s bin "
            f"{max(bins)}/s at +{bins.index(max(bins))} s ({max(bins) / steady_rate:.1f}× steady)"
            if steady_rate else f"mean {mean:.1f}/s", f"mean < {HERD_GOAL:g}× steady",
            ratio < HERD_GOAL),
        Row("  ↳ requests per second after the return, first 20 s", ", ".join(map(str, bins[:20]))),
        Row("  ↳ requests after the return", f"pulls {latency([r for r in after if r[1] == TASKS])};"
            f" posts {latency([r for r in after if r[1] == STATUS])}; {errors(after)}"),
        Row(f"Return: all {n} statuses stored (server answering → last stored; a task pulled "
            f"after the return runs {plan.lead_s + HOLD_S:g} s)",
            f"not all within {STORED_WAIT_S:g} s" if stored is None else f"{stored - back:.1f} s"),
        Row("Nothing lost, nothing stored twice (the outage's tasks)",
            f"{events} events for {tasks} tasks; {whole} with exactly received, running, "
            "succeeded as seq 1, 2, 3", f"{3 * n} events, {n} whole",
            events == 3 * n and whole == tasks == n),
        Row("  ↳ new connections after the return", connections(run, "back", "end")),
        *server_rows(run, back, back + plan.herd_s),
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


def rows_of(run: Run) -> list[Row]:
    rows, steady_rate = steady_rows(run)
    return rows + fanout_rows(run) + outage_rows(run, steady_rate) + simulator_rows(run)


def side_by_side(runs: list[Run]) -> str:
    """One row per measure, a result column per server; Met in the columns' order."""
    names = [f"{r.server}: {r.engine}, " + ("http.server, 1 process" if r.server == "builtin"
                                            else f"uvicorn, {r.plan.workers} workers")
             for r in runs]
    lines = ["| " + " | ".join(["Measure", *names, "Goal", "Met"]) + " |",
             "|" + "|".join(["---"] * (len(runs) + 3)) + "|"]
    for rows in zip(*map(rows_of, runs)):
        if len({row.measure for row in rows}) != 1:
            raise AssertionError(f"rows out of step: {[row.measure for row in rows]}")
        met = " / ".join(row.cells()[3] for row in rows) if rows[0].met is not None else "—"
        cells = [rows[0].measure, *(row.result for row in rows), rows[0].goal, met]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


NOTES = """\
Notes: both servers run as `dsagent-server serve` runs them, each in a
subprocess (its stderr to a log whose tracebacks are counted), one after
the other on the same fleet and seed: `builtin` on an SQLite file (WAL,
`synchronous=NORMAL`), `asgi` with `--workers` uvicorn processes on a
PostgreSQL cluster the bench starts with tests/pgcluster.py (`fsync`,
`synchronous_commit` and `full_page_writes` off, as in the tests: neither
engine waits on the disk here; uvicorn with its pure-Python h11 parser and
asyncio's loop, as `pip install dsagent` brings it, without httptools or
uvloop). Server CPU is each process's own user +
system time, summed over the server's process tree (uvicorn's supervisor
and workers) and over the postmaster's; sampled every 0.5 s. The outage is
a real one, the same for both servers: the process is stopped with SIGTERM
(as systemd stops it), its port refuses connections, and a new process is
started on the same port; agents see their kept-alive connections closed,
then connection refused. It replaces the built-in server's fault switch
(503 on status posts while pulls go on), which the ASGI server does not
have; tests/test_fleet_sim.py covers that case (`Retry-After`, per-endpoint
back-off). Every agent binds its tickle listener and its outgoing
connections to its own 127.x.y.z, so neither listening ports nor ephemeral
ports run out; every process raises its soft open-files limit to the hard
one. Agents honour `Retry-After` on 503/429 (both servers send one when
they shed load, 64 requests at once per process); otherwise they back off
exponentially with full jitter: uploads 0.5 s doubling to 60 s, pulls 2 s
doubling to the poll interval, uniform in [0, b]. The agents speak
HTTP/1.1 over asyncio streams, two keep-alive connections each (the CTA's
and the ctdataloader's), closed after 5 s idle: measured while writing
this bench (100 agents × 30 GETs against the built-in server), that costs
~60-70 µs of client CPU per request; httpx costs ~1.6 ms with one
`AsyncClient` per agent and ~3.9 ms with one shared client (100
connections), too much to load the server from the same two cores. Times
come from `time.time()` in each process (one clock); "stored" is the
server's `received_at` of the last terminal event; the listen-queue
counters are /proc/net/netstat's, for the whole machine.
"""


def section(workdir: Path, quick: bool, agents: int | None = None, shards: int | None = None,
            seed: int | None = None, server: str = "both", workers: int | None = None) -> str:
    """Run the fleet against ``server`` (builtin, asgi or both) and return the
    ``## Fleet`` Markdown section."""
    plan = QUICK if quick else FULL
    plan = replace(plan, agents=agents or plan.agents, shards=shards or plan.shards,
                   seed=plan.seed if seed is None else seed, workers=workers or plan.workers)
    kinds = SERVERS if server == "both" else (server,)
    conditions = Conditions()
    runs = [run_fleet(plan, workdir / f"fleet-{kind}", kind) for kind in kinds]
    return "\n".join([HEADING, "", *machine_lines(workdir, plan.mode(quick, kinds)),
                      conditions.line(), "", side_by_side(runs), "", NOTES])
