"""Per-round overhead of the federated exchange through real Flower processes on loopback.

    python benchmarks/round_overhead.py                      # 2 and 4 sites, float32 and float16 wire
    python benchmarks/round_overhead.py --sites 4 --wire float32 --rounds 3 --insecure
    python benchmarks/round_overhead.py --sites 4 --wire float32 --stock   # + stock Flower FedAvg baseline
    python benchmarks/round_overhead.py --sites 4 --wire float32 --reply-codec xor-zstd none

For the published Hermes-R size (base 32, 72 task slots, 61 M parameters) it starts a SuperLink (TLS
unless ``--insecure``), one SuperNode per site and submits the REAL ServerApp (``server.app:app``: the
real strategy, reply validation, aggregation and round checkpoints) with ``evaluate-every 0``. The sites
run the benchmark-only ClientApp ``echo_app`` below instead of the real one, because the real ClientApp
always trains (``local-iterations`` >= 1) and training is what this benchmark leaves out: ``echo_app``
answers the ``query`` like a site holding one catalog dataset, and answers ``train`` by sending back the
arrays it received moved like trained weights (Gaussian noise of ``--update`` x the rms of each block of
4096 values; the default is the change one real 400-step round made, ``benchmarks/reply_codec.py``),
through the same conversions and reply codec as ``client.app`` (``hermes_model.exchange.from_wire`` ->
a trained copy -> ``to_wire`` -> ``client.wire.reply_array``), with ``num-examples`` and the protocol's
metrics.

``--stock`` adds the baseline for each ``--sites`` value: Flower's own FedAvg sending the same model's
state dict as one ArrayRecord (405 Arrays, float32) to ``stock_echo_app``, a ClientApp doing what
``echo_app`` does the way Flower's PyTorch quickstart converts arrays; its round times come from a FedAvg
subclass timing configure -> aggregate.

So a round's time (``round-time-s`` of ``metrics.jsonl``: configure, serialise, send, ClientApp process
start, receive, validate, aggregate; not the checkpoint) is the overhead one round adds to local training.
Round 1 also pays for each SuperNode installing the app; rounds 2+ are reported as the steady state.

Prints one JSON line per configuration: bytes each site receives and sends per round (the plain array
payload, computed from the model layout; and Flower's own network-traffic counter of the run, per site
and round, which shows what the reply codec saved),
round times, the peak resident memory (VmHWM) of the SuperLink, SuperNode, ServerApp and ClientApp
processes and the CPU seconds each role used over the whole run (sampled from ``/proc`` every 0.2 s),
and the machine's load average before and after (other work on the machine stretches the round times;
the CPU seconds do not depend on it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from client.wire import reply_array
from hermes_model.catalog import Catalog
from hermes_model.exchange import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    EXCHANGE_ARRAYS,
    METRICS_RECORD,
    MODALITY_ROW_IDS,
    NUM_EXAMPLES,
    SITE_RECORD,
    TASK_ROW_IDS,
    from_wire,
    to_wire,
)

logger = logging.getLogger("round_overhead")

BENCH_SITE_KEY = "bench-site"  # SuperNode node config: index of the catalog dataset this site holds
BENCH_UPDATE_KEY = "bench-update"  # SuperNode node config: relative change of a "trained" reply
UPDATE_BLOCK = 4096
NOISE_BLOCKS = 256  # trained_like repeats one draw of NOISE_BLOCKS x UPDATE_BLOCK values
DEFAULT_UPDATE = 0.22  # relative change of one real 400-step round (benchmarks/reply_codec.py)
SITE_DATASETS = ("lits", "kits", "amos_ct", "amos_mr", "bcv", "structseg_oar")
ROLES = {"flower-superlink": "superlink", "flower-supernode": "supernode", "flwr-serverapp": "serverapp",
         "flwr-clientapp": "clientapp", "flower-superexec": "superexec"}

# ------------------------------------------------------------------------------------------------ echo_app
echo_app = ClientApp()


@echo_app.query()
def echo_query(msg: Message, context: Context) -> Message:
    """Describe a site holding catalog dataset ``SITE_DATASETS[bench-site]`` (no data behind it)."""
    index = int(context.node_config[BENCH_SITE_KEY])
    name = SITE_DATASETS[index]
    entry = Catalog.from_dict(json.loads(msg.content[CONFIG_RECORD]["catalog"])).dataset(name)
    datasets = [{"name": name, "modality": entry.modality,
                 "classes": {str(k): v for k, v in entry.classes.items()}, "num_train_cases": 10}]
    record = ConfigRecord({"name": f"bench-{index}", "datasets": json.dumps(datasets)})
    return Message(RecordDict({SITE_RECORD: record}), reply_to=msg)


def trained_like(received: torch.Tensor, relative_change: float, seed: int) -> torch.Tensor:
    """``received`` plus Gaussian noise of ``relative_change`` x the rms of each block of 4096 values:
    roughly what a round of LAMB does (each tensor moves by about the same amount per value). The noise is
    one draw of 2^20 values repeated (cheap: this stands in for training, not part of what is measured).

    It matters that replies differ from what was sent: Flower stores objects by content hash and skips
    uploading bytes the SuperLink already holds, and the reply codec's savings depend on the change."""
    out = received.reshape(-1).float().clone()
    whole = out.numel() // UPDATE_BLOCK * UPDATE_BLOCK
    parts = [out[:whole].view(-1, UPDATE_BLOCK), out[whole:].view(1, -1)]
    noise = torch.randn(NOISE_BLOCKS, UPDATE_BLOCK, generator=torch.Generator().manual_seed(seed))
    for blocks in parts:
        for start in range(0, blocks.shape[0], NOISE_BLOCKS):
            chunk = blocks[start:start + NOISE_BLOCKS]
            scale = chunk.pow(2).mean(1, keepdim=True).sqrt_().mul_(relative_change)
            chunk.addcmul_(noise[:chunk.shape[0], :chunk.shape[1]], scale)
    return out.view(received.shape)


