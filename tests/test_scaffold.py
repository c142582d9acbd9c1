"""``dsagent new-handler``: bad names refused; the package it writes installs
into a fresh virtualenv and passes its own test there, as written.

The fresh venv gets dsagent the way a handler author gets it: ``pip install``
of the project (a copy of this working tree, so the build writes nothing
here), which gives it real metadata and entry points (``dsagent.handlers``,
``pytest11``, the ``dsagent`` script). Only dsagent's third-party libraries
come from the project's venv, through a ``.pth`` naming a folder of links to
them (without dsagent and the example handler), so the test runs offline;
``wheel``, which building needs, is the one package pip installs from the
index.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from agent.tools.scaffold import distribution_name, module_name

ROOT = Path(__file__).resolve().parent.parent
DSAGENT = [sys.executable, "-m", "agent"]
PROJECT_FILES = ["setup.cfg", "pyproject.toml", "README.md",
                 "agent", "handlers", "objecthost", "ctdataloader", "taskserver"]


def new_handler(*args, cwd):
    return subprocess.run(DSAGENT + ["new-handler", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


@pytest.mark.parametrize("name, module, dist", [
    ("acme-inventory", "acme_inventory", "acme-inventory"),
    ("acme_inventory", "acme_inventory", "acme-inventory"),
    ("Acme.Inventory", "acme_inventory", "acme-inventory"),
    ("acme--inv_.x2", "acme_inv_x2", "acme-inv-x2"),
    ("a", "a", "a"),
])
def test_name_maps_to_module_and_distribution(name, module, dist):
    assert module_name(name) == module
    assert distribution_name(name) == dist


@pytest.mark.parametrize("name, error", [
    ("My pkg", "NAME 'My pkg' has ' ', which a distribution name cannot hold"),
    ("acme/inv", "has '/'"),
    ("acmé", "has 'é'"),
    ("1abc", "NAME '1abc' must start with a letter"),
    (".abc", "must start with a letter"),
    ("acme-", "NAME 'acme-' must end with a letter or a digit"),
    ("class", "NAME 'class' is a Python keyword"),
    ("Class", "NAME 'Class' maps to module 'class', which is a Python keyword"),
    ("json", "NAME 'json' would shadow the standard library module 'json'"),
    ("Json", "maps to module 'json', which would shadow the standard library module 'json'"),
    ("pluggy", "NAME 'pluggy' would shadow the installed module 'pluggy'"),
    ("tests", "reserved for the package's test folder"),
    ("x" * 65, "is longer than 64 characters"),
])
def test_bad_name_is_refused_and_nothing_written(tmp_path, name, error):
    result = new_handler(name, "--dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and error in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_bad_or_taken_task_type_are_refused(tmp_path):
    (tmp_path / "acme").mkdir()
    taken = new_handler("acme", cwd=tmp_path)
    assert taken.returncode == 2 and "acme already exists" in taken.stderr
    for task_type, error in [("Run Script", "is not valid"),
                             ("RunScript", "already served by the installed plugin 'runscript'")]:
        result = new_handler("other", "--task-type", task_type, cwd=tmp_path)
        assert result.returncode == 2 and error in result.stderr, result.stderr
    assert new_handler("other", "--dir", str(tmp_path / "none"), cwd=tmp_path).returncode == 2
    assert [p.name for p in tmp_path.iterdir()] == ["acme"]


@pytest.mark.parametrize("name", ["acme_inventory", "acme-inventory", "Acme.Inventory"])
def test_default_task_type_and_files(tmp_path, name):
    """The folder is NAME; distribution acme-inventory, module acme_inventory."""
    made = new_handler(name, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    project = tmp_path / name
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*") if p.is_file()) == [
        "README.md", "acme_inventory/__init__.py", "acme_inventory/handler.py",
        "pyproject.toml", "tests/test_handler.py"]
    assert 'TASK_TYPE = "AcmeInventory"' in (project / "acme_inventory" / "handler.py").read_text()
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == "acme-inventory"
    assert pyproject["project"]["entry-points"]["dsagent.handlers"] == {
        "acme_inventory": "acme_inventory.handler"}
    assert pyproject["tool"]["setuptools"]["packages"] == ["acme_inventory"]
    umask = os.umask(0)
    os.umask(umask)
    assert project.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir, not mkdtemp's 0700
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no staging left over


def make_fresh_venv(root: Path) -> Path:
    """A venv holding only links to dsagent's dependencies, then dsagent itself."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    deps = root / "deps"
    deps.mkdir()
    ours = sysconfig.get_paths()["purelib"]
    for entry in os.listdir(ours):
        if "dsagent" in entry or entry.startswith("__") or entry.endswith(".pth"):
            continue  # dsagent, the example handler, their editable finders, caches
        (deps / entry).symlink_to(os.path.join(ours, entry))
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "dsagent-test-deps.pth").write_text(f"{deps}\n")
    project = root / "dsagent-src"
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            project.mkdir(exist_ok=True)
            shutil.copy2(source, project / name)
    pip_install(python, "wheel")
    pip_install(python, "--no-index", "--no-build-isolation", str(project))
    return venv


def pip_install(python, *args):
    result = subprocess.run([python, "-m", "pip", "install", "-q", *args],
                            capture_output=True, text=True, env=clean_env(), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def clean_env():
    """The environment without this venv leaking in (PYTHONPATH, VIRTUAL_ENV)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def test_generated_package_installs_and_passes_its_test_in_a_fresh_venv(tmp_path):
    venv = make_fresh_venv(tmp_path)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    where = subprocess.run([python, "-c", "import agent; print(agent.__file__)"],
                           capture_output=True, text=True, env=clean_env(), cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), where  # dsagent installed there, not linked

    work = tmp_path / "work"
    work.mkdir()
    made = subprocess.run([bin_dir / "dsagent", "new-handler", "acme-inventory",
                           "--task-type", "Acme.Inventory"],
                          capture_output=True, text=True, cwd=work, env=clean_env(), timeout=60)
    assert made.returncode == 0, made.stderr
    package = work / "acme-inventory"
    pip_install(python, "--no-index", "--no-build-isolation", str(package))
    version = subprocess.run([python, "-c", "import importlib.metadata as m; "
                              "print(m.version('acme-inventory'))"],
                             capture_output=True, text=True, env=clean_env(), cwd=tmp_path)
    assert version.stdout.strip() == "0.1.0", version

    tested = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                            capture_output=True, text=True, cwd=package, env=clean_env(),
                            timeout=300)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "3 passed" in tested.stdout

    listed = subprocess.run([bin_dir / "dsagent", "handlers"], capture_output=True, text=True,
                            cwd=tmp_path, env=clean_env(), timeout=60)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    rows = [line.split()[:3] for line in listed.stdout.splitlines()]
    assert ["Acme.Inventory", "acme_inventory", "0.1.0"] in rows, listed.stdout
    assert ["RunScript", "runscript", "0.1.0"] in rows
    assert "Example.Echo" not in listed.stdout  # the project venv's example handler stayed out


def test_the_default_task_type_keeps_the_names_capitals():
    from agent.tools.scaffold import default_task_type, module_name

    assert module_name("AcmeInventory") == "acmeinventory"
    assert default_task_type("AcmeInventory") == "AcmeInventory"   # not Acmeinventory
    assert default_task_type("acme-inventory") == default_task_type("Acme.Inventory") == \
        "AcmeInventory"
