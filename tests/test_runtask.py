"""`dsagent run-task`: the real dispatch through worker processes, no server.

Covers PROTOCOL.md §5 exit codes, RunScript details, timeouts that kill the
whole process tree, a crashing handler contained, and the --json event format.
"""

import json
import subprocess
import sys
import uuid

import psutil

DSAGENT = [sys.executable, "-m", "agent"]


def task(type_, params=None, timeout=None, task_id=None):
    params = params or {}
    t = f' timeout="{timeout}"' if timeout else ""
    ps = "".join(f'<Parameter name="{k}"><![CDATA[{v}]]></Parameter>' for k, v in params.items())
    return f'<Task id="{task_id or uuid.uuid4()}" type="{type_}"{t}><Parameters>{ps}</Parameters></Task>'


def run_task(tmp_path, *tasks, extra=(), doc=None):
    path = tmp_path / "tasks.xml"
    path.write_text(doc if doc is not None else f"<ClientTasks>{''.join(tasks)}</ClientTasks>")
    result = subprocess.run(DSAGENT + ["run-task", str(path), "--json", *extra],
                            capture_output=True, text=True, timeout=120)
    events = [json.loads(line) for line in result.stdout.splitlines()]
    return result, events


def states(events, task_id=None):
    return [e["state"] for e in events if task_id in (None, e["task_id"])]


def test_runscript_succeeds_with_details_and_event_shape(tmp_path):
    result, events = run_task(tmp_path, task("RunScript", {"script": "echo out; echo err >&2"}))
    assert result.returncode == 0, result.stderr
    assert states(events) == ["received", "running", "succeeded"]
    assert [e["seq"] for e in events] == [1, 2, 3]
    final = events[-1]
    assert final["details"] == {"exit_code": 0, "stdout_tail": "out\n", "stderr_tail": "err\n"}
    assert set(final) == {"event_id", "task_id", "seq", "state", "progress", "message", "details", "at"}
    assert final["at"].endswith("Z")
    assert len({e["event_id"] for e in events}) == 3


def test_nonzero_exit_fails_and_tail_is_last_4k(tmp_path):
    script = "head -c 10000 /dev/zero | tr '\\0' a; echo END; exit 3"
    result, events = run_task(tmp_path, task("RunScript", {"script": script}))
    assert result.returncode == 1
    final = events[-1]
    assert final["state"] == "failed" and "code 3" in final["message"]
    assert final["details"]["exit_code"] == 3
    assert len(final["details"]["stdout_tail"]) == 4096
    assert final["details"]["stdout_tail"].endswith("aEND\n")


def test_bad_parameters_and_unknown_type_fail_before_running(tmp_path):
    cases = {  # task id -> (task, the message its failed event must carry)
        str(uuid.uuid4()): (("RunScript", {"script": "true", "colour": "red"}),
                            "unknown parameter 'colour' (RunScript takes script, interpreter)"),
        str(uuid.uuid4()): (("NoSuchType", None), "unknown task type 'NoSuchType'"),
        str(uuid.uuid4()): (("RunScript", {"script": "true", "interpreter": "bin/sh"}),
                            "parameter 'interpreter' must be an absolute path, got 'bin/sh'"),
        str(uuid.uuid4()): (("RunScript", {"interpreter": "/bin/sh"}),
                            "parameter 'script' is missing"),
        str(uuid.uuid4()): (("RunScript", {"script": " \n "}), "parameter 'script' is empty"),
    }
    result, events = run_task(tmp_path, *(task(*args, task_id=task_id)
                                          for task_id, (args, _) in cases.items()))
    assert result.returncode == 1
    for task_id, (_, message) in cases.items():
        assert states(events, task_id) == ["received", "failed"]
        final = [e for e in events if e["task_id"] == task_id][-1]
        assert message in final["message"], final


