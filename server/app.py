"""The Flower ServerApp (``serverapp = "server.app:app"`` in ``[tool.flwr.app.components]``).

It only reads the run config and hands over to :func:`server.runner.run_federation`; all logic lives in
typed functions that tests call without Flower's runtime. Run-config keys: see ``server.config``.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.config import ServerConfig
from server.runner import run_federation

logger = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume, with run-config ``resume = true``) the federation on ``grid``."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # httpx logs every request at INFO; Flower ships log lines to the SuperLink by more requests,
        # which would log again: a feedback loop of several pushes per second for the whole run.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    config = ServerConfig.from_run_config(dict(context.run_config))
    result = run_federation(grid, config)
    logger.info("federation finished after round %d; checkpoints in %s", result.last_round, config.run_dir)