def _update_seed(msg: Message, context: Context) -> tuple[float, int]:
    node = context.node_config
    site, server_round = int(node[BENCH_SITE_KEY]), int(msg.content[CONFIG_RECORD].get("server-round", 0))
    return float(node[BENCH_UPDATE_KEY]), 1000 * site + server_round


@echo_app.train()
def echo_train(msg: Message, context: Context) -> Message:
    """Send the received arrays back moved like trained weights (:func:`trained_like`, no training), in
    the wire dtype and reply codec the server asked for, with ``client.app``'s conversions (``from_wire``
    -> the trained copy -> ``to_wire`` -> ``client.wire.reply_array``)."""
    start = time.perf_counter()
    arrays, config = msg.content[ARRAYS_RECORD], msg.content[CONFIG_RECORD]
    wire, codec = str(config["wire-dtype"]), str(config.get("reply-codec", "none"))
    change, seed = _update_seed(msg, context)
    out = {}
    for index, name in enumerate(EXCHANGE_ARRAYS):
        received = from_wire(arrays[name].data)  # read-only view of the message bytes (float32 wire)
        out[name] = reply_array(to_wire(trained_like(received, change, seed + index), wire), received, codec)
    content = RecordDict({
        ARRAYS_RECORD: ArrayRecord(out),
        CONFIG_RECORD: ConfigRecord({TASK_ROW_IDS: list(config[TASK_ROW_IDS]),
                                     MODALITY_ROW_IDS: list(config[MODALITY_ROW_IDS])}),
        METRICS_RECORD: MetricRecord({NUM_EXAMPLES: 2, "loss": 1.0, "bce": 0.5, "dice": 0.5,
                                      "modality-acc": 1.0, "train-time-s": time.perf_counter() - start}),
    })
    return Message(content, reply_to=msg)


# ------------------------------------------------------------------------------------------------ stock FedAvg
# The baseline the exchange is judged against: Flower's own FedAvg with the model's state dict as one
# ArrayRecord (one Array per tensor), as Flower's PyTorch quickstart does, and a ClientApp that sends the
# arrays back shifted like ``echo_train``.
STOCK_ROUND_TIMES = "stock_round_times.json"
stock_server = ServerApp()
stock_echo_app = ClientApp()


