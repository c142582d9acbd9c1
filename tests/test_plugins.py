"""Plugin discovery: built-ins and third parties through one entry-point group,
broken and conflicting plugins named, hooks documented and exercised."""

import inspect
import os
import re
import subprocess
import sys
import textwrap

import pytest

from agent.plugin import hookimpl, hookspecs
from agent.common.errors import BadParameters, TaskRejected
from agent.common.task import Task
from agent.plugin.manager import load_handlers
from agent.plugin.testing import write_distribution
from agent.plugin.tasks import Param, TaskType

DSAGENT = [sys.executable, "-m", "agent"]


def make_dist(root, name, module_source, entry_name):
    """A minimal installed distribution (dist-info + module) on a path of its own."""
    return write_distribution(root, name, textwrap.dedent(module_source), entry_name, "0.9")


def run_handlers_cmd(pythonpath=None):
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(DSAGENT + ["handlers"], capture_output=True, text=True, env=env, timeout=60)


def test_builtin_and_third_party_listed_with_plugin_and_version():
    result = run_handlers_cmd()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(l.split()[:3] == ["RunScript", "runscript", "0.1.0"] for l in lines), lines
    assert any(l.split()[:3] == ["Example.Echo", "example", "1.2.3"] for l in lines), lines


def test_import_failure_is_named_and_only_that_plugin_is_missing(tmp_path):
    make_dist(tmp_path, "brokenplug", "raise ImportError('no such driver lib')\n", "broken")
    result = run_handlers_cmd(tmp_path)
    assert result.returncode == 1
    assert 'Error importing plugin "broken"' in result.stderr
    assert "no such driver lib" in result.stderr
    assert "RunScript" in result.stdout and "BROKEN plugin broken" in result.stdout


def test_duplicate_task_type_is_refused_naming_both(tmp_path):
    make_dist(tmp_path, "dupplug", """
        from agent.plugin import hookimpl
        from agent.plugin.tasks import TaskType

        @hookimpl
        def dsagent_task_types(register):
            register(TaskType("RunScript"))
    """, "dup")
    result = run_handlers_cmd(tmp_path)
    assert result.returncode == 1
    assert 'REFUSED task type RunScript: registered by both dup and runscript' in result.stdout \
        or 'registered by both runscript and dup' in result.stdout
    assert '"dup"' in result.stderr and '"runscript"' in result.stderr


class Good:
    @hookimpl
    def dsagent_task_types(self, register):
        register(TaskType("Good", default_timeout=7))

    @hookimpl
    def dsagent_run_task(self, task, ctx):
        return {"ran": task.id}


class Raises:
    @hookimpl
    def dsagent_task_types(self, register):
        raise RuntimeError("cannot declare")


def test_registration_error_names_plugin_and_spares_others(caplog):
    registry = load_handlers(entry_points=False, extra_plugins=[("good", Good()), ("bad", Raises())])
    assert set(registry.types) == {"Good"}
    assert "bad" in registry.broken
    assert 'plugin "bad"' in caplog.text and "cannot declare" in caplog.text
    with pytest.raises(TaskRejected, match="unknown task type 'Other'.*failed to load: bad"):
        registry.lookup("Other")


def test_hooks_are_called_only_on_the_owning_plugin():
    calls = []

    class Other:
        @hookimpl
        def dsagent_task_types(self, register):
            register(TaskType("Other"))

        @hookimpl
        def dsagent_run_task(self, task, ctx):
            calls.append(task.type)
            return {"other": True}

    registry = load_handlers(entry_points=False, extra_plugins=[("good", Good()), ("other", Other())])
    assert registry.run(Task("x", "Good"), ctx=None) == {"ran": "x"}
    assert calls == []
    assert registry.timeout_for(Task("x", "Good")) == 7
    assert registry.timeout_for(Task("x", "Good", timeout=3)) == 3


class Declared:
    """Declares its parameters; records the calls of its validate hook."""

    def __init__(self):
        self.validated = []

    @hookimpl
    def dsagent_task_types(self, register):
        register(TaskType("Acme.Copy", parameters=(
            Param("source", required=True, type="path"),
            Param("count", type="int"),
            Param("ratio", type="number"),
            Param("mode", pattern="fast|safe"),
            Param("note", required=True, allow_empty=True),
            Param("label", required=True),
        )))
        register(TaskType("Acme.Legacy"))  # written before Param: parameters=None
        register(TaskType("Acme.Bare", parameters=()))

    @hookimpl
    def dsagent_validate_task(self, task, config):
        self.validated.append(dict(task.parameters))


