"""``python -m objecthost --config FILE``."""

from .server import main

raise SystemExit(main())
