"""The ``dsagent_run`` fixture (agent/plugin/testing.py): it comes from the pytest11
entry point (no conftest here), runs the real dispatch and reports the events."""

import uuid

import pytest

from agent.plugin.testing import DsagentRunError

LOGGING_PLUGIN = """
    from agent.plugin import BadParameters, TaskType, hookimpl

    @hookimpl
    def dsagent_task_types(register):
        register(TaskType("Fixture.Store", default_timeout=20))

    @hookimpl
    def dsagent_validate_task(task, config):
        if not config["image_store"]:
            raise BadParameters("[handlers] image_store is not set")

    @hookimpl
    def dsagent_run_task(task, ctx):
        ctx.log.info("writing into %s", ctx.config["image_store"])
        with open(ctx.config["image_store"] + "/out.txt", "w") as fh:
            fh.write(task.parameters["text"])
        ctx.progress(10, "first")
        ctx.progress(90, "second", step=2)
        return {"timeout": ctx.config.get("max_memory_mb")}
"""


def test_success_events_and_accessors(dsagent_run):
    run = dsagent_run("Example.Echo", {"text": "abc"}, timeout=30)
    assert run.states == ["received", "running", "progress", "succeeded"]
    assert run.state == "succeeded" and run.exit_code == 0
    assert run.details == {"reversed": "cba"}
    assert run.progress == [50]
    assert run.progress_events[0]["message"] == "half way"
    assert [e["seq"] for e in run.events] == [1, 2, 3, 4]
    assert "started (timeout 30 s)" in run.events[1]["message"]


def test_bad_parameters_and_failure(dsagent_run):
    refused = dsagent_run("Example.Echo", {})
    assert refused.states == ["received", "failed"] and refused.exit_code == 1
    assert "parameter 'text' is missing" in refused.message
    failed = dsagent_run("Example.Echo", {"text": "fail"})
    assert failed.states == ["received", "running", "failed"]
    assert failed.message == "asked to fail" and failed.details == {"text": "fail"}


def test_timeout_goes_through_the_cancel_hook(dsagent_run):
    run = dsagent_run("Example.Sleep", {"seconds": "30"}, timeout=1)
    assert run.states == ["received", "running", "timed_out"]
    assert "timed out after 1 s" in run.message


def test_plugin_is_a_real_entry_point_and_sees_the_config(dsagent_run, tmp_path):
    unknown = dsagent_run("Fixture.Store", {"text": "x"})
    assert "unknown task type 'Fixture.Store'" in unknown.message
    dsagent_run.plugin("fixture_store", LOGGING_PLUGIN)
    refused = dsagent_run("Fixture.Store", {"text": "x"})
    assert refused.message == "[handlers] image_store is not set"
    run = dsagent_run("Fixture.Store", {"text": "hello ]]> <&>\r\n"},
                      handlers={"image_store": str(tmp_path), "max_memory_mb": 1024})
    assert run.state == "succeeded", run
    assert (tmp_path / "out.txt").read_bytes() == b"hello ]]> <&>\r\n"
    assert run.details == {"timeout": 1024}
    assert run.progress == [10, 90] and run.progress_events[1]["details"] == {"step": 2}
    assert any(f"writing into {tmp_path}" in line for line in run.log_lines), run.log
    assert "started (timeout 20 s)" in run.events[1]["message"]


def test_whole_document_with_a_rejected_task(dsagent_run):
    good, bad = str(uuid.uuid4()), "not-a-uuid"
    runs = dsagent_run.xml(
        f'<ClientTasks><Task id="{good}" type="Example.Echo"><Parameters>'
        f'<Parameter name="text">ab</Parameter></Parameters></Task>'
        f'<Task id="{bad}" type="Example.Echo"/></ClientTasks>')
    assert list(runs) == [bad, good]  # refused ones are reported first, as run-task does
    assert runs[bad].states == ["received", "failed"] and "is not a UUID" in runs[bad].message
    assert runs[good].details == {"reversed": "ba"}
    assert runs[good].exit_code == 1  # one task of the run failed


def test_unusable_config_is_an_error_naming_the_key(dsagent_run):
    with pytest.raises(DsagentRunError, match="unknown key 'no_such_key'"):
        dsagent_run("Example.Echo", {"text": "a"}, handlers={"no_such_key": "x"})
    with pytest.raises(DsagentRunError, match=r"\[handlers.acme\] deep: a handler setting"):
        dsagent_run("Example.Echo", {"text": "a"}, handlers={"acme": {"deep": {"x": 1}}})


SETTINGS_PLUGIN = '''
from agent.plugin import BadParameters, TaskType, hookimpl


@hookimpl
def dsagent_task_types(register):
    register(TaskType("Fixture.Settings", 20, "returns its own settings"))


@hookimpl
def dsagent_validate_task(task, config):
    if "endpoint" not in config.get("fixture_settings", {}):
        raise BadParameters("[handlers.fixture_settings] endpoint is not set")


@hookimpl
def dsagent_run_task(task, ctx):
    return {"settings": ctx.settings}
'''


def test_a_handler_gets_its_own_settings_table(dsagent_run):
    """[handlers.<plugin>] reaches that plugin (validate: config[<plugin>]; run: ctx.settings)."""
    dsagent_run.plugin("fixture_settings", SETTINGS_PLUGIN)
    refused = dsagent_run("Fixture.Settings")
    assert refused.message == "[handlers.fixture_settings] endpoint is not set"
    mine = {"endpoint": "https://inventory.example/api", "retries": 3, "ratio": 0.5,
            "tags": ["a", "b"], "verbose": True}
    run = dsagent_run("Fixture.Settings", handlers={"fixture_settings": mine,
                                                   "other_plugin": {"secret": "not mine"}})
    assert run.state == "succeeded", run
    assert run.details == {"settings": mine}
