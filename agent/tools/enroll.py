"""``dsagent enroll``: register with a task server, write the agent's config.

The registration is the one ``dsagent run`` does when it has no token
(``ServerAPI.register``, PROTOCOL.md §3); ``run`` keeps its result in
``<state_dir>/credentials.json``, enroll writes it into the config itself,
which ``Config.credentials()`` prefers. Choices (docs/troubleshooting.md):

- An existing config is never overwritten without ``--force``, and this is
  checked before registering, so a refusal leaves no new client on the server.
- With ``--force`` the existing config must be valid: its other sections and
  keys are kept (not its comments: it is rewritten), ``[agent]`` gets the new
  server_url, client_id, token and tickle_key, keeps its state_dir unless
  ``--state-dir`` is given, and loses enrollment_key (the token replaces it:
  one secret less on disk).
- A new config gets ``[objecthost]``/``[cta]`` with the §6 defaults and the
  server's poll_interval_s; values already there win.
- The file is written atomically with mode 0600; its folder is created 0700
  when missing and refused when world-writable (anyone could swap the file).
- ``http://`` to a host that is not loopback is enrolled with a warning (§3).

Exit status: 0 enrolled; 1 the server refused the key, was unreachable or
answered badly; 2 a local problem (bad URL, config exists, cannot write).
"""

from __future__ import annotations

import os
import stat
import sys
import tomllib
from typing import Any, TextIO
from urllib.parse import urlsplit

from agent.common.config import SCHEMA, check_config, load_config, render_config, write_private
from agent.common.errors import ConfigError, ServerError
from agent.tools.progressbar import ProgressBar
from agent.common.serverapi import ServerAPI, failure_kind, is_loopback_host

DEFAULT_STATE_DIR = "/var/lib/dsagent"
REGISTER_TIMEOUT_S = 15.0
REPLACED = ("server_url", "client_id", "token", "tickle_key", "enrollment_key")
DEFAULTS = {"objecthost": ("listen",), "cta": ("listen", "poll_interval_s", "max_concurrent_tasks")}
WHY = {
    "auth": "the server refused the enrollment key",
    "tls": "TLS with the server failed (is its certificate trusted here?)",
    "timeout": "the server did not answer in time",
    "unreachable": "the server is unreachable (is it running, is the URL right?)",
    "answer": "the server answered, but not as a dsagent task server would",
}


class EnrollError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def check_url(url: str) -> str:
    """``url`` without a trailing slash, or EnrollError naming what is wrong."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise EnrollError(f"--server {url!r} is not a usable URL ({exc})", 2) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EnrollError(f"--server {url!r} is not a usable URL: expected https://HOST[:PORT]",
                          2)
    if parts.query or parts.fragment:
        raise EnrollError(f"--server {url!r}: a server URL has no ?query or #fragment", 2)
    return url.rstrip("/")


def _kept_sections(path: str, force: bool) -> dict[str, dict[str, Any]]:
    if not os.path.lexists(path):
        return {}
    if not force:
        raise EnrollError(f"{path} already exists; refusing to overwrite it (it may hold "
                          "another enrollment). --force replaces its [agent] identity and "
                          "keeps its other settings", 2)
    try:
        return load_config(path, require=(), check_mode=False).sections
    except ConfigError as exc:
        raise EnrollError(f"{exc}; --force keeps the other settings of the existing config, "
                          "so it must be valid: fix it or remove it", 2) from None


def _prepare_folder(path: str) -> None:
    folder = os.path.dirname(path)
    if not os.path.exists(folder):
        try:
            os.makedirs(folder, mode=0o700)
        except OSError as exc:
            raise EnrollError(f"cannot create the config's folder {folder}: {exc.strerror}",
                              2) from None
        return
    if not os.path.isdir(folder):
        raise EnrollError(f"{folder} (the config's folder) is not a folder", 2)
    mode = stat.S_IMODE(os.stat(folder).st_mode)
    if mode & 0o002:
        raise EnrollError(f"the config's folder {folder} is world-writable (mode {mode:04o}): "
                          f"any user could replace the config; chmod o-w {folder} or choose "
                          "another --config", 2)


def _register(url: str, key: str, name: str | None) -> dict[str, Any]:
    api = ServerAPI(url, timeout=REGISTER_TIMEOUT_S)
    try:
        return api.register(key, name)
    except ServerError as exc:
        raise EnrollError(f"{WHY[failure_kind(exc)]}: {exc}", 1) from None
    finally:
        api.close()


def build_sections(kept: dict[str, dict[str, Any]], url: str, answer: dict[str, Any],
                   state_dir: str) -> dict[str, dict[str, Any]]:
    """The new config: the kept sections with the new identity and the defaults."""
    agent = {k: v for k, v in kept.get("agent", {}).items() if k not in REPLACED}
    agent.update(server_url=url, client_id=answer["client_id"], token=answer["token"],
                 tickle_key=answer["tickle_key"], state_dir=state_dir)
    sections = {"agent": agent}
    poll = answer.get("poll_interval_s")
    for section, keys in DEFAULTS.items():
        table = {key: SCHEMA[section][key][1] for key in keys}
        if section == "cta" and isinstance(poll, int) and not isinstance(poll, bool) and poll >= 1:
            table["poll_interval_s"] = poll
        table.update(kept.get(section, {}))
        sections[section] = table
    for section, table in kept.items():
        sections.setdefault(section, table)
    return sections


def enroll(server_url: str, key: str, config_path: str, state_dir: str | None = None,
           name: str | None = None, force: bool = False, out: TextIO = sys.stdout,
           err: TextIO = sys.stderr) -> int:
    """Register and write the config; print what was done (see the module doc)."""
    path = os.path.abspath(config_path)
    bar = ProgressBar(err)
    try:
        with bar:
            bar.update(0, f"checking {path}", force=True)
            url = check_url(server_url)
            parts = urlsplit(url)
            if parts.scheme == "http" and not is_loopback_host(parts.hostname or ""):
                bar.clear()
                err.write(f"dsagent enroll: warning: {url} is plain http to a host that is not "
                          "loopback: the token and tasks will travel unencrypted\n")
            kept = _kept_sections(path, force)
            _prepare_folder(path)
            state = os.path.abspath(state_dir or kept.get("agent", {}).get("state_dir")
                                    or DEFAULT_STATE_DIR)
            bar.update(33, f"registering with {url}", force=True)
            answer = _register(url, key, name)
            bar.update(67, f"writing {path}", force=True)
            text = render_config(build_sections(kept, url, answer, state), [
                f"dsagent agent config, written by `dsagent enroll` with {url}.",
                "It holds this client's token and tickle key: keep it private (mode 0600)."])
            check_config(tomllib.loads(text), path)  # what run will accept
            try:
                write_private(path, text)
            except OSError as exc:
                raise EnrollError(f"registered as {answer['client_id']}, but cannot write "
                                  f"{path}: {exc.strerror}; fix that and enroll again", 2) from None
    except EnrollError as exc:
        err.write(f"dsagent enroll: {exc}\n")
        return exc.code
    out.write(f"enrolled as {answer['client_id']} with {url}; wrote {path} (mode 0600)\n"
              f"start the agent: dsagent run --config {path}\n")
    return 0
