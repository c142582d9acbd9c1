"""The plugin manager, made in one place, and the task-type registry.

``load_handlers()`` builds the pluggy manager (add_hookspecs -> entry points
-> check_pending), then asks every plugin for its task types. Built-in and
third-party handlers come through the same entry-point group. A plugin that
fails to import, or whose ``dsagent_task_types`` raises, is logged with its
name and traceback and left out; only its own task types are missing. A type
registered by two plugins is refused for both, naming them.

Set ``DSAGENT_TRACE_HOOKS=1`` to log every hook call (pluggy tracing).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from agent.plugin import hookspecs
from agent.common.errors import TaskRejected
from agent.common.task import Task
from agent.plugin.tasks import TaskContext, TaskType

log = logging.getLogger("dsagent.plugins")


@dataclass
class RegisteredType:
    task_type: TaskType
    plugin: str
    version: str


@dataclass
class HandlerRegistry:
    """Which plugin serves which task type, and how to call it."""

    pm: pluggy.PluginManager
    types: dict[str, RegisteredType] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)       # plugin -> error
    conflicts: dict[str, list[str]] = field(default_factory=dict)  # type -> plugins

    def lookup(self, type_name: str) -> RegisteredType:
        """The registration of ``type_name``, or TaskRejected saying why there is none."""
        if type_name in self.types:
            return self.types[type_name]
        if type_name in self.conflicts:
            names = " and ".join(f'"{p}"' for p in self.conflicts[type_name])
            raise TaskRejected(f"task type '{type_name}' is registered by both {names}; "
                               "refusing to guess which one runs it")
        known = ", ".join(sorted(self.types)) or "none"
        message = f"unknown task type '{type_name}' (installed: {known})"
        if self.broken:
            message += "; plugins that failed to load: " + ", ".join(sorted(self.broken))
        raise TaskRejected(message)

    def hook_of(self, hook_name: str, plugin: str):
        """``hook_name`` as implemented by ``plugin`` alone (the other
        plugins' implementations are left out)."""
        others = [p for name, p in self.pm.list_name_plugin() if name != plugin]
        return self.pm.subset_hook_caller(hook_name, remove_plugins=others)

    def registered(self, hook_name: str, plugin: str, kind: type) -> list:
        """What ``plugin`` passes to ``register()`` in hook ``hook_name``
        (``dsagent_task_types``, ``dsagent_doctor_checks``); TypeError if
        something is not a ``kind``, and whatever the hook raises."""
        items: list = []
        self.hook_of(hook_name, plugin)(register=items.append)
        for item in items:
            if not isinstance(item, kind):
                raise TypeError(f"register() expects a {kind.__name__}, got {item!r}")
        return items

    def validate(self, task: Task, config: dict[str, Any]) -> None:
        """The declared parameters first (one wording for every handler), then the plugin's hook."""
        registered = self.lookup(task.type)
        registered.task_type.check_parameters(task.parameters)
        self.hook_of("dsagent_validate_task", registered.plugin)(task=task, config=config)

    def run(self, task: Task, ctx: TaskContext) -> dict[str, Any] | None:
        return self.hook_of("dsagent_run_task", self.lookup(task.type).plugin)(
            task=task, ctx=ctx)

    def cancel(self, task: Task) -> None:
        self.hook_of("dsagent_cancel_task", self.lookup(task.type).plugin)(task=task)

    def timeout_for(self, task: Task) -> int:
        return task.timeout or self.lookup(task.type).task_type.default_timeout


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP),
                  key=lambda ep: ep.name)


def load_handlers(*, entry_points: bool = True,
                  extra_plugins: Iterable[tuple[str, object]] = ()) -> HandlerRegistry:
    """Build the plugin manager and the task-type registry.

    ``entry_points=False`` skips installed plugins (tests register their own
    through ``extra_plugins`` as ``(name, plugin)`` pairs).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    registry = HandlerRegistry(pm)
    versions: dict[str, str] = {}
    if entry_points:
        for ep in _entry_points():
            if pm.has_plugin(ep.name) or ep.name in registry.broken:
                continue
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", DeprecationWarning)
                    plugin = ep.load()
                for warning in caught:   # e.g. a handler written for 0.1 (agent.errors)
                    log.warning('plugin "%s": %s', ep.name, warning.message)
                pm.register(plugin, name=ep.name)
            except Exception:  # a broken plugin must not take the others down
                error = traceback.format_exc()
                registry.broken[ep.name] = error.strip().splitlines()[-1]
                log.error('Error importing plugin "%s": %s', ep.name, error)
                continue
            versions[ep.name] = ep.dist.version if ep.dist else "?"
    for name, plugin in extra_plugins:
        pm.register(plugin, name=name)
        versions[name] = getattr(plugin, "__version__", "?")
    pm.check_pending()
    if os.environ.get("DSAGENT_TRACE_HOOKS"):
        pm.trace.root.setwriter(lambda msg: log.info("hook: %s", msg.rstrip()))
        pm.enable_tracing()
    _collect_types(registry, versions)
    return registry


def _collect_types(registry: HandlerRegistry, versions: dict[str, str]) -> None:
    pm = registry.pm
    for name, plugin in list(pm.list_name_plugin()):
        try:
            declared: list[TaskType] = registry.registered("dsagent_task_types", name, TaskType)
        except Exception:
            error = traceback.format_exc()
            registry.broken[name] = error.strip().splitlines()[-1]
            log.error('Error registering task types of plugin "%s": %s', name, error)
            pm.unregister(plugin)
            continue
        for task_type in declared:
            owner = registry.types.pop(task_type.name, None)
            if owner or task_type.name in registry.conflicts:
                plugins = registry.conflicts.setdefault(
                    task_type.name, [owner.plugin] if owner else [])
                plugins.append(name)
                log.error("task type '%s' is registered by both %s; refusing it",
                          task_type.name, " and ".join(f'"{p}"' for p in plugins))
                continue
            registry.types[task_type.name] = RegisteredType(task_type, name, versions.get(name, "?"))
