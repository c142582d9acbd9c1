"""``dsagent new-handler NAME``: write a handler package that installs and
passes its own test as written (docs/handler-guide.md explains each part).

The package is built in a hidden folder beside its target and renamed into
place, so a failure never leaves half a package behind.
"""

from __future__ import annotations

import importlib.util
import keyword
import os
import re
import shutil
import string
import sys
import tempfile
from pathlib import Path

from agent.common.errors import DsagentError
from agent.common.taskxml import TYPE_RE

NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
RESERVED = {"tests"}  # the package's own test folder
MAX_MODULE = 64


class ScaffoldError(DsagentError):
    """The package cannot be written (bad name, task type, or target folder)."""


def module_name(name: str) -> str:
    """The Python module NAME maps to, as poetry and cargo derive it:
    ``acme-inventory`` -> ``acme_inventory``; ScaffoldError saying why if none."""
    if not NAME_RE.fullmatch(name):
        bad = ", ".join(repr(c) for c in sorted(set(name)) if not NAME_RE.fullmatch(c))
        raise ScaffoldError(f"NAME {name!r} " + (f"has {bad}, which a distribution name cannot "
                                                 "hold" if bad else "is empty")
                            + ": use letters, digits, '-', '_' and '.' (e.g. acme-inventory)")
    if not name[0].isalpha():
        raise ScaffoldError(f"NAME {name!r} must start with a letter (a module name cannot "
                            "start with a digit, a distribution name not with '-', '_' or '.')")
    if not name[-1].isalnum():
        raise ScaffoldError(f"NAME {name!r} must end with a letter or a digit, as a "
                            "distribution name does")
    module = re.sub(r"[-_.]+", "_", name).lower()
    if len(module) > MAX_MODULE:
        raise ScaffoldError(f"NAME {name!r} is longer than {MAX_MODULE} characters")
    what = _subject(name, module)
    if keyword.iskeyword(module):
        raise ScaffoldError(f"{what} is a Python keyword")
    if module in RESERVED:
        raise ScaffoldError(f"{what} is reserved for the package's test folder")
    if module in sys.stdlib_module_names:
        raise ScaffoldError(f"{what} would shadow the standard library module {module!r}")
    return module


def _subject(name: str, module: str) -> str:
    return f"NAME {name!r}" + ("" if module == name else f" maps to module {module!r}, which")


def distribution_name(name: str) -> str:
    """The distribution NAME makes, normalized as pip does (PEP 503): ``acme-inventory``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def check_not_installed(name: str, module: str) -> None:
    """Refuse a module name an importable module already has (it would shadow it)."""
    spec = importlib.util.find_spec(module)
    if spec is not None:
        where = spec.origin or ", ".join(spec.submodule_search_locations or [])
        raise ScaffoldError(f"{_subject(name, module)} would shadow the installed module "
                            f"{module!r} ({where})")


def check_task_type(task_type: str) -> None:
    """Refuse a malformed task type, or one an installed plugin already serves."""
    from agent.plugin.manager import load_handlers

    if not TYPE_RE.fullmatch(task_type):
        raise ScaffoldError(f"task type {task_type!r} is not valid: a letter, then up to 127 "
                            "letters, digits, '.', '_' or '-'")
    registered = load_handlers().types.get(task_type)
    if registered:
        raise ScaffoldError(f"task type {task_type!r} is already served by the installed plugin "
                            f"{registered.plugin!r} (see dsagent handlers); choose another "
                            "with --task-type")


def default_task_type(name: str) -> str:
    """From NAME as typed, keeping its capitals: ``acme-inventory`` and
    ``acme_inventory`` -> ``AcmeInventory``, ``AcmeInventory`` stays."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[-_.]+", name) if part)


def new_handler(name: str, directory: str | os.PathLike = ".",
                task_type: str | None = None) -> Path:
    """Write the project ``<directory>/<name>/`` (distribution NAME, module
    ``module_name(NAME)``); return its path."""
    module = module_name(name)
    parent = Path(directory)
    if not parent.is_dir():
        raise ScaffoldError(f"--dir {parent}: no such directory")
    target = parent / name
    if target.exists() or target.is_symlink():
        raise ScaffoldError(f"{target} already exists; choose another NAME or --dir")
    check_not_installed(name, module)
    task_type = task_type or default_task_type(name)
    check_task_type(task_type)
    values = {"module": module, "task_type": task_type, "dist": distribution_name(name)}
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))
    try:
        for relative, template in FILES.items():
            path = staging / string.Template(relative).substitute(values)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(string.Template(template).substitute(values))
        staging.chmod(0o777 & ~_umask())
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _umask() -> int:
    """The process umask (mkdtemp's 0700 folder gets the usual mode before it is renamed)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


PYPROJECT = '''\
[build-system]
requires = ["setuptools>=64", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "dsagent handler plugin: the $task_type task type"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["dsagent"]

[project.optional-dependencies]
test = ["pytest>=7"]

# How dsagent finds the handler: one entry point in this group.
[project.entry-points."dsagent.handlers"]
$module = "$module.handler"

[tool.setuptools]
packages = ["$module"]

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

INIT = '''\
"""dsagent handler plugin serving the $task_type task type (see handler.py)."""

__version__ = "0.1.0"
'''

HANDLER = '''\
"""The $task_type task type.