def test_run_script_disabled_by_config(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[handlers]\nrun_script = false\n")
    result, events = run_task(tmp_path, task("RunScript", {"script": "true"}),
                              extra=["--config", str(config)])
    assert result.returncode == 1
    assert "disabled on this machine" in events[-1]["message"]


def test_timeout_kills_whole_process_tree(tmp_path):
    marker = uuid.uuid4().hex
    # a background child, a grandchild in a subshell, and the script itself
    script = (f"sh -c 'sleep 300; : {marker}' & (sh -c 'sleep 301; : {marker}' &) ; "
              f"sh -c 'sleep 302; : {marker}'")
    result, events = run_task(tmp_path, task("RunScript", {"script": script}, timeout=1))
    assert states(events) == ["received", "running", "timed_out"]
    assert "timed out after 1 s" in events[-1]["message"]
    assert result.returncode == 1
    left = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    assert left == []


def test_crashing_handler_is_contained_and_next_task_runs(tmp_path):
    crash, echo = str(uuid.uuid4()), str(uuid.uuid4())
    result, events = run_task(tmp_path, task("Example.Crash", task_id=crash),
                              task("Example.Echo", {"text": "abc"}, task_id=echo))
    assert states(events, crash) == ["received", "running", "failed"]
    assert "killed by signal 9" in [e for e in events if e["task_id"] == crash][-1]["message"]
    assert states(events, echo) == ["received", "running", "progress", "succeeded"]
    assert events[-1]["details"] == {"reversed": "cba"}
    assert [e for e in events if e["state"] == "progress"][0]["progress"] == 50


def test_cancel_hook_stops_handler_on_timeout(tmp_path):
    result, events = run_task(tmp_path, task("Example.Sleep", {"seconds": "30"}, timeout=1))
    assert states(events) == ["received", "running", "timed_out"]


def test_unreadable_document_or_config_exit_2(tmp_path):
    result, events = run_task(tmp_path, doc="<ClientTasks><Task")
    assert result.returncode == 2 and "not well-formed" in result.stderr and events == []
    config = tmp_path / "bad.toml"
    config.write_text("[handlers]\nsbs_dirr = '/x'\n")
    result, _ = run_task(tmp_path, task("RunScript", {"script": "true"}),
                         extra=["--config", str(config)])
    assert result.returncode == 2 and "unknown key 'sbs_dirr'" in result.stderr
    missing = subprocess.run(DSAGENT + ["run-task", str(tmp_path / "none.xml")],
                             capture_output=True, text=True)
    assert missing.returncode == 2


def test_the_pull_limits_apply_to_a_task_document(tmp_path):
    """Over 16 MiB (a pulled page's limit) the document is refused whole, before it
    is read into memory; an ``oversize`` stand-in fails that task by name."""
    big = task("RunScript", {"script": "true\n#" + "x" * (16 * 2**20)})
    result, events = run_task(tmp_path, big)
    assert result.returncode == 2 and events == []
    assert "is over 16,777,216 bytes, the most a task document may hold" in result.stderr
    stand_in = f'<Task id="{uuid.uuid4()}" type="RunScript" oversize="20000000"/>'
    result, events = run_task(tmp_path, stand_in, task("RunScript", {"script": "true"}))
    assert result.returncode == 1 and states(events) == ["received", "failed", "received",
                                                          "running", "succeeded"]
    assert "the task is 20,000,000 bytes" in events[1]["message"]


def test_leftover_and_escaped_processes_are_killed(tmp_path):
    marker = uuid.uuid4().hex
    script = (f"sh -c 'sleep 300; : {marker}' & "            # left in the script's group
              f"setsid sh -c 'sleep 301; : {marker}' & "     # escaped, holding our stdout
              "sleep 0.3; echo done")  # let it escape before the script exits
    result, events = run_task(tmp_path, task("RunScript", {"script": script}, timeout=30))
    assert states(events) == ["received", "running", "succeeded"]
    assert events[-1]["details"]["stdout_tail"] == "done\n"
    left = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    assert left == []


def test_memory_limit_contains_a_leaking_handler(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[handlers]\nmax_memory_mb = 768\n")
    hog, after = str(uuid.uuid4()), str(uuid.uuid4())
    eater = "b=[]\nwhile True: b.append(bytearray(50*2**20))"
    script = str(uuid.uuid4())
    result, events = run_task(tmp_path, task("Example.Hog", task_id=hog),
                              task("RunScript", {"script": eater, "interpreter": sys.executable},
                                   task_id=script),
                              task("Example.Echo", {"text": "still here"}, task_id=after),
                              extra=["--config", str(config)])
    final = {e["task_id"]: e for e in events if e["state"] in ("succeeded", "failed")}
    assert final[hog]["state"] == "failed"
    assert "ran out of memory (limit [handlers] max_memory_mb = 768)" in final[hog]["message"]
    assert final[script]["state"] == "failed" and "MemoryError" in final[script]["details"]["stderr_tail"]
    assert final[after]["state"] == "succeeded"  # the same worker goes on serving


def test_handler_polling_ctx_cancelled_stops_on_timeout(tmp_path):
    result, events = run_task(tmp_path, task("Example.Poll", timeout=1))
    assert states(events) == ["received", "running", "timed_out"]
    assert events[-1]["details"]["rounds"] > 10  # it stopped by itself and said so
    assert result.returncode == 1
