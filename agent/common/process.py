"""How every agent process started by ``dsagent run`` begins.

``python -m objecthost|agent.cta|ctdataloader --config FILE`` all parse the
same command line, log to stderr until the config says where to log, then
log as it says (exported to the environment, so the CTA's workers follow).
"""

from __future__ import annotations

import argparse

from agent.common.config import Config, load_config
from agent.common.logsetup import setup_logging


def start(process: str, argv: list[str] | None, prog: str, description: str = "") -> Config:
    """Parse ``--config FILE`` (usage shown as ``prog``), set up logging for
    ``process``, and load the config.

    Raises what ``load_config`` raises (ConfigError), already able to be
    logged where the config says.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description or None)
    parser.add_argument("--config", required=True, metavar="FILE", help="the agent's TOML config")
    args = parser.parse_args(argv)
    setup_logging(process)
    config = load_config(args.config)
    setup_logging(process, config=config)
    return config
