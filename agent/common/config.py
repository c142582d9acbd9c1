"""The agent's TOML configuration (PROTOCOL.md §6), checked strictly.

An unknown key, a missing required key or a value of the wrong type stops the
start with a ConfigError naming the key and the file: a typo must never be
silently ignored on a machine nobody watches.

Extensions to §6 (documented in docs/config.md):
- ``[agent] enrollment_key``: needed to register when there is no token yet.
- ``[agent] mode``: ``managed`` (default) or ``automation`` (PROTOCOL.md §8: an
  automation environment registers at every start, with ``"mode":
  "automation"``; it may hold no client_id/token/tickle_key).
- ``[agent] reboot_command``: what a Reboot task runs once every status has
  reached the server (a list: program and arguments); default
  ``["systemctl", "reboot"]``, in automation mode ``["reboot", "-f"]``.
- ``[handlers] run_script``: §4 names it (false disables RunScript).
- ``[handlers] sbs_wake_command``: run after an SBS file is written, to wake
  the PXE Interface service (the seed's Windows event); unset: nothing runs.
- ``[handlers] preboot_keep_versions``: BootWiz versions kept for rollback.
- ``[handlers] max_memory_mb``: address-space limit of a handler worker and
  its children (RLIMIT_AS; 0 = none), so a leaking handler fails alone.
- ``[logging]``: ``dir`` (default ``<state_dir>/logs``), ``format`` of stderr
  (``text`` or ``json``), ``level``, ``max_bytes`` and ``backups`` of each
  rotated file (see agent/common/logsetup.py).
- ``[pxe]`` (§6): needs ``[handlers] sbs_dir`` too (the folder the PXE
  Interface reads); ``tftp_root`` defaults to ``[handlers] preboot_store``.
- ``[packages]``: this site server serves its driver packages and images over
  HTTP (agent/packages/, docs/package-server.md); ``listen`` is checked like
  the other listen values, and it needs ``[handlers] package_store`` or a
  folder ``image_store``, something to serve.
- ``[wakeup] mqtt``: the optional MQTT wake-up (a broker URL, ``mqtt://`` or
  ``mqtts://``, user:password allowed; off when unset) and ``mqtt_ca_file``, a
  private CA for ``mqtts://``; see agent/common/mqtt.py.
- ``[trace] listen``: the remote trace stream (the seed's Remote Trace), off
  when empty; see agent/tools/trace.py.
- ``[handlers] image_store`` on the task server's own origin (same scheme,
  host and port as ``server_url``) and without user:password in it is handed
  to handlers with the agent's client id and token as its user:password
  (``Config.handlers``): that server already receives the token on every
  call, and an automation environment has no other credential to capture
  with (docs/image-store-http.md, SECURITY.md).
Credentials obtained by registration are kept in ``<state_dir>/credentials.json``
(mode 0600) and used when the config itself has no token.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from agent.common.errors import ConfigError
from agent.common.mqtt import parse_mqtt_url

REQUIRED = object()
DEFAULT_CONFIG_PATH = "/etc/dsagent/agent.toml"   # where the Debian package puts it

# section -> key -> (type, default or REQUIRED)
SCHEMA: dict[str, dict[str, tuple[type, Any]]] = {
    "agent": {"server_url": (str, REQUIRED), "state_dir": (str, REQUIRED),
              "client_id": (str, None), "token": (str, None),
              "tickle_key": (str, None), "enrollment_key": (str, None),
              "mode": (str, "managed"), "reboot_command": (list, None)},
    "objecthost": {"listen": (str, "0.0.0.0:50122")},
    "cta": {"listen": (str, "127.0.0.1:50124"), "poll_interval_s": (int, 300),
            "max_concurrent_tasks": (int, 2), "pull_batch": (int, 100)},
    "handlers": {"sbs_dir": (str, None), "image_store": (str, None),
                 "package_store": (str, None), "preboot_store": (str, None),
                 "run_script": (bool, True), "sbs_wake_command": (str, None),
                 "preboot_keep_versions": (int, 3), "max_memory_mb": (int, 4096),
                 "replication_kbps": (int, 0)},
    "logging": {"dir": (str, ""), "format": (str, "text"), "level": (str, "INFO"),
                "max_bytes": (int, 10 * 1024 * 1024), "backups": (int, 5)},
    "trace": {"listen": (str, "")},
    "wakeup": {"mqtt": (str, None), "mqtt_ca_file": (str, None)},
    "pxe": {"interface": (str, REQUIRED), "tftp_root": (str, None)},
    "packages": {"listen": (str, "0.0.0.0:50180")},
}


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    """Split ``host:port`` (IPv6 as ``[::1]:port``); raise ConfigError if bad."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) \
            or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


