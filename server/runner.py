"""The server's run loop, independent of Flower's runtime (a ``Grid`` is all it needs).

``run_federation(grid, config)``: build or resume the global model, then

1. **before round 1**: wait (bounded) for ``min-sites`` sites; ask each site what it holds (``query``: its
   datasets and their fingerprint, aggregate statistics only); refuse, with a reason sent back to the site,
   a site whose datasets clash with the catalog or whose data contradicts the federation's plan
   (:func:`hermes_model.fingerprint.plan_problems`); end at once with one clear line when the sites that
   came cannot make ``min-sites`` any more; size the prior bank from the catalog and the admitted sites'
   datasets plus spare rows (``task-slots: 0``), build the model, write ``plans.json`` and
   ``fingerprint.json`` into the run folder and log the plan and the learning-rate schedule in words;
2. **per round**: sample, send ``train`` (with the plan, so every site preprocesses with it), aggregate,
   optionally ``evaluate``, append metric lines, log a summary naming every site, and write an atomic
   round checkpoint;
3. **at the end**: write ``final_model.pt`` (:func:`server.checkpoint.save_final_model`) and say how to
   use it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn

from hermes_model.catalog import Catalog
from hermes_model.exchange import (
    CONFIG_RECORD,
    DATASETS_KEY,
    FINGERPRINT_KEY,
    NAME_KEY,
    NUM_EXAMPLES,
    PROTOCOL_KEY,
    PROTOCOL_VERSION,
    REFUSED_KEY,
    SITE_RECORD,
    StateLayout,
)
from hermes_model.factory import build_model, load_checkpoint
from hermes_model.fileio import atomic_write_json
from hermes_model.fingerprint import DatasetFingerprint, fingerprints_from_json, merge_fingerprints, plan_problems
from hermes_model.plans import Plans, catalog_digest
from server.bank import PriorBank, SiteDataset, parse_site_datasets, required_task_slots
from server.checkpoint import (
    FINAL_MODEL,
    FINGERPRINT_FILE,
    PLANS_FILE,
    RAW_WEIGHTS,
    WEIGHTS_FIELD,
    RunStore,
    save_final_model,
)
from server.config import ServerConfig
from server.state import GlobalState
from server.strategy import HermesStrategy, StrategyOptions

logger = logging.getLogger(__name__)

_SITE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
UNSIZED_TASK_SLOTS = 1 << 20  # the admission bank before the real one is sized (capacity checked later)
REFUSAL_TIMEOUT_S = 30.0


class SiteWaitTimeout(RuntimeError):
    """Too few sites connected (or answered the query) within ``start-timeout-s``."""


class FederationFailed(RuntimeError):
    """The run cannot go on (e.g. ``min-sites`` can no longer be met); the message is one line."""


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
    final_model: Path | None = None


@dataclass(frozen=True)
class SiteAnswer:
    """A site's answer to the query: its name, datasets and their fingerprint."""

    site: str
    datasets: list[SiteDataset]
    fingerprint: list[DatasetFingerprint]
    protocol: int = PROTOCOL_VERSION


# ----------------------------------------------------------------------------------------------- building
def initial_catalog(config: ServerConfig) -> Catalog:
    """The catalog a fresh run starts from: ``catalog``, else the one inside ``initial-weights``, else the
    bundled one."""
    if config.catalog:
        return Catalog.load(config.catalog)
    if config.initial_weights:
        embedded = _load_initial(config).extra.get("catalog")
        if embedded is not None:
            return Catalog.from_dict(embedded)
    return Catalog.load()


def _load_initial(config: ServerConfig) -> Any:
    path = Path(config.initial_weights)
    if not path.is_file():
        raise ValueError(f"initial-weights {str(path)!r} does not exist (use '' for random weights)")
    return load_checkpoint(path)