GOOD = {"source": "/dev/sdb", "note": "", "label": "disk"}


@pytest.mark.parametrize("type_name, params, message", [
    ("Acme.Copy", {**GOOD, "colour": "red", "size": "1"},
     "unknown parameter 'colour' (Acme.Copy takes source, count, ratio, mode, note, label)"),
    ("Acme.Bare", {"x": "1"}, "unknown parameter 'x' (Acme.Bare takes no parameters)"),
    ("Acme.Copy", {"note": "", "label": "disk"}, "parameter 'source' is missing"),
    ("Acme.Copy", {"source": "/dev/sdb", "label": "disk"}, "parameter 'note' is missing"),
    ("Acme.Copy", {**GOOD, "label": ""}, "parameter 'label' is empty"),
    ("Acme.Copy", {**GOOD, "label": " \t\n"}, "parameter 'label' is empty"),
    ("Acme.Copy", {**GOOD, "source": "dev/sdb"},
     "parameter 'source' must be an absolute path, got 'dev/sdb'"),
    ("Acme.Copy", {**GOOD, "source": "/dev/sdb\n/etc"},
     "parameter 'source' must be an absolute path, got '/dev/sdb\\n/etc'"),
    ("Acme.Copy", {**GOOD, "count": "1.5"}, "parameter 'count' must be a whole number, got '1.5'"),
    ("Acme.Copy", {**GOOD, "count": ""}, "parameter 'count' must be a whole number, got ''"),
    ("Acme.Copy", {**GOOD, "ratio": "nan"}, "parameter 'ratio' must be a number, got 'nan'"),
    ("Acme.Copy", {**GOOD, "mode": "slow"}, "parameter 'mode' must match fast|safe, got 'slow'"),
    ("Acme.Copy", {**GOOD, "mode": "fast "}, "parameter 'mode' must match fast|safe, got 'fast '"),
])
def test_core_refuses_bad_declared_parameters_before_the_hook(type_name, params, message):
    plugin = Declared()
    registry = load_handlers(entry_points=False, extra_plugins=[("acme", plugin)])
    with pytest.raises(BadParameters) as refused:
        registry.validate(Task("t", type_name, params), {})
    assert str(refused.value) == message
    assert plugin.validated == []  # the handler never saw the task


@pytest.mark.parametrize("type_name, params", [
    ("Acme.Copy", GOOD),
    ("Acme.Copy", {**GOOD, "count": " -7 ", "ratio": "1e3", "mode": "safe", "note": "  "}),
    ("Acme.Copy", {**GOOD, "ratio": "-.5"}),
    ("Acme.Bare", {}),
    ("Acme.Legacy", {"anything": "", "at": "all"}),  # undeclared: left to the handler
])
def test_parameters_that_fit_reach_the_hook(type_name, params):
    plugin = Declared()
    registry = load_handlers(entry_points=False, extra_plugins=[("acme", plugin)])
    registry.validate(Task("t", type_name, params), {})
    assert plugin.validated == [params]


def test_a_bad_declaration_breaks_only_its_plugin():
    for bad, error in ((lambda: Param("a", type="float"), ValueError),
                       (lambda: Param("a", pattern="("), re.error),
                       (lambda: TaskType("X", parameters=(Param("a"), Param("a"))), ValueError),
                       (lambda: TaskType("X", parameters=("a",)), TypeError)):
        with pytest.raises(error):
            bad()

    class Twice:
        @hookimpl
        def dsagent_task_types(self, register):
            register(TaskType("Twice", parameters=(Param("a"), Param("a", required=True))))

    registry = load_handlers(entry_points=False,
                             extra_plugins=[("good", Good()), ("twice", Twice())])
    assert set(registry.types) == {"Good"}
    assert "declared twice" in registry.broken["twice"]


