"""How much the lossless reply codec (``reply-codec = "xor-zstd"``) saves on REAL training updates.

    python benchmarks/reply_codec.py                            # sarcoma CT demo site, 20/100/400 steps
    python benchmarks/reply_codec.py --iterations 20 400 --site site_configs/demo/brats-flair.yaml

A site codes its train reply as the XOR of the trained weights' bit patterns with the weights it
received, byte planes compressed with zstd (``hermes_model.exchange.encode_delta``). What that saves
depends on how far a round moves the weights, so this trains a real demo site (``client.site.Site``, the
real engine and data, Hermes-R at the demo's base 8) from the same fresh model for each ``--iterations``
value (one round of that many local steps, the learning-rate schedule of a 10-round run) and codes the
reply against the request. The codec only looks at the relative size of each weight's change, which
LAMB keeps about the same whatever the width of the network, so the ratios carry over to the published
base 32 (61 M parameters).

Prints one JSON line per iterations value: the backbone's relative change (rms of the change / rms of
the weights), the coded size as a fraction of the plain size for the float32 and float16 wires, and
encode / decode throughput.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from client.site import RoundRequest, Site
from hermes_model import build_model
from hermes_model.exchange import StateLayout, decode_delta, encode_delta, to_wire
from simulation.run import task_slots_for
from simulation.sites import demo_site_paths, stage_sites

ROUNDS = 10  # the schedule the round is the first of
DEMO_SITE = "sarcoma-ct"


def fresh_request(site: Site, task_slots: int, iterations: int) -> RoundRequest:
    """Round 1 of a ``ROUNDS``-round schedule: a fresh model (seed 0), task ids 0.. for the site's classes."""
    torch.manual_seed(0)
    spec = {"name": "hermes-r", "base_channels": 8, "task_slots": task_slots, "modality_slots": 6}
    model = build_model(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
    layout, state = StateLayout.from_model(model), model.state_dict()
    keys = [f"{ds.name}/{cls}" for ds in site.config.datasets for cls in ds.resolved_classes(site.catalog).values()]
    task_map = {key: i for i, key in enumerate(keys)}
    return RoundRequest(
        server_round=1, backbone=layout.backbone(state), task_rows=layout.task_rows(state, list(task_map.values())),
        modality_rows=layout.modality_rows(state, [0]), task_row_ids=tuple(task_map.values()),
        modality_row_ids=(0,), model=spec, task_map=task_map,
        engine={"optimizer": "lamb", "lr": 2e-3, "warmup_epochs": 0, "total_epochs": ROUNDS,
                "iters_per_epoch": iterations},
        local_iterations=iterations, schedule_iteration=0, seed=0,
    )


def coded_fraction(trained: torch.Tensor, received: torch.Tensor, wire: str, repeats: int = 3) -> dict[str, float]:
    values, reference = to_wire(trained, wire), to_wire(received, wire)
    encode, decode = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        data = encode_delta(values, reference)
        encode.append(time.perf_counter() - start)
        start = time.perf_counter()
        decoded = decode_delta(data, reference)
        decode.append(time.perf_counter() - start)
    if not torch.equal(decoded.view(torch.uint8), values.view(torch.uint8)):
        raise AssertionError("the codec is not lossless on this update")
    plain = values.numel() * values.element_size()
    return {f"{wire}_coded_fraction": round(len(data) / plain, 3),
            f"{wire}_encode_mb_s": round(plain / statistics.median(encode) / 1e6),
            f"{wire}_decode_mb_s": round(plain / statistics.median(decode) / 1e6)}


def measure(site_yaml: Path, iterations: int, root: Path) -> dict[str, object]:
    staged = stage_sites([site_yaml], root / f"run-{iterations}")[0]  # fresh site state, shared preprocessing
    site = Site.from_path(staged.path)
    request = fresh_request(site, task_slots_for([staged]), iterations)
    start = time.perf_counter()
    reply = site.train(request)
    train_s = time.perf_counter() - start
    received, trained = request.backbone, reply.backbone.float()
    change = float((trained - received).pow(2).mean().sqrt() / received.pow(2).mean().sqrt())
    return {"site": site.name, "iterations": iterations, "backbone_values": received.numel(),
            "relative_change": round(change, 5), "train_s": round(train_s, 1),
            **coded_fraction(trained, received, "float32"), **coded_fraction(trained, received, "float16")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo = {p.stem: p for p in demo_site_paths()}
    parser.add_argument("--site", type=Path, default=demo[DEMO_SITE], help="site config (default: demo sarcoma CT)")
    parser.add_argument("--iterations", type=int, nargs="+", default=[20, 100, 400], help="local steps per round")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.iterations):
        parser.error(f"--iterations must be >= 1, got {args.iterations}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="reply-codec-") as tmp:
        for iterations in args.iterations:
            print(json.dumps(measure(args.site, iterations, Path(tmp))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
