"""Write the seed corpus (fuzz/corpus/*) and the known-crash inputs (fuzz/known-crashes/*).

    python fuzz/make_corpus.py

Deterministic: running it again rewrites the same files. Valid frames are
signed for the harnesses' fixed moment and keys (fuzz_tickle.py), so the
fuzzer starts from lines that pass every check.
"""

from __future__ import annotations

import codecs
import hashlib
from pathlib import Path

from _harness import REPO  # noqa: F401  (puts the repo on sys.path)

from agent.common.tickle import sign

HERE = Path(__file__).resolve().parent
CID = "pc-0042"
KEY = bytes.fromhex("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
HOP_KEY = bytes.fromhex("ff" * 32)
NOW = 1_700_000_000
NONCE = "0123456789abcdef0123456789abcdef"
ID1 = "0b8e8c5e-3f7a-4f63-9d8f-2a61c1e0e4a1"
ID2 = "0b8e8c5e-3f7a-4f63-9d8f-2a61c1e0e4a2"


def tickle(cid=CID, ts=NOW, nonce=NONCE, key=KEY, end=b"\n", sig=None) -> bytes:
    body = f"DSTICKLE/1 {cid} {ts} {nonce}".encode("utf-8")
    return body + b" " + (sig or sign(key, body).encode()) + end


def wake(ts=NOW, nonce=NONCE, key=HOP_KEY, sig=None) -> bytes:
    body = f"DSWAKE/1 {ts} {nonce}".encode()
    return body + b" " + (sig or sign(key, body).encode()) + b"\n"


TICKLE = {
    "valid": tickle(),
    "valid-nonce-16": tickle(nonce="0123456789abcdef"),
    "valid-nonce-64": tickle(nonce="ab" * 32),
    "valid-nonce-upper": tickle(nonce=NONCE.upper()),
    "valid-edge-skew": tickle(ts=NOW - 300),
    "valid-cid-64": tickle(cid="a" * 64),
    "nonce-15": tickle(nonce="0123456789abcde"),
    "nonce-65": tickle(nonce="a" * 65),
    "nonce-not-hex": tickle(nonce="0123456789abcdeg"),
    "other-client": tickle(cid="pc-0043"),
    "cid-65": tickle(cid="a" * 65),
    "cid-bad-char": tickle(cid="pc/0042"),
    "cid-unicode": tickle(cid="pc-ö042"),
    "bad-signature": tickle(sig=b"0" * 64),
    "signature-upper": tickle(sig=sign(KEY, f"DSTICKLE/1 {CID} {NOW} {NONCE}".encode()).upper().encode()),
    "signature-short": tickle(sig=b"ab" * 31),
    "stale": tickle(ts=NOW - 301),
    "future": tickle(ts=NOW + 301),
    "ts-negative": tickle(ts=-5),
    "ts-19-digits": tickle(ts=9_999_999_999_999_999_999),
    "ts-20-digits": tickle(ts=10_000_000_000_000_000_000),
    "ts-unicode-digits": tickle(ts="١٧٠٠٠٠٠٠٠٠"),
    "ts-superscript": tickle(ts="17²"),
    "crlf": tickle(end=b"\r\n"),
    "no-newline": tickle(end=b""),
    "trailing-bytes": tickle() + b"more\n",
    "two-lines": tickle() + tickle(nonce="f" * 32),
    "tabs": tickle().replace(b" ", b"\t"),
    "double-space": tickle().replace(b" ", b"  ", 1),
    "version-2": tickle().replace(b"DSTICKLE/1", b"DSTICKLE/2"),
    "lowercase-magic": tickle().replace(b"DSTICKLE", b"dstickle"),
    "nul-inside": tickle().replace(b" ", b"\0", 1),
    "empty": b"",
    "newline": b"\n",
    "garbage": b"hello world\n",
    "binary": b"\x00\xff\xfe binary \x80\n",
    "511-bytes": b"A" * 511 + b"\n",
    "513-bytes": b"A" * 512 + b"\n",
    "wake-valid": wake(),
    "wake-stale": wake(ts=NOW - 1000),
    "wake-forged": wake(key=b"\0" * 32),
    "wake-nonce-upper": wake(nonce=NONCE.upper()),
    "wake-with-tickle-key": wake(key=KEY),
}


def doc(*tasks: str, client: str = CID, head: str = "") -> bytes:
    return f'{head}<ClientTasks client="{client}">{"".join(tasks)}</ClientTasks>'.encode()


def task(tid=ID1, type_="RunScript", params=None, attrs="") -> str:
    params = {"script": "echo hi"} if params is None else params
    ps = "".join(f'<Parameter name="{k}">{v}</Parameter>' for k, v in params.items())
    return f'<Task id="{tid}" type="{type_}"{attrs}><Parameters>{ps}</Parameters></Task>'


LAUGHS = ('<!DOCTYPE ClientTasks [<!ENTITY a "lol"><!ENTITY b "&a;&a;&a;&a;">'
          '<!ENTITY c "&b;&b;&b;&b;">]>')
TASKXML = {
    "protocol-example": doc(
        f'<Task id="{ID1}" type="UpdateSBSInfo" timeout="300"><Parameters>'
        '<Parameter name="kind">update</Parameter><Parameter name="payload"><![CDATA['
        '<Computer mac="00:11:22:33:44:55" action="boot-automation"/>]]></Parameter>'
        '</Parameters></Task>'),
    "empty": doc(),
    "self-closing": b"<ClientTasks/>",
    "no-client-attr": b"<ClientTasks>" + task().encode() + b"</ClientTasks>",
    "other-client": doc(task(), client="pc-9999"),
    "two-tasks": doc(task(), task(ID2, "BootWizRebuild", {"config": "c", "base": "b"})),
    "timeout": doc(task(attrs=' timeout="2592000"')),
    "timeout-zero": doc(task(attrs=' timeout="0"')),
    "timeout-over": doc(task(attrs=' timeout="2592001"')),
    "timeout-spaces": doc(task(attrs=' timeout=" 10 "')),
    "timeout-negative": doc(task(attrs=' timeout="-1"')),
    "timeout-float": doc(task(attrs=' timeout="1e3"')),
    "timeout-arabic-digits": doc(task(attrs=' timeout="١٢"')),
    "cr-char-ref": doc(task(params={"script": "a&#13;\nb &lt;&amp;&gt; é"})),
    "cdata": doc(task(params={"script": "<![CDATA[<x>&y;]]>"})),
    "billion-laughs": (LAUGHS + f'<ClientTasks client="{CID}">&c;</ClientTasks>').encode(),
    "external-entity": (b'<!DOCTYPE ClientTasks [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                        + doc(task(params={"script": "&x;"}))),
    "external-dtd": b'<!DOCTYPE ClientTasks SYSTEM "http://127.0.0.1:9/evil.dtd"><ClientTasks/>',
    "parameter-entity": (b'<!DOCTYPE ClientTasks [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>'
                         b"<ClientTasks/>"),
    "doctype-plain": b"<!DOCTYPE ClientTasks><ClientTasks/>",
    "undefined-entity": doc(task(params={"script": "&nope;"})),
    "deep-nesting": b"<ClientTasks>" + b"<a>" * 40 + b"</a>" * 40 + b"</ClientTasks>",
    "depth-6": doc(task(params={"p": "<b><c/></b>"})),
    "invalid-utf8": b'<ClientTasks client="pc-0042"><Task id="\xff\xfe\xc3(" type="T"/></ClientTasks>',
    "utf16-bom": codecs.BOM_UTF16_LE + doc(task()).decode().replace(
        "<ClientTasks", '<?xml version="1.0" encoding="UTF-16"?><ClientTasks', 1).encode("utf-16-le"),
    "utf8-bom": codecs.BOM_UTF8 + doc(task()),
    "latin1-declared": ('<?xml version="1.0" encoding="ISO-8859-1"?>'.encode()
                        + doc(task(params={"script": "echo caf\xe9"})).decode().encode("latin-1")),
    "multibyte-encoding": b'<?xml version="1.0" encoding="utf-7"?><ClientTasks/>',
    "nul-char-ref": doc(task(params={"script": "a&#0;b"})),
    "nul-raw": doc(task(params={"script": "a\0b"})),
    "duplicate-ids": doc(task(), task(params={"script": "echo second"})),
    "unknown-attribute": doc(task(attrs=' colour="red"')),
    "xmlns": doc(task(attrs=' xmlns="urn:x" xmlns:e="urn:e" e:x="1"')),
    "unknown-element": doc(f'<Task id="{ID1}" type="T"><Extra/></Task>'),
    "parameter-no-name": doc(f'<Task id="{ID1}" type="T"><Parameters><Parameter>x</Parameter>'
                             '</Parameters></Task>'),
    "parameter-twice": doc(task(params={"a": "1"}).replace("</Parameters>",
                                                           '<Parameter name="a">2</Parameter></Parameters>')),
    "parameter-element": doc(f'<Task id="{ID1}" type="T"><Parameters><Parameter name="a"><b/>'
                             '</Parameter></Parameters></Task>'),
    "two-parameters-blocks": doc(f'<Task id="{ID1}" type="T"><Parameters/><Parameters/></Task>'),
    "parameters-text": doc(f'<Task id="{ID1}" type="T"><Parameters>text</Parameters></Task>'),
    "task-text": doc(f'<Task id="{ID1}" type="T">text</Task>'),
    "task-empty": doc("<Task/>"),
    "id-not-uuid": doc(task(tid="not-a-uuid")),
    "id-spaces": doc(task(tid=f" {ID1} ")),
    "id-129": doc(task(tid="a" * 129)),
    "type-bad": doc(task(type_="1bad type")),
    "type-missing": doc(f'<Task id="{ID1}"/>'),
    "comments-pi": (b'<?xml version="1.0"?><!-- c --><?pi x?>'
                    + doc("<!-- in -->" + task() + "<?pi y?>")),
    "root-other": b"<Tasks/>",
    "junk-after-root": doc() + b"<ClientTasks/>",
    "truncated": doc(task())[:-20],
    "clienttasks-text": b"<ClientTasks>hello</ClientTasks>",
    "many-attributes": ("<ClientTasks>" + "<Task " + " ".join(f'a{i}=""' for i in range(200))
                        + "/></ClientTasks>").encode(),
    "empty-bytes": b"",
}

CONFIG = {
    "protocol-example": b'''[agent]
server_url = "https://ns.example:8443"
client_id  = "pc-0042"
token      = "secret"
tickle_key = "00112233445566778899aabbccddeeff"
state_dir  = "/var/lib/dsagent"

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
run_script = false
sbs_wake_command = "/usr/bin/true --now"
preboot_keep_versions = 3
''',
    "minimal": b'[agent]\nserver_url = "http://127.0.0.1:8080"\nstate_dir = "/tmp/s"\n',
    "handlers-only": b'[handlers]\nrun_script = false\n',
    "empty": b"",
    "unknown-key": b'[agent]\nserver_url = "http://x"\nstate_dir = "/s"\npoll = 5\n',
    "unknown-section": b'[agnet]\nserver_url = "http://x"\n',
    "missing-required": b'[agent]\nserver_url = "http://x"\n',
    "string-for-int": b'[cta]\npoll_interval_s = "300"\n',
    "bool-for-int": b'[cta]\nmax_concurrent_tasks = true\n',
    "float-for-int": b'[cta]\npoll_interval_s = 1.5\n',
    "string-for-bool": b'[handlers]\nrun_script = "false"\n',
    "int-for-string": b'[agent]\nserver_url = 5\nstate_dir = "/s"\n',
    "poll-zero": b'[cta]\npoll_interval_s = 0\n',
    "tasks-257": b'[cta]\nmax_concurrent_tasks = 257\n',
    "huge-int": b'[cta]\npoll_interval_s = 9223372036854775807\n',
    "listen-ipv6": b'[cta]\nlisten = "[::1]:50124"\n[objecthost]\nlisten = "[::]:50122"\n',
    "listen-no-port": b'[cta]\nlisten = "127.0.0.1"\n',
    "listen-no-host": b'[objecthost]\nlisten = ":50122"\n',
    "listen-port-high": b'[objecthost]\nlisten = "0.0.0.0:65536"\n',
    "listen-port-negative": b'[objecthost]\nlisten = "0.0.0.0:-1"\n',
    "listen-arabic-digits": '[objecthost]\nlisten = "0.0.0.0:١٢٣"\n'.encode(),
    "tickle-key-not-hex": b'[agent]\nserver_url = "http://x"\nstate_dir = "/s"\ntickle_key = "xyz"\n',
    "server-url-ftp": b'[agent]\nserver_url = "ftp://x"\nstate_dir = "/s"\n',
    "section-not-table": b'agent = 5\n',
    "array-of-tables": b'[[agent]]\nserver_url = "http://x"\n',
    "dotted-keys": b'agent.server_url = "http://x"\nagent.state_dir = "/s"\n',
    "inline-table": b'agent = { server_url = "http://x", state_dir = "/s" }\n',
    "sub-table": b'[agent.extra]\nx = 1\n',
    "datetime": b'[agent]\nserver_url = 1979-05-27T07:32:00Z\nstate_dir = "/s"\n',
    "duplicate-key": b'[cta]\npoll_interval_s = 1\npoll_interval_s = 2\n',
    "unterminated": b'[agent]\nserver_url = "http://x\n',
    "unicode-key": '[agent]\n"sérver_url" = "http://x"\n'.encode(),
    "not-utf8": b'[agent]\nserver_url = "http://\xff"\n',
    "nested-arrays": b'[handlers]\nsbs_dir = [[["x"]]]\n',
}

KNOWN_CRASHES = {
    "taskxml": {
        "timeout-superscript-digit": doc(task(attrs=' timeout="²"')),
        "unknown-encoding": b'<?xml version="1.0" encoding="x-evil"?><ClientTasks/>',
        "binary-codec-encoding": b'<?xml version="1.0" encoding="rot13"?><ClientTasks/>',
    },
    "config": {
        "listen-superscript-digit": '[cta]\nlisten = "127.0.0.1:²"\n'.encode(),
        "deeply-nested-array": b"a = " + b"[" * 2000 + b"]" * 2000 + b"\n",
    },
}


def write(folder: Path, items: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for name, data in items.items():
        digest = hashlib.sha1(data).hexdigest()[:8]
        (folder / f"{name}-{digest}").write_bytes(data)


def main() -> None:
    write(HERE / "corpus" / "tickle", TICKLE)
    write(HERE / "corpus" / "taskxml", TASKXML)
    write(HERE / "corpus" / "config", CONFIG)
    for target, items in KNOWN_CRASHES.items():
        write(HERE / "known-crashes" / target, items)
    print({"tickle": len(TICKLE), "taskxml": len(TASKXML), "config": len(CONFIG),
           "known-crashes": sum(map(len, KNOWN_CRASHES.values()))})


if __name__ == "__main__":
    main()
