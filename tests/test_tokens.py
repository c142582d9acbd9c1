"""Tokens in task parameters (taskserver/tokens.py): replaced per computer,
an unknown one refused by name."""

import pytest
from hypothesis import given, strategies as st

from taskserver.checks import InvalidRequest
from taskserver.tokens import TOKENS, expand, facts_of

CLIENT = {"name": "pc-0042", "macs": ["52:54:00:AA:BB:01", "52:54:00:aa:bb:02"],
          "serial": "VMW-123"}


def test_every_token_is_replaced_from_the_computer():
    facts = facts_of(CLIENT, "pc-0042", image="win11-base")
    params = {"image": "%COMPNAME%-backup", "note": "%ID% %MAC% %SERIALNUMBER% %IMAGE% 100%%",
              "plain": "no tokens"}
    assert expand(params, facts, "pc-0042") == {
        "image": "pc-0042-backup", "note": "pc-0042 52:54:00:aa:bb:01 VMW-123 win11-base 100%",
        "plain": "no tokens"}


def test_the_pxe_entry_names_the_computer_and_image_falls_back_to_the_task_parameter():
    facts = facts_of(None, "c-1", pxe_name="lab-7", pxe_mac="52:54:00:00:00:07")
    assert expand({"image": "gold", "x": "%COMPNAME% %MAC% %IMAGE%"}, facts, "c-1")["x"] \
        == "lab-7 52:54:00:00:00:07 gold"


@pytest.mark.parametrize("value, message", [
    ("%COMPUTERNAME%", r"parameter 'x': unknown token %COMPUTERNAME% \(known: %COMPNAME%"),
    ("%SERIALNUMBER%", r"token %SERIALNUMBER% has no value for c-1"),
    ("%IMAGE%", r"token %IMAGE% has no value for c-1"),
    ("50%", r"a lone '%'"),
])
def test_an_unknown_or_empty_token_is_refused_by_name(value, message):
    with pytest.raises(InvalidRequest, match=message):
        expand({"x": value}, facts_of({"name": "n"}, "c-1"), "c-1")


@given(st.text(alphabet="%ACDEGIMNOPSUX_-1 ", max_size=40))
def test_expansion_either_replaces_cleanly_or_refuses(value):
    facts = facts_of(CLIENT, "pc-0042", image="img")
    try:
        out = expand({"x": value}, facts, "pc-0042")["x"]
    except InvalidRequest as exc:
        assert "parameter 'x'" in str(exc)
    else:
        assert not any(f"%{t}%" in out for t in TOKENS if f"%%{t}" not in value)
