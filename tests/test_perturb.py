"""The perturbation engine against hand computations: init norms, normalised steps, projection, padding."""

import math

import pytest
import torch

from carlrar.perturb import ascent_step, init_delta, normalize_grad, project


def test_l2_init_bounds_padding_and_expected_norm():
    L, d = 500, 64
    mask = torch.zeros(2, L + 10, dtype=torch.long)
    mask[0, :L], mask[1, :100] = 1, 1
    delta = init_delta(torch.empty(2, L + 10, d), mask, 0.6, "l2", torch.Generator().manual_seed(0))
    assert delta[0, L:].abs().sum() == 0 and delta[1, 100:].abs().sum() == 0  # padding untouched
    assert delta[0].abs().max() <= 0.6 / math.sqrt(L * d)  # uniform(−1, 1) · γ / sqrt(L·d)
    assert delta[1].abs().max() <= 0.6 / math.sqrt(100 * d)
    # E‖δ‖² = L·d · (γ² / (L·d)) · E[u²] = γ² / 3 for every length: ‖δ‖ ≈ 0.6 / √3 = 0.3464
    norms = delta.flatten(1).norm(dim=1)
    assert norms[0].item() == pytest.approx(0.6 / math.sqrt(3), rel=0.02)
    assert norms[1].item() == pytest.approx(0.6 / math.sqrt(3), rel=0.05)


def test_linf_and_zero_init():
    mask = torch.tensor([[1, 1, 0]])
    delta = init_delta(torch.empty(1, 3, 1000), mask, 0.3, "linf", torch.Generator().manual_seed(0))
    assert delta[0, :2].abs().max() <= 0.3 and delta[0, :2].abs().max() > 0.29 and delta[0, 2].abs().sum() == 0
    assert torch.equal(init_delta(torch.empty(1, 3, 4), mask, 0.0), torch.zeros(1, 3, 4))


def test_normalised_gradient_per_example():
    g = torch.tensor([[[3.0, 4.0]], [[0.0, -2.0]]])  # two examples, 1 token, 2 dims
    assert torch.allclose(normalize_grad(g, "l2"), torch.tensor([[[0.6, 0.8]], [[0.0, -1.0]]]))
    assert torch.allclose(normalize_grad(g, "linf"), torch.tensor([[[0.75, 1.0]], [[0.0, -1.0]]]))
    assert torch.equal(normalize_grad(torch.zeros(1, 1, 2)), torch.zeros(1, 1, 2))  # 1e-8 guard, no NaN


def test_projection_l2_linf_and_unbounded():
    d = torch.tensor([[[3.0, 4.0]], [[0.3, 0.4]]])  # norms 5 and 0.5
    assert torch.allclose(project(d, 1.0, "l2"), torch.tensor([[[0.6, 0.8]], [[0.3, 0.4]]]))
    assert torch.equal(project(d, 0.0, "l2"), d)  # ε = 0: unbounded
    assert torch.allclose(project(d, 0.35, "linf"), torch.tensor([[[0.35, 0.35]], [[0.3, 0.35]]]))


def test_ascent_step_ignores_and_keeps_padding_zero():
    delta = torch.zeros(1, 2, 2)
    grad = torch.tensor([[[3.0, 4.0], [7.0, 7.0]]])  # second position is padding
    out = ascent_step(delta, grad, torch.tensor([[1, 0]]), step_size=0.1, eps=0.0)
    assert torch.allclose(out, torch.tensor([[[0.06, 0.08], [0.0, 0.0]]]))
    out = ascent_step(out, grad, torch.tensor([[1, 0]]), step_size=0.1, eps=0.1)  # norm 0.2 → back to 0.1
    assert torch.allclose(out, torch.tensor([[[0.06, 0.08], [0.0, 0.0]]]))
