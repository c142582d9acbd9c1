"""Config loading: §6 keys, unknown/missing keys named with the file, fuzzing."""

import os

import pytest
from hypothesis import given, settings, strategies as st

from agent.common.config import check_config, load_config
from agent.common.errors import ConfigError

GOOD = """
[agent]
server_url = "https://ns.example:8443"
client_id  = "pc-0042"
token      = "t"
tickle_key = "00ff"
state_dir  = "{state}"

[objecthost]
listen = "0.0.0.0:50122"

[cta]
listen = "127.0.0.1:50124"
poll_interval_s = 300
max_concurrent_tasks = 2

[handlers]
sbs_dir       = "/srv/sbs/SBS"
image_store   = "/srv/images"
package_store = "/srv/packages"
preboot_store = "/srv/preboot"
"""


def write(tmp_path, text, mode=0o600):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_protocol_example_loads(tmp_path):
    config = load_config(write(tmp_path, GOOD.format(state=tmp_path)))
    assert config.get("cta", "max_concurrent_tasks") == 2
    assert config.handlers["sbs_dir"] == "/srv/sbs/SBS"
    assert config.handlers["run_script"] is True
    creds = config.credentials()
    assert (creds.client_id, creds.token, creds.tickle_key) == ("pc-0042", "t", b"\x00\xff")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("poll_interval_s", "poll_intervall_s"), "unknown key 'poll_intervall_s' in [cta]"),
    (lambda t: t.replace('server_url = "https://ns.example:8443"\n', ""), "missing required key 'server_url'"),
    (lambda t: t + "\n[extra]\nx = 1\n", "unknown section [extra]"),
    (lambda t: t.replace("max_concurrent_tasks = 2", 'max_concurrent_tasks = "2"'), "must be an integer"),
    (lambda t: t.replace('tickle_key = "00ff"', 'tickle_key = "zz"'), "must be hex"),
    (lambda t: t.replace('listen = "127.0.0.1:50124"', 'listen = "127.0.0.1"'), "HOST:PORT"),
    (lambda t: t.replace("[agent]", "[agent"), "not valid TOML"),
])
def test_bad_config_names_key_and_file(tmp_path, edit, message):
    path = write(tmp_path, edit(GOOD.format(state=tmp_path)))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file_and_missing_section(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"missing section \[agent\]"):
        load_config(write(tmp_path, "[cta]\npoll_interval_s = 5\n"))
    assert load_config(write(tmp_path, "[handlers]\nrun_script = false\n"), require=()).handlers[
        "run_script"] is False


def test_registration_credentials_saved_private_and_used(tmp_path):
    text = GOOD.format(state=tmp_path).replace('token      = "t"\n', "")
    config = load_config(write(tmp_path, text))
    assert config.credentials() is None
    path = config.save_credentials("pc-9", "tok", "abcd")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert config.credentials().client_id == "pc-9"


@pytest.mark.parametrize("store, lent", [
    ("https://ns.example:8443/images/", True),
    ("https://NS.example:8443/images/", True),                 # host names are case-free
    ("https://ns.example:8443", True),
    ("https://ns.example/images/", False),                     # 443, not 8443
    ("http://ns.example:8443/images/", False),                 # another scheme
    ("https://ns.example.evil:8443/images/", False),
    ("https://ns.example:8443@evil.example/images/", False),   # a user named ns.example
    ("https://other:pw@ns.example:8443/images/", False),       # its own credentials kept
    ("/srv/images", False),
    ("https://ns.example:bad/images/", False),
])
def test_image_store_on_the_servers_origin_gets_the_agents_credentials(tmp_path, store, lent):
    text = GOOD.format(state=tmp_path).replace('token      = "t"', 'token      = "t/k:n"') \
        .replace('image_store   = "/srv/images"', f'image_store   = "{store}"')
    got = load_config(write(tmp_path, text)).handlers["image_store"]
    if lent:
        scheme, rest = store.split("://", 1)
        assert got == f"{scheme}://pc-0042:t%2Fk%3An@{rest}"
    else:
        assert got == store


def test_no_credentials_yet_lends_nothing(tmp_path):
    text = GOOD.format(state=tmp_path).replace('token      = "t"\n', "").replace(
        'image_store   = "/srv/images"', 'image_store   = "https://ns.example:8443/images/"')
    config = load_config(write(tmp_path, text))
    assert config.handlers["image_store"] == "https://ns.example:8443/images/"
    config.save_credentials("pc-9", "tok", "abcd")         # registered (automation: each boot)
    assert config.handlers["image_store"] == "https://pc-9:tok@ns.example:8443/images/"


toml_values = st.one_of(st.integers(), st.text(max_size=10), st.booleans(), st.floats(allow_nan=False))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["agent", "cta", "objecthost", "handlers", "bogus"]),
                       st.dictionaries(st.sampled_from(["listen", "server_url", "state_dir",
                                                        "poll_interval_s", "max_concurrent_tasks",
                                                        "tickle_key", "run_script", "x"]),
                                       toml_values, max_size=4), max_size=4))