def initial_model(config: ServerConfig, task_slots: int | None = None) -> nn.Module:
    """The round-0 model: random with ``seed`` and ``task_slots`` rows (None: the config's), or
    ``initial-weights`` (the published Hermes-R checkpoint or one of ours; its own bank size)."""
    if config.initial_weights:
        loaded = _load_initial(config)
        wanted = {"name": config.model, **config.model_kwargs(task_slots or loaded.config.get("task_slots"))}
        diffs = {k: (loaded.config.get(k), v) for k, v in wanted.items() if loaded.config.get(k) != v}
        if diffs:
            raise ValueError(
                f"initial-weights {config.initial_weights!r} is a different network than configured: "
                + ", ".join(
                    f"{k.replace('_', '-')}: checkpoint {a!r}, config {b!r}" for k, (a, b) in diffs.items()
                )
            )
        return loaded.model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build_model(config.model, **config.model_kwargs(task_slots)).eval()


def decide_task_slots(config: ServerConfig, catalog: Catalog) -> int:
    """The prior bank's size: the config's ``task-slots`` when set, else the catalog (with the admitted
    sites' datasets registered) plus ``spare-task-slots`` rows; a checkpoint's own size with
    ``initial-weights``.

    Raises:
        ValueError: a configured or loaded size that cannot hold the catalog (the message names the size
            needed).
    """
    if config.initial_weights:
        slots = int(_load_initial(config).config.get("task_slots", 0)) or required_task_slots(catalog, 0)
    else:
        slots = config.task_slots or required_task_slots(catalog, config.spare_task_slots)
    catalog.check_capacity(slots)
    return slots


def strategy_options(config: ServerConfig, model: nn.Module, plans: Plans, run_key: str) -> StrategyOptions:
    spec = model_spec(model, config)
    return StrategyOptions(
        kind=config.strategy,
        weighting=config.weighting,
        proximal_mu=config.proximal_mu,
        wire_dtype=config.wire_dtype,
        reply_codec=config.reply_codec,
        local_update=config.local_update,
        keep_local_state=config.keep_local_state,
        outer=config.outer_settings(),
        evaluate_ema=config.evaluate_ema,
        min_replies=config.min_sites_per_round,
        sites_per_round=config.sites_per_round,
        local_iterations=config.local_iterations,
        seed=config.seed,
        ttl_s=config.round_timeout_s + 60.0,
        model_json=json.dumps(spec, sort_keys=True),
        engine_json=json.dumps(config.engine_config(), sort_keys=True),
        plans_json=plans.to_json(),
        run_key=run_key,
    )


def model_spec(model: nn.Module, config: ServerConfig) -> dict[str, Any]:
    """The build arguments of ``model`` (name and keyword arguments, bank sizes from its state)."""
    layout = StateLayout.from_model(model)
    return {
        **getattr(model, "hermes_config", {"name": config.model}),
        "task_slots": layout.task_slots,
        "modality_slots": layout.modality_slots,
    }


def new_run_key(config: ServerConfig) -> str:
    """A name for a new run, unique across runs: the run folder's name and a random suffix."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(config.run_dir).name)[:80] or "run"
    return f"{stem}-{uuid.uuid4().hex[:8]}"


# ----------------------------------------------------------------------------------------------- messages
def send_and_collect(grid: Grid, messages: list[Message], timeout_s: float, poll_s: float,
                     sent_to: dict[str, int] | None = None) -> list[Message]:
    """``grid.send_and_receive`` with our poll interval (Flower's deployment grid looks for replies every
    3 s): push ``messages``, then pull their replies every ``poll_s`` seconds until each has one or
    ``timeout_s`` seconds have passed. ``sent_to``, when given, is filled with message id -> destination
    node (an error reply comes from the SuperLink, not from the node it is about)."""
    deadline = time.monotonic() + timeout_s
    ids = list(grid.push_messages(messages))
    if sent_to is not None:
        sent_to.update({mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=True) if mid})
    pending = [message_id for message_id in ids if message_id]
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
                f"start-timeout-s={timeout_s:g} s; start more SuperNodes, lower min-sites or raise start-timeout-s"
            )
        time.sleep(min(poll_s, remaining))


def query_sites(
    grid: Grid, node_ids: list[int], catalog: Catalog, timeout_s: float, poll_s: float
) -> dict[int, SiteAnswer]:
    """Send ``query`` to ``node_ids``; node id -> the :class:`SiteAnswer` of every valid reply.

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
    out: dict[int, SiteAnswer] = {}
    sent_to: dict[str, int] = {}
    for reply in send_and_collect(grid, messages, timeout_s, poll_s, sent_to):
        node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        try:
            out[node] = _parse_query_reply(reply, node)
        except ValueError as exc:
            logger.error("node %d: invalid query reply, site left out: %s", node, exc)
    missing = sorted(set(node_ids) - set(out))
    if missing:
        logger.warning("no valid query reply from node(s) %s within query-timeout-s=%g", missing, timeout_s)
    return out


