"""The import rules of docs/architecture.md ("What may import what"), enforced.

Every import statement of every shipped module is read with ``ast``
(function-level imports included, since the code uses them to keep idle
processes small), resolved to a module name, and checked against the rules.
The objecthost's rule is also checked at run time: importing it must not
load a third-party library.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("agent", "handlers", "objecthost", "ctdataloader", "taskserver")
HANDLER_PACKAGES = ("handlers.runscript", "handlers.sbs", "handlers.imaging", "handlers.bootwiz",
                    "handlers.reboot", "handlers.replication")
THIRD_PARTY = ("pluggy", "httpx", "xmltodict", "psutil", "apscheduler", "zstandard",
               "inotify_simple", "starlette", "uvicorn")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a.b import c`` gives ``a.b`` and
    ``a.b.c``: c may be a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def modules() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path)
            for top in SHIPPED for path in sorted((ROOT / top).rglob("*.py"))}


def within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def project_imports(imported: set[str]) -> set[str]:
    """Imports of project modules; ``agent`` itself (``__version__``) and a
    bare package name (``from handlers import x`` also gives ``handlers.x``)
    are not dependencies."""
    return {m for m in imported if within(m, *SHIPPED)
            and m not in (*SHIPPED, "agent.__version__")}


# package -> the project packages it may import (besides itself); the table
# "What may import what" in docs/architecture.md says the same, word for word
ALLOWED = {
    "agent": {"agent.plugin"},       # only when the deprecated agent.hookimpl is used
    "agent.common": set(),
    "agent.plugin": {"agent.common"},
    "ctdataloader": {"agent.common"},
    "agent.pxe": {"agent.common"},
    "agent.packages": {"agent.common"},
    "objecthost": {"agent.common"},
    "agent.cta": {"agent.common", "agent.plugin", "ctdataloader"},
    "agent.supervisor": {"agent.common", "agent.tools"},
    "agent.tools": {"agent.common", "agent.plugin", "agent.cta", "agent.pxe",
                    "agent.packages", "agent.supervisor", "ctdataloader"},
    "agent.__main__": {"agent.tools"},
    "agent.errors": {"agent.common"},                 # deprecated aliases for handlers
    "agent.tasks": {"agent.common", "agent.plugin"},  # written for 0.1 (removed in 0.3)
    "handlers.shared": {"agent.plugin"},
    **{package: {"agent.plugin", "handlers.shared"} for package in HANDLER_PACKAGES},
    "taskserver": {"agent.common", "agent.tools"},
}


def package_of(module: str) -> str:
    """The ALLOWED key a module belongs to (``agent.cta.worker`` -> ``agent.cta``)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] in ("agent", "handlers") else parts[0]


def test_every_package_has_a_rule():
    assert {package_of(name) for name in modules()} - {"handlers"} == set(ALLOWED)


def test_each_package_imports_only_what_the_table_allows():
    found = []
    for name, imported in modules().items():
        package = package_of(name)
        for target in sorted(project_imports(imported)):
            other = package_of(target)
            if other != package and other not in ALLOWED.get(package, set()):
                found.append(f"{name} imports {target} ({package} may import only "
                             f"{', '.join(sorted(ALLOWED.get(package, ()))) or 'itself'})")
    assert found == []


def test_the_architecture_page_shows_the_same_table():
    page = (ROOT / "docs" / "architecture.md").read_text()
    shown = {}
    for line in page.split("## What may import what", 1)[1].splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 2:
            imports = set() if cells[1].startswith("nothing") else {
                c.strip().strip("`") for c in cells[1].split(",")}
            for package in cells[0].split("`, `"):
                shown[package] = imports
    assert shown == ALLOWED


def test_the_package_roots_import_nothing():
    """Importing ``agent`` (as any part of the agent does, the objecthost's
    plumbing included) runs no import: the root holds the version and the
    deprecated ``hookimpl`` alias, which imports the plugin API only when used."""
    tree = ast.parse((ROOT / "agent" / "__init__.py").read_text())
    assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports_of(ROOT / "handlers" / "__init__.py") == set()


def test_handlers_shared_has_no_hooks():
    for path in (ROOT / "handlers" / "shared").rglob("*.py"):
        assert "hookimpl" not in path.read_text(), f"{path}: handlers.shared is a library"


def test_the_objecthost_never_talks_http():
    for name, imported in modules().items():
        if within(name, "objecthost"):
            assert not {m for m in imported if within(m, "agent.common.serverapi", *THIRD_PARTY)}


def test_importing_the_objecthost_loads_no_third_party_library():
    code = ("import sys, objecthost.server\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {THIRD_PARTY!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("top", SHIPPED)
def test_no_shipped_module_over_650_lines(top):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / top).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 650}
    assert long == {}
