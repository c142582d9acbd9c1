"""bench/replication.py runs (small sizes): the real handler against curl from
nginx, and a re-replication after one changed file moves only that file."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not installed
from bench import replication  # noqa: E402


def test_the_replication_bench_measures_a_small_package(tmp_path):
    if not os.access(replication.NGINX, os.X_OK) or not shutil.which("curl"):
        pytest.fail("the replication bench needs nginx (nginx-light) and curl: make test "
                    "installs them")
    mib = 1 << 20
    text = replication.section(tmp_path / "w", runs=1, dest=tmp_path / "dest",
                               sizes={"image": 8 * mib, "drivers": 2 * mib, "driver_files": 20})
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert text.startswith(replication.HEADING + "\n")
    assert sum("| only that file's bytes | yes |" in row for row in rows) == 2
    assert not any("problems" in row for row in rows)
