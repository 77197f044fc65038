"""The site's Flower ClientApp: thin handlers translating the messages of the federated Hermes protocol to
and from the typed :class:`client.site.Site` API.

Where the site config comes from:

- deployment: the SuperNode's node config, ``flower-supernode --node-config 'site-config="/path/site.yaml"'``
  (``context.node_config["site-config"]``);
- simulation: virtual clients only get a ``partition-id``; it indexes the run-config key ``site-configs``,
  a string of site config paths separated by ``,`` (relative paths are relative to the working folder of
  the process).

Errors: a malformed request raises :class:`client.site.ProtocolError`, whose text names only keys and values
of the request and goes back to the server. Any other failure is logged here with its details and
re-raised as a :class:`SiteError` that names only the exception type, because Flower sends the text of a
ClientApp's exception to the server and such texts may hold file paths or case ids.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.config import REFUSAL_FILE
from client.site import ProtocolError, RoundRequest, Site, TrainReply
from client.wire import reply_array
from hermes_model.exchange import (
    ARRAYS_RECORD,
    BACKBONE,
    CONFIG_RECORD,
    DATASETS_KEY,
    FINGERPRINT_KEY,
    METRICS_RECORD,
    MODALITY_ROW_IDS,
    MODALITY_ROWS,
    MODALITY_TERM_ARRAYS,
    NAME_KEY,
    PROTOCOL_KEY,
    PROTOCOL_VERSION,
    REFUSED_KEY,
    SITE_RECORD,
    TASK_ROW_IDS,
    TASK_ROWS,
    from_wire,
)
from hermes_model.fileio import atomic_write_json
from hermes_model.fingerprint import fingerprints_to_json
from hermes_model.plans import Plans

__all__ = ["SITE_CONFIG_KEY", "SITE_CONFIGS_KEY", "SiteError", "app", "load_site", "parse_request",
           "site_config_path"]

logger = logging.getLogger(__name__)

SITE_CONFIG_KEY = "site-config"    # node config (SuperNode --node-config)
SITE_CONFIGS_KEY = "site-configs"  # run config (simulation): paths separated by ","
PARTITION_KEY = "partition-id"     # node config of a simulated client

app = ClientApp()


class SiteError(RuntimeError):
    """A site failed; the details are in the site's log, not in the message (they may identify data)."""


# ------------------------------------------------------------------------------------------------ the site
def site_config_path(context: Context) -> Path:
    """The site config of this node: node config ``site-config``, else run config ``site-configs`` indexed
    by the node's ``partition-id`` (simulation)."""
    node = context.node_config
    if SITE_CONFIG_KEY in node:
        return Path(str(node[SITE_CONFIG_KEY]))
    if PARTITION_KEY not in node:
        raise ValueError(
            f"no site config: give the SuperNode --node-config '{SITE_CONFIG_KEY}=\"site.yaml\"', or in "
            f"simulation the run config '{SITE_CONFIGS_KEY}' (paths separated by ',') indexed by "
            f"'{PARTITION_KEY}'"
        )
    paths = [p.strip() for p in str(context.run_config.get(SITE_CONFIGS_KEY, "")).split(",") if p.strip()]
    partition = node[PARTITION_KEY]
    if isinstance(partition, bool) or not isinstance(partition, int) or not 0 <= partition < len(paths):
        raise ValueError(
            f"{PARTITION_KEY} = {partition!r} does not index the {len(paths)} paths of run config "
            f"'{SITE_CONFIGS_KEY}'"
        )
    return Path(paths[partition])


_SITES: dict[tuple[Path, int], Site] = {}


