"""Power-cut safety of the state DB (issue #5): the outbox and the task states
survive an abrupt stop at any write, with the unsynced writes dropped.

A SIGKILL keeps the page cache, so it cannot show this. Here the agent's own
code (tests/powercut/workload.py) runs under an LD_PRELOAD shim that logs
every file operation in the state dir (iolog.c); crash states are rebuilt from
the log with only what was fsync'd plus any subset of the rest, torn at 512-byte
sectors (crashsim.py, model in its docstring); each is opened with
agent.cta.taskdb and checked against what the workload was told (harness.py).
The model and the figures: docs/reliability.md, "Power cut". Seed in the
output (DSAGENT_POWERCUT_SEED=... replays it); bench/powercut.py runs more.
"""

import os
import random
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.powercut from the root

from tests.powercut import harness  # noqa: E402
from tests.powercut.crashsim import OPEN, SYNC, WRITE, Disk, Op  # noqa: E402

SEED = int(os.environ.get("DSAGENT_POWERCUT_SEED") or random.randrange(1 << 30))


def show(capsys, what: str, tally: harness.Tally) -> None:
    with capsys.disabled():
        print(f"\npower cut, {what}, DSAGENT_POWERCUT_SEED={SEED}: {tally.states} crash states "
              f"from {tally.ops} logged ops ({tally.killed}/{tally.runs} runs killed): "
              f"{tally.lost} lost acknowledged facts, {tally.corrupt} corrupt, "
              f"{tally.inconsistent} inconsistent, {tally.stuck} could not carry on, "
              f"{tally.resent} with deleted events to re-send")


def test_wal_full_loses_nothing_acknowledged(tmp_path, capsys):
    """As shipped (CTA synchronous=FULL, ctdataloader NORMAL): from a new state
    dir, from an existing DB with checkpoints and WAL restarts every few commits,
    and a long run past SQLite's own 1000-page checkpoint."""
    runs = [{"steps": 400},
            {"steps": 400, "prefill": 200, "autocheckpoint": 30},
            {"steps": 1500}]
    tally = harness.campaign(runs, points=50, seed=SEED, workdir=tmp_path)
    show(capsys, "synchronous=FULL", tally)
    assert tally.states >= 700 and tally.killed >= 1
    assert (tally.lost, tally.corrupt, tally.inconsistent, tally.stuck) == (0, 0, 0, 0), \
        tally.examples


def test_the_test_catches_lost_commits(tmp_path, capsys):
    """Negative controls: the same workload with fsyncs that do not happen must be
    caught losing acknowledged events. NORMAL (in WAL mode: no fsync at commit)
    loses the last commits but stays consistent; OFF and a shim that drops every
    fsync lose them too."""
    for what, spec in (("synchronous=NORMAL", {"cta_sync": "NORMAL"}),
                       ("synchronous=OFF", {"cta_sync": "OFF", "autocheckpoint": 30}),
                       ("fsyncs dropped by the shim", {"drop_sync": True})):
        tally = harness.campaign([{"steps": 300, **spec}], points=12, seed=SEED, workdir=tmp_path)
        show(capsys, what, tally)
        assert tally.lost > 0, (what, tally)
        if what == "synchronous=NORMAL":
            assert tally.corrupt == 0, tally.examples


def test_crash_model_keeps_only_what_was_synced():
    """The model itself: a synced write survives every crash state; a later one
    may be missing or torn at a sector; a name needs a directory fsync."""
    disk = Disk({})
    disk.apply(Op(OPEN, ino=1, off=1))                      # the directory
    disk.apply(Op(OPEN, ino=7, path="f"))
    disk.apply(Op(WRITE, ino=7, off=0, data=b"a" * 1024))
    disk.apply(Op(SYNC, ino=7))
    assert disk.crash(random.Random(0), "none") == {}       # name not durable yet
    assert disk.crash(random.Random(0), "all") == {"f": b"a" * 1024}
    disk.apply(Op(SYNC, ino=1))
    disk.apply(Op(WRITE, ino=7, off=0, data=b"b" * 1024))
    assert disk.crash(random.Random(0), "none") == {"f": b"a" * 1024}
    assert disk.crash(random.Random(0), "all") == {"f": b"b" * 1024}
    seen = {disk.crash(random.Random(i), "subset")["f"] for i in range(64)}
    assert seen == {b"a" * 1024, b"b" * 1024, b"a" * 512 + b"b" * 512, b"b" * 512 + b"a" * 512}


def test_no_compiler_is_an_error_not_a_pass(tmp_path, monkeypatch):
    """Without cc the campaign cannot run: it must fail, saying how to fix it."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(harness.ToolMissing, match="ensure-system-tools.sh"):
        harness.campaign([{"steps": 1}], points=1, seed=SEED, workdir=tmp_path)
