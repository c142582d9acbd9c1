"""``python -m agent.pxe --config FILE``: the PXE process (agent/pxe/service.py)."""

import sys

from agent.pxe.service import main

sys.exit(main())
