"""Untrusted XML parsed safely (xmltodict on expat), for every document the
agent reads from outside: task documents (taskxml.py) and SBS files (agent.pxe).

A size limit before parsing; no DTD at all (so no entity of any kind,
internal or external); an element depth limit enforced while parsing, so
neither billion laughs nor deep nesting can cost memory. Bad input never
raises anything but XMLRefused.
"""

from __future__ import annotations

from xml.parsers import expat as _expat

import xmltodict


class XMLRefused(Exception):
    """The bytes are not a document we parse; the message says why."""


class _Refuse(Exception):
    pass


class _GuardedParser:
    """An expat parser that refuses DTDs and nesting deeper than ``max_depth``."""

    def __init__(self, parser, max_depth: int):
        object.__setattr__(self, "_parser", parser)
        object.__setattr__(self, "_depth", 0)
        object.__setattr__(self, "_max_depth", max_depth)
        parser.StartDoctypeDeclHandler = self._doctype

    def _doctype(self, *args):
        raise _Refuse("a DTD (<!DOCTYPE>) is not allowed")

    def __getattr__(self, name):
        return getattr(self._parser, name)

    def __setattr__(self, name, value):
        if name == "StartElementHandler":
            inner = value

            def value(*args):  # noqa: E306 - wraps xmltodict's handler
                object.__setattr__(self, "_depth", self._depth + 1)
                if self._depth > self._max_depth:
                    raise _Refuse(f"elements nested deeper than {self._max_depth}")
                return inner(*args)
        elif name == "EndElementHandler":
            inner_end = value

            def value(*args):  # noqa: E306
                object.__setattr__(self, "_depth", self._depth - 1)
                return inner_end(*args)
        setattr(self._parser, name, value)


def _guarded_expat(max_depth: int):
    class GuardedExpat:
        ExpatError = _expat.ExpatError

        @staticmethod
        def ParserCreate(*args, **kwargs):
            return _GuardedParser(_expat.ParserCreate(*args, **kwargs), max_depth)

    return GuardedExpat


def parse_xml(data: bytes | str, *, max_bytes: int, max_depth: int,
              force_list: tuple[str, ...] = (), strip_whitespace: bool = True) -> dict:
    """``data`` as xmltodict's dict, or XMLRefused naming the problem."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if len(data) > max_bytes:
        raise XMLRefused(f"document is {len(data)} bytes, over the {max_bytes}-byte limit")
    try:
        doc = xmltodict.parse(data, expat=_guarded_expat(max_depth), disable_entities=True,
                              strip_whitespace=strip_whitespace, force_list=force_list)
    except _Refuse as exc:
        raise XMLRefused(str(exc)) from None
    except _expat.ExpatError as exc:
        raise XMLRefused(f"not well-formed XML: {exc}") from None
    except ValueError as exc:  # xmltodict refuses entity declarations this way
        raise XMLRefused(f"refused XML: {exc}") from None
    except LookupError as exc:  # <?xml encoding="..."?> names no (text) codec
        raise XMLRefused(f"refused XML: {exc}") from None
    return doc
