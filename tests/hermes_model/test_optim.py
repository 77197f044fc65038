"""Tests for hermes_model.optim: apex-equivalent LAMB, optimiser factory, learning-rate schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from hermes_model.optim import OPTIMIZER_CHOICES, ApexLamb, build_optimizer, lr_at, lr_at_iteration

# ---------------------------------------------------------------------------------------------------
# A float64 re-implementation of apex FusedLAMB (csrc/multi_tensor_lamb.cu, adam_w_mode=1,
# bias_correction=1, grad_averaging=1, use_nvlamb=False), written from the formula, whole tensors at once.
# ---------------------------------------------------------------------------------------------------


class ReferenceLamb:
    def __init__(self, params, decays, lr, betas, eps, max_grad_norm):
        self.params = [p.detach().clone().double() for p in params]
        self.decays = decays
        self.lr, self.betas, self.eps, self.max_grad_norm = lr, betas, eps, max_grad_norm
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        clip = total / self.max_grad_norm if total > self.max_grad_norm else 1.0
        for i, (p, g, wd) in enumerate(zip(self.params, grads, self.decays, strict=True)):
            g = g.double() / clip
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            m_hat = self.m[i] / (1 - b1**self.t)
            v_hat = self.v[i] / (1 - b2**self.t)
            update = m_hat / (torch.sqrt(v_hat) + self.eps) + wd * p
            ratio = 1.0
            if wd != 0:
                w_norm = float(p.norm())
                u_norm = float(update.norm())
                if w_norm > 0 and u_norm > 0:
                    ratio = w_norm / u_norm
            self.params[i] = p - self.lr * ratio * update
        return total


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, kernel_size=3)
        self.fc = nn.Linear(3 * 6, 4)
        self.scale = nn.Parameter(torch.zeros(4))  # norm 0 at step 1: trust ratio must fall back to 1

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.fc(h) * (1 + self.scale)


def _param_groups(net: SmallNet, decay: float):
    with_decay = [net.conv.weight, net.fc.weight, net.scale]
    without = [net.conv.bias, net.fc.bias]
    groups = [{"params": with_decay, "weight_decay": decay}, {"params": without, "weight_decay": 0.0}]
    return groups, with_decay + without, [decay] * len(with_decay) + [0.0] * len(without)


@pytest.mark.parametrize("lr", [2e-3, 5e-2])
def test_lamb_matches_apex_formula_in_float64(lr):
    torch.manual_seed(0)
    net = SmallNet().double()
    groups, ordered, decays = _param_groups(net, decay=0.05)
    opt = build_optimizer(groups, "lamb", lr=lr, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-5)
    assert isinstance(opt, ApexLamb)
    ref = ReferenceLamb(ordered, decays, lr=lr, betas=(0.9, 0.999), eps=1e-5, max_grad_norm=1.0)
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    clipped_steps = 0
    for step in range(6):
        opt.zero_grad()
        # large loss scale on most steps so the global-norm scaling triggers; a tiny one on step 3
        scale = 1e-4 if step == 3 else 50.0
        (scale * (net(x) - 1.0).square().mean()).backward()
        grads = [p.grad.detach().clone() for p in ordered]
        total = ref.step(grads)
        clipped_steps += total > 1.0
        opt.step()
        for p, expected in zip(ordered, ref.params, strict=True):
            torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)
        # the gradients themselves are left untouched
        for p, g in zip(ordered, grads, strict=True):
            assert torch.equal(p.grad, g)
    assert 1 <= clipped_steps < 6  # both the scaled and the unscaled branch were exercised


def test_lamb_single_step_by_hand():
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))  # norm 5
    opt = ApexLamb([p], lr=0.1, eps=0.0, weight_decay=0.1, max_grad_norm=1.0)
    p.grad = torch.tensor([6.0, 8.0], dtype=torch.float64)  # norm 10 -> scaled by 1/10
    opt.step()
    # step 1 with bias correction: m_hat = g, v_hat = g^2, so the Adam part is sign(g) = [1, 1]
    update = torch.tensor([1.0 + 0.3, 1.0 + 0.4], dtype=torch.float64)
    expected = torch.tensor([3.0, 4.0], dtype=torch.float64) - 0.1 * (5.0 / math.sqrt(3.65)) * update
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=0.0)


def test_lamb_zero_decay_group_has_no_trust_ratio():
    p = nn.Parameter(torch.tensor([30.0, 40.0], dtype=torch.float64))
    opt = ApexLamb([p], lr=0.1, eps=0.0, weight_decay=0.0)
    p.grad = torch.tensor([0.3, -0.4], dtype=torch.float64)  # below max_grad_norm: unscaled
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([29.9, 40.1], dtype=torch.float64))


def test_lamb_state_dict_roundtrip_continues_identically():
    torch.manual_seed(1)
    a = SmallNet()
    b = SmallNet()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 2, 8)
    opt_a = build_optimizer(a.parameters(), "lamb", lr=1e-2)
    for _ in range(2):
        opt_a.zero_grad()
        (10 * a(x).square().mean()).backward()
        opt_a.step()
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b.parameters(), "lamb", lr=1e-2)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # load_state_dict may alias the tensors
    for net, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        (10 * net(x).square().mean()).backward()
        opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_build_optimizer_kinds_and_hyperparameters():
    net = SmallNet()
    adamw = build_optimizer(net.parameters(), "adamw", lr=1e-3, weight_decay=0.01, eps=1e-7)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["eps"] == 1e-7 and adamw.param_groups[0]["weight_decay"] == 0.01
    sgd = build_optimizer(net.parameters(), "sgd", lr=0.1, momentum=0.5)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5
    lamb = build_optimizer(net.parameters())  # CPU parameters: never apex
    assert isinstance(lamb, ApexLamb)
    group = lamb.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["eps"], tuple(group["betas"])) == (
        2e-3,
        1e-5,
        1e-5,
        (0.9, 0.999),
    )
    assert lamb.defaults["max_grad_norm"] == 1.0 and group["bias_correction"] and group["grad_averaging"]


def test_build_optimizer_rejects_bad_input():
    params = list(SmallNet().parameters())
    with pytest.raises(ValueError, match="lamb.*adamw.*sgd.*'adam'"):
        build_optimizer(params, "adam")
    assert set(OPTIMIZER_CHOICES) == {"lamb", "adamw", "sgd"}
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(params, "lamb", lr=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        build_optimizer(params, "sgd", weight_decay=-1.0)
    with pytest.raises(ValueError, match="betas"):
        build_optimizer(params, "adamw", betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="momentum"):
        build_optimizer(params, "sgd", momentum=1.5)


def test_lr_schedule_values():
    base = 2e-3
    assert lr_at(0, base) == pytest.approx(base * math.exp(-10))
    assert lr_at(4, base) == pytest.approx(base * math.exp(-2))
    assert lr_at(5, base) == pytest.approx(base * (1 - 5 / 200) ** 0.9)
    assert lr_at(100, base) == pytest.approx(base * 0.5**0.9)
    assert lr_at(199, base) == pytest.approx(base * (1 / 200) ** 0.9)
    assert lr_at(200, base) == 0.0 and lr_at(250, base) == 0.0
    assert lr_at(0, base, warmup_epochs=0) == base
    warm = [lr_at(e, base) for e in range(5)]
    decay = [lr_at(e, base) for e in range(5, 201)]
    assert warm == sorted(warm) and decay == sorted(decay, reverse=True)
    assert lr_at_iteration(399, base) == lr_at(0, base)
    assert lr_at_iteration(400, base) == lr_at(1, base)
    assert lr_at_iteration(7, base, iters_per_epoch=2, warmup_epochs=0, total_epochs=8) == lr_at(
        3, base, warmup_epochs=0, total_epochs=8
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"epoch": -1}, "epoch"),
        ({"epoch": 1.5}, "epoch"),
        ({"epoch": 0, "total_epochs": 0}, "total_epochs"),
        ({"epoch": 0, "warmup_epochs": 300}, "warmup_epochs"),
        ({"epoch": 0, "base_lr": -1.0}, "base_lr"),
    ],
)
def test_lr_schedule_rejects_bad_input(kwargs, name):
    kwargs = {"base_lr": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=name):
        lr_at(**kwargs)


def test_lr_at_iteration_rejects_bad_iters_per_epoch():
    with pytest.raises(ValueError, match="iters_per_epoch"):
        lr_at_iteration(3, 1e-3, iters_per_epoch=0)