def _site_logging() -> None:
    """Show the site's progress (INFO of ``client`` and ``hermes_model``) in the SuperNode's output: a
    ClientApp process starts without logging configured, where only warnings would appear."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("client", "hermes_model"):
        if logging.getLogger(name).getEffectiveLevel() > logging.INFO:
            logging.getLogger(name).setLevel(logging.INFO)


def load_site(context: Context) -> Site:
    """The :class:`Site` of this node, cached per process while its config file is unchanged."""
    _site_logging()
    path = site_config_path(context).resolve()
    key = (path, path.stat().st_mtime_ns if path.is_file() else -1)
    if key not in _SITES:
        _SITES[key] = Site.from_path(path)
    return _SITES[key]


def _private_errors(kind: str) -> Callable:
    """Let :class:`ProtocolError` through; log any other exception here and raise one without its text."""

    def decorate(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
        @functools.wraps(handler)
        def run(msg: Message, context: Context) -> Message:
            try:
                return handler(msg, context)
            except ProtocolError:
                logger.exception("%s: the server's request is malformed", kind)
                raise
            except Exception as exc:
                logger.exception("%s failed", kind)
                raise SiteError(f"{kind} failed at the site ({type(exc).__name__}); the details stay in the "
                                "site's log") from None

        return run

    return decorate


# ------------------------------------------------------------------------------------------------ records
def _record(msg: Message, name: str, kind: type) -> Any:
    if name not in msg.content or not isinstance(msg.content[name], kind):
        raise ProtocolError(
            f"the message has no {kind.__name__} named {name!r}; it has {sorted(msg.content)}"
        )
    return msg.content[name]


def _json(config: ConfigRecord, key: str, default: Any = None) -> Any:
    if key not in config:
        if default is None:
            raise ProtocolError(f"config key {key!r} is missing")
        return default
    try:
        return json.loads(config[key])
    except (TypeError, ValueError):
        raise ProtocolError(f"config key {key!r} must be a JSON string, got {config[key]!r}") from None


def _value(config: ConfigRecord, key: str, default: Any = None) -> Any:
    if key not in config:
        if default is None:
            raise ProtocolError(f"config key {key!r} is missing")
        return default
    return config[key]


def _tensor(arrays: ArrayRecord, name: str) -> torch.Tensor:
    if name not in arrays:
        raise ProtocolError(f"array {name!r} is missing from {ARRAYS_RECORD!r}; it has {sorted(arrays)}")
    try:
        return from_wire(arrays[name].data)  # read-only: the site copies it into its model
    except ValueError as exc:
        raise ProtocolError(f"array {name!r}: {exc}") from None


def parse_request(msg: Message, train: bool) -> RoundRequest:
    """The typed request of a train (``train=True``) or evaluate message."""
    arrays = _record(msg, ARRAYS_RECORD, ArrayRecord)
    config = _record(msg, CONFIG_RECORD, ConfigRecord)
    server_round = _value(config, "server-round")
    iterations = _value(config, "local-iterations") if train else _value(config, "local-iterations", 1)
    schedule = _value(config, "schedule-iteration", 0 if not train else None)
    return RoundRequest(
        server_round=server_round,
        backbone=_tensor(arrays, BACKBONE),
        task_rows=_tensor(arrays, TASK_ROWS),
        modality_rows=_tensor(arrays, MODALITY_ROWS),
        task_row_ids=_value(config, TASK_ROW_IDS),
        modality_row_ids=_value(config, MODALITY_ROW_IDS),
        model=_json(config, "model"),
        task_map=_json(config, "task-map"),
        engine=_json(config, "engine", {}),
        local_iterations=iterations,
        schedule_iteration=schedule,
        seed=_value(config, "seed", 0),
        wire_dtype=_value(config, "wire-dtype", "float32"),
        reply_codec=_value(config, "reply-codec", "none"),
        proximal_mu=_value(config, "proximal-mu", 0.0),
        local_update=_value(config, "local-update", "steps"),
        keep_local_state=_value(config, "keep-local-state", True),
        plans=_plans(config),
        run_key=_value(config, "run-key", "default"),
    )


def _plans(config: ConfigRecord) -> Plans:
    if "plans" not in config:
        raise ProtocolError("config key 'plans' is missing (a server of this version always sends its plan)")
    try:
        return Plans.from_json(config["plans"])
    except ValueError as exc:
        raise ProtocolError(f"config key 'plans': {exc}") from None


def _train_content(reply: TrainReply, request: RoundRequest) -> RecordDict:
    arrays = {BACKBONE: reply.backbone, TASK_ROWS: reply.task_rows, MODALITY_ROWS: reply.modality_rows}
    received = {BACKBONE: request.backbone, TASK_ROWS: request.task_rows, MODALITY_ROWS: request.modality_rows}
    gradient = reply.modality_term is not None  # gradients are never coded against the weights received
    payload = {k: reply_array(v, received[k], "none" if gradient else request.reply_codec) for k, v in arrays.items()}
    if gradient:
        payload.update({k: Array(v.numpy()) for k, v in zip(MODALITY_TERM_ARRAYS, reply.modality_term, strict=True)})
    return RecordDict({
        ARRAYS_RECORD: ArrayRecord(payload),
        CONFIG_RECORD: ConfigRecord({TASK_ROW_IDS: list(reply.task_row_ids),
                                     MODALITY_ROW_IDS: list(reply.modality_row_ids)}),
        METRICS_RECORD: MetricRecord(dict(reply.metrics)),
    })


# ------------------------------------------------------------------------------------------------ handlers
@app.query()
@_private_errors("query")
def query(msg: Message, context: Context) -> Message:
    """Reply with the site's name (from its config), its datasets (name, modality, classes, number of
    training cases) and their fingerprint (aggregate statistics only). A query carrying ``refused`` is the
    server's refusal of this site: it is logged and written to ``<work_dir>/server_refusal.json``."""
    site = load_site(context)
    config = msg.content[CONFIG_RECORD] if CONFIG_RECORD in msg.content else ConfigRecord()
    if REFUSED_KEY in config:
        reason = str(config[REFUSED_KEY])
        logger.error("site %s: the server refused this site: %s", site.name, reason)
        atomic_write_json(site.config.work_dir / REFUSAL_FILE, {"time": time.time(), "reason": reason})
        return Message(RecordDict({SITE_RECORD: ConfigRecord({NAME_KEY: site.name})}), reply_to=msg)
    datasets = json.dumps([d.to_dict() for d in site.describe()])
    fingerprint = fingerprints_to_json(site.fingerprint())
    content = RecordDict({SITE_RECORD: ConfigRecord({NAME_KEY: site.name, DATASETS_KEY: datasets,
                                                     FINGERPRINT_KEY: fingerprint, PROTOCOL_KEY: PROTOCOL_VERSION})})
    return Message(content, reply_to=msg)


@app.train()
@_private_errors("train")
def train(msg: Message, context: Context) -> Message:
    """Train the received backbone and rows; reply with them and the training metrics."""
    request = parse_request(msg, train=True)
    reply = load_site(context).train(request)
    return Message(_train_content(reply, request), reply_to=msg)


@app.evaluate()
@_private_errors("evaluate")
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received weights on the site's validation split; reply with aggregate metrics."""
    metrics = load_site(context).evaluate(parse_request(msg, train=False))
    return Message(RecordDict({METRICS_RECORD: MetricRecord(metrics)}), reply_to=msg)
