"""``python -m objecthost --config FILE``."""

from objecthost.server import main

raise SystemExit(main())
