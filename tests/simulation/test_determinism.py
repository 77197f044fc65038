"""Same seed, same model: two federated simulations of the quick demo with the same seed end with bitwise
identical weights on the CPU, one run alone and one beside a third run that loads the machine (and races it
for the cores, so the sites' replies arrive in another order and other Ray actors take other sites); a run
with another seed ends elsewhere. Takes four to six minutes on 2 CPU cores."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hermes_model.factory import load_checkpoint
from server.checkpoint import FINAL_MODEL
from simulation.flower import stop_process_tree
from simulation.sites import REPO_ROOT
from tests.simulation.processes import EXIT_GRACE_S, wait_until_gone

pytestmark = pytest.mark.slow

ROUNDS, LOCAL_ITERATIONS = 2, 3
RUN_TIMEOUT_S = 1200.0
_MAIN = "import sys; from simulation.cli import main; sys.exit(main(sys.argv[1:]))"


def _start(run_dir: Path, seed: int, flwr_home: Path) -> tuple[subprocess.Popen, Path]:
    """``hermes-sim run --quick`` (2 sarcoma sites) in a child process of its own group."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(flwr_home)})
    log = run_dir.parent / f"{run_dir.name}.log"
    command = [sys.executable, "-c", _MAIN, "run", "--quick", "--quiet", "--rounds", str(ROUNDS),
               "--local-iterations", str(LOCAL_ITERATIONS), "--evaluate-every", "0", "--seed", str(seed),
               "--run-dir", str(run_dir)]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return process, log


def _finish(runs: list[tuple[subprocess.Popen, Path]]) -> None:
    """Wait for every run (bounded); a run that fails or overruns fails the test, and every process it
    started is stopped by process id first."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        for process, log in runs:
            try:
                code = process.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"hermes-sim did not finish within {RUN_TIMEOUT_S:g} s; see {log}")
            assert code == 0, f"hermes-sim exited with {code}:\n{log.read_text(errors='replace')[-4000:]}"
    finally:
        for process, _log in runs:
            stop_process_tree(process)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / FINAL_MODEL).model.state_dict()


def _differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The entries of two state dicts that are not bitwise equal (same keys, dtypes, shapes and bytes)."""
    assert sorted(a) == sorted(b)
    return [k for k in sorted(a) if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


def test_same_seed_gives_bitwise_identical_weights_whatever_the_load(tmp_path: Path) -> None:
    start = time.monotonic()
    alone = tmp_path / "seed0-alone" / "run"
    _finish([_start(alone, 0, tmp_path / "seed0-alone" / "flwr-home")])
    quiet_s = time.monotonic() - start
    # the same seed again, racing a run with another seed for the cores
    loaded, other = tmp_path / "seed0-loaded" / "run", tmp_path / "seed1" / "run"
    _finish([_start(loaded, 0, tmp_path / "seed0-loaded" / "flwr-home"),
             _start(other, 1, tmp_path / "seed1" / "flwr-home")])
    print(f"quick federated run alone: {quiet_s:.0f} s; two runs side by side: "
          f"{time.monotonic() - start - quiet_s:.0f} s")

    reference = _weights(alone)
    assert len(reference) > 100 and all(t.dtype == torch.float32 for t in reference.values() if t.is_floating_point())
    same = _differences(reference, _weights(loaded))
    assert not same, f"same seed, different weights in {len(same)} of {len(reference)} tensors: {same[:5]}"
    changed = _differences(reference, _weights(other))
    assert len(changed) > len(reference) // 2, f"seed 1 changed only {changed} (of {len(reference)} tensors)"
    for run in (alone, loaded, other):
        assert wait_until_gone(run, EXIT_GRACE_S) == [], f"processes still working in {run}"
