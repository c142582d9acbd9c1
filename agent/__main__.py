import sys

from agent.tools.cli import main

sys.exit(main())