@dataclass
class Credentials:
    client_id: str
    token: str
    tickle_key: bytes


@dataclass
class Config:
    path: str
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def get(self, section: str, key: str) -> Any:
        """The value of ``[section] key`` or its schema default."""
        values = self.sections.get(section, {})
        if key in values:
            return values[key]
        default = SCHEMA[section][key][1]
        return None if default is REQUIRED else default

    def has_section(self, section: str) -> bool:
        return section in self.sections

    @property
    def state_dir(self) -> Path:
        return Path(self.get("agent", "state_dir"))

    @property
    def handlers(self) -> dict[str, Any]:
        """The [handlers] section with defaults filled in (what handlers see),
        and each ``[handlers.<plugin>]`` table of plugin settings as is; URLs on
        the task server's origin carry the agent's credentials (lend_credentials)."""
        values = {key: self.get("handlers", key) for key in SCHEMA["handlers"]}
        for key in LENT_TO_SERVER_ORIGIN:
            if values.get(key):
                values[key] = self.lend_credentials(values[key])
        return {**self.plugin_settings, **values}

    def lend_credentials(self, url: str) -> str:
        """``url`` with ``client_id:token`` as its user:password when it is on the
        task server's origin and names no user itself; else ``url`` unchanged
        (another origin never sees the token; no credentials yet: unchanged)."""
        if not same_origin(url, self.get("agent", "server_url") or ""):
            return url
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            return url
        try:
            creds = self.credentials()
        except ConfigError:
            return url
        if creds is None:
            return url
        userinfo = f"{quote(creds.client_id, safe='')}:{quote(creds.token, safe='')}@"
        return urlunsplit(parts._replace(netloc=userinfo + parts.netloc))

    @property
    def plugin_settings(self) -> dict[str, dict[str, Any]]:
        """``{plugin: its [handlers.<plugin>] table}``."""
        return {key: value for key, value in self.sections.get("handlers", {}).items()
                if isinstance(value, dict)}

    def credentials(self) -> Credentials | None:
        """Credentials from the config, else from registration; None if neither."""
        cid, token, key = (self.get("agent", k) for k in ("client_id", "token", "tickle_key"))
        if not (cid and token and key):
            stored = self.state_dir / "credentials.json"
            try:
                data = json.loads(stored.read_text())
                cid, token, key = data["client_id"], data["token"], data["tickle_key"]
            except FileNotFoundError:
                return None
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{stored}: unreadable credentials ({exc})") from exc
        try:
            key_bytes = bytes.fromhex(key)
        except ValueError as exc:
            raise ConfigError(f"{self.path}: [agent] tickle_key is not hex") from exc
        return Credentials(cid, token, key_bytes)

    def save_credentials(self, client_id: str, token: str, tickle_key: str) -> Path:
        """Persist registration results atomically with mode 0600."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        target = self.state_dir / "credentials.json"
        tmp = target.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"client_id": client_id, "token": token, "tickle_key": tickle_key}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        return target


def load_config(path: str | os.PathLike, require: tuple[str, ...] = ("agent",),
                check_mode: bool = True) -> Config:
    """Read and check a config file; ``require`` lists sections that must exist.

    ``check_mode=False`` skips the mode rule (``dsagent doctor`` reports it
    as a finding instead of stopping)."""
    path = str(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML (arrays or tables nested too deeply)") from None
    config = check_config(raw, path, require)
    if check_mode:
        _check_mode(path, config)
    return config


SECRET_KEYS = (("agent", "token"), ("agent", "tickle_key"), ("agent", "enrollment_key"))


def _check_mode(path: str, config: "Config") -> None:
    """Refuse a config holding secrets that other users can read (SECURITY.md)."""
    secrets = [f"[{s}] {k}" for s, k in SECRET_KEYS if config.sections.get(s, {}).get(k)]
    broker = config.get("wakeup", "mqtt")
    if broker and parse_mqtt_url(broker, "").password is not None:
        secrets.append("[wakeup] mqtt's password")
    if not secrets:
        return
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"{path}: holds secrets ({', '.join(secrets)}) but its mode is "
                          f"{mode:04o}, readable by other users; run: chmod 600 {path}")


def check_config(raw: dict, path: str, require: tuple[str, ...] = ("agent",)) -> Config:
    """Validate a parsed TOML table against SCHEMA (see module docstring)."""
    sections: dict[str, dict[str, Any]] = {}
    for name, table in raw.items():
        if name not in SCHEMA:
            raise ConfigError(f"{path}: unknown section [{name}]")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        checked = {}
        for key, value in table.items():
            if name == "handlers" and key not in SCHEMA[name] and isinstance(value, dict):
                checked[key] = _check_plugin_settings(value, key, path)
                continue
            if key not in SCHEMA[name]:
                hint = (" (a third-party handler's own settings go in a [handlers.<plugin>] "
                        "table)") if name == "handlers" else ""
                raise ConfigError(f"{path}: unknown key '{key}' in [{name}]{hint}")
            kind = SCHEMA[name][key][0]
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{path}: [{name}] {key} must be an integer")
            if not isinstance(value, kind):
                raise ConfigError(f"{path}: [{name}] {key} must be a {kind.__name__}")
            checked[key] = value
        sections[name] = checked
    for name in require:
        if name not in sections:
            raise ConfigError(f"{path}: missing section [{name}]")
    for name, table in sections.items():
        for key, (_, default) in SCHEMA[name].items():
            if default is REQUIRED and key not in table:
                raise ConfigError(f"{path}: missing required key '{key}' in [{name}]")
    config = Config(path=path, sections=sections)
    _check_values(config)
    return config


PLUGIN_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SETTING_TYPES = (str, int, float, bool)


def _check_plugin_settings(table: dict, plugin: str, path: str) -> dict[str, Any]:
    """A ``[handlers.<plugin>]`` table: that handler plugin's own settings.

    dsagent cannot know their keys (the CTA never loads plugins), so it checks
    their shape here; the plugin checks their meaning in its validate hook,
    and ``dsagent doctor`` fails a table that names no installed plugin.
    """
    where = f"{path}: [handlers.{plugin}]"
    if not PLUGIN_RE.fullmatch(plugin):
        raise ConfigError(f"{where}: not a plugin name (1-64 of A-Z a-z 0-9 _ . -)")
    for key, value in table.items():
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(item, _SETTING_TYPES) for item in items):
            raise ConfigError(f"{where} {key}: a handler setting is a string, number, boolean "
                              "or a list of them")
    return dict(table)


def _check_values(config: Config) -> None:
    where = config.path
    for section in ("objecthost", "cta"):
        parse_hostport(config.get(section, "listen"), f"{where}: [{section}] listen")
    if config.get("cta", "poll_interval_s") < 1:
        raise ConfigError(f"{where}: [cta] poll_interval_s must be >= 1")
    if not 1 <= config.get("cta", "max_concurrent_tasks") <= 256:
        raise ConfigError(f"{where}: [cta] max_concurrent_tasks must be 1..256")
    if not 1 <= config.get("cta", "pull_batch") <= 1000:
        raise ConfigError(f"{where}: [cta] pull_batch must be 1..1000")
    if config.get("logging", "format") not in ("text", "json"):
        raise ConfigError(f"{where}: [logging] format must be \"text\" or \"json\"")
    if config.get("logging", "level").upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{where}: [logging] level must be DEBUG, INFO, WARNING or ERROR")
    if config.get("logging", "max_bytes") < 0 or not 0 <= config.get("logging", "backups") <= 100:
        raise ConfigError(f"{where}: [logging] max_bytes must be >= 0 and backups 0..100")
    if config.get("trace", "listen"):
        parse_hostport(config.get("trace", "listen"), f"{where}: [trace] listen")
    _check_agent(config)
    _check_wakeup(config)
    key = config.get("agent", "tickle_key")
    if key is not None:
        try:
            bytes.fromhex(key)
        except ValueError as exc:
            raise ConfigError(f"{where}: [agent] tickle_key must be hex") from exc
    if config.has_section("pxe"):
        _check_pxe(config)
    if config.has_section("packages"):
        _check_packages(config)
    url = config.get("agent", "server_url")
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: [agent] server_url must start with https:// or http://")


LENT_TO_SERVER_ORIGIN = ("image_store",)   # [handlers] URLs given the agent's credentials
DEFAULT_PORTS = {"http": 80, "https": 443}


def same_origin(url: str, other: str) -> bool:
    """Whether two http(s) URLs have the same scheme, host and port (RFC 6454)."""
    try:
        a, b = urlsplit(url), urlsplit(other)
        ports = [p.port or DEFAULT_PORTS.get(p.scheme.lower()) for p in (a, b)]
    except ValueError:                       # a port that is no number
        return False
    return (a.scheme.lower() in DEFAULT_PORTS and a.scheme.lower() == b.scheme.lower()
            and bool(a.hostname) and a.hostname == b.hostname and ports[0] == ports[1])


AGENT_MODES = ("managed", "automation")
REBOOT_COMMANDS = {"managed": ["systemctl", "reboot"], "automation": ["reboot", "-f"]}


def _check_agent(config: Config) -> None:
    """``[agent] mode`` and ``reboot_command`` (extensions of §6, docs/automation.md)."""
    where, mode = config.path, config.get("agent", "mode")
    if mode not in AGENT_MODES:
        raise ConfigError(f"{where}: [agent] mode must be \"managed\" or \"automation\", "
                          f"got {mode!r}")
    static = [k for k in ("client_id", "token", "tickle_key") if config.get("agent", k)]
    if mode == "automation" and static:
        raise ConfigError(f"{where}: [agent] mode = \"automation\" registers at every start "
                          f"and gets its identity from the task server; remove {', '.join(static)}")
    command = config.get("agent", "reboot_command")
    if command is not None and (not command or not all(
            isinstance(part, str) and part and "\0" not in part for part in command)):
        raise ConfigError(f"{where}: [agent] reboot_command must be a list of strings, the "
                          "program first, e.g. [\"systemctl\", \"reboot\"]")


def _check_wakeup(config: Config) -> None:
    """``[wakeup]``: a broker URL, and a CA file only for ``mqtts://``."""
    where, broker, ca_file = config.path, config.get("wakeup", "mqtt"), \
        config.get("wakeup", "mqtt_ca_file")
    url = parse_mqtt_url(broker, f"{where}: [wakeup] mqtt") if broker is not None else None
    if ca_file is not None and (url is None or not url.tls):
        raise ConfigError(f"{where}: [wakeup] mqtt_ca_file is for an mqtts:// broker; "
                          "[wakeup] mqtt is " + ("not set" if url is None else str(url)))
    if ca_file is not None and not os.path.isabs(ca_file):
        raise ConfigError(f"{where}: [wakeup] mqtt_ca_file must be an absolute path, "
                          f"got {ca_file!r}")