def test_handlers_lists_each_types_parameters(tmp_path):
    make_dist(tmp_path, "oldplug", """
        from agent.plugin import hookimpl
        from agent.plugin.tasks import TaskType

        @hookimpl
        def dsagent_task_types(register):
            register(TaskType("Old.Style", 60, "checks its own parameters"))
    """, "old")
    result = run_handlers_cmd(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    listed: dict[str, list[str]] = {}
    current = ""
    for line in result.stdout.splitlines()[1:]:
        if line.startswith("    "):
            listed[current].append(line.strip())   # a parameter of the type above
        else:
            current = line.split()[0]
            listed[current] = []
    assert listed["RunScript"] == [
        "script (required, text): the script's text",
        "interpreter (optional, path): the program that runs it (default /bin/sh)"]
    assert listed["UpdateSBSInfo"][0] == ("kind (required, matching initial-config|clients|"
                                          "images|predefined|update): which file to write")
    assert listed["UpdateSBSInfo"][1].startswith("payload (required, text, may be empty): ")
    assert listed["UpdateSBSInfo"][2].startswith("confirm_s (optional, number): ")
    assert [p.split()[0] for p in listed["BootWizRebuild"]] == ["config", "base", "drivers"]
    assert [p.split()[0] for p in listed["DeployImage"]] == [
        "image", "target", "grow", "targets", "multicast", "multicast_port",
        "multicast_interface", "multicast_wait_s"]
    assert listed["Example.Sleep"] == ["seconds (required, number)"]
    assert listed["Example.Crash"] == ["no parameters"]
    assert listed["Old.Style"] == ["parameters checked by the handler"]


def test_every_hook_is_documented_and_exercised():
    """Meta-test: each hookspec has a docstring saying when it is called and
    what it returns, docs/handler-guide.md quotes it word for word, and its
    name appears in this test suite."""
    here = os.path.dirname(__file__)
    corpus = "".join(open(os.path.join(here, f)).read() for f in os.listdir(here) if f.endswith(".py"))
    corpus += open(os.path.join(here, "example_handler", "dsagent_example", "handler.py")).read()
    guide = " ".join(open(os.path.join(here, "..", "docs", "handler-guide.md")).read().split())
    names = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
             if name.startswith("dsagent_")]
    assert names
    for name in names:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert "Called" in doc and "Return" in doc, name
        assert f"def {name}(" in guide, f"docs/handler-guide.md does not show hook {name}"
        assert " ".join(doc.split()) in guide, f"docs/handler-guide.md quotes an old docstring of {name}"
        assert corpus.count(name) >= 1, f"hook {name} is not exercised by any test"


def test_the_plugin_api_is_exported_plainly_and_documented():
    """``agent.plugin`` is the one public API: every name in its ``__all__``
    is a plain attribute (no lazy ``__getattr__``) and named in the guide."""
    import agent.plugin as api

    guide = open(os.path.join(os.path.dirname(__file__), "..", "docs", "handler-guide.md")).read()
    assert not hasattr(api, "__getattr__")
    for name in api.__all__:
        assert name in vars(api), name
        assert f"`{name}`" in guide, f"docs/handler-guide.md does not name {name}"


OLD_STYLE_PLUGIN = '''
from agent import hookimpl
from agent.errors import TaskFailed
from agent.tasks import TaskType


@hookimpl
def dsagent_task_types(register):
    register(TaskType("Old.Fail", 30, "written for dsagent 0.1"))


@hookimpl
def dsagent_run_task(task, ctx):
    raise TaskFailed("still works: " + task.parameters["why"])
'''


def test_a_handler_written_for_0_1_still_runs_and_is_told_to_upgrade(dsagent_run):
    """agent.hookimpl, agent.errors and agent.tasks are deprecated aliases:
    the handler runs, and the worker's log names the plugin and the fix."""
    dsagent_run.plugin("old_style", OLD_STYLE_PLUGIN)
    run = dsagent_run("Old.Fail", {"why": "0.1 imports"}, timeout=30)
    assert run.states == ["received", "running", "failed"], run.log
    assert run.message == "still works: 0.1 imports"
    told = [line for line in run.log.splitlines() if 'plugin "old_style": ' in line]
    for fix in ("use 'from agent.plugin import hookimpl'",
                "agent.errors is deprecated: import the errors from agent.plugin",
                "agent.tasks is deprecated"):
        assert any(fix in line for line in told), run.log


def test_progress_reports_are_thinned_and_sized_for_reading():
    """agent.plugin.Progress: at least every min_step percent, sizes in a unit that
    reads (never "0 of 0 MiB" for a small package), and the byte counts as details."""
    from agent.plugin.progress import Progress, human_bytes

    reports = []
    progress = Progress(400_000, lambda pct, msg, **d: reports.append((pct, msg, d)), "fetched",
                        min_step=25, min_interval_s=3600)
    for _ in range(40):
        progress.add(10_000)
    assert [pct for pct, _, _ in reports] == [2.5, 27.5, 52.5, 77.5]
    assert reports[-1][1].startswith("fetched: 303 KiB of 391 KiB (")
    assert reports[-1][2]["bytes_done"] == 310_000 and reports[-1][2]["bytes_total"] == 400_000
    assert [human_bytes(n) for n in (512, 120_000, 3_565_158, 2**30)] == [
        "512 B", "117 KiB", "3.4 MiB", "1.0 GiB"]
