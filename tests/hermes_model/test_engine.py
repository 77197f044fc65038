"""Tests for hermes_model.engine: config, EMA, loss with deep supervision, train step, checkpoints."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hermes_model.engine import EngineConfig, ModelEMA, TrainEngine, compute_loss
from hermes_model.losses import hermes_loss
from hermes_model.optim import lr_at


class TinyHermes(nn.Module):
    """Stand-in with the Hermes forward signature: (x, task_ids, modality_ids) -> (seg, modality_logits)."""

    def __init__(self, task_slots: int = 8, modality_slots: int = 6, deep_supervision: bool = False):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm3d(4)
        self.head = nn.Conv3d(4, 1, 1)
        self.task_bias = nn.Embedding(task_slots, 1)
        self.modality = nn.Linear(4, modality_slots)
        self.deep_supervision = deep_supervision

    def forward(self, x, task_ids, modality_ids):
        h = torch.relu(self.norm(self.conv(x)))
        bias = self.task_bias(task_ids.clamp_min(0)).reshape(*task_ids.shape, 1, 1, 1)
        seg = self.head(h) + bias  # (B, n, D, H, W)
        modality_logits = self.modality(h.mean(dim=(2, 3, 4)))
        if self.deep_supervision:
            return [seg, F.avg_pool3d(seg, 2)], modality_logits
        return seg, modality_logits


def make_batch(seed: int, size: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(2, 1, size, size, size, generator=g),
        "target": (torch.rand(2, 3, size, size, size, generator=g) > 0.7).to(torch.uint8),
        "task_ids": torch.tensor([[1, 2, -1], [0, 3, 4]]),
        "modality_ids": torch.tensor([[0], [-1]]),
    }


def tiny_model(seed: int = 0, **kwargs) -> TinyHermes:
    torch.manual_seed(seed)
    return TinyHermes(**kwargs)


def small_config(**overrides) -> EngineConfig:
    base = dict(iters_per_epoch=2, warmup_epochs=1, total_epochs=10, lr=1e-2)
    return EngineConfig(**{**base, **overrides})


def assert_modules_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------------------------------- config


def test_config_defaults_are_the_published_recipe():
    cfg = EngineConfig()
    recipe = ("lamb", 2e-3, 1e-5, (0.9, 0.999), 1e-5)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps) == recipe
    assert (cfg.warmup_epochs, cfg.total_epochs, cfg.iters_per_epoch) == (5, 200, 400)
    assert (cfg.precision, cfg.grad_clip, cfg.ema_decay, cfg.proximal_mu) == ("fp32", None, 0.99, 0.0)
    assert EngineConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["betas"] == [0.9, 0.999]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("optimizer", "adam"),
        ("lr", -1.0),
        ("weight_decay", -0.1),
        ("betas", (0.9, 1.5)),
        ("eps", 0.0),
        ("momentum", 1.0),
        ("warmup_epochs", -1),
        ("total_epochs", 0),
        ("iters_per_epoch", 0),
        ("precision", "fp16"),
        ("grad_clip", 0.0),
        ("ema_decay", 1.5),
        ("channels_last", "yes"),
        ("proximal_mu", -0.5),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="learning_rate"):
        EngineConfig.from_dict({"learning_rate": 0.1})


# ------------------------------------------------------------------------------------------- EMA


def test_ema_matches_hand_computation():
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = ModelEMA(model, decay=0.99)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())

    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, -1.0]]))
    ema.update(model, step=0)  # alpha = 0: plain copy
    assert torch.equal(ema.module[0].weight, torch.tensor([[3.0, -1.0]]))

    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[5.0, 1.0]]))
        model[1].running_mean.fill_(7.0)
    ema.update(model, step=1)  # alpha = 1 - 1/2 = 0.5
    torch.testing.assert_close(ema.module[0].weight, torch.tensor([[4.0, 0.0]]))
    assert torch.equal(ema.module[1].running_mean, torch.tensor([7.0]))  # buffers copied, not averaged

    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[104.0, 100.0]]))
    ema.update(model, step=1000)  # alpha = min(1 - 1/1001, 0.99) = 0.99
    torch.testing.assert_close(ema.module[0].weight, torch.tensor([[0.99 * 4.0 + 1.04, 1.0]]))
    model.train()
    assert not ema.module.training


# ------------------------------------------------------------------------------------------- loss


def test_single_output_loss_is_hermes_loss():
    batch = make_batch(0)
    model = tiny_model()
    seg, mod = model(batch["image"], batch["task_ids"], batch["modality_ids"])
    terms = compute_loss((seg, mod), batch)
    ref = hermes_loss(seg, mod, batch["target"], batch["task_ids"], batch["modality_ids"])
    for key in ("total", "bce", "dice", "modality"):
        torch.testing.assert_close(getattr(terms, key), getattr(ref, key))


def test_deep_supervision_loss_is_half_main_half_aux():
    batch = make_batch(1)
    model = tiny_model(deep_supervision=True)
    (main, aux), mod = model(batch["image"], batch["task_ids"], batch["modality_ids"])
    terms = compute_loss(([main, aux], mod), batch)
    ids, mids = batch["task_ids"], batch["modality_ids"]
    full = hermes_loss(main, mod, batch["target"], ids, mids)
    half = hermes_loss(aux, mod, batch["target"][:, :, ::2, ::2, ::2], ids, mids)  # nearest, factor 2
    expected = 0.5 * (full.bce + full.dice) + 0.5 * (half.bce + half.dice) + 0.01 * full.modality
    torch.testing.assert_close(terms.total, expected)
    torch.testing.assert_close(terms.modality, full.modality)
    assert not torch.isclose(terms.total, full.total)  # the aux term really contributes

    same_grid = compute_loss(([main, main * 2], mod), batch)
    twice = hermes_loss(main * 2, mod, batch["target"], ids, mids)
    expected = 0.5 * (full.bce + full.dice) + 0.5 * (twice.bce + twice.dice) + 0.01 * full.modality
    torch.testing.assert_close(same_grid.total, expected)


def test_compute_loss_rejects_bad_outputs():
    batch = make_batch(0)
    seg = torch.zeros(2, 3, 8, 8, 8)
    mod = torch.zeros(2, 6)
    with pytest.raises(ValueError, match="pair"):
        compute_loss(seg, batch)
    with pytest.raises(ValueError, match="main, aux"):
        compute_loss(([seg, seg, seg], mod), batch)
    with pytest.raises(ValueError, match="integer factors"):
        compute_loss(([seg, torch.zeros(2, 3, 3, 3, 3)], mod), batch)


# ------------------------------------------------------------------------------------------- training


def test_schedule_position_drives_lr():
    cfg = small_config(warmup_epochs=2, total_epochs=6)
    engine = TrainEngine(tiny_model(), cfg)
    batch = make_batch(0)
    seen = []
    for it in range(6):
        metrics = engine.train_step(batch)
        expected = lr_at(it // 2, cfg.lr, warmup_epochs=2, total_epochs=6)
        assert metrics["lr"] == pytest.approx(expected, rel=1e-12)
        assert engine.optimizer.param_groups[0]["lr"] == metrics["lr"]
        seen.append(metrics["lr"])
    assert engine.iteration == 6
    assert seen[0] == seen[1] < seen[2] == seen[3] < seen[4]  # warm-up, one value per epoch
    engine.iteration = 11  # epoch 5 of 6: last poly value
    assert engine.current_lr() == pytest.approx(cfg.lr * (1 / 6) ** 0.9)
    assert engine.train_step(batch)["lr"] == pytest.approx(cfg.lr * (1 / 6) ** 0.9)


def test_train_step_reports_finite_metrics_and_updates_ema():
    engine = TrainEngine(tiny_model(), small_config(grad_clip=10.0))
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    metrics = engine.train_step(make_batch(0))
    assert set(metrics) == {"loss", "bce", "dice", "modality", "lr", "grad_norm"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["loss"] == pytest.approx(metrics["bce"] + metrics["dice"] + 0.01 * metrics["modality"])
    assert not torch.equal(engine.model.conv.weight, before["conv.weight"])
    # step 0 of the EMA copies the weights
    assert_modules_equal(engine.ema.module, engine.model)
    engine.train_step(make_batch(1))
    assert not torch.equal(engine.ema.module.conv.weight, engine.model.conv.weight)


@pytest.mark.parametrize("optimizer", ["lamb", "adamw", "sgd"])
def test_resume_equivalence(tmp_path, optimizer):
    cfg = small_config(optimizer=optimizer, grad_clip=5.0)
    running = TrainEngine(tiny_model(0), cfg)
    for step in range(3):
        running.train_step(make_batch(step))
    path = running.save(tmp_path / "engine.pt")
    # weights_only-loadable, and a model with other initial weights is fully overwritten
    raw = torch.load(path, weights_only=True)
    assert raw["iteration"] == 3 and raw["config"] == cfg.to_dict()
    resumed = TrainEngine.load(path, tiny_model(123))
    assert resumed.iteration == 3 and resumed.config == cfg
    m_run = running.train_step(make_batch(3))
    m_res = resumed.train_step(make_batch(3))
    assert m_run == m_res
    assert_modules_equal(running.model, resumed.model)
    assert_modules_equal(running.ema.module, resumed.ema.module)

    # load_state into an existing engine behaves the same
    other = TrainEngine(tiny_model(7), cfg)
    other.load_state(path)
    other.train_step(make_batch(3))
    assert_modules_equal(other.model, resumed.model)


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    engine = TrainEngine(tiny_model(), small_config())
    path = engine.save(tmp_path / "ckpt.pt")
    original = path.read_bytes()
    engine.train_step(make_batch(0))
    engine.state_dict = lambda: {"unpicklable": lambda: None}  # torch.save fails mid-write
    with pytest.raises(Exception, match="pickle|lambda"):
        engine.save(path)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temp file left behind
    assert torch.load(path, weights_only=True)["iteration"] == 0


def test_load_rejects_foreign_checkpoint(tmp_path):
    engine = TrainEngine(tiny_model(), small_config())
    with pytest.raises(ValueError, match="format"):
        engine.load_state_dict({"model": {}})


def test_bf16_step_on_cpu_is_finite_and_uses_bf16():
    engine = TrainEngine(tiny_model(), small_config(precision="bf16"))
    dtypes = []
    engine.model.conv.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    before = engine.model.conv.weight.detach().clone()
    metrics = engine.train_step(make_batch(0))
    assert dtypes == [torch.bfloat16]
    assert math.isfinite(metrics["loss"])
    assert engine.model.conv.weight.dtype == torch.float32
    assert not torch.equal(engine.model.conv.weight, before)


def test_channels_last_step_runs():
    engine = TrainEngine(tiny_model(), small_config(channels_last=True))
    assert engine.model.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert math.isfinite(engine.train_step(make_batch(0))["loss"])
    reference = TrainEngine(tiny_model(), small_config())
    reference.train_step(make_batch(0))
    torch.testing.assert_close(engine.model.conv.weight, reference.model.conv.weight, rtol=1e-4, atol=1e-6)


def test_grad_clip_bounds_the_gradient_norm():
    engine = TrainEngine(tiny_model(), small_config(grad_clip=1e-3))
    metrics = engine.train_step(make_batch(0))
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in engine.model.parameters()]))
    assert metrics["grad_norm"] > 1e-3  # clipping was active
    assert float(total) <= 1e-3 * (1 + 1e-5)


def test_nan_input_raises_without_stepping():
    engine = TrainEngine(tiny_model(), small_config())
    engine.train_step(make_batch(0))
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    batch = make_batch(1)
    batch["image"][0, 0, 1, 2, 3] = float("nan")
    with pytest.raises(RuntimeError, match="iteration 1"):
        engine.train_step(batch)
    assert engine.iteration == 1
    for key, value in engine.model.state_dict().items():  # BatchNorm running stats included
        assert torch.equal(value, before[key]), key
    assert math.isfinite(engine.train_step(make_batch(2))["loss"])  # the engine is still usable


def test_batch_validation():
    engine = TrainEngine(tiny_model(), small_config())
    batch = make_batch(0)
    del batch["task_ids"]
    with pytest.raises(ValueError, match="task_ids"):
        engine.train_step(batch)
    batch = make_batch(0)
    batch["image"] = batch["image"][:, 0]
    with pytest.raises(ValueError, match="image"):
        engine.train_step(batch)


# ------------------------------------------------------------------------------------------- FedProx


def test_fedprox_term_pulls_toward_reference():
    cfg = dict(optimizer="sgd", momentum=0.0, weight_decay=0.0, warmup_epochs=0, lr=0.1)
    plain = TrainEngine(tiny_model(0), small_config(**cfg))
    prox = TrainEngine(tiny_model(0), small_config(proximal_mu=2.0, **cfg))
    w0 = {k: v.detach().clone() for k, v in prox.model.named_parameters()}
    reference = {k: torch.zeros_like(v) for k, v in w0.items() if k != "modality.bias"}  # a subset
    prox.set_proximal_reference(reference)
    batch = make_batch(0)
    m_plain = plain.train_step(batch)
    m_prox = prox.train_step(batch)
    sq = sum(float(w0[k].square().sum()) for k in reference)
    assert m_prox["proximal"] == pytest.approx(0.5 * 2.0 * sq, rel=1e-5)
    assert "proximal" not in m_plain
    p_plain = dict(plain.model.named_parameters())
    for name, p in prox.model.named_parameters():
        # SGD: the extra step is exactly -lr * mu * (w0 - w_ref) on the shared params, 0 elsewhere
        extra = -0.1 * 2.0 * w0[name] if name in reference else torch.zeros_like(p)
        torch.testing.assert_close(p - p_plain[name], extra, rtol=1e-4, atol=1e-6)
    dist = sum(float(p.detach().square().sum()) for n, p in prox.model.named_parameters() if n in reference)
    dist_plain = sum(float(p.detach().square().sum()) for n, p in p_plain.items() if n in reference)
    assert dist < dist_plain


def test_fedprox_reference_validation_and_checkpoint(tmp_path):
    engine = TrainEngine(tiny_model(), small_config(proximal_mu=0.5))
    with pytest.raises(ValueError, match="not in the model"):
        engine.set_proximal_reference({"nope.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="conv.weight"):
        engine.set_proximal_reference({"conv.weight": torch.zeros(3)})
    state = engine.model.state_dict()  # buffers are accepted and ignored
    engine.set_proximal_reference(state)
    path = engine.save(tmp_path / "prox.pt")
    loaded = TrainEngine.load(path, tiny_model(5))
    assert loaded._proximal_reference.keys() == dict(engine.model.named_parameters()).keys()
    assert "proximal" in loaded.train_step(make_batch(0))


# ------------------------------------------------------------------------------------------- real model


def test_real_hermes_r_step_and_checkpoint(tmp_path):
    if importlib.util.find_spec("hermes_model.factory") is None:
        pytest.skip("hermes_model.factory (build_model) is not available yet")
    from hermes_model.factory import build_model

    def build(seed):
        torch.manual_seed(seed)
        return build_model("hermes-r", base_channels=8, task_slots=72, modality_slots=6)

    engine = TrainEngine(build(0), small_config(grad_clip=1.0))
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(1, 1, 32, 32, 32, generator=g),
        "target": (torch.rand(1, 2, 32, 32, 32, generator=g) > 0.5).float(),
        "task_ids": torch.tensor([[3, -1]]),
        "modality_ids": torch.tensor([[0]]),
    }
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    metrics = engine.train_step(batch)
    assert all(math.isfinite(v) for v in metrics.values())
    assert engine.iteration == 1
    assert any(not torch.equal(v, before[k]) for k, v in engine.model.state_dict().items())
    restored = TrainEngine.load(engine.save(tmp_path / "hermes_r.pt"), build(1))
    assert restored.iteration == 1
    assert_modules_equal(restored.model, engine.model)
    assert_modules_equal(restored.ema.module, engine.ema.module)
    assert restored.optimizer.state_dict()["param_groups"] == engine.optimizer.state_dict()["param_groups"]
