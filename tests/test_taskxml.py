"""Task XML parsing: well-formed documents, every refusal path, and fuzzing."""

import pytest
from hypothesis import given, settings, strategies as st

from agent.common.errors import TaskDocumentError
from agent.common.taskxml import MAX_DEPTH, parse_client_tasks

ID1 = "0b8e8c5e-3f7a-4f63-9d8f-2a61c1e0e4a1"
ID2 = "0b8e8c5e-3f7a-4f63-9d8f-2a61c1e0e4a2"


def doc(*tasks: str, client: str = "pc-0042") -> bytes:
    return f'<ClientTasks client="{client}">{"".join(tasks)}</ClientTasks>'.encode()


def test_protocol_example_parses_with_payload_byte_for_byte():
    payload = '  <Computer mac="00:11:22:33:44:55" action="boot-automation"/>\n\t'
    xml = doc(f'<Task id="{ID1}" type="UpdateSBSInfo" timeout="300"><Parameters>'
              '<Parameter name="kind">update</Parameter>'
              f'<Parameter name="payload"><![CDATA[{payload}]]></Parameter>'
              '</Parameters></Task>')
    parsed = parse_client_tasks(xml, "pc-0042")
    [task] = parsed.tasks
    assert (task.id, task.type, task.timeout) == (ID1, "UpdateSBSInfo", 300)
    assert task.parameters == {"kind": "update", "payload": payload}
    assert not parsed.rejected and not parsed.skipped


def test_carriage_return_survives_as_character_reference():
    xml = doc(f'<Task id="{ID1}" type="RunScript"><Parameters>'
              '<Parameter name="script">a&#13;\nb &lt;&amp;&gt; é</Parameter></Parameters></Task>')
    assert parse_client_tasks(xml).tasks[0].parameters["script"] == "a\r\nb <&> é"


def test_empty_document_and_empty_parameter():
    assert parse_client_tasks(doc()).tasks == []
    xml = doc(f'<Task id="{ID1}" type="T"><Parameters><Parameter name="x"/></Parameters></Task>')
    assert parse_client_tasks(xml).tasks[0].parameters == {"x": ""}


@pytest.mark.parametrize("data, reason", [
    (b"<ClientTasks>", "not well-formed"),
    (b"", "not well-formed"),
    (b"<Tasks/>", "expected <ClientTasks>"),
    (b'<!DOCTYPE ClientTasks [<!ENTITY a "b">]><ClientTasks/>', "DTD"),
    (b'<!DOCTYPE ClientTasks SYSTEM "http://x/evil.dtd"><ClientTasks/>', "DTD"),
    (b"<ClientTasks>" + b"<a>" * (MAX_DEPTH + 2) + b"</a>" * (MAX_DEPTH + 2) + b"</ClientTasks>",
     "nested deeper"),
    (b"<ClientTasks>\xff\xfe</ClientTasks>", "not well-formed"),
    (b'<ClientTasks client="someone-else"/>', "addressed to client"),
])
def test_unusable_documents_are_refused_with_a_reason(data, reason):
    with pytest.raises(TaskDocumentError, match=reason):
        parse_client_tasks(data, "pc-0042")


def test_billion_laughs_refused_without_expanding():
    laughs = b'<!DOCTYPE l [<!ENTITY l0 "ha">' + b"".join(
        b'<!ENTITY l%d "&l%d;&l%d;&l%d;&l%d;&l%d;&l%d;&l%d;&l%d;&l%d;&l%d;">' % ((i,) + (i - 1,) * 10)
        for i in range(1, 10)) + b"]><ClientTasks>&l9;</ClientTasks>"
    with pytest.raises(TaskDocumentError):
        parse_client_tasks(laughs)


def test_oversize_document_refused_before_parsing():
    with pytest.raises(TaskDocumentError, match="over the"):
        parse_client_tasks(b"<ClientTasks>" + b" " * 2000 + b"</ClientTasks>", max_bytes=1000)


@pytest.mark.parametrize("task, message", [
    (f'<Task id="{ID1}" type="T" timeout="soon"/>', "timeout"),
    (f'<Task id="{ID1}" type="T" timeout="0"/>', "timeout"),
    (f'<Task id="{ID1}" type="T" colour="red"/>', "unknown attribute 'colour'"),
    (f'<Task id="{ID1}" type=""/>', "type"),
    (f'<Task id="{ID1}"/>', "type"),
    (f'<Task id="{ID1}" type="T"><Extra/></Task>', "unexpected element <Extra>"),
    (f'<Task id="{ID1}" type="T"><Parameters><Parameter>x</Parameter></Parameters></Task>',
     "no name"),
    (f'<Task id="{ID1}" type="T"><Parameters><Parameter name="a">1</Parameter>'
     '<Parameter name="a">2</Parameter></Parameters></Task>', "given twice"),
    (f'<Task id="{ID1}" type="T"><Parameters><Parameter name="a"><b/></Parameter>'
     '</Parameters></Task>', "unexpected content"),
    ('<Task id="not-a-uuid" type="T"/>', "not a UUID"),
])
def test_bad_task_with_readable_id_is_rejected_with_message(task, message):
    parsed = parse_client_tasks(doc(task, f'<Task id="{ID2}" type="Good"/>'))
    assert [t.id for t in parsed.tasks] == [ID2]
    [bad] = parsed.rejected
    assert message in bad.message


def test_task_without_readable_id_is_skipped_and_duplicates_dropped():
    parsed = parse_client_tasks(doc('<Task type="T"/>', f'<Task id="{ID1}" type="T"/>',
                                    f'<Task id="{ID1}" type="T"/>'))
    assert [t.id for t in parsed.tasks] == [ID1]
    assert any("no readable id" in s for s in parsed.skipped)
    assert any("twice" in s for s in parsed.skipped)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes_never_crash(data):
    try:
        parse_client_tasks(data)
    except TaskDocumentError:
        pass


xml_fragments = st.lists(st.sampled_from([
    "<ClientTasks>", "</ClientTasks>", f'<Task id="{ID1}" type="T">', "</Task>", "<Task>",
    "<Parameters>", "</Parameters>", '<Parameter name="p">', "<Parameter>", "</Parameter>",
    "text", "&amp;", "&bogus;", "<![CDATA[x]]>", "<!-- c -->", '<Task id="" type="T"/>',
    '<?xml version="1.0"?>', "<!DOCTYPE x>", " timeout=\"5\"", "\x00", "é"]), max_size=20)


@settings(max_examples=300, deadline=None)
@given(xml_fragments)
def test_fuzz_structured_fragments_never_crash(parts):
    try:
        parsed = parse_client_tasks("".join(parts).encode("utf-8", "surrogatepass"))
    except TaskDocumentError:
        return
    for task in parsed.tasks:
        assert isinstance(task.parameters, dict)
