"""One SBS file parsed by the PROTOCOL.md v1.1 §7 grammar into typed records.

Which document a file is comes from its name (the §4 UpdateSBSInfo names),
so a file named as a client list that holds an ``<Images>`` root is refused
rather than guessed at. Unknown attributes are ignored (§7: the task server
may add some, as BootWizRebuild's update file does); unknown elements, text
where none belongs, a bad MAC or action are refused with a SBSParseError
naming the file and the problem. XML safety: agent/common/safexml.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from agent.common.errors import DsagentError
from agent.common.safexml import XMLRefused, parse_xml

MAX_FILE_BYTES = 64 * 1024 * 1024   # 10,000 computers are ~1 MB
MAX_DEPTH = 4                       # Update/Computer + slack
ACTIONS = ("automation", "production", "ignore")
UNKNOWN_COMPUTERS = ("ignore", "automation")
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")   # a preboot configuration, a setting
MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(?:[:-][0-9A-Fa-f]{2}){5}")
UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"

# file name -> document kind (§4 UpdateSBSInfo names)
NAMES = ((re.compile(r"initialPXEConfigPath\.sbs"), "settings"),
         (re.compile(r"[0-9]{10}-client\.sbs"), "managed"),
         (re.compile(r"PredefinedComputers\.sbs"), "predefined"),
         (re.compile(r"[0-9]{10}-image\.sbs"), "images"),
         (re.compile(UUID + r"\.sbs"), "update"))
ROOTS = {"settings": "PXEConfig", "managed": "Computers", "predefined": "Computers",
         "images": "Images", "update": "Update"}
WHOLE = ("settings", "managed", "predefined", "images")   # applied before updates


class SBSParseError(DsagentError):
    """The file is not a §7 document; the message names the file and the problem."""


class _Bad(Exception):
    pass


def _children(element: str, node) -> dict[str, list]:
    """The child elements of ``element`` (attributes ignored; text refused)."""
    if node is None:
        return {}
    if isinstance(node, str):
        if node.strip():
            raise _Bad(f"<{element}> holds text {_quote(node)} instead of elements")
        return {}
    if str(node.get("#text") or "").strip():
        raise _Bad(f"<{element}> holds text {_quote(node['#text'])} beside its elements")
    return {key: value for key, value in node.items() if not key.startswith(("@", "#"))}


def _only(children: dict[str, list], element: str, allowed: tuple[str, ...]) -> None:
    for key in children:
        if key not in allowed:
            raise _Bad(f"unexpected element <{key}> in <{element}> (expected "
                       f"{' or '.join(f'<{a}>' for a in allowed)})")


def _attrs(element: str, node, text: bool = False) -> tuple[dict[str, str], str]:
    """(attributes without '@', text) of a leaf element; nested elements refused."""
    if node is None:
        return {}, ""
    if isinstance(node, str):
        if node.strip() and not text:
            raise _Bad(f"<{element}> holds text {_quote(node)}")
        return {}, node.strip()
    for key in node:
        if not key.startswith(("@", "#")):
            raise _Bad(f"unexpected element <{key}> in <{element}>")
    body = str(node.get("#text") or "").strip()
    if body and not text:
        raise _Bad(f"<{element}> holds text {_quote(body)}")
    return {k[1:]: v for k, v in node.items() if k.startswith("@")}, body


def _quote(text: str) -> str:
    text = text.strip()
    return repr(text[:40] + ("…" if len(text) > 40 else ""))


def _required(element: str, attrs: dict[str, str], key: str) -> str:
    value = (attrs.get(key) or "").strip()
    if not value:
        raise _Bad(f"<{element}> has no {key} attribute")
    return value


def normalise_mac(raw: str) -> str:
    """``00-11-22-AA-bb-cc`` -> ``00:11:22:aa:bb:cc``; ValueError if it is no MAC."""
    text = raw.strip()
    if not MAC_RE.fullmatch(text):
        raise ValueError(f"MAC {raw!r} is not six hex pairs separated by ':' or '-'")
    return text.lower().replace("-", ":")


def _mac(element: str, attrs: dict[str, str]) -> str:
    try:
        return normalise_mac(_required(element, attrs, "mac"))
    except ValueError as exc:
        raise _Bad(f"<{element}>: {exc}") from None


def _config_name(element: str, raw: str | None, required: bool) -> str | None:
    value = (raw or "").strip()
    if not value:
        if required:
            raise _Bad(f"<{element}> has no config attribute")
        return None
    if not NAME_RE.fullmatch(value):
        raise _Bad(f"<{element}> config {value!r} is not a configuration name "
                   "([A-Za-z0-9._-], 1-64)")
    return value


@dataclass(frozen=True)
class Computer:
    mac: str                  # lowercase, ':'-separated
    action: str               # automation | production | ignore
    config: str | None = None
    id: str | None = None


def _computer(node) -> Computer:
    attrs, _ = _attrs("Computer", node)
    mac = _mac("Computer", attrs)
    action = _required("Computer", attrs, "action")
    if action not in ACTIONS:
        raise _Bad(f"<Computer mac=\"{mac}\"> action {action!r} is not one of "
                   f"{', '.join(ACTIONS)}")
    ident = (attrs.get("id") or "").strip() or None
    return Computer(mac, action, _config_name("Computer", attrs.get("config"), False), ident)


@dataclass(frozen=True)
class RemoveComputer:
    mac: str


@dataclass(frozen=True)
class Image:
    config: str
    version: str | None = None


def _image(node) -> Image:
    attrs, _ = _attrs("Image", node)
    config = _config_name("Image", attrs.get("config"), True)
    return Image(config, (attrs.get("version") or "").strip() or None)


@dataclass(frozen=True)
class Setting:
    name: str
    value: str


def _setting(node) -> Setting:
    attrs, value = _attrs("Setting", node, text=True)
    name = _required("Setting", attrs, "name")
    if not NAME_RE.fullmatch(name):
        raise _Bad(f"<Setting> name {name!r} is not a setting name ([A-Za-z0-9._-], 1-64)")
    if name == "unknown_computers" and value not in UNKNOWN_COMPUTERS:
        raise _Bad(f"setting unknown_computers is {value!r}, not one of "
                   f"{', '.join(UNKNOWN_COMPUTERS)}")
    if name == "automation_config" and value and not NAME_RE.fullmatch(value):
        raise _Bad(f"setting automation_config {value!r} is not a configuration name")
    return Setting(name, value)


@dataclass(frozen=True)
class RemoveImage:
    config: str


Change = Union[Computer, RemoveComputer, Image, RemoveImage, Setting]


def _unique(children: dict[str, list], root: str, element: str, parse, key) -> list:
    """The ``element`` children of ``root``, parsed; one ``key`` listed twice is refused."""
    _only(children, root, (element,))
    seen: set[str] = set()
    items = []
    for node in children.get(element, []):
        item = parse(node)
        if key(item) in seen:
            raise _Bad(f"{element} {key(item)} is listed twice in <{root}>")
        seen.add(key(item))
        items.append(item)
    return items


@dataclass(frozen=True)
class Settings:
    """initialPXEConfigPath.sbs: every setting (replaces them all)."""
    values: dict


def _settings(children: dict[str, list]) -> dict[str, str]:
    return {s.name: s.value for s in _unique(children, "PXEConfig", "Setting", _setting,
                                             lambda s: s.name)}


@dataclass(frozen=True)
class Computers:
    """A whole computer list: managed (``NNNNNNNNNN-client.sbs``) or predefined."""
    predefined: bool
    computers: tuple


def _computer_list(children: dict[str, list]) -> tuple:
    return tuple(_unique(children, "Computers", "Computer", _computer, lambda c: c.mac))


@dataclass(frozen=True)
class Images:
    images: tuple


def _image_list(children: dict[str, list]) -> tuple:
    return tuple(_unique(children, "Images", "Image", _image, lambda i: i.config))


@dataclass(frozen=True)
class Update:
    change: Change


def _update(children: dict[str, list]) -> Change:
    kinds = ("Computer", "RemoveComputer", "Image", "RemoveImage", "Setting")
    _only(children, "Update", kinds)
    found = [(key, node) for key, nodes in children.items() for node in nodes]
    if len(found) != 1:
        raise _Bad(f"<Update> holds {len(found)} changes, expected exactly one of "
                   f"{', '.join(f'<{k}>' for k in kinds)}")
    key, node = found[0]
    if key == "Computer":
        return _computer(node)
    if key == "RemoveComputer":
        return RemoveComputer(_mac(key, _attrs(key, node)[0]))
    if key == "Image":
        return _image(node)
    if key == "RemoveImage":
        return RemoveImage(_config_name(key, _attrs(key, node)[0].get("config"), True))
    return _setting(node)


Document = Union[Settings, Computers, Images, Update]


def kind_of(name: str) -> str | None:
    """The document kind a file name stands for, or None."""
    return next((kind for pattern, kind in NAMES if pattern.fullmatch(name)), None)


def parse_sbs(name: str, data: bytes) -> Document:
    """Parse the file ``name`` holding ``data``; raise SBSParseError if it is bad."""
    kind = kind_of(name)
    try:
        if kind is None:
            raise _Bad("not an SBS file name (initialPXEConfigPath.sbs, NNNNNNNNNN-client.sbs, "
                       "NNNNNNNNNN-image.sbs, PredefinedComputers.sbs or <uuid>.sbs)")
        try:
            doc = parse_xml(data, max_bytes=MAX_FILE_BYTES, max_depth=MAX_DEPTH,
                            force_list=("Computer", "Image", "Setting", "RemoveComputer",
                                        "RemoveImage"))
        except XMLRefused as exc:
            raise _Bad(str(exc)) from None
        root_name = ROOTS[kind]
        if list(doc) != [root_name]:
            raise _Bad(f"root element is <{next(iter(doc), None)}>, expected <{root_name}> "
                       f"for a {kind} file")
        children = _children(root_name, doc[root_name])
        if kind == "settings":
            return Settings(_settings(children))
        if kind in ("managed", "predefined"):
            return Computers(kind == "predefined", _computer_list(children))
        if kind == "images":
            return Images(_image_list(children))
        return Update(_update(children))
    except _Bad as exc:
        raise SBSParseError(f"{name}: {exc}") from None