class TimedFedAvg(FedAvg):
    """FedAvg that records each round's seconds from configuring to aggregated (what our strategy's
    ``round-time-s`` covers too)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.round_times: list[float] = []
        self._round_start = 0.0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Any:
        self._round_start = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        result = super().aggregate_train(server_round, replies)
        self.round_times.append(round(time.perf_counter() - self._round_start, 3))
        return result


@stock_server.main()
def stock_main(grid: Grid, context: Context) -> None:
    from hermes_model import build_model

    config = context.run_config
    sites = int(config["min-sites"])
    torch.manual_seed(0)
    model = build_model("hermes-r", base_channels=32, task_slots=72, modality_slots=6)
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=sites,
                           min_available_nodes=sites)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                   num_rounds=int(config["num-server-rounds"]))
    run_dir = Path(str(config["run-dir"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STOCK_ROUND_TIMES).write_text(json.dumps(strategy.round_times))


@stock_echo_app.train()
def stock_echo_train(msg: Message, context: Context) -> Message:
    change, seed = _update_seed(msg, context)
    state = msg.content["arrays"].to_torch_state_dict()
    trained = {name: trained_like(tensor, change, seed + i) if tensor.is_floating_point() else tensor
               for i, (name, tensor) in enumerate(state.items())}
    content = RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord({NUM_EXAMPLES: 2})})
    return Message(content, reply_to=msg)


# ------------------------------------------------------------------------------------------------ measuring
class ProcessSampler:
    """Samples every process started by the given roots from ``/proc``, by role: the peak resident set
    (VmHWM, KiB) and the CPU seconds used (user + system; a process's last sample before it exits)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.roots: list[Any] = []  # server.launch.ManagedProcess
        self.peak_kib: dict[str, int] = {}
        self._cpu_ticks: dict[int, tuple[str, int]] = {}
        self._tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        from server.launch import proc_table, process_tree

        table = proc_table()  # one walk of /proc per sample for all roots: the sampler's own CPU stays small
        pids = {pid for root in list(self.roots) for pid in process_tree(root.pid, root.pgid, table)}
        for proc in (Path(f"/proc/{pid}") for pid in pids):
            try:
                stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                ticks = int(stat[11]) + int(stat[12])
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                hwm = next(int(line.split()[1]) for line in (proc / "status").read_text().splitlines()
                           if line.startswith("VmHWM:"))
            except (OSError, ValueError, IndexError, StopIteration):
                continue
            role = next((r for key, r in ROLES.items() if key in cmd), None)
            if role is not None:
                self.peak_kib[role] = max(self.peak_kib.get(role, 0), hwm)
                self._cpu_ticks[int(proc.name)] = (role, ticks)

    def mib(self) -> dict[str, float]:
        return {role: round(kib / 1024, 1) for role, kib in sorted(self.peak_kib.items())}

    def cpu_s(self) -> dict[str, float]:
        total: dict[str, int] = {}
        for role, ticks in self._cpu_ticks.values():
            total[role] = total.get(role, 0) + ticks
        return {role: round(t / self._tick, 1) for role, t in sorted(total.items())}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def payload_bytes(num_sites: int, wire: str, stock: bool = False) -> list[dict[str, int]]:
    """Per site: bytes of the arrays it receives and sends in one round (both the same by design);
    stock FedAvg sends the whole state dict."""
    from hermes_model import build_model
    from hermes_model.catalog import modality_id, modality_row
    from hermes_model.exchange import StateLayout

    model = build_model("hermes-r", base_channels=32, task_slots=72, modality_slots=6)
    if stock:
        n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        return [{"site": f"bench-{index}", "receives": n, "sends": n} for index in range(num_sites)]
    layout = StateLayout.from_model(model)
    catalog = Catalog.load()
    size = 4 if wire == "float32" else 2
    out = []
    for index in range(num_sites):
        entry = catalog.dataset(SITE_DATASETS[index])
        rows = len(entry.task_ids) * layout.task_row_size + len(
            {modality_row(modality_id(entry.modality), layout.modality_slots)}) * layout.modality_row_size
        n = (layout.backbone_size + rows) * size
        out.append({"site": f"bench-{index}", "receives": n, "sends": n})
    return out


def start_sites(link: Any, num_sites: int, root: Path, tls: Any, update: float) -> list[Any]:
    from server.launch import ManagedProcess, flower_env, flower_executable

    nodes = []
    for index in range(num_sites):
        args = [flower_executable("flower-supernode"), "--superlink", link.address,
                "--port", str(free_port()), "--node-config", f"{BENCH_SITE_KEY}={index} {BENCH_UPDATE_KEY}={update}"]
        args += ["--insecure"] if tls is None else ["--root-certificates", str(tls.ca_cert)]
        home = root / f"site-{index}"
        nodes.append(ManagedProcess(args, env=flower_env(home / "flwr-home"), cwd=root,
                                    log_path=home / "supernode.log"))
    return nodes


def stage_bench_app(root: Path, num_sites: int, wire: str, codec: str, rounds: int, stock: bool) -> Path:
    """The Flower App of one configuration: our ServerApp + ``echo_app``, or stock FedAvg + its echo."""
    from server.config import ServerConfig
    from server.launch import stage_app

    extra = {"round_overhead.py": Path(__file__).resolve()}
    if stock:
        config = {"num-server-rounds": rounds, "min-sites": num_sites, "run-dir": str(root / "run")}
        return stage_app(root / "app", config, serverapp="round_overhead:stock_server",
                         clientapp="round_overhead:stock_echo_app", extra_files=extra)
    config = ServerConfig(
        num_server_rounds=rounds, min_sites=num_sites, min_sites_per_round=num_sites, local_iterations=1,
        evaluate_every=0, wire_dtype=wire, reply_codec=codec, base_channels=32, task_slots=72, modality_slots=6,
        run_dir=str(root / "run"), keep_checkpoints=1, round_timeout_s=900.0, start_timeout_s=300.0,
        query_timeout_s=300.0, poll_interval_s=0.5,
    )
    return stage_app(root / "app", config.to_run_config(), clientapp="round_overhead:echo_app",
                     extra_files=extra)


def round_times(run_dir: Path, stock: bool) -> list[float]:
    if stock:
        return [float(t) for t in json.loads((run_dir / STOCK_ROUND_TIMES).read_text())]
    from server.checkpoint import RunStore

    metrics = RunStore(run_dir).read_metrics()
    return [m["round-time-s"] for m in metrics if m["scope"] == "aggregate" and m["phase"] == "train"]


def bench(num_sites: int, wire: str, codec: str, rounds: int, insecure: bool, root: Path, update: float,
          stock: bool = False) -> dict[str, Any]:
    """One configuration: a fresh SuperLink, ``num_sites`` SuperNodes, ``rounds`` rounds."""
    from server.cli import write_keys
    from server.launch import TlsFiles, start_superlink

    root.mkdir(parents=True)
    tls = None
    if not insecure:
        write_keys(root / "keys", [])
        tls = TlsFiles.from_keys_dir(root / "keys")
    app = stage_bench_app(root, num_sites, wire, codec, rounds, stock)
    load_before = os.getloadavg()[0]
    with ProcessSampler() as memory:
        link = start_superlink(root / "superlink", port=free_port(), tls=tls)
        memory.roots.append(link.process)
        nodes: list[Any] = []
        try:
            nodes = start_sites(link, num_sites, root, tls, update)
            memory.roots.extend(nodes)
            t0 = time.monotonic()
            run_id = link.submit_run(app)
            info = link.wait_for_run(run_id, timeout_s=3600.0, poll_s=10.0)  # each poll is a CPU-heavy `flwr ls`
            wall = time.monotonic() - t0
            log = link.flwr("log", str(run_id), link.connection, "--show", timeout_s=120.0).stdout
            (root / "serverapp.log").write_text("".join(  # the ServerApp's log, without httpx's request lines
                line for line in log.splitlines(keepends=True) if " httpx: " not in line))
        finally:
            for process in [*nodes, link.process]:
                process.terminate()
            for process in [*nodes, link.process]:
                process.stop(20.0)
    if info["status"] != "finished:completed":
        raise RuntimeError(f"run {run_id} ended {info['status']}: {info.get('status-details')}")
    times = round_times(root / "run", stock)
    traffic = info.get("network-traffic", {})
    per_site_round = {k: round(v / (num_sites * rounds)) for k, v in traffic.items()}
    steady = times[1:] or times
    return {
        "exchange": "stock-fedavg" if stock else "hermes", "sites": num_sites, "wire": wire,
        "reply_codec": "none" if stock else codec, "update": update, "tls": not insecure, "rounds": rounds,
        "round_time_s": times, "round_time_s_steady_mean": round(statistics.mean(steady), 2),
        "payload_bytes_per_site_round": payload_bytes(num_sites, wire, stock),
        "flower_traffic_bytes_per_site_round": per_site_round,
        "run_wall_s": round(wall, 1), "peak_rss_mib": memory.mib(),
        "cpu_s_whole_run": memory.cpu_s(), "cpus": os.cpu_count(),
        "load_avg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 4], help="numbers of sites (<= 6)")
    parser.add_argument("--wire", nargs="+", default=["float32", "float16"], choices=["float32", "float16"])
    parser.add_argument("--reply-codec", nargs="+", default=["none"], choices=["none", "xor-zstd"],
                        help="reply codecs to run (default: none, the server default)")
    parser.add_argument("--update", type=float, default=DEFAULT_UPDATE,
                        help="relative change of the echoed 'trained' weights (default: a real 400-step round)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per configuration (>= 2)")
    parser.add_argument("--insecure", action="store_true", help="no TLS")
    parser.add_argument("--stock", action="store_true",
                        help="also run stock Flower FedAvg (one Array per tensor, float32) per --sites value")
    parser.add_argument("--work-dir", default=None, help="keep the runs here (default: a temp folder)")
    args = parser.parse_args(argv)
    if any(not 1 <= n <= len(SITE_DATASETS) for n in args.sites):
        parser.error(f"--sites values must be in 1..{len(SITE_DATASETS)}, got {args.sites}")
    if args.rounds < 2:
        parser.error(f"--rounds must be >= 2 (round 1 includes app installation), got {args.rounds}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="round-overhead-") as tmp:
        base = Path(args.work_dir).resolve() if args.work_dir else Path(tmp)
        for sites in args.sites:
            runs = [(wire, codec, False) for wire in args.wire for codec in args.reply_codec]
            runs += [("float32", "none", True)] if args.stock else []
            for wire, codec, stock in runs:
                name = f"{sites}-sites-{'stock' if stock else f'{wire}-{codec}'}"
                result = bench(sites, wire, codec, args.rounds, args.insecure, base / name, args.update, stock)
                print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