Parameters (all strings, as in the task XML), declared in PARAMETERS: dsagent
refuses a task with an unknown, missing or empty one before any hook runs.

- ``items``: comma-separated names to process (required, at least one);
- ``fail_on`` (optional): an item name that makes the task fail, to show how
  a handler reports a failure.

Details of a succeeded task: ``processed`` (the items, in order) and ``count``.
Replace the body of dsagent_run_task with the real work.
"""

from agent.plugin import BadParameters, Param, TaskFailed, TaskType, hookimpl

TASK_TYPE = "$task_type"
PARAMETERS = (
    Param("items", required=True, description="comma-separated names to process"),
    Param("fail_on", description="an item name that makes the task fail"),
)


@hookimpl
def dsagent_task_types(register):
    register(TaskType(TASK_TYPE, default_timeout=600,
                      description="process a comma-separated list of items",
                      parameters=PARAMETERS))


def _items(task):
    return [item.strip() for item in task.parameters["items"].split(",") if item.strip()]


@hookimpl
def dsagent_validate_task(task, config):
    # Check here what a Param cannot say, naming the parameter: the task then
    # goes received -> failed without ever running.
    if not _items(task):
        raise BadParameters("parameter 'items' names no item")


@hookimpl
def dsagent_run_task(task, ctx):
    items = _items(task)
    processed = []
    for index, item in enumerate(items):
        if ctx.cancelled():  # timeout or shutdown: stop soon, the task ends timed_out/cancelled
            raise TaskFailed("stopped on request", {"processed": processed})
        if item == task.parameters.get("fail_on"):
            raise TaskFailed(f"cannot process item '{item}'", {"processed": processed})
        ctx.log.info("processing %s", item)  # the log line carries task=<id>
        processed.append(item)
        ctx.progress(100 * (index + 1) / len(items), f"processed {item}", item=item)
    return {"processed": processed, "count": len(processed)}
'''

TEST = '''\
"""Runs $task_type through dsagent's real dispatch (the dsagent_run fixture
comes with dsagent, as a pytest plugin)."""


def test_processes_every_item_with_progress(dsagent_run):
    run = dsagent_run("$task_type", {"items": "a, b,c"}, timeout=60)
    assert run.states == ["received", "running", "progress", "progress", "progress", "succeeded"]
    assert run.details == {"processed": ["a", "b", "c"], "count": 3}
    assert [round(p) for p in run.progress] == [33, 67, 100]
    assert any("processing b" in line for line in run.log_lines)


def test_bad_parameters_are_refused_before_running(dsagent_run):
    missing = dsagent_run("$task_type", {})
    assert missing.states == ["received", "failed"]
    assert "parameter 'items' is missing" in missing.message
    unknown = dsagent_run("$task_type", {"items": "a", "colour": "red"})
    assert "unknown parameter 'colour'" in unknown.message
    no_item = dsagent_run("$task_type", {"items": " , "})
    assert no_item.message == "parameter 'items' names no item"


def test_failure_keeps_what_was_done(dsagent_run):
    run = dsagent_run("$task_type", {"items": "a,b,c", "fail_on": "b"}, timeout=60)
    assert run.states == ["received", "running", "progress", "failed"]
    assert run.message == "cannot process item 'b'"
    assert run.details == {"processed": ["a"]}
'''

README = '''\
# $dist

A dsagent handler plugin serving the `$task_type` task type (see
`$module/handler.py` for its parameters and details).

    pip install -e '.[test]'   # into the environment where dsagent is installed
    dsagent handlers           # lists $task_type, plugin $module
    pytest                     # runs the task through dsagent's real dispatch

Try it without a server:

    cat > tasks.xml <<'EOF'
    <ClientTasks>
      <Task id="0b8e8c5e-3f7a-4f63-9d8f-2a61c1e0e4a1" type="$task_type" timeout="60">
        <Parameters><Parameter name="items">a,b,c</Parameter></Parameters>
      </Task>
    </ClientTasks>
    EOF
    dsagent run-task tasks.xml

dsagent's handler guide (`docs/handler-guide.md`) explains the hooks, a
task's life, progress, details and the `dsagent_run` test fixture.
'''

FILES = {
    "pyproject.toml": PYPROJECT,
    "README.md": README,
    "$module/__init__.py": INIT,
    "$module/handler.py": HANDLER,
    "tests/test_handler.py": TEST,
}
