"""The Flower ServerApp (``serverapp = "server.app:app"`` in ``[tool.flwr.app.components]``).

It only reads the run config and hands over to :func:`server.runner.run_federation`; all logic lives in
typed functions that tests call without Flower's runtime. Run-config keys: see ``server.config``.

A run that cannot go on for a reason the operator must act on (too few sites admitted, e.g. because
some were refused) ends with ONE log line saying why, not a traceback, and ``<run-dir>/run_status.json``
records the outcome (``hermes-server start`` reads it and exits non-zero).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from hermes_model.fileio import atomic_write_json
from server.config import ServerConfig
from server.runner import FederationFailed, SiteWaitTimeout, run_federation, usage_lines

logger = logging.getLogger(__name__)

app = ServerApp()
RUN_STATUS_FILE = "run_status.json"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume, with run-config ``resume = true``) the federation on ``grid``."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # httpx logs every request at INFO; Flower ships log lines to the SuperLink by more requests,
        # which would log again: a feedback loop of several pushes per second for the whole run.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    config = ServerConfig.from_run_config(dict(context.run_config))
    status_path = f"{config.run_dir}/{RUN_STATUS_FILE}"
    try:
        result = run_federation(grid, config)
    except (FederationFailed, SiteWaitTimeout) as exc:
        logger.error("the federation stopped: %s", exc)
        atomic_write_json(status_path, {"status": "failed", "reason": str(exc), "time": time.time()})
        return
    atomic_write_json(status_path, {"status": "completed", "last_round": result.last_round,
                                    "final_model": str(result.final_model), "time": time.time()})
    logger.info("federation finished after round %d; checkpoints in %s", result.last_round, config.run_dir)
    for line in usage_lines(result.final_model, config.run_dir):
        logger.info("%s", line)


def read_run_status(run_dir: str | Path) -> dict[str, Any]:
    """The ``run_status.json`` the ServerApp wrote into ``run_dir`` (``{}`` when there is none)."""
    try:
        return json.loads((Path(run_dir) / RUN_STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
