"""The CLI's progress line: drawn on a terminal (a real pseudo-terminal here),
absent when stderr is a pipe, never on stdout."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid

from agent.tools.progressbar import CLEAR, ProgressBar

DSAGENT = [sys.executable, "-m", "agent"]


def run_with_tty_stderr(args: list[str]) -> tuple[int, str, str]:
    """Run ``dsagent ARGS`` with stderr on a pseudo-terminal and stdout piped;
    (exit status, stdout, what the terminal received)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(DSAGENT + args, stdout=subprocess.PIPE, stderr=slave,
                            stdin=subprocess.DEVNULL)
    os.close(slave)
    received = bytearray()
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every copy of the slave side is closed
            break
        if not chunk:
            break
        received += chunk
    os.close(master)
    stdout = proc.stdout.read().decode()
    proc.stdout.close()
    return proc.wait(timeout=120), stdout, received.decode("utf-8", "replace")


def run_piped(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(DSAGENT + args, capture_output=True, text=True, timeout=120)


def assert_no_control(text: str) -> None:
    assert "\r" not in text and "\x1b" not in text


def echo_tasks(tmp_path) -> str:
    path = tmp_path / "tasks.xml"
    path.write_text(f'<ClientTasks><Task id="{uuid.uuid4()}" type="Example.Echo"><Parameters>'
                    '<Parameter name="text">abc</Parameter></Parameters></Task></ClientTasks>')
    return str(path)


def test_bar_draws_only_when_enabled():
    pipe = io.StringIO()
    bar = ProgressBar(pipe)          # a StringIO is not a terminal
    bar.update(42, "copying")
    bar.clear()
    assert pipe.getvalue() == ""
    term = io.StringIO()
    bar = ProgressBar(term, enabled=True)
    bar.update(42, "copying\nblocks", force=True)
    drawn = term.getvalue()
    assert drawn.startswith(CLEAR) and " 42% copying blocks 0:00" in drawn
    assert "\n" not in drawn
    bar.clear()
    assert term.getvalue().endswith(CLEAR)


def test_run_task_json_draws_progress_on_a_terminal_and_keeps_stdout_clean(tmp_path):
    code, stdout, terminal = run_with_tty_stderr(["run-task", echo_tasks(tmp_path), "--json"])
    assert code == 0
    events = [json.loads(line) for line in stdout.splitlines()]
    assert [e["state"] for e in events] == ["received", "running", "progress", "succeeded"]
    assert_no_control(stdout)
    assert "\r" in terminal and " 50% Example.Echo half way" in terminal
    assert terminal.endswith(CLEAR)  # the line is erased at the end


def test_run_task_piped_has_no_control_characters(tmp_path):
    result = run_piped(["run-task", echo_tasks(tmp_path), "--json"])
    assert result.returncode == 0
    assert len(result.stdout.splitlines()) == 4
    assert_no_control(result.stdout + result.stderr)


def test_doctor_and_enroll_show_their_steps_on_a_terminal(tmp_path, server):
    config = str(tmp_path / "agent.toml")
    code, stdout, terminal = run_with_tty_stderr(
        ["enroll", "--server", server.url, "--key", "let-me-in", "--config", config,
         "--state-dir", str(tmp_path / "state")])
    assert code == 0
    assert "registering with " + server.url in terminal and "\r" in terminal
    assert_no_control(stdout)

    code, stdout, terminal = run_with_tty_stderr(["doctor", "--config", config, "--json"])
    assert json.loads(stdout)["checks"][0]["name"] == "config"
    assert "check 1 of 12: config" in terminal and "check 12 of 12: handlers" in terminal
    assert_no_control(stdout)

    result = run_piped(["doctor", "--config", config])
    assert_no_control(result.stdout + result.stderr)


def test_run_task_of_an_imaging_task_draws_its_progress(tmp_path):
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as fh:  # a disk file with data in 1 MiB runs among holes
        for mib in range(0, 64, 2):
            fh.seek(mib << 20)
            fh.write(os.urandom(1 << 20))
    (tmp_path / "images").mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(f'[handlers]\nimage_store = "{tmp_path / "images"}"\n')
    tasks = tmp_path / "tasks.xml"
    tasks.write_text(f'<ClientTasks><Task id="{uuid.uuid4()}" type="CreateImage"><Parameters>'
                     f'<Parameter name="source">{disk}</Parameter>'
                     '<Parameter name="image">golden</Parameter></Parameters></Task></ClientTasks>')
    code, stdout, terminal = run_with_tty_stderr(
        ["run-task", str(tasks), "--config", str(config), "--json"])
    assert code == 0, stdout
    events = [json.loads(line) for line in stdout.splitlines()]
    assert events[-1]["state"] == "succeeded"
    assert any(e["state"] == "progress" for e in events)
    assert_no_control(stdout)
    assert "CreateImage" in terminal and "MiB" in terminal and "%" in terminal
