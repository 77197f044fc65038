"""The prior-bank-aware strategy (a Flower ``Strategy``): each sampled site gets the backbone and only
the prior rows it owns; the backbone is averaged over every valid reply, each prior row over the
replying sites that own it, and rows whose owners did not reply keep their value.

The global ``ArrayRecord`` this strategy works on has three float32 arrays (``server.state``):
``backbone`` (backbone_size,), ``task_rows`` (task_slots, task_row_size) and ``modality_rows``
(modality_slots, modality_row_size). Averaging is float32 whatever the wire dtype. Sites train with
FedAvg's local steps or FedProx's (sites add the proximal term; the server only sends ``proximal-mu``);
the average of their replies is a target, and the server optimiser (``server.outer``) steps the global
model with the pseudo-gradient ``sent - target`` (SGD at learning rate 1: FedAvg). The server also keeps
the EMA of the global model, which evaluation and the final model use. Optimiser state and EMA are part
of :meth:`HermesStrategy.state_dict`.

Everything a round does is a function of (seed, round, state): node sampling and the per-site seeds
are derived from the seed and the round, replies are aggregated in site-name order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from hermes_model.engine import EngineConfig
from hermes_model.exchange import (
    ARRAYS_RECORD,
    BACKBONE,
    CONFIG_RECORD,
    KNOWN_MODALITY,
    LOCAL_UPDATES,
    LOSS_TOKENS,
    MODALITY_ROW_IDS,
    MODALITY_ROWS,
    NUM_EXAMPLES,
    REPLY_CODECS,
    TASK_ROW_IDS,
    TASK_ROWS,
    StateLayout,
    to_wire,
)
from hermes_model.losses import MODALITY_LOSS_WEIGHT
from server.bank import MODALITY, TASK, PriorBank
from server.config import STRATEGIES, local_update_problem
from server.outer import OuterOptimizer, OuterSettings, ServerEMA
from server.state import GlobalState
from server.validation import ReplyRejected, Sent, TrainUpdate, parse_evaluate_reply, parse_train_reply

logger = logging.getLogger(__name__)

WEIGHTINGS = ("samples", "uniform")


def derive_seed(seed: int, server_round: int, name: str) -> int:
    """A seed in [0, 2**31) that depends only on (seed, round, name): stable across processes."""
    digest = hashlib.sha256(f"{int(seed)}:{int(server_round)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**31)


@dataclass(frozen=True)
class StrategyOptions:
    """Settings of :class:`HermesStrategy` (see ``server.config.ServerConfig`` for their meaning).

    ``model_json``, ``engine_json`` and ``plans_json`` are sent to the sites verbatim (protocol keys
    ``model``/``engine``/``plans``); ``run_key`` names the run to the sites (their local state per run).
    """

    kind: str = "fedavg"
    weighting: str = "samples"
    proximal_mu: float = 0.0
    wire_dtype: str = "float32"
    reply_codec: str = "none"
    local_update: str = "steps"
    keep_local_state: bool = True
    outer: OuterSettings = field(default_factory=OuterSettings)
    ema_decay: float = EngineConfig.ema_decay
    evaluate_ema: bool = True
    min_replies: int = 1
    sites_per_round: int = 0
    local_iterations: int = 1
    seed: int = 0
    ttl_s: float | None = None
    model_json: str = "{}"
    engine_json: str = "{}"
    plans_json: str = "{}"
    run_key: str = "default"

    def __post_init__(self) -> None:
        if self.kind not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {self.kind!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {self.weighting!r}")
        if self.wire_dtype not in ("float32", "float16"):
            raise ValueError(f"wire-dtype must be one of ['float32', 'float16'], got {self.wire_dtype!r}")
        if self.local_update not in LOCAL_UPDATES:
            raise ValueError(f"local-update must be one of {list(LOCAL_UPDATES)}, got {self.local_update!r}")
        problem = local_update_problem(self.local_update, self.local_iterations, self.kind)
        if problem:
            raise ValueError(problem)
        if self.reply_codec not in REPLY_CODECS:
            raise ValueError(f"reply-codec must be one of {list(REPLY_CODECS)}, got {self.reply_codec!r}")
        if self.kind == "fedprox" and not self.proximal_mu > 0:
            raise ValueError(f"strategy 'fedprox' needs proximal-mu > 0, got {self.proximal_mu!r}")
        if self.min_replies < 1 or self.local_iterations < 1 or self.sites_per_round < 0:
            raise ValueError(
                f"need min_replies >= 1, local_iterations >= 1, sites_per_round >= 0; got "
                f"{self.min_replies}, "
                f"{self.local_iterations}, {self.sites_per_round}"
            )


class HermesStrategy(Strategy):
    """Prior-bank-aware FedAvg / FedProx local training with a server optimiser and a server EMA.

    Args:
        layout: the model's state layout (backbone vs prior rows).
        bank: the global prior bank (ownership; updated by :meth:`aggregate_train`).
        options: see :class:`StrategyOptions`.

    Attributes:
        nodes: connected node id -> site name (filled by the runner from the query replies).
        round_lines: per-site and aggregate metric lines of the last ``aggregate_*`` call.
    """

    def __init__(self, layout: StateLayout, bank: PriorBank, options: StrategyOptions | None = None) -> None:
        self.layout, self.bank = layout, bank
        self.options = options or StrategyOptions()
        self.nodes: dict[int, str] = {}
        self.round_lines: list[dict[str, Any]] = []
        self.outer = OuterOptimizer(layout, self.options.outer)
        self.ema = ServerEMA(self.options.ema_decay)
        self._current: GlobalState | None = None
        self._sent: dict[int, Sent] = {}
        self._message_nodes: dict[str, int] = {}

    # -- sampling ----------------------------------------------------------------------------------
    def available_sites(self, grid: Grid) -> list[tuple[str, int]]:
        """(site, node id) of the connected, registered sites, sorted by site name."""
        connected = set(grid.get_node_ids())
        return sorted((s, n) for n, s in self.nodes.items() if n in connected and s in self.bank.sites)

    def sample_sites(self, server_round: int, grid: Grid) -> list[tuple[str, int]]:
        """The sites of this round's training: all, or ``sites_per_round`` drawn with a round seed."""
        candidates = self.available_sites(grid)
        k = self.options.sites_per_round
        if k and k < len(candidates):
            rng = random.Random(derive_seed(self.options.seed, server_round, "sample-train"))
            candidates = sorted(rng.sample(candidates, k))
        return candidates

    # -- train -------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One ``train`` message per sampled site: backbone + its own rows + the round config."""
        self._current = GlobalState.from_record(arrays, self.layout)
        sites = self.sample_sites(server_round, grid)
        logger.info("round %d: training on %d site(s): %s", server_round, len(sites), [s for s, _ in sites])
        return self._messages(server_round, arrays, config, sites, MessageType.TRAIN)

    def _messages(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        sites: list[tuple[str, int]],
        message_type: str,
    ) -> list[Message]:
        assert self._current is not None
        wire = self.options.wire_dtype
        backbone = to_wire(self._current.backbone, wire)  # float32: a view of the global arrays, no copy
        backbone_array = arrays[BACKBONE] if wire == "float32" else Array(backbone.numpy())
        self._sent = {}
        messages = []
        for site, node in sites:
            own = self.bank.ownership(site)
            sent = {
                BACKBONE: backbone,
                TASK_ROWS: to_wire(self._current.task_rows[list(own.task_ids)], wire),
                MODALITY_ROWS: to_wire(self._current.modality_rows[list(own.modality_rows)], wire),
            }
            self._sent[node] = Sent(node, site, own.task_ids, own.modality_rows, sent)
            payload = ArrayRecord(
                {name: backbone_array if name == BACKBONE else Array(t.numpy()) for name, t in sent.items()}
            )
            content = RecordDict(
                {ARRAYS_RECORD: payload, CONFIG_RECORD: self._site_config(server_round, config, site)}
            )
            messages.append(
                Message(
                    content,
                    dst_node_id=node,
                    message_type=message_type,
                    group_id=str(server_round),
                    ttl=self.options.ttl_s,
                )
            )
        return messages

    def _site_config(self, server_round: int, config: ConfigRecord, site: str) -> ConfigRecord:
        own, opt = self.bank.ownership(site), self.options
        values = dict(config.items())
        values.update(
            {
                "server-round": server_round,
                TASK_ROW_IDS: list(own.task_ids),
                MODALITY_ROW_IDS: list(own.modality_rows),
                "local-iterations": opt.local_iterations,
                "schedule-iteration": (server_round - 1) * opt.local_iterations,
                "seed": opt.seed,  # the site derives its round's patches from it (round_sampling_seed)
                "wire-dtype": opt.wire_dtype,
                "reply-codec": opt.reply_codec if opt.local_update == "steps" else "none",
                "local-update": opt.local_update,
                "keep-local-state": opt.keep_local_state,
                "proximal-mu": float(opt.proximal_mu if opt.kind == "fedprox" else 0.0),
                "model": opt.model_json,
                "engine": opt.engine_json,
                "plans": opt.plans_json,
                "run-key": opt.run_key,
                "task-map": json.dumps(own.task_map, sort_keys=True),
            }
        )
        return ConfigRecord(values)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, average backbone and owned rows, update the bank.

        Returns ``(None, metrics)`` when fewer than ``min_replies`` replies are valid (model kept).
        """
        if self._current is None:
            raise RuntimeError("aggregate_train called before configure_train")
        updates, drops = self._collect_train(server_round, replies)
        summary: dict[str, Any] = {"sampled-sites": len(self._sent), "valid-replies": len(updates)}
        summary.update(_drop_counts(drops))
        if len(updates) < self.options.min_replies:
            logger.warning(
                "round %d: %d valid repl(ies), fewer than min-sites-per-round=%d: the model is kept",
                server_round,
                len(updates),
                self.options.min_replies,
            )
            summary["skipped"] = 1
            self.round_lines.append(
                {"round": server_round, "phase": "train", "scope": "aggregate", **summary}
            )
            return None, MetricRecord(summary)
        first_step = self.global_step(server_round)
        if self.options.local_update == "gradient":
            gradient, task_n, mod_n = self._union_gradient(updates)
            new = self.outer.step(self._current, gradient, global_step=first_step)
        else:
            target, task_n, mod_n = self._average(updates)
            new = self.outer.step(self._current, target=target, global_step=first_step)
        self.ema.update(new, first_step, self.options.local_iterations)
        modalities = self._task_modalities(updates)
        for kind, counts in ((TASK, task_n), (MODALITY, mod_n)):
            for row in torch.nonzero(counts > 0).flatten().tolist():
                mods = modalities.get(row, ()) if kind == TASK else ()
                self.bank.record_update(kind, row, server_round, float(counts[row]), mods)
        summary.update(_weighted_metrics([(u.num_examples, u.metrics) for u in updates]))
        summary["skipped"] = 0
        self.round_lines.append({"round": server_round, "phase": "train", "scope": "aggregate", **summary})
        self._current = new
        return new.to_record(), MetricRecord(summary)

    def _task_modalities(self, updates: list[TrainUpdate]) -> dict[int, set[str]]:
        """Task row -> modalities of the replying sites' datasets that hold it."""
        out: dict[int, set[str]] = {}
        for u in updates:
            own = self.bank.sites.get(u.site)
            for task, mods in (own.task_modalities.items() if own else ()):
                out.setdefault(task, set()).update(mods)
        return out

    def expect_replies(self, message_nodes: dict[str, int]) -> None:
        """Message id -> destination node of this round's messages, so that an error reply (whose source is
        the SuperLink, not the node) is still attributed to its site."""
        self._message_nodes = dict(message_nodes)

    def _sender(self, msg: Message) -> int:
        """The node a reply is about: its source, or for an error reply the node its message went to."""
        src = msg.metadata.src_node_id
        if msg.has_error() and src not in self._sent:
            return self._message_nodes.get(msg.metadata.reply_to_message_id, src)
        return src

    def _collect_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[TrainUpdate], list[str]]:
        updates, drops = self._valid_replies(
            server_round, "train", replies,
            lambda msg, sent, src, site: parse_train_reply(msg, sent or Sent(src, site, (), ()), self.layout,
                                                           self.options.local_update == "gradient"),
        )
        return [updates[s] for s in sorted(updates)], drops

    def _valid_replies(
        self, server_round: int, phase: str, replies: Iterable[Message], parse: Callable[..., Any]
    ) -> tuple[dict[str, Any], list[str]]:
        """Parse every reply with ``parse(msg, sent, src, site)``; a rejected reply (or one from a node
        not sent a message, or a second reply) is dropped and counted. Returns ({site: parsed}, drop
        reasons) and starts this round's metrics lines with one line per site."""
        self.round_lines = []
        parsed: dict[str, Any] = {}
        drops: list[str] = []
        seen: set[int] = set()
        for msg in replies:
            src = self._sender(msg)
            sent = self._sent.get(src)
            site = sent.site if sent else f"node-{src}"
            try:
                if not msg.has_error() and (sent is None or src in seen):
                    raise ReplyRejected(
                        "unexpected-sender", f"node {src} was not sent a message or replied twice"
                    )
                result = parse(msg, sent, src, site)
            except ReplyRejected as rej:
                self._drop(server_round, phase, site, rej, drops)
                continue
            seen.add(src)
            parsed[site] = result
            self.round_lines.append(
                {"round": server_round, "phase": phase, "scope": "site", "site": site, "status": "ok",
                 **result.metrics}
            )
        return parsed, drops

    def _drop(self, server_round: int, phase: str, site: str, rej: ReplyRejected, drops: list[str]) -> None:
        logger.warning("round %d: dropped the %s reply of site %r (%s)", server_round, phase, site, rej)
        drops.append(rej.reason)
        self.round_lines.append(
            {
                "round": server_round,
                "phase": phase,
                "scope": "site",
                "site": site,
                "status": "dropped",
                "reason": rej.reason,
                "detail": rej.detail[:300],
            }
        )

    def _union_gradient(self, updates: list[TrainUpdate]) -> tuple[GlobalState, torch.Tensor, torch.Tensor]:
        """The gradient of the union of the sites' batches from their sums (``TrainEngine.loss_sum_gradients``):
        ``sum dS / sum N + w * sum dM / sum Q``; a row only from the sites that hold it (zero elsewhere).

        Returns the gradient and, per task / modality row, the samples behind it.
        """
        assert self._current is not None
        tokens = max(sum(u.metrics[LOSS_TOKENS] for u in updates), 1.0)
        known = sum(u.metrics[KNOWN_MODALITY] for u in updates)
        gradient = GlobalState(*(torch.zeros_like(t) for t in self._current.tensors()))
        task_n = torch.zeros(gradient.task_rows.shape[0], dtype=torch.float64)
        mod_n = torch.zeros(gradient.modality_rows.shape[0], dtype=torch.float64)
        for u in updates:
            assert u.modality_term is not None
            scales = [(1.0 / tokens, (u.backbone, u.task_rows, u.modality_rows))]
            if known:
                scales.append((MODALITY_LOSS_WEIGHT / known, u.modality_term))
            tasks, mods = torch.tensor(u.task_ids, dtype=torch.long), torch.tensor(u.modality_ids, dtype=torch.long)
            for scale, (backbone, task_rows, modality_rows) in scales:
                gradient.backbone.add_(backbone, alpha=scale)
                gradient.task_rows.index_add_(0, tasks, task_rows, alpha=scale)
                gradient.modality_rows.index_add_(0, mods, modality_rows, alpha=scale)
            task_n[tasks] += u.num_examples
            mod_n[mods] += u.num_examples
        return gradient, task_n, mod_n

    def _average(self, updates: list[TrainUpdate]) -> tuple[GlobalState, torch.Tensor, torch.Tensor]:
        """Weighted means (float32): backbone over all updates, each row over the updates holding it.

        Returns the new state and, per task / modality row, the samples behind its update (0 = kept).
        """
        assert self._current is not None
        weights = [u.num_examples if self.options.weighting == "samples" else 1.0 for u in updates]
        total = sum(weights)
        acc = torch.zeros_like(self._current.backbone)
        for w, u in zip(weights, updates, strict=True):
            acc.add_(u.backbone, alpha=w)
        # the backbone is replaced, so only the rows are copied (one model-sized buffer less at the peak)
        new = GlobalState(acc.div_(total), self._current.task_rows.clone(), self._current.modality_rows.clone())
        task_n = _rows_mean(
            new.task_rows,
            [(w, u.num_examples, u.task_ids, u.task_rows) for w, u in zip(weights, updates, strict=True)],
        )
        mod_n = _rows_mean(
            new.modality_rows,
            [
                (w, u.num_examples, u.modality_ids, u.modality_rows)
                for w, u in zip(weights, updates, strict=True)
            ],
        )
        return new, task_n, mod_n

    # -- evaluate ----------------------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, raw: bool = False
    ) -> Iterable[Message]:
        """One ``evaluate`` message per connected site (same payload layout as ``train``) with the model
        :meth:`evaluation_arrays` chooses for ``arrays`` (``raw``: ``arrays`` themselves)."""
        arrays = arrays if raw else self.evaluation_arrays(arrays)
        self._current = GlobalState.from_record(arrays, self.layout)
        return self._messages(server_round, arrays, config, self.available_sites(grid), MessageType.EVALUATE)

    def evaluation_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """The model to evaluate and hand to users: the server's EMA when it has one and ``evaluate_ema``,
        else ``arrays`` (the raw global model)."""
        if self.options.evaluate_ema and self.ema.state is not None:
            return self.ema.state.to_record()
        return arrays

    def global_step(self, server_round: int) -> int:
        """The global step at which ``server_round`` starts (the sites' schedule position)."""
        return (server_round - 1) * self.options.local_iterations

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted means (by num-examples) of every metric, e.g. ``dice-mean`` and ``dice/<ds>/<class>``
        (each over the sites that report it); None when no reply is valid."""
        results, drops = self._valid_replies(
            server_round, "evaluate", replies, lambda msg, sent, src, site: parse_evaluate_reply(msg, site)
        )
        if not results:
            logger.warning("round %d: no valid evaluate reply", server_round)
            return None
        summary: dict[str, Any] = {"valid-replies": len(results), **_drop_counts(drops)}
        summary.update(
            _weighted_metrics([(results[s].num_examples, results[s].metrics) for s in sorted(results)])
        )
        self.round_lines.append({"round": server_round, "phase": "evaluate", "scope": "aggregate", **summary})
        return MetricRecord(summary)

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The strategy's own state (server optimiser and EMA), for the round checkpoint."""
        return {"kind": self.options.kind, "outer": self.outer.state_dict(), "ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.options.kind:
            raise ValueError(
                f"strategy state is for {state.get('kind')!r}, this strategy is {self.options.kind!r}"
            )
        self.outer.load_state_dict(state["outer"])
        self.ema.load_state_dict(state["ema"])

    def summary(self) -> None:
        o = self.options
        logger.info(
            "HermesStrategy: %s local steps, server optimiser %s (lr %g), weighting=%s, wire=%s, reply codec=%s, "
            "min replies=%d, sites/round=%s, proximal-mu=%s, evaluates the %s model",
            o.kind,
            o.outer.kind,
            o.outer.lr,
            o.weighting,
            o.wire_dtype,
            o.reply_codec,
            o.min_replies,
            o.sites_per_round or "all",
            o.proximal_mu,
            "EMA" if o.evaluate_ema else "raw",
        )


# ----------------------------------------------------------------------------------------------- helpers
def _rows_mean(
    rows: torch.Tensor, parts: list[tuple[float, float, tuple[int, ...], torch.Tensor]]
) -> torch.Tensor:
    """Replace, in place, every row of ``rows`` (R, C) that some part holds by the weighted mean of
    those parts; parts are (weight, samples, row ids, (k, C) values). Returns the samples per row (R,)."""
    acc = torch.zeros_like(rows)
    wsum = torch.zeros(rows.shape[0], dtype=torch.float32)
    nsum = torch.zeros(rows.shape[0], dtype=torch.float64)
    for weight, samples, ids, values in parts:
        index = torch.tensor(ids, dtype=torch.long)
        acc[index] += weight * values
        wsum[index] += weight
        nsum[index] += samples
    hit = wsum > 0
    rows[hit] = acc[hit] / wsum[hit].unsqueeze(1)
    return nsum


def _weighted_metrics(items: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """num-examples summed; every other metric the num-examples-weighted mean over those reporting it."""
    out: dict[str, float] = {NUM_EXAMPLES: float(sum(n for n, _ in items))}
    keys = sorted({k for _, m in items for k in m if k != NUM_EXAMPLES})
    for key in keys:
        held = [(n, m[key]) for n, m in items if key in m]
        out[key] = sum(n * x for n, x in held) / sum(n for n, _ in held)
    return out


def _drop_counts(drops: list[str]) -> dict[str, int]:
    counts = Counter(drops)
    return {"dropped-replies": len(drops), **{f"dropped/{r}": c for r, c in sorted(counts.items())}}
