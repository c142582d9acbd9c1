"""``dsagent doctor``: check each classic failure of the seed, say what to do.

Each check gives ok, warn, fail or skip (not configured here), a one-line
finding naming the file, port, package or process, and a one-line action.
The exit status is 0 when no check failed (warnings do not fail: they are
things to look at, like a store nearly full), 1 otherwise. Handler plugins
add their own checks (hook ``dsagent_doctor_checks``): the doctor imports no
handler, it runs what they register with the [handlers] section. Checks only
read (a plugin's check may probe and clean up after itself, as the image
store's does). docs/troubleshooting.md lists the checks.
"""

from __future__ import annotations

import email.utils
import errno
import json
import logging
import os
import socket
import stat
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, TextIO
from urllib.parse import urlsplit

import psutil

from agent.common.config import Config, _check_mode, load_config, parse_hostport
from agent.common.errors import ConfigError, DsagentError, MqttError, ServerError, \
    TaskDocumentError
from agent.common.mqtt import parse_mqtt_url, probe as mqtt_probe, wake_topic
from agent.plugin import CheckResult, DoctorCheck
from agent.plugin.checks import CHECK_STATUSES
from agent.plugin.manager import HandlerRegistry, load_handlers
from agent.packages.checks import CHECKS as PACKAGES_CHECKS
from agent.pxe.checks import CHECKS as PXE_CHECKS
from agent.tools.progressbar import ProgressBar
from agent.common.serverapi import ServerAPI, failure_kind, is_loopback_host
from agent.tools.status import format_peer, human_age
from agent.common.statusfile import read_all
from agent.supervisor import CHILDREN
from agent.common.taskxml import parse_client_tasks
from ctdataloader.outbox import summary as outbox_summary

SKEW_FAIL_S = 300          # PROTOCOL.md §2: a tickle more than 300 s off is refused (stale)
SKEW_WARN_S = 60
TASKS_LIMIT = 16 << 20
SERVER_TIMEOUT_S = 10.0
TICKLE_WINDOW_S = 3600     # a refusal older than this is history
OUTBOX_WARN_S = 600        # an event waiting longer: the server is not taking statuses
TICKLE_ADVICE = {          # §2 code -> (cause, what to do); bad-frame and busy are noise
    "bad-signature": ("it was signed with another tickle key than this agent's",
                      "enroll again (dsagent enroll --force) or set [agent] tickle_key to "
                      "the server's"),
    "unknown-client": ("it named another client id than this agent's",
                       "check [agent] client_id (or credentials.json) against the server's "
                       "record of this machine"),
    "stale": ("its time was more than 300 s off this machine's clock",
              "synchronise the clocks (NTP) of the task server and this machine"),
    "replay": ("its nonce had been used already", "the task server must send a fresh nonce "
               "with every tickle"),
}
MQTT_ADVICE = {             # MqttError.kind -> what to do
    "connect": "start the broker, or fix the host and port of {key}; check DNS and that the "
               "firewall lets this machine connect out to it",
    "tls": "give the broker a certificate for its name, or set [wakeup] mqtt_ca_file to the "
           "CA that signed it; never turn verification off",
    "refused": "fix the user:password of {key} or the broker's password file",
    "subscribe": "let this client read {topic} in the broker's ACL (SECURITY.md)",
    "timeout": "check that {key} names an MQTT broker and that it is not overloaded",
}


