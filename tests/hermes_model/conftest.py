from pathlib import Path

import numpy as np
import pytest
import torch

from hermes_model import build_model

DATA = Path(__file__).resolve().parents[1] / "data"
# The shared, read-only spec folder next to the checkout: it holds the float64 golden vectors.
SPEC = Path(__file__).resolve().parents[2] / ".." / "shared" / "spec"


def read_manifest(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) rows of a state-dict manifest (.tsv: name, shape as AxB, numel)."""
    lines = (DATA / name).read_text().splitlines()[1:]
    return [(row.split("\t")[0], tuple(int(s) for s in row.split("\t")[1].split("x"))) for row in lines]


def golden_weights(manifest: str) -> dict[str, torch.Tensor]:
    """Spec section 6: randn(shape) * 0.05 per manifest row, in file order, from one generator seeded 0."""
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) * 0.05 for name, shape in read_manifest(manifest)}


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    with np.load(DATA / "hermes_r_base8_golden.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def golden_model() -> torch.nn.Module:
    model = build_model("hermes-r", base_channels=8, task_slots=72, modality_slots=6)
    model.load_state_dict(golden_weights("hermes_r_base8_state_dict.tsv"), strict=True)
    return model.eval()


def golden_inputs(golden: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(golden["x"]), torch.from_numpy(golden["task_ids"]),
            torch.from_numpy(golden["modality_ids"]))


def load_spec_golden(name: str) -> dict[str, np.ndarray]:
    """Arrays of ``../shared/spec/<name>`` (relative to the repository root); skips the test when absent."""
    path = SPEC / name
    if not path.is_file():
        pytest.skip(f"{name} not found in {SPEC.resolve()} (the shared spec folder next to the checkout)")
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
