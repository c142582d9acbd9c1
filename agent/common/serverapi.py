"""The agent's side of the HTTP API (PROTOCOL.md §3), over httpx.

This is the one boundary where httpx errors become ServerError/AuthError.
Keep-alive (one Client per process), TLS verified by default, redirects never
followed (a task server that redirects elsewhere is not trusted), response
bodies capped before they are read into memory.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import logging
import os
import platform
import socket
import ssl
import time
import uuid
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from agent import __version__
from agent.common.errors import AuthError, ServerBusy, ServerError

log = logging.getLogger("dsagent.server")

MAX_JSON_BYTES = 1024 * 1024
SYS_CLASS_NET = "/sys/class/net"
PRODUCT_UUID = "/sys/class/dmi/id/product_uuid"     # SMBIOS system uuid; readable by root
BOGUS_UUIDS = {"00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff",
               "03000200-0400-0500-0006-000700080009"}   # firmware placeholders, not unique
IFF_LOOPBACK = 0x8
MAX_RETRY_AFTER_S = 3600.0        # a Retry-After further out than this is taken as this
MAX_PXE_STARTUP_BYTES = 64 * 1024 * 1024   # whole computer lists: ~100 bytes a computer
PXE_STARTUP_KINDS = ("initial-config", "clients", "images", "predefined")


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def failure_kind(exc: BaseException) -> str:
    """Why a call failed: "auth" (token or key refused), "tls", "timeout",
    "unreachable" or "answer" (HTTP error or unusable reply); read from the
    httpx error a ServerError keeps as its context (doctor and enroll say it)."""
    if isinstance(exc, AuthError):
        return "auth"
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(e, ssl.SSLError) for e in chain):
        return "tls"
    if any(isinstance(e, httpx.TimeoutException) for e in chain):
        return "timeout"
    if any(isinstance(e, (httpx.ConnectError, httpx.NetworkError, OSError)) for e in chain):
        return "unreachable"
    return "answer"


def retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delay-seconds or an HTTP date,
    RFC 9110 §10.2.3), capped at MAX_RETRY_AFTER_S; None if absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return min(float(text), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(when.timestamp() - time.time(), 0.0), MAX_RETRY_AFTER_S)


class RegistrationRefused(AuthError):
    """POST register answered 401/403; ``reason`` is the server's own words (its
    ``{"error": ...}``), ``status`` the HTTP status."""

    def __init__(self, message: str, reason: str, status: int):
        super().__init__(message)
        self.reason, self.status = reason, status


class ServerAPI:
    """Calls to one task server; ``client_id``/``token`` may be set after register()."""

    def __init__(self, server_url: str, client_id: str | None = None,
                 token: str | None = None, timeout: float = 30.0, verify: bool | str = True,
                 deadline: float | None = None):
        self.server_url = server_url.rstrip("/")
        # httpx's timeout is per network operation; this bounds a whole exchange
        self.deadline = 2 * timeout if deadline is None else deadline
        self.client_id = client_id
        self.token = token
        self.last_date: str | None = None  # Date header of the last answer (doctor's clock check)
        parts = urlsplit(self.server_url)
        if parts.scheme == "http" and not is_loopback_host(parts.hostname or ""):
            log.warning("server_url %s is plain http: status and tasks travel unencrypted",
                        self.server_url)
        self._http = httpx.Client(base_url=self.server_url, timeout=timeout, verify=verify,
                                  follow_redirects=False,
                                  headers={"User-Agent": f"dsagent/{__version__}",
                                           # the size caps count bytes as received: no
                                           # content coding (a zstd/gzip bomb) is accepted
                                           "Accept-Encoding": "identity"})

    def close(self) -> None:
        self._http.close()

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _path(self, tail: str) -> str:
        return f"/api/v1/clients/{quote(self.client_id or '', safe='')}/{tail}"

    def _request(self, method: str, path: str, limit: int, refusal: bool = False,
                 **kwargs) -> tuple[httpx.Response, bytes]:
        where = f"{method} {self.server_url}{path}"
        deadline = time.monotonic() + self.deadline
        try:
            with self._http.stream(method, path, **kwargs) as response:
                self.last_date = response.headers.get("date")
                coding = response.headers.get("content-encoding", "identity").strip().lower()
                if coding not in ("", "identity"):
                    raise ServerError(f"{where}: answer with Content-Encoding {coding!r} refused "
                                      "(we asked for identity)")
                body = bytearray()
                for chunk in response.iter_raw():
                    body += chunk
                    if len(body) > limit:
                        raise ServerError(f"{where}: response larger than {limit} bytes; refused")
                    if time.monotonic() > deadline:
                        raise ServerError(f"{where}: answer not complete within "
                                          f"{self.deadline:g} s; refused")
        except httpx.TimeoutException as exc:
            raise ServerError(f"{where}: timed out ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise ServerError(f"{where}: {type(exc).__name__}: {exc}") from None
        status = response.status_code
        if status in (401, 403) and refusal:
            reason = _error_text(body) or f"HTTP {status}"
            raise RegistrationRefused(f"{where}: refused (HTTP {status}): {reason}", reason, status)
        if status in (401, 403):
            raise AuthError(f"{where}: server refused our credentials (HTTP {status})")
        if status in (429, 503):
            after = retry_after(response.headers.get("retry-after"))
            raise ServerBusy(f"{where}: HTTP {status} (server busy)"
                             + (f", Retry-After {after:g} s" if after is not None else ""), after)
        if 300 <= status < 400:
            raise ServerError(f"{where}: redirected to {response.headers.get('location')!r}; "
                              "not followed")
        if status >= 400:
            raise ServerError(f"{where}: HTTP {status}: {bytes(body[:200])!r}")
        return response, bytes(body)

    def get_tasks(self, max_bytes: int, batch: int = 100) -> bytes:
        """One page of the pending-tasks document: at most ``batch`` tasks in at most
        ``max_bytes`` bytes (§3 paging; parsing is taskxml's job)."""
        response, body = self._request("GET", self._path("tasks"), max_bytes, headers=self._auth(),
                                       params={"limit": batch, "max_bytes": max_bytes})
        ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("application/xml", "text/xml"):
            raise ServerError(f"GET tasks: content type {ctype or 'none'!r}, expected application/xml")
        return body

    def post_status(self, events: list[dict[str, Any]]) -> list[str]:
        """Upload events; return the event ids the server accepted."""
        response, body = self._request("POST", self._path("status"), MAX_JSON_BYTES,
                                       headers=self._auth(), json={"events": events})
        try:
            accepted = json.loads(body)["accepted"]
            if not isinstance(accepted, list):
                raise TypeError("accepted is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise ServerError(f"POST status: unusable answer ({exc}): {body[:200]!r}") from None
        return [str(a) for a in accepted]

    def pxe_startup(self) -> dict[str, str | None]:
        """GET pxe/startup (§7): the initial SBS documents, by §4 kind; registers
        this client as a PXE server at the task server."""
        _, body = self._request("GET", self._path("pxe/startup"), MAX_PXE_STARTUP_BYTES,
                                headers=self._auth())
        try:
            answer = json.loads(body)
            if not isinstance(answer, dict):
                raise TypeError("not a JSON object")
            for kind in PXE_STARTUP_KINDS:
                if kind != "predefined" and not isinstance(answer.get(kind), str):
                    raise TypeError(f"{kind!r} is not an XML string")
            if not isinstance(answer.get("predefined"), (str, type(None))):
                raise TypeError("'predefined' is neither an XML string nor null")
        except (ValueError, TypeError) as exc:
            raise ServerError(f"GET pxe/startup: unusable answer ({exc}): {body[:200]!r}") from None
        return {kind: answer.get(kind) for kind in PXE_STARTUP_KINDS}

    def post_pxe_state(self, state: dict[str, Any]) -> None:
        """POST pxe/state (§7): this PXE server's health."""
        self._request("POST", self._path("pxe/state"), MAX_JSON_BYTES, headers=self._auth(),
                      json=state)

    def register(self, enrollment_key: str | None, name: str | None = None, *,
                 mode: str | None = None, tickle_addr: str | None = None) -> dict[str, Any]:
        """POST /api/v1/register; return client_id, token, tickle_key, poll_interval_s.

        Sends every MAC of the machine (``machine_macs``) and its SMBIOS uuid
        (``machine_uuid``); ``mode="automation"`` (§8) and ``tickle_addr`` (where
        the objecthost can be reached, an extension) are added when given. A
        401/403 raises RegistrationRefused carrying the server's reason.
        """
        request = {
            "name": name or socket.gethostname(),
            "uuid": machine_uuid(),
            "macs": machine_macs(),
            "ips": _local_ips(),
            "os": f"{platform.system()} {platform.release()}",
            "agent_version": __version__,
            "enrollment_key": enrollment_key or "",
        }
        if mode:
            request["mode"] = mode
        if tickle_addr:
            request["tickle_addr"] = tickle_addr
        _, body = self._request("POST", "/api/v1/register", MAX_JSON_BYTES, refusal=True,
                                json=request)
        try:
            answer = json.loads(body)
            for key in ("client_id", "token", "tickle_key"):
                if not isinstance(answer[key], str) or not answer[key]:
                    raise TypeError(f"{key} missing")
            bytes.fromhex(answer["tickle_key"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ServerError(f"register: unusable answer ({exc})") from None
        return answer


def _error_text(body: bytes) -> str:
    """The ``error`` of a JSON error body (one line, at most 300 characters), or ""."""
    try:
        text = json.loads(body).get("error")
    except (ValueError, AttributeError):
        text = None
    return " ".join(text.split())[:300] if isinstance(text, str) else ""


def machine_macs(sys_class_net: str = SYS_CLASS_NET) -> list[str]:
    """Every MAC of this machine, lowercase with ':': each interface but loopback
    (physical ones first, then by name; an all-zero or repeated address is left
    out). Where sysfs shows none, the MAC ``uuid.getnode()`` finds, if it is real."""
    found: list[tuple[bool, str, str]] = []
    try:
        names = sorted(os.listdir(sys_class_net))
    except OSError:
        names = []
    for name in names:
        base = os.path.join(sys_class_net, name)
        try:
            with open(os.path.join(base, "address")) as fh:
                mac = fh.read().strip().lower()
            with open(os.path.join(base, "flags")) as fh:
                flags = int(fh.read().strip(), 16)
        except (OSError, ValueError):
            continue
        parts = mac.split(":")
        if (flags & IFF_LOOPBACK or len(parts) != 6 or mac == "00:00:00:00:00:00"
                or not all(len(p) == 2 for p in parts)):
            continue
        found.append((not os.path.exists(os.path.join(base, "device")), name, mac))
    macs = list(dict.fromkeys(mac for _, _, mac in sorted(found)))
    node = uuid.getnode()
    if not macs and not (node >> 40) & 1:   # the multicast bit: getnode made a random one up
        macs = [":".join(f"{(node >> s) & 0xff:02x}" for s in range(40, -1, -8))]
    return macs


def machine_uuid(path: str = PRODUCT_UUID) -> str:
    """The SMBIOS system uuid, lowercase (root may read it). Unreadable, missing or
    a firmware placeholder: a uuid made from the MAC ``uuid.getnode()`` finds, as
    before (it identifies nothing the MACs do not; the server never matches it
    to another machine)."""
    try:
        with open(path) as fh:
            value = str(uuid.UUID(fh.read().strip()))
        if value not in BOGUS_UUIDS:
            return value
        log.debug("%s holds the placeholder %s; not used", path, value)
    except (OSError, ValueError) as exc:
        log.debug("no SMBIOS uuid from %s (%s)", path, exc)
    return str(uuid.UUID(int=uuid.getnode()))


def _local_ips() -> list[str]:
    try:
        import psutil

        return sorted({a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                       if a.family in (socket.AF_INET, socket.AF_INET6)})
    except Exception:  # an inventory nicety, never a reason to fail registration
        return []