@dataclass
class Result:
    name: str
    status: str       # ok | warn | fail | skip
    finding: str
    action: str = ""


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _oserror(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{exc.strerror or exc}" + (f" ({name})" if name else "")


class Doctor:
    """Runs the checks in order; later checks use what earlier ones found
    (the config, the server's Date header). The plugins' checks come after
    the clock; the handlers check, last, says which plugins failed to load."""

    def __init__(self, config_path: str):
        self.path = config_path
        self.config: Config | None = None
        self.registry: HandlerRegistry | None = None
        self.server_date: str | None = None   # Date header of the server's answer
        self.asked_at = 0.0                   # local time in the middle of that request
        self.checks: list[tuple[str, Callable[[], Result]]] = [
            ("config", self.check_config), ("state-dir", self.check_state_dir),
            ("objecthost-port", lambda: self.check_port("objecthost")),
            ("cta-port", lambda: self.check_port("cta")),
            ("server", self.check_server), ("clock", self.check_clock),
            ("tickles", self.check_tickles), ("outbox", self.check_outbox),
            ("handlers", self.check_handlers),
        ]

    def section_checks(self, section: str, checks) -> list[tuple[str, Callable[[], Result]]]:
        """A site server's rows for the process a section starts (agent/pxe/checks.py
        with [pxe], agent/packages/checks.py with [packages]), only with it."""
        try:
            if not load_config(self.path).has_section(section):
                return []
        except (DsagentError, OSError):
            return []   # the config check says why

        def run(name, check):
            try:
                found = check(self.config)
            except Exception as exc:   # a check's own bug must not hide the other rows
                return Result(name, "fail", f"the check failed: {type(exc).__name__}: {exc}",
                              "report it with `dsagent logs`")
            return Result(name, found.status, found.finding, found.action)
        return [(name, lambda n=name, c=check: run(n, c)) for name, check in checks]

    def mqtt_checks(self) -> list[tuple[str, Callable[[], Result]]]:
        """The MQTT wake-up's row, only with [wakeup] mqtt."""
        try:
            if not load_config(self.path, check_mode=False).get("wakeup", "mqtt"):
                return []
        except (DsagentError, OSError):
            return []   # the config check says why
        return [("mqtt-wakeup", self.check_mqtt_wakeup)]

    def run(self, bar: ProgressBar) -> list[Result]:
        bar.update(0, "loading the handler plugins", force=True)
        self.registry = _load_plugins()
        at = [name for name, _ in self.checks].index("clock") + 1
        checks = self.checks[:at] + self.plugin_checks() + self.checks[at:-1] \
            + self.mqtt_checks() + self.section_checks("pxe", PXE_CHECKS) \
            + self.section_checks("packages", PACKAGES_CHECKS) + self.checks[-1:]
        results = []
        for index, (name, check) in enumerate(checks):
            bar.update(100 * index / len(checks),
                       f"check {index + 1} of {len(checks)}: {name}", force=True)
            if self.config is None and name != "config":
                results.append(Result(name, "skip", f"the config {self.path} cannot be used",
                                      "fix the config first (see the config check)"))
                continue
            results.append(check())
        bar.clear()
        return results

    # ---- config and modes ---------------------------------------------------
    def check_config(self) -> Result:
        name, path = "config", self.path
        if not os.path.exists(path):
            return Result(name, "fail", f"{path} does not exist",
                          f"enroll this machine: dsagent enroll --server URL --key KEY "
                          f"--config {path}")
        try:
            config = load_config(path, check_mode=False)
        except ConfigError as exc:
            return Result(name, "fail", str(exc), f"fix {path} (PROTOCOL.md §6, docs/config.md)")
        self.config = config
        try:
            _check_mode(path, config)
        except ConfigError as exc:
            return Result(name, "fail", str(exc), f"chmod 600 {path}")
        mode = _mode(path)
        if mode & 0o002:
            return Result(name, "fail", f"{path} is world-writable (mode {mode:04o}): any user "
                          "can point the agent at another server", f"chmod 600 {path}")
        folder = os.path.dirname(os.path.abspath(path))
        if _mode(folder) & 0o002:
            return Result(name, "fail", f"the config's folder {folder} is world-writable: any "
                          "user can replace the config", f"chmod o-w {folder}")
        return Result(name, "ok", f"{path} is valid, mode {mode:04o}")

    def check_state_dir(self) -> Result:
        name = "state-dir"
        state = str(self.config.state_dir)
        if not os.path.lexists(state):
            return Result(name, "ok", f"{state} does not exist yet; dsagent run creates it "
                          "(mode 0700)")
        if not os.path.isdir(state):
            return Result(name, "fail", f"[agent] state_dir {state} is not a folder",
                          f"remove {state} or set [agent] state_dir in {self.path}")
        for secret in ("credentials.json", "hop.key", "trace.key"):
            path = os.path.join(state, secret)
            if os.path.exists(path) and _mode(path) & 0o077:
                return Result(name, "fail", f"{path} holds secrets but its mode is "
                              f"{_mode(path):04o}, readable by other users",
                              f"chmod 600 {path}")
        mode = _mode(state)
        if mode & 0o002:
            return Result(name, "fail", f"{state} is world-writable (mode {mode:04o})",
                          f"chmod 700 {state}")
        if mode & 0o077:
            return Result(name, "warn", f"{state} has mode {mode:04o}, not 0700 (SECURITY.md); "
                          "dsagent run resets it at start", f"chmod 700 {state}")
        return Result(name, "ok", f"{state} mode {mode:04o}; secrets in it are private")

    # ---- ports ----------------------------------------------------------------
    def check_port(self, section: str) -> Result:
        name = f"{section}-port"
        listen = self.config.get(section, "listen")
        host, port = parse_hostport(listen, f"[{section}] listen")
        module = dict(CHILDREN)[section]
        on_port = [c for c in psutil.net_connections("tcp")
                   if c.laddr and c.laddr.port == port and _overlaps(host, c.laddr.ip)]
        for conn in (c for c in on_port if not c.raddr):
            if conn.pid is None:
                return Result(name, "fail", f"{listen} is taken by a program of another user",
                              "run dsagent doctor as root to name it, then stop it or move "
                              f"[{section}] listen in {self.path}")
            try:
                proc = psutil.Process(conn.pid)
                cmdline, pname = proc.cmdline(), proc.name()
            except psutil.Error:
                continue  # it just exited
            if not _is_module(cmdline, module):
                return Result(name, "fail", f"{listen} is taken by another program: {pname} "
                              f"(pid {conn.pid})",
                              f"stop {pname} (pid {conn.pid}) or move [{section}] listen in "
                              f"{self.path} to a free port")
            theirs = _config_arg(cmdline)
            if theirs and not _same_file(theirs, self.path):
                return Result(name, "fail", f"{listen} is held by the {section} of another "
                              f"agent (pid {conn.pid}, config {theirs})",
                              f"stop that agent or give the two configs different "
                              f"[{section}] listen ports")
            return Result(name, "ok", f"{listen} is bound by our {section} (pid {conn.pid})")
        problem = _bind_problem(host, port)
        if problem and any(c.status == psutil.CONN_TIME_WAIT for c in on_port):
            return Result(name, "warn", f"{listen} is held by closed connections in TIME_WAIT "
                          "(of a program that has exited)",
                          "wait a minute: the system frees them; then start the agent")
        if problem:
            return Result(name, "fail", f"{listen} cannot be bound: {problem}",
                          f"set [{section}] listen in {self.path} to an address of this machine "
                          "and a free port")
        supervisor = _find_supervisor(self.path)
        if supervisor:
            return Result(name, "fail", f"nothing listens on {listen} although dsagent run "
                          f"(pid {supervisor}) runs: its {section} is down or restarting",
                          "look at the agent's log for why it exits")
        return Result(name, "warn", f"nothing listens on {listen}: dsagent run is not running "
                      f"with {self.path}", f"start the agent: dsagent run --config {self.path}")

    # ---- server and clock ---------------------------------------------------------
    def check_server(self) -> Result:
        name = "server"
        url = self.config.get("agent", "server_url")
        try:
            creds = self.config.credentials()
        except ConfigError as exc:
            return Result(name, "fail", str(exc), "remove it and register again "
                          "(dsagent enroll, or [agent] enrollment_key and dsagent run)")
        if creds is None:
            if self.config.get("agent", "enrollment_key"):
                return Result(name, "warn", f"not registered yet: no token in {self.path} nor in "
                              f"{self.config.state_dir}/credentials.json",
                              "start dsagent run: it registers with [agent] enrollment_key")
            return Result(name, "fail", f"no credentials: {self.path} has no token and "
                          "no enrollment_key",
                          f"dsagent enroll --server {url} --key KEY --config {self.path} --force")
        api = ServerAPI(url, creds.client_id, creds.token, timeout=SERVER_TIMEOUT_S)
        before = time.time()
        try:
            document = parse_client_tasks(api.get_tasks(TASKS_LIMIT))
        except (ServerError, TaskDocumentError) as exc:
            return self._server_failure(url, creds.client_id, exc)
        finally:
            self._note_date(api, before)
            api.close()
        pending = len(document.tasks) + len(document.rejected)
        found = (f"{url} answered GET tasks for client {creds.client_id} "
                 f"({pending}{'+' if document.more else ''} task(s) waiting to be taken)")
        parts = urlsplit(url)
        if parts.scheme == "http" and not is_loopback_host(parts.hostname or ""):
            return Result(name, "warn", found + ", over plain http to a non-loopback host: "
                          "the token travels unencrypted",
                          f"use an https:// server_url in {self.path}")
        return Result(name, "ok", found)

    def _note_date(self, api: ServerAPI, before: float) -> None:
        self.server_date = api.last_date
        self.asked_at = (before + time.time()) / 2

    def _server_failure(self, url: str, client_id: str, exc: DsagentError) -> Result:
        kind = "answer" if isinstance(exc, TaskDocumentError) else failure_kind(exc)
        actions = {
            "auth": ("the server refused the token of client " + client_id,
                     "the client was removed or its token rotated on the server: enroll again "
                     f"(dsagent enroll --server {url} --key KEY --config {self.path} --force)"),
            "tls": ("TLS with the server failed",
                    "install the server's CA certificate or fix its certificate's name; "
                    "never turn verification off"),
            "timeout": ("the server did not answer in time",
                        "check that the task server is up and not overloaded"),
            "unreachable": ("the server is unreachable",
                            f"start the task server or fix [agent] server_url in {self.path}; "
                            "check the network and firewall"),
            "answer": ("the server gave an unusable answer",
                       f"check that [agent] server_url in {self.path} is a dsagent task server"),
        }
        what, action = actions[kind]
        return Result("server", "fail", f"{what}: {exc}", action)

    def check_clock(self) -> Result:
        name = "clock"
        if self.server_date is None:
            return Result(name, "skip", "no Date header from the server to compare with",
                          "see the server check")
        try:
            server = email.utils.parsedate_to_datetime(self.server_date).timestamp()
        except (TypeError, ValueError):
            return Result(name, "warn", f"the server's Date header {self.server_date!r} "
                          "cannot be read", "check the task server's HTTP front end")
        skew = self.asked_at - (server + 0.5)   # Date has whole seconds
        how = (f"this machine's clock is {abs(skew):.0f} s "
               f"{'ahead of' if skew > 0 else 'behind'} the task server's (its Date header)")
        sync = "synchronise the clocks (NTP: timedatectl set-ntp true, or chronyc makestep)"
        if abs(skew) > SKEW_FAIL_S:
            return Result(name, "fail", f"{how}: tickles are refused as stale beyond "
                          f"{SKEW_FAIL_S} s", sync)
        if abs(skew) > SKEW_WARN_S:
            return Result(name, "warn", f"{how}; tickles fail beyond {SKEW_FAIL_S} s", sync)
        return Result(name, "ok", f"{how}, within {SKEW_WARN_S} s")

    # ---- the handler plugins' own checks (hook dsagent_doctor_checks) -------------
    def plugin_checks(self) -> list[tuple[str, Callable[[], Result]]]:
        """What each plugin registers, in plugin order. A hook that raises or
        registers something else, and a name two plugins (or a plugin and
        the doctor) claim, become a failing row naming the plugin(s)."""
        own = {name for name, _ in self.checks}
        registered: list[tuple[str, DoctorCheck]] = []
        failed: list[Result] = []
        for plugin, _ in sorted(self.registry.pm.list_name_plugin(), key=lambda p: p[0]):
            try:
                checks: list[DoctorCheck] = self.registry.registered(
                    "dsagent_doctor_checks", plugin, DoctorCheck)
            except Exception as exc:
                failed.append(_broken(plugin, plugin, "could not register its doctor checks",
                                      exc))
                continue
            for check in checks:
                if check.name in own:
                    failed.append(Result(plugin, "fail", f"handler plugin '{plugin}' registers "
                                         f"a doctor check named '{check.name}', like one of "
                                         "the doctor's own: it does not run",
                                         f"rename the check in '{plugin}'"))
                else:
                    registered.append((plugin, check))
        owners: dict[str, list[str]] = {}
        for plugin, check in registered:
            owners.setdefault(check.name, []).append(plugin)
        rows: list[tuple[str, Callable[[], Result]]] = []
        for plugin, check in registered:
            claim = owners.pop(check.name, None)
            if claim is None:
                continue  # a duplicate, reported with its first registration
            if len(claim) > 1:
                who = (f"twice by {plugin}" if len(set(claim)) == 1
                       else f"by both {' and '.join(dict.fromkeys(claim))}")
                rows.append((check.name, _constant(Result(
                    check.name, "fail", f"doctor check '{check.name}' is registered {who}: "
                    "it does not run",
                    "uninstall one of the packages, or rename the check in one of them"))))
            else:
                rows.append((check.name, lambda p=plugin, c=check: self._run_plugin_check(p, c)))
        return rows + [(r.name, _constant(r)) for r in failed]

    def _run_plugin_check(self, plugin: str, check: DoctorCheck) -> Result:
        try:
            result = check.run(self.config.handlers)
        except Exception as exc:
            return _broken(check.name, plugin, "failed its doctor check", exc)
        if not isinstance(result, CheckResult):
            return Result(check.name, "fail", f"handler plugin '{plugin}': its doctor check "
                          f"returned {type(result).__name__}, not a CheckResult",
                          f"upgrade the package of '{plugin}' or report it to its authors")
        finding, action = (_name_config(t, self.path) for t in (result.finding, result.action))
        return Result(check.name, result.status, finding, action)

    # ---- what the processes reported (agent/common/statusfile.py) ----------------------
    def check_tickles(self) -> Result:
        name = "tickles"
        host = read_all(self.config.state_dir).get("objecthost")
        if not host:
            return Result(name, "skip", "the objecthost has not run here yet (no status file)")
        accepted, refused = host.get("last_accepted"), host.get("last_refused")
        now = time.time()
        counts = f"{host.get('accepted', 0)} accepted, {host.get('refused', 0)} refused"
        if refused and refused.get("code") in TICKLE_ADVICE \
                and now - refused.get("at", 0) < TICKLE_WINDOW_S \
                and (not accepted or accepted.get("at", 0) < refused["at"]):
            cause, action = TICKLE_ADVICE[refused["code"]]
            return Result(name, "warn", f"the last tickle ({human_age(now - refused['at'])} ago, "
                          f"from {format_peer(refused.get('peer'))}) was refused {refused['code']}: "
                          f"{cause}; none accepted since ({counts}), so tasks wait for the "
                          f"poll timer", f"if that was the task server: {action}")
        last = f"; last accepted {human_age(now - accepted['at'])} ago" if accepted else ""
        return Result(name, "ok", f"{counts} since the objecthost started{last}")

    def check_mqtt_wakeup(self) -> Result:
        """Connect to the broker and subscribe to our wake topic as the objecthost
        does (a throw-away session, so the objecthost's is not taken over)."""
        name, key = "mqtt-wakeup", f"[wakeup] mqtt in {self.path}"
        url = parse_mqtt_url(self.config.get("wakeup", "mqtt"), key)
        try:
            creds = self.config.credentials()
        except ConfigError as exc:
            return Result(name, "skip", str(exc), "see the server check")
        if creds is None:
            return Result(name, "skip", "not registered yet: no client id to subscribe for",
                          "see the server check")
        topic = wake_topic(creds.client_id)
        try:
            mqtt_probe(url, topic, self.config.get("wakeup", "mqtt_ca_file"), SERVER_TIMEOUT_S)
        except ImportError:
            return Result(name, "fail", "paho-mqtt is not installed (the MQTT wake-up needs it)",
                          "install dsagent's dependencies again: pip install 'paho-mqtt>=2.0'")
        except MqttError as exc:
            return Result(name, "fail", str(exc), MQTT_ADVICE[exc.kind].format(key=key, topic=topic))
        found = f"{url} let us connect and subscribe to {topic}"
        link = read_all(self.config.state_dir).get("objecthost", {}).get("mqtt") or {}
        if link.get("state") == "reconnecting":
            return Result(name, "warn", f"{found}, but the objecthost reports: "
                          f"{link.get('reason')}", "restart the agent if it persists; "
                          "dsagent logs --since 1h shows the objecthost's attempts")
        state = {"connected": "; the objecthost is subscribed"}.get(link.get("state"), "")
        return Result(name, "ok", found + state)

    def check_outbox(self) -> Result:
        name = "outbox"
        try:
            box = outbox_summary(self.config.state_dir)
        except DsagentError as exc:  # no state DB yet, or unreadable
            return Result(name, "skip", str(exc))
        depth, oldest = box.waiting, box.oldest_s
        if oldest is not None and oldest > OUTBOX_WARN_S:
            error = read_all(self.config.state_dir).get("ctdataloader", {}).get(
                "last_upload_error")
            why = f"; the last upload failed: {error['message']}" if error else ""
            return Result(name, "warn", f"{depth} status event(s) waiting, the oldest for "
                          f"{human_age(oldest)}: the server has not accepted them{why}",
                          "see the server check; they are kept until accepted "
                          "(dsagent logs --since 1h shows the uploads)")
        return Result(name, "ok", f"{depth} status event(s) waiting"
                      + (f", the oldest for {human_age(oldest)}" if oldest is not None else ""))

    # ---- handler plugins ------------------------------------------------------------
    def check_handlers(self) -> Result:
        """Plugins that fail to load, task types two plugins claim, and settings
        tables ([handlers.<plugin>]) that name no installed plugin (a typo: the
        plugin would run without its settings)."""
        name = "handlers"
        registry = self.registry
        plugins = sorted(p for p, _ in registry.pm.list_name_plugin())  # task types or not
        if registry.broken:
            plugin, error = sorted(registry.broken.items())[0]
            return Result(name, "fail", f"handler plugin '{plugin}' cannot be loaded: {error}"
                          + (f" (and {len(registry.broken) - 1} more)"
                             if len(registry.broken) > 1 else ""),
                          f"reinstall or remove the package of '{plugin}'; its task types "
                          "fail until then (dsagent handlers lists them)")
        if registry.conflicts:
            task_type, owners = sorted(registry.conflicts.items())[0]
            return Result(name, "fail", f"task type '{task_type}' is registered by both "
                          f"{' and '.join(owners)}: it is refused",
                          "uninstall one of the two packages")
        unknown = sorted(set(self.config.plugin_settings) - set(plugins))
        if unknown:
            return Result(name, "fail", f"[handlers.{unknown[0]}] in {self.path} names no "
                          f"installed handler plugin (installed: {', '.join(plugins)})",
                          "fix the table's name (the plugin's entry-point name) or install the "
                          "plugin")
        return Result(name, "ok", f"{len(registry.types)} task type(s) from "
                      f"{len(plugins)} plugin(s): {', '.join(plugins)}")


def _load_plugins() -> HandlerRegistry:
    """The plugins as a worker loads them; a broken one is reported by the
    handlers check, not logged as a traceback among the findings."""
    quiet = logging.getLogger("dsagent.plugins")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return load_handlers()
    finally:
        quiet.setLevel(level)


def _broken(name: str, plugin: str, what: str, exc: Exception) -> Result:
    return Result(name, "fail", f"handler plugin '{plugin}' {what}: "
                  f"{type(exc).__name__}: {exc}",
                  f"upgrade or reinstall the package of '{plugin}', or report it to its authors")


def _constant(result: Result) -> Callable[[], Result]:
    return lambda: result


def _name_config(text: str, path: str) -> str:
    """A plugin check says "the agent's config"; the doctor knows which file."""
    return text.replace("the agent's config", path)


def _overlaps(host: str, bound: str) -> bool:
    """Whether a socket bound to ``bound`` keeps ``host`` (same port) from binding."""
    wildcard = ("", "0.0.0.0", "::")
    return host in wildcard or bound in wildcard or host == bound or (
        host == "localhost" and bound in ("127.0.0.1", "::1"))


def _is_module(cmdline: list[str], module: str) -> bool:
    return "-m" in cmdline and module in cmdline


def _config_arg(cmdline: list[str]) -> str | None:
    if "--config" in cmdline[:-1]:
        return cmdline[cmdline.index("--config") + 1]
    return None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _bind_problem(host: str, port: int) -> str:
    """Why this machine cannot listen on host:port now ("" if it can)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"host {host!r} does not resolve ({exc.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "the port is in use (a socket bound but not listening)"
            return _oserror(exc)
    return ""


def _find_supervisor(config_path: str) -> int | None:
    """The pid of ``dsagent run`` with this config, if one runs."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "run" in cmdline and any(part.endswith(("dsagent", "agent")) for part in cmdline[:3]):
            theirs = _config_arg(cmdline)
            if theirs and _same_file(theirs, config_path):
                return proc.info["pid"]
    return None


def format_table(results: list[Result]) -> str:
    width = max(len(r.name) for r in results)
    lines = []
    for r in results:
        lines.append(f"{r.status.upper() if r.status == 'fail' else r.status:<5} "
                     f"{r.name:<{width}}  {r.finding}")
        if r.status in ("warn", "fail") and r.action:
            lines.append(f"{'':<5} {'':<{width}}  what to do: {r.action}")
    counts = ", ".join(f"{sum(r.status == s for r in results)} {s}" for s in CHECK_STATUSES)
    lines.append(f"{len(results)} checks: {counts}")
    return "\n".join(lines)


def doctor(config_path: str, as_json: bool, out: TextIO = sys.stdout,
           err: TextIO = sys.stderr) -> int:
    """Run every check, print the table (or JSON); 0 when none failed."""
    results = Doctor(config_path).run(ProgressBar(err))
    failed = any(r.status == "fail" for r in results)
    if as_json:
        out.write(json.dumps({"config": config_path, "ok": not failed,
                              "checks": [asdict(r) for r in results]}, indent=2) + "\n")
    else:
        out.write(format_table(results) + "\n")
    out.flush()
    return 1 if failed else 0