def _parse_query_reply(reply: Message, node: int) -> SiteAnswer:
    if reply.has_error():
        raise ValueError(f"error reply: {reply.error.reason}")
    if SITE_RECORD not in reply.content:
        raise ValueError(f"missing record {SITE_RECORD!r}; got {sorted(reply.content.keys())}")
    record = reply.content[SITE_RECORD]
    name = record.get(NAME_KEY, f"node-{node}")
    if not isinstance(name, str) or not _SITE_NAME.match(name):
        raise ValueError(f"site name must consist of letters, digits, '_' and '-', got {name!r}")
    fingerprint = fingerprints_from_json(record[FINGERPRINT_KEY]) if FINGERPRINT_KEY in record else []
    protocol = record.get(PROTOCOL_KEY, 1)
    return SiteAnswer(name, parse_site_datasets(record.get(DATASETS_KEY)), fingerprint,
                      int(protocol) if isinstance(protocol, int) else 0)


def refuse_site(grid: Grid, node: int, reason: str, poll_s: float) -> None:
    """Tell the site on ``node`` why it is refused (a ``query`` carrying ``refused``); best effort."""
    message = Message(RecordDict({CONFIG_RECORD: ConfigRecord({REFUSED_KEY: reason})}), dst_node_id=node,
                      message_type=MessageType.QUERY, ttl=REFUSAL_TIMEOUT_S + 60.0)
    if not send_and_collect(grid, [message], REFUSAL_TIMEOUT_S, poll_s):
        logger.warning("node %d did not confirm its refusal within %g s", node, REFUSAL_TIMEOUT_S)


