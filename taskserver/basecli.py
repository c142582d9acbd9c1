"""``dsagent-server bootwiz-base``: build the automation base (taskserver/bootwizbase.py).

    dsagent-server bootwiz-base NAME --preboot-store DIR --server-url URL
        [--enrollment-key K | --enrollment-key-file FILE] [--image-store URL|DIR]
        [--kernel FILE] [--modules M,M,... | --add-module M ...] [--tool CMD ...]
        [--with DIST ...] [--json]

Writes ``DIR/NAME/vmlinuz``, ``DIR/NAME/initrd.img`` (the layout BootWizRebuild
takes as a ``base``) and ``DIR/NAME/base.json``, then prints the sizes and
what the initrd holds (``--json``: base.json's content). Progress goes to
stderr. Exit status 0 built, 1 failed (the message says what is missing), 2
usage. docs/automation-base.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from taskserver.bootwizbase import DEFAULT_MODULES, BaseBuildError, BaseInfo, Options, build_base

PROG = "dsagent-server bootwiz-base"


def _words(text: str) -> tuple[str, ...]:
    return tuple(w for w in text.replace(",", " ").split() if w)


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def describe(info: BaseInfo) -> str:
    """What the command prints: where, how big, what it holds."""
    dists = ", ".join(f"{k} {v}" for k, v in info.distributions.items())
    sizes = ", ".join(f"{k} {_mib(v)}" for k, v in info.sizes.items())
    key = ("baked in: anyone on the PXE network can read it (SECURITY.md)"
           if info.enrollment_key_baked else "none")
    return "\n".join([
        f"automation base {info.name!r} built in {info.seconds:.1f} s: {info.folder}/",
        f"  vmlinuz     {_mib(info.kernel_size):>10}  Linux {info.kernel_version} ({info.kernel})",
        (f"  initrd.img  {_mib(info.initrd_size):>10}  gzip newc, {info.entries} entries, "
         f"{_mib(info.unpacked_size)} unpacked"),
        f"              sha256 {info.initrd_sha256}",
        f"  holds: Python {info.python} (stdlib precompiled, .pyc only), {dists}",
        f"         tools: {' '.join(info.tools)}; {info.busybox.split(' (')[0]}",
        f"         kernel modules ({len(info.modules)}): {' '.join(info.modules) or 'none'}",
        f"         by size: {sizes}{'' if info.stripped else ' (not stripped: no strip)'}",
        f"  server: {info.server_url}; enrollment key: {key}",
        f"  image store: {info.image_store or 'not set: imaging tasks will fail'}",
        f"  boot it: BootWizRebuild with base={info.name} (docs/automation-base.md)",
    ])


def add_commands(subparsers) -> None:
    """Add ``bootwiz-base`` to ``dsagent-server``'s sub-commands."""
    help_ = ("build the automation base (a kernel and an initrd carrying the agent) "
             "into DIR/NAME for BootWizRebuild")
    p = subparsers.add_parser("bootwiz-base", help=help_, description=help_)
    p.add_argument("name", metavar="NAME", help="the base's name: the folder DIR/NAME")
    p.add_argument("--preboot-store", required=True, metavar="DIR",
                   help="the preboot store (BootWizRebuild's [handlers] preboot_store)")
    p.add_argument("--server-url", required=True, metavar="URL",
                   help="the task server the booted computers register with (baked in)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--enrollment-key", metavar="K",
                     help="baked in: anyone on the PXE network can read it (SECURITY.md)")
    key.add_argument("--enrollment-key-file", metavar="FILE",
                     help="the enrollment key from a file (kept out of the process list)")
    p.add_argument("--image-store", metavar="URL|DIR",
                   help="[handlers] image_store of the booted agent (default: SERVER-URL/images/, "
                        "the reference server's store; '' for none)")
    p.add_argument("--kernel", metavar="FILE",
                   help="the kernel (default: this machine's newest /boot/vmlinuz-*); its "
                        "modules come from /lib/modules/<version>")
    p.add_argument("--modules", metavar="M,M,...",
                   help="kernel modules to carry instead of the default list "
                        f"({','.join(DEFAULT_MODULES)}); '' for none")
    p.add_argument("--add-module", action="append", default=[], metavar="M",
                   help="one more kernel module (with its dependencies)")
    p.add_argument("--tool", action="append", default=[], metavar="CMD",
                   help="one more command to carry, with its shared libraries")
    p.add_argument("--with", dest="distributions", action="append", default=[],
                   metavar="DIST", help="one more installed Python distribution (e.g. a "
                                        "third-party handler) and what it requires")
    p.add_argument("--json", action="store_true", help="print base.json instead of the summary")
    p.set_defaults(func=cmd_bootwiz_base)


def cmd_bootwiz_base(args: argparse.Namespace) -> int:
    key = args.enrollment_key
    if args.enrollment_key_file:
        try:
            key = Path(args.enrollment_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise BaseBuildError(f"--enrollment-key-file {args.enrollment_key_file}: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None

    def progress(text: str) -> None:
        print(f"{PROG}: {text}", file=sys.stderr, flush=True)

    opts = Options(name=args.name, preboot_store=args.preboot_store, server_url=args.server_url,
                   enrollment_key=key, image_store=args.image_store, kernel=args.kernel,
                   modules=DEFAULT_MODULES if args.modules is None else _words(args.modules),
                   extra_modules=tuple(args.add_module), tools=tuple(args.tool),
                   distributions=tuple(args.distributions), log=progress)
    info = build_base(opts)
    if key:
        progress("warning: the enrollment key is baked into initrd.img, which the PXE server "
                 "hands to any computer on its network (SECURITY.md)")
    if info.server_url.startswith("http://"):
        progress("note: the server URL is plain http: tokens and tasks travel unencrypted")
    print(json.dumps(asdict(info), indent=2) if args.json else describe(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone (``python -m taskserver.basecli``), until ``dsagent-server`` has the command."""
    parser = argparse.ArgumentParser(prog="dsagent-server")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BaseBuildError as exc:
        print(f"dsagent-server: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
