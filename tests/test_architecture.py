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
HANDLER_PACKAGES = ("handlers.runscript", "handlers.sbs", "handlers.imaging", "handlers.bootwiz")
THIRD_PARTY = ("pluggy", "httpx", "xmltodict", "psutil", "apscheduler", "zstandard")


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


def violations(rule) -> list[str]:
    found = []
    for name, imported in modules().items():
        for target in sorted(project_imports(imported)):
            problem = rule(name, target)
            if problem:
                found.append(f"{name} imports {target}: {problem}")
    return found


def test_the_rules_see_every_package():
    names = modules()
    for expected in ("agent.plugin.hookspecs", "agent.common.config", "agent.cta.service",
                     "agent.tools.cli", "agent.supervisor", "ctdataloader.outbox",
                     "objecthost.server", "taskserver.store", "handlers.runscript"):
        assert expected in names
    assert "agent.common.config" in names["objecthost.server"] | {
        m for n, i in names.items() if n.startswith("objecthost") for m in i}


def test_agent_imports_neither_the_task_server_nor_a_handler():
    def rule(name, target):
        if within(name, "agent") and within(target, "taskserver", "handlers"):
            return "the agent's code may not depend on the reference server or a handler"
    assert violations(rule) == []


def test_handlers_import_only_the_plugin_api_their_own_package_and_handlers_shared():
    def rule(name, target):
        if not within(name, *HANDLER_PACKAGES, "handlers.shared"):
            return None
        own = next((p for p in HANDLER_PACKAGES + ("handlers.shared",) if within(name, p)))
        if within(target, "agent.plugin", own, "handlers.shared"):
            return None
        if within(target, "ctdataloader"):
            return "a handler never touches the outbox: it reports through ctx"
        if within(target, *HANDLER_PACKAGES):
            return "handlers do not import each other (shared code goes in handlers.shared)"
        return "handlers use the plugin API (agent.plugin) only"
    assert violations(rule) == []


def test_handlers_shared_has_no_hooks():
    for path in (ROOT / "handlers" / "shared").rglob("*.py"):
        assert "hookimpl" not in path.read_text(), f"{path}: handlers.shared is a library"


def test_common_plumbing_depends_on_nothing_above_it():
    def rule(name, target):
        if within(name, "agent.common") and not within(target, "agent.common"):
            return "agent.common is the bottom layer"
    assert violations(rule) == []


def test_plugin_api_depends_only_on_common():
    def rule(name, target):
        if within(name, "agent.plugin") and not within(target, "agent.plugin", "agent.common"):
            return "the plugin API stands on agent.common only"
    assert violations(rule) == []


def test_ctdataloader_depends_only_on_common():
    def rule(name, target):
        if within(name, "ctdataloader") and not within(target, "ctdataloader", "agent.common"):
            return "the ctdataloader stands on agent.common only"
    assert violations(rule) == []


def test_only_the_cta_and_the_tools_use_the_outbox():
    def rule(name, target):
        if within(target, "ctdataloader") and not within(
                name, "ctdataloader", "agent.cta", "agent.tools", "agent.supervisor"):
            return "the outbox belongs to ctdataloader; only the CTA writes and tools read it"
    assert violations(rule) == []


def test_objecthost_imports_only_the_standard_library_and_the_shared_plumbing():
    def rule(name, target):
        if within(name, "objecthost") and not within(target, "objecthost", "agent.common"):
            return "the objecthost stands on agent.common only"
        if within(name, "objecthost") and within(target, "agent.common.serverapi"):
            return "the objecthost never talks HTTP"
    assert violations(rule) == []
    for name, imported in modules().items():
        if within(name, "objecthost"):
            third = {m for m in imported if within(m, *THIRD_PARTY)}
            assert not third, f"{name} imports {third}"


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