# ----------------------------------------------------------------------------------------------- the run
class FederatedRun:
    """One run of ``config`` on ``grid``; :meth:`run` does all rounds (see module docstring)."""

    def __init__(self, config: ServerConfig, grid: Grid) -> None:
        self.config, self.grid = config, grid
        self.store = RunStore(config.run_dir)
        self.refused: dict[int, str] = {}  # node -> why it was refused (never asked again in this run)
        self.nodes: dict[int, str] = {}  # admitted node -> site name (shared with the strategy)
        self.answers: dict[str, SiteAnswer] = {}
        self.start_round = 0
        self.model: nn.Module | None = None
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
        self.catalog = initial_catalog(self.config)
        self.plans = self.config.plans()
        self.run_key = new_run_key(self.config)
        fixed = self.config.task_slots or self.config.initial_weights  # else sized once sites are admitted
        slots = decide_task_slots(self.config, self.catalog) if fixed else UNSIZED_TASK_SLOTS
        self.bank = PriorBank(slots, self.config.modality_slots)
        self.store.truncate_metrics(0)

    def _resume(self) -> None:
        ckpt = self.store.load_latest()
        assert ckpt is not None
        conflicts = self.config.resume_conflicts(ckpt.config)
        if conflicts:
            raise ValueError("cannot resume with changed settings:\n  - " + "\n  - ".join(conflicts))
        self.catalog, self.bank, self.plans, self.run_key = ckpt.catalog, ckpt.bank, ckpt.plans, ckpt.run_key
        self._use_model(ckpt.model.eval())
        self.strategy.load_state_dict(ckpt.strategy_state)
        self.start_round = ckpt.server_round
        self.store.truncate_metrics(self.start_round)
        logger.info("resuming after round %d from %s", self.start_round, ckpt.path)

    def _use_model(self, model: nn.Module) -> None:
        self.model = model
        self.layout = StateLayout.from_model(model)
        self.plans = self.plans.with_model(model_spec(model, self.config), catalog_digest(self.catalog.to_dict()))
        options = strategy_options(self.config, model, self.plans, self.run_key)
        self.strategy = HermesStrategy(self.layout, self.bank, options)
        self.strategy.nodes = self.nodes

    def _build_model(self) -> None:
        """Size the bank from the admitted sites, build the round-0 model and re-register the sites in
        the sized bank (fresh runs, once the first sites are admitted)."""
        slots = decide_task_slots(self.config, self.catalog)
        sites = {site: self.bank.sites[site] for site in self.bank.sites}
        self.bank = PriorBank(slots, self.config.modality_slots)
        for site in sites:
            self.bank.register_site(site, self.answers[site].datasets, self.catalog)
        self._use_model(initial_model(self.config, slots))
        spare = self.bank.usable_task_ids - self.catalog.num_tasks
        logger.info("prior bank: %d task rows (%d tasks in the catalog, %d spare for sites that join later), %d "
                    "modality rows", slots, self.catalog.num_tasks, spare, self.config.modality_slots)
        logger.info("plan: %s", self.plans.describe())
        logger.info("schedule: %s", self.config.describe_schedule())
        warning = self.config.schedule_problems()["warning"]
        if warning:
            logger.warning("schedule: %s", warning)
        atomic_write_json(self.store.run_dir / PLANS_FILE, self.plans.to_dict())
        merged = merge_fingerprints({s: a.fingerprint for s, a in sorted(self.answers.items())})
        atomic_write_json(self.store.run_dir / FINGERPRINT_FILE, json.loads(json.dumps(merged, allow_nan=True)))

    # -- sites -------------------------------------------------------------------------------------
    def refresh_sites(self) -> None:
        """Forget departed nodes; query newly connected ones; admit or refuse them."""
        connected = set(self.grid.get_node_ids())
        nodes = self.nodes
        for node in [n for n in nodes if n not in connected]:
            logger.warning("site %r (node %d) disconnected", nodes.pop(node), node)
        new = sorted(connected - set(nodes) - set(self.refused))
        answers = query_sites(self.grid, new, self.catalog, self.config.query_timeout_s, self.config.poll_interval_s)
        for node, answer in sorted(answers.items(), key=lambda kv: kv[1].site):
            if answer.site in nodes.values():  # a restarted site whose old node the SuperLink still lists
                logger.warning("site %r (node %d) is connected as another node too; admitted once the other "
                               "leaves", answer.site, node)
                continue
            reason = self._admission_problem(answer)
            if reason is None:
                try:
                    own = self.bank.register_site(answer.site, answer.datasets, self.catalog)
                except ValueError as exc:
                    reason = str(exc)
            if reason is not None:
                self._refuse(node, answer.site, reason)
                continue
            nodes[node] = answer.site
            self.answers[answer.site] = answer
            logger.info("site %r (node %d) admitted: datasets %s, task rows %s, modality rows %s", answer.site,
                        node, list(own.datasets), list(own.task_ids), list(own.modality_rows))

    def _admission_problem(self, answer: SiteAnswer) -> str | None:
        if answer.protocol != PROTOCOL_VERSION:
            return (f"site {answer.site!r} speaks protocol version {answer.protocol}, this server {PROTOCOL_VERSION}: "
                    "install the server's hermes-fl release at the site")
        problems = [p for fp in answer.fingerprint for p in plan_problems(answer.site, fp, self.plans)]
        declared = {d.name for d in answer.datasets}
        missing = sorted(declared - {fp.dataset for fp in answer.fingerprint})
        if missing:
            problems.append(f"site {answer.site!r} sent no fingerprint for datasets {missing}")
        return "; ".join(problems) or None

    def _refuse(self, node: int, site: str, reason: str) -> None:
        logger.error("site %r (node %d) refused: %s", site, node, reason)
        self.refused[node] = f"{site}: {reason}"
        refuse_site(self.grid, node, reason, self.config.poll_interval_s)

    def wait_and_register(self) -> None:
        """Bounded start: wait for ``min-sites`` connected nodes, then for as many admitted sites; fail at
        once when the connected sites cannot make ``min-sites`` because some were refused."""
        cfg = self.config
        deadline = time.monotonic() + cfg.start_timeout_s
        wait_for_sites(self.grid, cfg.min_sites, cfg.start_timeout_s, cfg.poll_interval_s)
        while True:
            self.refresh_sites()
            connected = set(self.grid.get_node_ids())
            admitted = len(connected & set(self.nodes))
            if admitted >= cfg.min_sites:
                return
            # a refused site usually disconnects at once: count it among the sites that came
            came = admitted + len(self.refused)
            if self.refused and came >= cfg.min_sites and connected <= set(self.nodes) | set(self.refused):
                raise FederationFailed(
                    f"min-sites={cfg.min_sites} cannot be met: {came} site(s) came, "
                    f"{len(self.refused)} refused ({'; '.join(self.refused.values())})"
                )
            if time.monotonic() >= deadline:
                raise SiteWaitTimeout(
                    f"only {admitted} of min-sites={cfg.min_sites} site(s) were admitted within "
                    f"start-timeout-s={cfg.start_timeout_s:g} s (see the errors above)"
                )
            time.sleep(min(cfg.poll_interval_s, max(deadline - time.monotonic(), 0.0)))

    # -- rounds ------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        cfg = self.config
        if self.model is not None and self.start_round >= cfg.num_server_rounds:
            logger.info("nothing to do: round %d of num-server-rounds=%d already done", self.start_round,
                        cfg.num_server_rounds)
            return self._finish(self.start_round, self._arrays())
        self.wait_and_register()
        if self.model is None:
            self._build_model()
        self.strategy.summary()
        arrays = self._arrays()
        for server_round in range(self.start_round + 1, cfg.num_server_rounds + 1):
            t0 = time.monotonic()
            logger.info("[ROUND %d/%d]", server_round, cfg.num_server_rounds)
            self._await_sites(server_round)
            arrays, lines = self._train(server_round, arrays)
            if cfg.evaluates(server_round):
                lines += self._evaluate(server_round, arrays)
            if cfg.evaluates_raw(server_round):
                lines += [{**x, WEIGHTS_FIELD: RAW_WEIGHTS} for x in self._evaluate(server_round, arrays, raw=True)]
            for line in lines:
                if line.get("scope") == "aggregate" and line.get("phase") == "train":
                    line["round-time-s"] = round(time.monotonic() - t0, 3)
            self.store.append_metrics(lines)
            logger.info("%s", round_summary(server_round, cfg.num_server_rounds, lines))
            self._checkpoint(server_round, arrays)
        return self._finish(cfg.num_server_rounds, arrays)

    def _await_sites(self, server_round: int) -> None:
        """Refresh the sites; when fewer than ``min-sites-per-round`` are available (e.g. a site restarting
        after a crash), wait for them up to ``start-timeout-s`` before the round goes ahead."""
        cfg = self.config
        deadline = time.monotonic() + cfg.start_timeout_s
        self.refresh_sites()
        available = len(self.strategy.available_sites(self.grid))
        if available < cfg.min_sites_per_round:
            logger.warning("round %d: %d site(s) available, min-sites-per-round=%d: waiting up to %g s for sites "
                           "to (re)connect", server_round, available, cfg.min_sites_per_round, cfg.start_timeout_s)
        while available < cfg.min_sites_per_round and time.monotonic() < deadline:
            time.sleep(min(cfg.poll_interval_s, max(deadline - time.monotonic(), 0.0)))
            self.refresh_sites()
            available = len(self.strategy.available_sites(self.grid))

    def _arrays(self) -> ArrayRecord:
        assert self.model is not None
        return GlobalState.from_state_dict(self.layout, self.model.state_dict()).to_record()

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
        replies = self._exchange(messages)
        new, _ = self.strategy.aggregate_train(server_round, replies)
        return (arrays if new is None else new), list(self.strategy.round_lines)

    def _exchange(self, messages: list[Message]) -> list[Message]:
        sent_to: dict[str, int] = {}
        replies = send_and_collect(self.grid, messages, self.config.round_timeout_s, self.config.poll_interval_s,
                                   sent_to)
        self.strategy.expect_replies(sent_to)
        return replies

    def _evaluate(self, server_round: int, arrays: ArrayRecord, raw: bool = False) -> list[dict[str, Any]]:
        messages = list(self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(), self.grid, raw=raw))
        if not messages:
            return []
        self.strategy.aggregate_evaluate(server_round, self._exchange(messages))
        return list(self.strategy.round_lines)

    def _checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        assert self.model is not None
        GlobalState.from_record(arrays, self.layout).load_into(self.layout, self.model.state_dict())
        self.store.save_round(
            server_round,
            self.model,
            catalog=self.catalog,
            bank=self.bank,
            strategy_state=self.strategy.state_dict(),
            config=self.config.model_dump(),
            seed=self.config.seed,
            plans=self.plans,
            run_key=self.run_key,
            keep=self.config.keep_checkpoints,
        )

    def _finish(self, last_round: int, arrays: ArrayRecord) -> RunResult:
        """Load the final state into the model and write ``final_model.pt``."""
        assert self.model is not None
        GlobalState.from_record(arrays, self.layout).load_into(self.layout, self.model.state_dict())
        handed_over = self.strategy.evaluation_arrays(arrays)
        raw_state = None
        if handed_over is not arrays:  # the EMA: the raw weights go into the file too
            raw_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        final = GlobalState.from_record(handed_over, self.layout).in_copy_of(self.layout, self.model)
        path = save_final_model(self.store.run_dir / FINAL_MODEL, final, self.catalog, self.plans,
                                self.bank.trained_tasks(), raw_state=raw_state, mode="federated",
                                server_round=last_round)
        history = [m for m in self.store.read_metrics() if m.get("scope") == "aggregate"]
        return RunResult(last_round, self.model, arrays, self.catalog, self.bank, self.strategy, history, path)


