"""Plugin discovery: built-ins and third parties through one entry-point group,
broken and conflicting plugins named, hooks documented and exercised."""

import inspect
import os
import subprocess
import sys
import textwrap

import pytest

from agent.plugin import hookimpl, hookspecs
from agent.common.errors import TaskRejected
from agent.plugin.manager import load_handlers
from agent.plugin.testing import write_distribution
from agent.plugin.tasks import TaskType

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
    from agent.common.task import Task
    assert registry.run(Task("x", "Good"), ctx=None) == {"ran": "x"}
    assert calls == []
    assert registry.timeout_for(Task("x", "Good")) == 7
    assert registry.timeout_for(Task("x", "Good", timeout=3)) == 3


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
