"""The server's run loop, independent of Flower's runtime (a ``Grid`` is all it needs).

``run_federation(grid, config)``: build or resume the global model, wait (bounded) for the sites, ask
each site what it holds (``query``), then per round: sample, send ``train``, aggregate, optionally
``evaluate``, append metric lines and write an atomic round checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn

from hermes_model.catalog import Catalog
from hermes_model.exchange import CONFIG_RECORD, SITE_RECORD, StateLayout
from hermes_model.factory import build_model, load_checkpoint
from server.bank import PriorBank, SiteDataset, parse_site_datasets
from server.checkpoint import RunStore
from server.config import ServerConfig
from server.state import GlobalState
from server.strategy import HermesStrategy, StrategyOptions

logger = logging.getLogger(__name__)

_SITE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class SiteWaitTimeout(RuntimeError):
    """Too few sites connected (or answered the query) within ``start-timeout-s``."""


@dataclass
class RunResult:
    """The end of a run: the last round done and the final global state."""

    last_round: int
    model: nn.Module
    arrays: ArrayRecord
    catalog: Catalog
    bank: PriorBank
    strategy: HermesStrategy
    history: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- building
def initial_model(config: ServerConfig) -> tuple[nn.Module, Catalog]:
    """The round-0 model and catalog: random with ``seed``, or ``initial-weights`` (the published
    Hermes-R checkpoint or one of ours; ours may carry its catalog)."""
    embedded = None
    if config.initial_weights:
        path = Path(config.initial_weights)
        if not path.is_file():
            raise ValueError(f"initial-weights {str(path)!r} does not exist (use '' for random weights)")
        loaded = load_checkpoint(path)
        model, embedded = loaded.model, loaded.extra.get("catalog")
        wanted = {"name": config.model, **config.model_kwargs()}
        diffs = {k: (loaded.config.get(k), v) for k, v in wanted.items() if loaded.config.get(k) != v}
        if diffs:
            raise ValueError(
                f"initial-weights {str(path)!r} is a different network than configured: "
                + ", ".join(
                    f"{k.replace('_', '-')}: checkpoint {a!r}, config {b!r}" for k, (a, b) in diffs.items()
                )
            )
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = build_model(config.model, **config.model_kwargs())
    if config.catalog:
        catalog = Catalog.load(config.catalog)
    elif embedded is not None:
        catalog = Catalog.from_dict(embedded)
    else:
        catalog = Catalog.load()
    catalog.check_capacity(StateLayout.from_model(model).task_slots)  # ids 0..task_slots-2, as the model
    return model.eval(), catalog


def strategy_options(config: ServerConfig, model: nn.Module) -> StrategyOptions:
    layout = StateLayout.from_model(model)
    spec = {
        **getattr(model, "hermes_config", {"name": config.model}),
        "task_slots": layout.task_slots,
        "modality_slots": layout.modality_slots,
    }
    return StrategyOptions(
        kind=config.strategy,
        weighting=config.weighting,
        proximal_mu=config.proximal_mu,
        wire_dtype=config.wire_dtype,
        reply_codec=config.reply_codec,
        server_lr=config.server_lr,
        beta1=config.beta1,
        beta2=config.beta2,
        tau=config.tau,
        min_replies=config.min_sites_per_round,
        sites_per_round=config.sites_per_round,
        local_iterations=config.local_iterations,
        seed=config.seed,
        ttl_s=config.round_timeout_s + 60.0,
        model_json=json.dumps(spec, sort_keys=True),
        engine_json=json.dumps(config.engine_config(), sort_keys=True),
    )


# ----------------------------------------------------------------------------------------------- messages
def send_and_collect(grid: Grid, messages: list[Message], timeout_s: float, poll_s: float) -> list[Message]:
    """``grid.send_and_receive`` with our poll interval (Flower's deployment grid looks for replies every
    3 s): push ``messages``, then pull their replies every ``poll_s`` seconds until each has one or
    ``timeout_s`` seconds have passed."""
    deadline = time.monotonic() + timeout_s
    pending = [message_id for message_id in grid.push_messages(messages) if message_id]
    replies: list[Message] = []
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies += arrived
        answered = {reply.metadata.reply_to_message_id for reply in arrived}
        pending = [message_id for message_id in pending if message_id not in answered]
        remaining = deadline - time.monotonic()
        if not pending or remaining <= 0:
            break
        time.sleep(min(poll_s, remaining))
    return replies


# ----------------------------------------------------------------------------------------------- sites
def wait_for_sites(grid: Grid, min_sites: int, timeout_s: float, poll_s: float = 1.0) -> list[int]:
    """Poll ``grid.get_node_ids()`` until ``min_sites`` nodes are connected; never waits past ``timeout_s``.

    Raises:
        SiteWaitTimeout: fewer than ``min_sites`` nodes after ``timeout_s`` seconds.
    """
    start = time.monotonic()
    last_seen = -1
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_sites:
            logger.info("%d site(s) connected (min-sites=%d)", len(nodes), min_sites)
            return nodes
        if len(nodes) != last_seen:
            logger.info("waiting for sites: %d of min-sites=%d connected", len(nodes), min_sites)
            last_seen = len(nodes)
        remaining = timeout_s - (time.monotonic() - start)
        if remaining <= 0:
            raise SiteWaitTimeout(
                f"only {len(nodes)} of min-sites={min_sites} site(s) connected after "
                f"start-timeout-s={timeout_s:g} s"
                f" (node ids {nodes}); start more SuperNodes, lower min-sites or raise start-timeout-s"
            )
        time.sleep(min(poll_s, remaining))


def query_sites(
    grid: Grid, node_ids: list[int], catalog: Catalog, timeout_s: float, poll_s: float
) -> dict[int, tuple[str, list[SiteDataset]]]:
    """Send ``query`` to ``node_ids``; node id -> (site name, datasets) of every valid reply.

    A reply without a ``name`` gets ``node-<id>`` as its site name. Invalid replies are logged and left out.
    """
    if not node_ids:
        return {}
    request = RecordDict(
        {CONFIG_RECORD: ConfigRecord({"catalog": json.dumps(catalog.to_dict(), sort_keys=True)})}
    )
    messages = [
        Message(request, dst_node_id=n, message_type=MessageType.QUERY, ttl=timeout_s + 60.0)
        for n in node_ids
    ]
    out: dict[int, tuple[str, list[SiteDataset]]] = {}
    for reply in send_and_collect(grid, messages, timeout_s, poll_s):
        node = reply.metadata.src_node_id
        try:
            out[node] = _parse_query_reply(reply, node)
        except ValueError as exc:
            logger.error("node %d: invalid query reply, site left out: %s", node, exc)
    missing = sorted(set(node_ids) - set(out))
    if missing:
        logger.warning("no valid query reply from node(s) %s within query-timeout-s=%g", missing, timeout_s)
    return out


def _parse_query_reply(reply: Message, node: int) -> tuple[str, list[SiteDataset]]:
    if reply.has_error():
        raise ValueError(f"error reply: {reply.error.reason}")
    if SITE_RECORD not in reply.content:
        raise ValueError(f"missing record {SITE_RECORD!r}; got {sorted(reply.content.keys())}")
    record = reply.content[SITE_RECORD]
    name = record.get("name", f"node-{node}")
    if not isinstance(name, str) or not _SITE_NAME.match(name):
        raise ValueError(f"site name must consist of letters, digits, '_' and '-', got {name!r}")
    return name, parse_site_datasets(record.get("datasets"))


# ----------------------------------------------------------------------------------------------- the run
class FederatedRun:
    """One run of ``config`` on ``grid``; :meth:`run` does all rounds (see module docstring)."""

    def __init__(self, config: ServerConfig, grid: Grid) -> None:
        self.config, self.grid = config, grid
        self.store = RunStore(config.run_dir)
        self._silent_rejected: set[int] = set()
        self.start_round = 0
        path = self.store.latest_path()
        if path is not None and not config.resume:
            raise ValueError(
                f"run-dir {str(self.store.run_dir)!r} already holds checkpoint {path.name}: pass resume=true "
                "(hermes-server start --resume) to continue it, or choose a new run-dir"
            )
        if path is not None:
            self._resume()
        else:
            if config.resume:
                logger.info(
                    "resume requested but %s holds no checkpoint: starting at round 1", self.store.run_dir
                )
            self._fresh()

    def _fresh(self) -> None:
        self.model, self.catalog = initial_model(self.config)
        self.layout = StateLayout.from_model(self.model)
        self.bank = PriorBank(self.layout.task_slots, self.layout.modality_slots)
        self.strategy = HermesStrategy(self.layout, self.bank, strategy_options(self.config, self.model))
        self.store.truncate_metrics(0)

    def _resume(self) -> None:
        ckpt = self.store.load_latest()
        assert ckpt is not None
        conflicts = self.config.resume_conflicts(ckpt.config)
        if conflicts:
            raise ValueError("cannot resume with changed settings:\n  - " + "\n  - ".join(conflicts))
        self.model, self.catalog, self.bank = ckpt.model.eval(), ckpt.catalog, ckpt.bank
        self.layout = StateLayout.from_model(self.model)
        self.strategy = HermesStrategy(self.layout, self.bank, strategy_options(self.config, self.model))
        self.strategy.load_state_dict(ckpt.strategy_state)
        self.start_round = ckpt.server_round
        self.store.truncate_metrics(self.start_round)
        logger.info("resuming after round %d from %s", self.start_round, ckpt.path)

    # -- sites -------------------------------------------------------------------------------------
    def refresh_sites(self) -> None:
        """Forget departed nodes; query newly connected ones and register their datasets."""
        connected = set(self.grid.get_node_ids())
        nodes = self.strategy.nodes
        for node in [n for n in nodes if n not in connected]:
            logger.warning("site %r (node %d) disconnected", nodes.pop(node), node)
        self._silent_rejected &= connected
        new = sorted(connected - set(nodes) - self._silent_rejected)
        answers = query_sites(
            self.grid, new, self.catalog, self.config.query_timeout_s, self.config.poll_interval_s
        )
        for node, (site, datasets) in sorted(answers.items(), key=lambda kv: kv[1][0]):
            if site in nodes.values():
                logger.error("node %d claims site %r, already connected as another node: ignored", node, site)
                self._silent_rejected.add(node)
                continue
            try:
                own = self.bank.register_site(site, datasets, self.catalog)
            except ValueError as exc:
                logger.error("site %r (node %d) rejected: %s", site, node, exc)
                self._silent_rejected.add(node)
                continue
            nodes[node] = site
            logger.info(
                "site %r (node %d): datasets %s, task rows %s, modality rows %s",
                site,
                node,
                list(own.datasets),
                list(own.task_ids),
                list(own.modality_rows),
            )

    def wait_and_register(self) -> None:
        """Bounded start: wait for ``min-sites`` connected nodes, then for as many registered sites."""
        cfg = self.config
        deadline = time.monotonic() + cfg.start_timeout_s
        wait_for_sites(self.grid, cfg.min_sites, cfg.start_timeout_s, cfg.poll_interval_s)
        while True:
            self.refresh_sites()
            registered = len(self.strategy.available_sites(self.grid))
            if registered >= cfg.min_sites:
                return
            if time.monotonic() >= deadline:
                raise SiteWaitTimeout(
                    f"only {registered} of min-sites={cfg.min_sites} site(s) answered the query validly "
                    f"within "
                    f"start-timeout-s={cfg.start_timeout_s:g} s (see the errors above)"
                )
            time.sleep(min(cfg.poll_interval_s, max(deadline - time.monotonic(), 0.0)))

    # -- rounds ------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        cfg = self.config
        self.strategy.summary()
        arrays = GlobalState.from_state_dict(self.layout, self.model.state_dict()).to_record()
        if self.start_round >= cfg.num_server_rounds:
            logger.info(
                "nothing to do: round %d of num-server-rounds=%d already done",
                self.start_round,
                cfg.num_server_rounds,
            )
            return self._result(self.start_round, arrays)
        self.wait_and_register()
        for server_round in range(self.start_round + 1, cfg.num_server_rounds + 1):
            t0 = time.monotonic()
            logger.info("[ROUND %d/%d]", server_round, cfg.num_server_rounds)
            self.refresh_sites()
            arrays, lines = self._train(server_round, arrays)
            if cfg.evaluate_every and (
                server_round % cfg.evaluate_every == 0 or server_round == cfg.num_server_rounds
            ):
                lines += self._evaluate(server_round, arrays)
            for line in lines:
                if line.get("scope") == "aggregate" and line.get("phase") == "train":
                    line["round-time-s"] = round(time.monotonic() - t0, 3)
            self.store.append_metrics(lines)
            self._checkpoint(server_round, arrays)
        return self._result(cfg.num_server_rounds, arrays)

    def _train(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, list[dict[str, Any]]]:
        messages = list(self.strategy.configure_train(server_round, arrays, ConfigRecord(), self.grid))
        if len(messages) < self.config.min_sites_per_round:
            logger.warning(
                "round %d skipped: %d site(s) available, min-sites-per-round=%d; the model is kept",
                server_round,
                len(messages),
                self.config.min_sites_per_round,
            )
            return arrays, [
                {
                    "round": server_round,
                    "phase": "train",
                    "scope": "aggregate",
                    "sampled-sites": len(messages),
                    "valid-replies": 0,
                    "dropped-replies": 0,
                    "skipped": 1,
                }
            ]
        replies = send_and_collect(self.grid, messages, self.config.round_timeout_s, self.config.poll_interval_s)
        new, _ = self.strategy.aggregate_train(server_round, replies)
        return (arrays if new is None else new), list(self.strategy.round_lines)

    def _evaluate(self, server_round: int, arrays: ArrayRecord) -> list[dict[str, Any]]:
        messages = list(self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(), self.grid))
        if not messages:
            return []
        replies = send_and_collect(self.grid, messages, self.config.round_timeout_s, self.config.poll_interval_s)
        self.strategy.aggregate_evaluate(server_round, replies)
        return list(self.strategy.round_lines)

    def _checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        GlobalState.from_record(arrays, self.layout).load_into(self.layout, self.model.state_dict())
        self.store.save_round(
            server_round,
            self.model,
            catalog=self.catalog,
            bank=self.bank,
            strategy_state=self.strategy.state_dict(),
            config=self.config.model_dump(),
            seed=self.config.seed,
            keep=self.config.keep_checkpoints,
        )

    def _result(self, last_round: int, arrays: ArrayRecord) -> RunResult:
        GlobalState.from_record(arrays, self.layout).load_into(self.layout, self.model.state_dict())
        history = [m for m in self.store.read_metrics() if m.get("scope") == "aggregate"]
        return RunResult(last_round, self.model, arrays, self.catalog, self.bank, self.strategy, history)


def run_federation(grid: Grid, config: ServerConfig) -> RunResult:
    """Run (or resume) the federation described by ``config`` on ``grid``."""
    return FederatedRun(config, grid).run()
