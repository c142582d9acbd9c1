"""Shared plumbing of the atheris harnesses (fuzz_*.py).

Each harness defines ``TestOneInput(data: bytes)`` that raises only when it
found a bug: an exception of an undocumented type escaped the target, or an
accepted input broke an invariant. The same function replays the seed corpus
in CI (tests/test_attacks.py) without atheris.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

try:  # atheris is optional: only fuzzing needs it, replaying the corpus does not
    import atheris
except ImportError:  # pragma: no cover - depends on the machine
    atheris = None


def known_bug(exc: BaseException, known: list[tuple[type, str]]) -> bool:
    """True if ``exc`` is one of the ``known`` (type, message part) bugs and the
    environment says FUZZ_SKIP_KNOWN=1 (to fuzz on past a bug not fixed yet;
    fuzz/known-crashes/ holds their reproducers)."""
    import os

    if os.environ.get("FUZZ_SKIP_KNOWN") != "1":
        return False
    return any(isinstance(exc, kind) and part in str(exc) for kind, part in known)


def instrumented(main: bool):
    """``atheris.instrument_imports()`` when fuzzing, else a no-op context."""
    if main and atheris is not None:
        return atheris.instrument_imports()
    return contextlib.nullcontext()


def fuzz(test_one_input) -> None:
    """Run libFuzzer over ``test_one_input`` with the command line's options."""
    if atheris is None:
        sys.exit("atheris is not installed: pip install atheris "
                 "(the corpus replays without it: pytest tests/test_attacks.py -k corpus)")
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