def test_fuzz_config_only_raises_config_error(raw):
    try:
        check_config(raw, "fuzz.toml")
    except ConfigError:
        pass


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_config_with_secrets_readable_by_others_is_refused(tmp_path, mode):
    path = write(tmp_path, GOOD.format(state=tmp_path), mode)
    with pytest.raises(ConfigError, match=r"holds secrets \(\[agent\] token, \[agent\] tickle_key\)"
                                          r".*chmod 600"):
        load_config(path)


def test_config_without_secrets_may_be_world_readable(tmp_path):
    path = write(tmp_path, "[handlers]\nrun_script = false\n", 0o644)
    assert load_config(path, require=()).handlers["run_script"] is False


def test_every_config_key_is_documented():
    """docs/config.md lists every section and key the loader accepts."""
    from pathlib import Path

    from agent.common.config import SCHEMA

    doc = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    for section, keys in SCHEMA.items():
        assert f"## [{section}]" in doc, section
        body = doc.split(f"## [{section}]", 1)[1].split("\n## ", 1)[0]
        for key in keys:
            assert f"`{key}`" in body, f"[{section}] {key} is not in docs/config.md"


def test_plugin_settings_tables_are_checked_for_shape():
    base = {"agent": {"server_url": "http://127.0.0.1:1", "state_dir": "/tmp/x"}}
    config = check_config({**base, "handlers": {"sbs_dir": "/srv/sbs", "acme": {
        "endpoint": "https://x", "retries": 3, "tags": ["a", "b"], "on": True}}}, "a.toml")
    assert config.plugin_settings == {"acme": {"endpoint": "https://x", "retries": 3,
                                               "tags": ["a", "b"], "on": True}}
    assert config.handlers["acme"]["retries"] == 3 and config.handlers["sbs_dir"] == "/srv/sbs"
    with pytest.raises(ConfigError, match=r"\[handlers.acme\] deep: a handler setting is"):
        check_config({**base, "handlers": {"acme": {"deep": {"x": 1}}}}, "a.toml")
    with pytest.raises(ConfigError, match=r"\[handlers.a b\]: not a plugin name"):
        check_config({**base, "handlers": {"a b": {}}}, "a.toml")
    with pytest.raises(ConfigError, match=r"unknown key 'endpoint' in \[handlers\] \(a third-party"):
        check_config({**base, "handlers": {"endpoint": "https://x"}}, "a.toml")
    with pytest.raises(ConfigError, match=r"\[handlers\] sbs_dir must be a str"):
        check_config({**base, "handlers": {"sbs_dir": {"x": 1}}}, "a.toml")


PXE_BASE = {"agent": {"server_url": "http://127.0.0.1:1", "state_dir": "/tmp/x"},
            "handlers": {"sbs_dir": "/srv/sbs/SBS", "preboot_store": "/srv/preboot"}}


def test_pxe_section_per_protocol_6():
    from agent.common.config import pxe_tftp_root

    config = check_config({**PXE_BASE, "pxe": {"interface": "eth1"}}, "a.toml")
    assert config.get("pxe", "interface") == "eth1" and pxe_tftp_root(config) == "/srv/preboot"
    config = check_config({**PXE_BASE, "pxe": {"interface": "enp0s31f6.100",
                                               "tftp_root": "/srv/tftp"}}, "a.toml")
    assert pxe_tftp_root(config) == "/srv/tftp"
    assert not check_config(PXE_BASE, "a.toml").has_section("pxe")


@pytest.mark.parametrize("pxe, handlers, message", [
    ({}, None, "missing required key 'interface' in [pxe]"),
    ({"interface": ""}, None, "is not a Linux interface name"),
    ({"interface": "a" * 16}, None, "is not a Linux interface name"),
    ({"interface": "eth/1"}, None, "is not a Linux interface name"),
    ({"interface": "eth 1"}, None, "is not a Linux interface name"),
    ({"interface": "eth0:1"}, None, "is not a Linux interface name"),
    ({"interface": ".."}, None, "is not a Linux interface name"),
    ({"interface": 3}, None, "[pxe] interface must be a str"),
    ({"interface": "eth1", "tftp_root": "srv"}, None, "tftp_root must be an absolute path"),
    ({"interface": "eth1", "dhcp": True}, None, "unknown key 'dhcp' in [pxe]"),
    ({"interface": "eth1"}, {"preboot_store": "/p"}, "[pxe] needs [handlers] sbs_dir"),
    ({"interface": "eth1"}, {"sbs_dir": "/s"}, "[pxe] needs tftp_root, or [handlers] preboot_store"),
])
def test_bad_pxe_section_is_refused(pxe, handlers, message):
    raw = {**PXE_BASE, "pxe": pxe}
    if handlers is not None:
        raw["handlers"] = handlers
    with pytest.raises(ConfigError) as err:
        check_config(raw, "a.toml")
    assert message in str(err.value) and "a.toml" in str(err.value)