def reboot_command(config: Config) -> list[str]:
    """``[agent] reboot_command``, else the default of the agent's mode."""
    return list(config.get("agent", "reboot_command")
                or REBOOT_COMMANDS[config.get("agent", "mode")])


IFNAME_FORBIDDEN = re.compile(r"[/:\s]")


def _check_pxe(config: Config) -> None:
    """``[pxe]`` (§6): a Linux interface name; the folders the PXE process needs."""
    where = config.path
    name = config.get("pxe", "interface")
    if not 1 <= len(name) <= 15 or IFNAME_FORBIDDEN.search(name) or name in (".", ".."):
        raise ConfigError(f"{where}: [pxe] interface {name!r} is not a Linux interface name "
                          "(1-15 characters, no '/', ':' or whitespace)")
    if not config.get("handlers", "sbs_dir"):
        raise ConfigError(f"{where}: [pxe] needs [handlers] sbs_dir (the SBS folder the PXE "
                          "Interface reads)")
    root = pxe_tftp_root(config)
    if not root:
        raise ConfigError(f"{where}: [pxe] needs tftp_root, or [handlers] preboot_store as "
                          "its default")
    if not os.path.isabs(root):
        raise ConfigError(f"{where}: [pxe] tftp_root must be an absolute path, got {root!r}")


