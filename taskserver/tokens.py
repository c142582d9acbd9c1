"""Tokens in task parameters, replaced per computer when tasks are queued.

The seed: "Task was, essentially, created for DS, and the tokens in Task are
almost exclusively used for DS tasks". One task queued for many computers
names each one's own values: ``image=%COMPNAME%-backup`` gives
``pc-0042-backup`` on pc-0042. Tokens (case-sensitive, ``%NAME%``):

    %COMPNAME%       the computer's name (its PXE list entry, else its client record)
    %ID%             its client id
    %MAC%            its first MAC (lower case, ':'-separated)
    %SERIALNUMBER%   its SMBIOS serial number, if it reported one at registration
    %IMAGE%          the image the job is about (``deploy --image``, or the task's
                     own ``image`` parameter)
    %%               a literal '%'

An unknown token (``%COMPUTERNAME%``), or a token without a value for that
computer, refuses the whole queueing with the token's name, the parameter
and the computer: nothing is queued half-replaced. A parameter with no ``%``
is passed as is. (A script that needs a literal ``%PATH%`` writes ``%%PATH%%``.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from taskserver.checks import InvalidRequest

TOKEN_RE = re.compile(r"%([A-Za-z0-9_]*)%")
TOKENS = ("COMPNAME", "ID", "MAC", "SERIALNUMBER", "IMAGE")


def facts_of(client: Mapping[str, Any] | None, client_id: str,
             pxe_name: str | None = None, pxe_mac: str | None = None,
             image: str | None = None) -> dict[str, str | None]:
    """The token values for one computer, from its client record (``TaskStore.client``)
    and its PXE list entry, if any."""
    client = client or {}
    macs = client.get("macs") or []
    if isinstance(macs, str):
        try:
            macs = json.loads(macs)
        except ValueError:
            macs = []
    mac = pxe_mac or (macs[0].lower().replace("-", ":") if macs else None)
    return {"COMPNAME": pxe_name or client.get("name") or client_id, "ID": client_id,
            "MAC": mac, "SERIALNUMBER": client.get("serial") or None, "IMAGE": image}


def expand(params: Mapping[str, str], facts: Mapping[str, str | None],
           computer: str) -> dict[str, str]:
    """``params`` with every token replaced from ``facts``; InvalidRequest naming
    the token, the parameter and ``computer`` if one is unknown or has no value."""
    out = {}
    for name, value in params.items():
        if "%" not in value:
            out[name] = value
            continue

        def one(match: re.Match) -> str:
            token = match.group(1)
            if token == "":
                return "%"
            if token not in TOKENS:
                raise InvalidRequest(
                    f"parameter {name!r}: unknown token %{token}% (known: "
                    + ", ".join(f"%{t}%" for t in TOKENS) + "; write %% for a literal %)")
            found = facts.get(token) if token != "IMAGE" else (
                facts.get("IMAGE") or params.get("image"))
            if not found:
                raise InvalidRequest(f"parameter {name!r}: token %{token}% has no value for "
                                     f"{computer}")
            return found

        rest = TOKEN_RE.sub(one, value)
        if "%" in TOKEN_RE.sub("", value.replace("%%", "")):
            raise InvalidRequest(f"parameter {name!r}: a lone '%' in {value!r} (write %% "
                                 "for a literal %)")
        out[name] = rest
    return out
