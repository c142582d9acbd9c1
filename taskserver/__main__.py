"""``python -m taskserver`` is ``dsagent-server``."""

from taskserver.cli import main

raise SystemExit(main())
