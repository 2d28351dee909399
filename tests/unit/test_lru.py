"""LRU: parallel scan == sequential loop, causality, left-padding invariance, stable init, gradients."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from model.lru import LRU, LRUSequenceModel, lru_scan_parallel, lru_scan_reference


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _random_lambdas(num_channels: int, dtype: torch.dtype = torch.complex128) -> Tensor:
    radius = 0.5 + 0.49 * torch.rand(num_channels, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(num_channels, dtype=torch.float64)
    return torch.polar(radius, phase).to(dtype)


@pytest.mark.parametrize("length", [1, 2, 3, 5, 8, 13, 16, 50, 64, 100])
def test_parallel_scan_matches_sequential_loop(length: int) -> None:
    lambdas = _random_lambdas(6)
    inputs = torch.randn(3, length, 6, dtype=torch.complex128)
    torch.testing.assert_close(lru_scan_parallel(lambdas, inputs), lru_scan_reference(lambdas, inputs), atol=1e-12, rtol=1e-12)


def test_parallel_scan_float32_and_closed_form() -> None:
    lambdas = _random_lambdas(4, torch.complex64)
    inputs = torch.randn(2, 37, 4, dtype=torch.complex64)
    parallel = lru_scan_parallel(lambdas, inputs)
    torch.testing.assert_close(parallel, lru_scan_reference(lambdas, inputs), atol=1e-5, rtol=1e-5)
    # Independent check of the recurrence itself: h_t = sum_k lambda^(t-k) u_k.
    t = 20
    powers = lambdas[None, :] ** torch.arange(t, -1, -1)[:, None]  # [t+1, H]
    torch.testing.assert_close(parallel[:, t], (powers * inputs[:, : t + 1]).sum(1), atol=1e-5, rtol=1e-5)


def test_parallel_scan_gradients_match_reference() -> None:
    lambdas = _random_lambdas(3).requires_grad_()
    inputs = torch.randn(2, 11, 3, dtype=torch.complex128, requires_grad=True)
    grads = []
    for scan in (lru_scan_parallel, lru_scan_reference):
        out = scan(lambdas, inputs)
        (out.real.sum() + out.imag.square().sum()).backward()
        grads.append((lambdas.grad.clone(), inputs.grad.clone()))
        lambdas.grad, inputs.grad = None, None
    torch.testing.assert_close(grads[0], grads[1])


def test_lru_init_is_on_the_stable_ring_with_normalised_input_gain() -> None:
    lru = LRU(dim=8, state_dim=512, r_min=0.8, r_max=0.99, max_phase=math.pi / 2)
    lambdas = lru.lambdas().detach()
    assert lambdas.abs().max() < 1.0
    assert lambdas.abs().min() >= 0.8 - 1e-6 and lambdas.abs().max() <= 0.99 + 1e-6
    assert lambdas.angle().min() >= 0 and lambdas.angle().max() <= math.pi / 2 + 1e-6
    gamma = lru.gamma_log.exp().detach()
    torch.testing.assert_close(gamma, (1 - lambdas.abs() ** 2).sqrt(), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="r_max=1.2"):
        LRU(dim=4, r_min=0.5, r_max=1.2)


def test_lru_parallel_and_sequential_layers_agree() -> None:
    lru = LRU(dim=8)
    x = torch.randn(2, 19, 8)
    parallel = lru(x)
    lru.use_parallel_scan = False
    torch.testing.assert_close(parallel, lru(x), atol=1e-5, rtol=1e-5)


def test_real_matmul_projections_equal_the_complex_formula() -> None:
    """forward's real-arithmetic B x and Re(C h) compute the complex-tensor LRU exactly, values and gradients."""
    lru = LRU(16)
    x = torch.randn(3, 9, 16, requires_grad=True)
    grads = []
    for run in (lru.forward, lru.forward_complex):
        out = run(x)
        (out * torch.linspace(-1, 1, 16)).sum().backward()
        grads.append((out.detach(), x.grad.clone(), lru.B_im.grad.clone(), lru.C_im.grad.clone(), lru.nu_log.grad.clone()))
        x.grad = None
        lru.zero_grad()
    for fast, reference in zip(*grads):
        torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-4)


def _model(**kwargs: object) -> LRUSequenceModel:
    model = LRUSequenceModel(dim=16, max_len=32, num_layers=2, **kwargs)
    # Fresh LayerNorms map a zero vector to zero; a trained one maps it to its bias. Give
    # them non-zero biases so padding leaks would show up here rather than after training.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.bias.normal_()
    return model.eval()  # dropout off: outputs must be deterministic to compare


def test_sequence_model_is_causal() -> None:
    model = _model()
    x = torch.randn(2, 12, 16)
    mask = torch.ones(2, 12, dtype=torch.bool)
    out = model(x, mask)
    assert out.shape == (2, 12, 16)
    for t in (0, 5, 10):
        changed = x.clone()
        changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
        out_changed = model(changed, mask)
        torch.testing.assert_close(out_changed[:, : t + 1], out[:, : t + 1], atol=1e-6, rtol=0)
        assert (out_changed[:, t + 1] - out[:, t + 1]).abs().max() > 1e-3  # and later outputs do change


@pytest.mark.parametrize("use_parallel_scan", [True, False])
def test_left_padding_does_not_change_the_last_output(use_parallel_scan: bool) -> None:
    model = _model(use_parallel_scan=use_parallel_scan)
    history = torch.randn(1, 7, 16)
    unpadded = model(history, torch.ones(1, 7, dtype=torch.bool))

    extra = 9
    garbage = torch.randn(1, extra, 16) * 100  # padded slots hold junk: it must be ignored
    padded_input = torch.cat([garbage, history], dim=1)
    mask = torch.cat([torch.zeros(1, extra, dtype=torch.bool), torch.ones(1, 7, dtype=torch.bool)], dim=1)
    padded = model(padded_input, mask)

    torch.testing.assert_close(padded[:, -1], unpadded[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[:, extra:], unpadded, atol=1e-5, rtol=1e-5)
    assert padded[:, :extra].abs().max() == 0


def test_batch_with_mixed_padding_matches_each_row_alone() -> None:
    model = _model()
    x = torch.randn(3, 10, 16)
    lengths = [10, 4, 1]
    mask = torch.arange(10)[None, :] >= (10 - torch.tensor(lengths))[:, None]
    batched = model(x, mask)
    for row, length in enumerate(lengths):
        alone = model(x[row : row + 1, 10 - length :], torch.ones(1, length, dtype=torch.bool))
        torch.testing.assert_close(batched[row, -1], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_gradients_flow_to_lambda_parameters() -> None:
    model = LRUSequenceModel(dim=8, max_len=16, num_layers=1)
    x = torch.randn(4, 9, 8)
    mask = torch.ones(4, 9, dtype=torch.bool)
    model(x, mask)[:, -1].square().sum().backward()
    lru = model.blocks[0].lru
    for name in ("nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im", "D"):
        grad = getattr(lru, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="disagree"):
        _model()(torch.randn(2, 5, 16), torch.ones(2, 6, dtype=torch.bool))


def test_feed_forward_is_square_by_default() -> None:
    """fMRLRec's LRU uses square feed-forward layers (the winner of BENCHMARKS.md session 5)."""
    model = LRUSequenceModel(16, max_len=5, num_layers=2)
    assert all(block.ffn.gate.out_features == 16 for block in model.blocks)
