"""``dsagent doctor`` on a site server with ``[packages]``: does the package
server answer, so that other site servers can replicate from it?

``packages-server``: the package server has not run, has stopped, or does not
answer ``GET /`` on its ``[packages] listen`` address (a wildcard address is
asked on loopback). Reads the status file and asks over HTTP; changes nothing.
Each check returns a Finding (the same shape as agent/pxe/checks.py's), which
the doctor turns into its table row.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from agent.common.config import Config, parse_hostport
from agent.common.findings import Finding

PROBE_S = 3.0


def probe_url(listen: str) -> str:
    host, port = parse_hostport(listen, "[packages] listen")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def check_server(config: Config) -> Finding:
    listen = config.get("packages", "listen")
    try:
        facts = json.loads((Path(config.state_dir) / "status" / "packages.json").read_text())
    except (OSError, ValueError):
        facts = {}
    if not facts:
        return Finding("fail", "the package server has not run (no status file)",
                       "start the agent: dsagent run --config " + config.path)
    if not facts.get("serving"):
        return Finding("fail", f"the package server is stopped (it listens on {listen})",
                       "read `dsagent logs` (lines of packages) for why")
    url = probe_url(listen)
    try:
        with urllib.request.urlopen(url, timeout=PROBE_S) as answer:
            ids = json.loads(answer.read(1 << 20))
    except (OSError, ValueError) as exc:
        return Finding("fail", f"the package server does not answer {url}: {exc}",
                       "read `dsagent logs` (lines of packages); is the port taken? ss -tlpn")
    counts = ", ".join(f"{len(v)} {k}" for k, v in ids.items()) if isinstance(ids, dict) else "?"
    return Finding("ok", f"the package server answers on {listen} ({counts})")


CHECKS = (("packages-server", check_server),)
