"""The PXE Server's rendered answers (agent/pxe/bootfiles.py) and the Signal's
startup files (agent/pxe/startup.py), on real files: what dnsmasq and iPXE
will read for each decision."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from agent.pxe.bootfiles import EVERYONE, BootFiles, script_name
from agent.pxe.interface import scan, store_dir
from agent.pxe.sbsdoc import Computer, Computers, Settings, Update
from agent.pxe.startup import StartupError, write_startup_files
from agent.pxe.state import Decision, PXEState

AUTO = "02:00:00:00:00:01"
PROD = "02:00:00:00:00:02"
IGN = "02:00:00:00:00:03"


@pytest.fixture
def state(tmp_path):
    s = PXEState(tmp_path / "state")
    yield s
    s.close()


def files_in(tmp_path):
    return BootFiles(tmp_path / "run", tmp_path / "tftp", ipxe_dir=tmp_path / "ipxe")


def build(root, config):
    version = root / config / "v1"
    version.mkdir(parents=True)
    (version / "boot.ipxe").write_text("#!ipxe\n")
    os.symlink("v1", root / config / "current")


def test_each_decision_becomes_a_script_and_only_answered_macs_are_in_the_hosts_file(
        tmp_path, state):
    state.apply("initialPXEConfigPath.sbs", Settings({"unknown_computers": "ignore"}))
    state.apply("1-client.sbs", Computers(False, [Computer(AUTO, "automation", "auto64"),
                                           Computer(PROD, "production"),
                                           Computer(IGN, "ignore")]))
    files = files_in(tmp_path)
    build(files.tftp_root, "auto64")
    rendered = files.render(*state.decisions())
    assert files.hosts_path.read_text().split() == [AUTO, PROD]   # ignore: no answer at all
    assert rendered.answered == 2 and rendered.unbuilt == {}
    auto = (files.boot_dir / script_name(AUTO)).read_text()
    assert "chain /auto64/current/boot.ipxe || goto failed" in auto
    assert (files.boot_dir / script_name(PROD)).read_text().splitlines()[-1] == "exit"
    assert "${mac:hexhyp}.ipxe" in (files.boot_dir / "boot.ipxe").read_text()
    assert "exit" in (files.boot_dir / "unknown.ipxe").read_text()
    assert oct(os.stat(files.hosts_path).st_mode & 0o777) == "0o644"   # dnsmasq drops root


def test_unknown_computers_automation_answers_every_mac(tmp_path, state):
    state.apply("initialPXEConfigPath.sbs", Settings({"unknown_computers": "automation",
                                                      "automation_config": "auto64"}))
    state.apply("1-client.sbs", Computers(False, [Computer(IGN, "ignore")]))
    files = files_in(tmp_path)
    rendered = files.render(*state.decisions())
    assert files.hosts_path.read_text() == EVERYONE + "\n" and rendered.answered == -1
    assert "chain /auto64/current/boot.ipxe" in (files.boot_dir / "unknown.ipxe").read_text()
    # answered by the wildcard, the ignored MAC's script ends iPXE at once
    assert (files.boot_dir / script_name(IGN)).read_text().splitlines()[-1] == "exit"
    assert rendered.unbuilt == {"auto64": ["unknown computers"]}


def test_a_one_computer_change_rewrites_one_script_and_stale_scripts_go(tmp_path, state):
    macs = [f"02:00:00:00:{i // 256:02x}:{i % 256:02x}" for i in range(300)]
    state.apply("1-client.sbs", Computers(False, [Computer(m, "production") for m in macs]))
    files = files_in(tmp_path)
    first = files.render(*state.decisions())
    assert first.written == 302 and first.hosts_changed
    inode = os.stat(files.boot_dir / script_name(macs[1])).st_ino
    state.apply("u.sbs", Update(Computer(macs[0], "automation", "auto64")))
    again = files.render(*state.decisions())
    assert (again.written, again.deleted, again.hosts_changed) == (1, 0, False)
    assert os.stat(files.boot_dir / script_name(macs[1])).st_ino == inode
    assert again.unbuilt == {"auto64": [macs[0]]}
    state.apply("2-client.sbs", Computers(False, [Computer(macs[0], "production")]))
    third = files.render(*state.decisions())
    assert third.deleted == 299 and third.hosts_changed
    assert sorted(os.listdir(files.boot_dir)) == sorted(
        ["boot.ipxe", "unknown.ipxe", script_name(macs[0])])
    # a new process starts from what is on disk: nothing to write
    assert files_in(tmp_path).render(*state.decisions()).written == 0


@pytest.fixture
def open_dir():
    """A folder other users can enter, as dnsmasq (user nobody) must (pytest's
    own tmp_path is under a 0700 folder)."""
    path = Path(tempfile.mkdtemp(prefix="dsagent-pxe-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_prepare_copies_the_ipxe_loaders_and_names_the_missing_package(open_dir):
    files = files_in(open_dir)
    with pytest.raises(FileNotFoundError, match="install Debian's ipxe package"):
        files.prepare()
    (open_dir / "ipxe").mkdir()
    (open_dir / "ipxe" / "undionly.kpxe").write_bytes(b"\x00" * 100)
    files.prepare()
    assert (files.boot_dir / "undionly.kpxe").read_bytes() == b"\x00" * 100


def test_prepare_names_the_folder_dnsmasq_could_not_enter(tmp_path, open_dir):
    (open_dir / "closed").mkdir(mode=0o700)
    with pytest.raises(PermissionError, match=r"closed \(mode 0700\) is closed to other users"):
        BootFiles(open_dir / "run", open_dir / "closed" / "tftp").prepare()
    with pytest.raises(PermissionError, match="runs as user nobody"):
        files_in(tmp_path).prepare()   # pytest's basetemp is 0700


MACS = st.sampled_from([f"02:00:00:00:00:{i:02x}" for i in range(8)])
ENTRY = st.builds(Computer, MACS, st.sampled_from(["automation", "production", "ignore"]),
                  st.sampled_from([None, "a", "b"]))


@settings(max_examples=60, deadline=None)
@given(managed=st.lists(ENTRY, max_size=6), predefined=st.lists(ENTRY, max_size=6),
       unknown=st.sampled_from(["ignore", "automation"]), fallback=st.sampled_from([None, "z"]))
def test_decisions_agree_with_decision_for_every_mac(tmp_path_factory, managed, predefined,
                                                     unknown, fallback):
    s = PXEState(tmp_path_factory.mktemp("state"))
    try:
        values = {"unknown_computers": unknown, **({"automation_config": fallback}
                                                   if fallback else {})}
        s.apply("i.sbs", Settings(values))
        s.apply("1-client.sbs", Computers(False, list({c.mac: c for c in managed}.values())))
        s.apply("P.sbs", Computers(True, list({c.mac: c for c in predefined}.values())))
        decisions, unknown_decision = s.decisions()
        for i in range(8):
            mac = f"02:00:00:00:00:{i:02x}"
            assert decisions.get(mac, unknown_decision) == s.decision(mac)
    finally:
        s.close()


def test_startup_files_are_written_under_their_names_and_applied(tmp_path, state):
    sbs = tmp_path / "SBS"
    sbs.mkdir()
    answer = {"initial-config": '<PXEConfig><Setting name="unknown_computers">ignore</Setting>'
                                '</PXEConfig>',
              "clients": f'<Computers><Computer mac="{AUTO}" action="production"/></Computers>',
              "images": '<Images><Image config="auto64" version="v1"/></Images>',
              "predefined": None}
    names = write_startup_files(sbs, answer)
    assert names[0] == "initialPXEConfigPath.sbs" and names[1].endswith("-client.sbs")
    assert len(names) == 3 and sorted(os.listdir(sbs)) == sorted(names)   # no temporary left
    result = scan(sbs, state)
    assert [n for n, _ in result.applied] == names and os.listdir(sbs) == []
    assert sorted(os.listdir(store_dir(sbs))) == sorted(names)
    assert state.decision(AUTO) == Decision("production", None)
    (sbs / "initialPXEConfigPath.sbs").write_text("<PXEConfig/>")   # an older one still waiting
    with pytest.raises(StartupError) as caught:
        write_startup_files(sbs, answer)
    assert caught.value.waiting
    assert (sbs / "initialPXEConfigPath.sbs").read_text() == "<PXEConfig/>"   # not overwritten
