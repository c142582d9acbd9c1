"""``python -m agent.packages --config FILE``: the package server (agent/packages/service.py)."""

import sys

from agent.packages.service import main

sys.exit(main())