def round_summary(server_round: int, rounds: int, lines: list[dict[str, Any]]) -> str:
    """The operator's summary of a round: per site samples, loss, time and Dice; dropped sites and why."""
    out = [f"round {server_round}/{rounds} summary:"]
    sites = sorted({x["site"] for x in lines if x.get("scope") == "site"})
    for site in sites:
        train = next((x for x in lines if x.get("site") == site and x["phase"] == "train"), None)
        evaluate = next((x for x in lines if x.get("site") == site and x["phase"] == "evaluate"
                         and WEIGHTS_FIELD not in x), None)
        parts = []
        for phase, line in (("train", train), ("evaluate", evaluate)):
            if line is None:
                continue
            if line.get("status") == "dropped":
                parts.append(f"{phase} reply DROPPED ({line.get('reason')}: {str(line.get('detail', ''))[:120]})")
            elif phase == "train":
                parts.append(f"{int(line.get(NUM_EXAMPLES, 0))} samples, loss {line.get('loss', math.nan):.4f}, "
                             f"{line.get('train-time-s', math.nan):.1f} s")
            else:
                parts.append(f"Dice {line.get('dice-mean', math.nan):.3f} on {int(line.get(NUM_EXAMPLES, 0))} "
                             f"validation case(s) (whole scans), {line.get('eval-time-s', math.nan):.1f} s")
        out.append(f"  site {site!r}: " + "; ".join(parts))
    raw = next((x for x in lines if x.get("scope") == "aggregate" and x.get(WEIGHTS_FIELD) == RAW_WEIGHTS), None)
    if raw is not None:
        out.append(f"  raw weights (not the EMA): mean Dice {raw.get('dice-mean', math.nan):.3f}")
    agg = next((x for x in lines if x.get("scope") == "aggregate" and x["phase"] == "train"), None)
    if agg is not None and agg.get("skipped"):
        out.append("  the round was skipped: too few valid replies; the model is kept")
    return "\n".join(out)


def run_federation(grid: Grid, config: ServerConfig) -> RunResult:
    """Run (or resume) the federation described by ``config`` on ``grid``."""
    return FederatedRun(config, grid).run()


def usage_lines(final_model: Path, run_dir: Path | str) -> list[str]:
    """How to use a run's model: the exact commands (for the last lines of a run)."""
    return [
        f"final model: {final_model}",
        f"segment a scan: hermes-predict --model {final_model} --input SCAN.nii.gz --modality CT --output "
        "seg.nii.gz",
        f"score it:       hermes-evaluate --pred seg.nii.gz --ref LABEL.nii.gz --output {Path(run_dir) / 'eval.csv'}",
    ]


__all__ = ["FederatedRun", "FederationFailed", "RunResult", "SiteWaitTimeout", "initial_catalog", "initial_model",
           "run_federation", "send_and_collect"]