def _check_packages(config: Config) -> None:
    """``[packages]``: where the package server listens; something for it to serve."""
    where = config.path
    parse_hostport(config.get("packages", "listen"), f"{where}: [packages] listen")
    images = config.get("handlers", "image_store")
    if not config.get("handlers", "package_store") and not (images and "://" not in images):
        raise ConfigError(f"{where}: [packages] needs [handlers] package_store, or "
                          "image_store as a folder (what the package server serves)")


def pxe_tftp_root(config: Config) -> str | None:
    """``[pxe] tftp_root``, by default ``[handlers] preboot_store`` (§6)."""
    return config.get("pxe", "tftp_root") or config.get("handlers", "preboot_store")


def toml_value(value: Any) -> str:
    """``value`` (str, int, float, bool or a list of them) as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    out = ['"']
    for ch in str(value):
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def render_config(sections: dict[str, dict[str, Any]], header: list[str]) -> str:
    """A config file (TOML) from ``{section: {key: value}}``, ``header`` as comments;
    a dict value becomes a ``[section.key]`` table (a plugin's settings)."""
    lines = [f"# {line}" for line in header]
    tables = [(name, table) for name, table in sections.items() if table]
    while tables:
        section, table = tables.pop(0)
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        lines += ["", f"[{section}]"]
        width = max((len(key) for key in scalars), default=0)
        lines += [f"{key.ljust(width)} = {toml_value(value)}" for key, value in scalars.items()]
        tables[:0] = [(f"{section}.{k}", v) for k, v in table.items() if isinstance(v, dict)]
    return "\n".join(lines) + "\n"


def write_private(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` atomically with ``text``, mode 0600 from the first byte
    (it holds secrets), fsync'ed; a reader sees the old file or the new one."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)  # left by a killed run; never write into a file found there
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
