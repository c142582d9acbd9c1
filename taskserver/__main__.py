"""``python -m taskserver`` is ``dsagent-server``."""

from .cli import main

raise SystemExit(main())
