"""Matryoshka layers: exact truncation (slice property), fast path == block reference, loss sums."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from matryoshka.layers import (
    MatryoshkaLinear,
    MatryoshkaLoss,
    matryoshka_loss,
    truncate,
    validate_sizes,
)

SIZES = (2, 4, 8, 16)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _perturb_beyond(x: Tensor, prefix: int) -> Tensor:
    """A copy of x whose features past `prefix` are replaced by fresh noise."""
    y = x.clone()
    y[..., prefix:] = torch.randn_like(y[..., prefix:]) * 10
    return y


@pytest.mark.parametrize("in_nested", [False, True])
def test_linear_slice_property_every_size(in_nested: bool) -> None:
    in_sizes = (3, 6, 12, 24) if in_nested else None  # SIZES scaled to a 24-wide input
    layer = MatryoshkaLinear(24, 16, SIZES, in_sizes=in_sizes)
    x = torch.randn(3, 5, 24)
    full = layer(x)
    for size in SIZES:
        prefix = layer.in_prefix(size)
        assert prefix == (size * 24 // 16 if in_nested else 24)
        alone = layer.forward_prefix(x[..., :prefix], size)
        assert alone.shape == (3, 5, size)
        torch.testing.assert_close(full[..., :size], alone, atol=1e-6, rtol=0)
        # ...and the truncated outputs genuinely ignore everything past the prefix.
        if prefix < 24:
            torch.testing.assert_close(layer(_perturb_beyond(x, prefix))[..., :size], full[..., :size], atol=1e-6, rtol=0)


def test_linear_nested_outputs_do_depend_on_later_inputs_in_later_blocks() -> None:
    # Guards against a mask that is all zeros/too strict: the last block must see the whole input.
    layer = MatryoshkaLinear(16, 16, SIZES, in_sizes=SIZES)
    x = torch.randn(4, 16)
    changed = layer(_perturb_beyond(x, 8)) - layer(x)
    assert changed[:, :8].abs().max() == 0
    assert changed[:, 8:].abs().min() > 0


@pytest.mark.parametrize("in_nested", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_masked_fast_path_matches_block_loop(in_nested: bool, bias: bool) -> None:
    layer = MatryoshkaLinear(12, 16, SIZES, in_sizes=(3, 6, 9, 12) if in_nested else None, bias=bias)
    with torch.no_grad():
        layer.weight.normal_()  # also fills the masked-out entries, which must then be ignored
    x = torch.randn(7, 12)
    torch.testing.assert_close(layer(x), layer.forward_reference(x), atol=1e-5, rtol=1e-5)


def test_linear_mask_gets_no_gradient_outside_blocks() -> None:
    layer = MatryoshkaLinear(4, 4, (2, 4), in_sizes=(2, 4))
    layer(torch.randn(5, 4)).sum().backward()
    assert layer.weight.grad[:2, 2:].abs().max() == 0
    assert layer.weight.grad[2:, :].abs().min() > 0


def test_linear_init_scale_uses_block_fan_in() -> None:
    layer = MatryoshkaLinear(64, 64, (4, 64), in_sizes=(4, 64))
    assert layer.weight[:4, :4].abs().max() <= 0.5  # 1/sqrt(4)
    assert layer.weight[:4, 4:].abs().max() == 0
    assert layer.weight[4:].abs().max() <= 0.125  # 1/sqrt(64)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ((), "non-empty"),
        ((4, 0, 8), "size 0"),
        ((4, -2), "size -2"),
        ((4, 32), "size 32 .* exceeds dim=16"),
        ((8, 4, 16), "size 4 .*sorted"),
        ((4, 4, 16), "size 4 .*unique"),
    ],
)
def test_validate_sizes_errors_name_the_size_and_dim(sizes: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        validate_sizes(sizes, 16)
    assert "16" in str(info.value)


def test_validate_sizes_full_and_partial() -> None:
    assert validate_sizes([2, 4], 16) == (2, 4)
    with pytest.raises(ValueError, match="last size 4 must equal dim=16"):
        validate_sizes([2, 4], 16, require_full=True)
    with pytest.raises(ValueError, match="last size 8 must equal dim=16"):
        MatryoshkaLinear(8, 16, (4, 8))
    with pytest.raises(ValueError, match="same length"):
        MatryoshkaLinear(8, 16, (4, 8, 16), in_sizes=(4, 8))


def test_truncate() -> None:
    x = torch.arange(12.0).reshape(2, 6)
    assert truncate(x, 3).tolist() == [[0.0, 1.0, 2.0], [6.0, 7.0, 8.0]]
    with pytest.raises(ValueError, match="size 7"):
        truncate(x, 7)


def _in_batch_softmax(user: Tensor, items: Tensor, temperature: float = 1.0) -> Tensor:
    logits = user @ items.T / temperature
    return torch.nn.functional.cross_entropy(logits, torch.arange(user.shape[0]))


def test_loss_is_weighted_sum_of_per_size_losses() -> None:
    user, items = torch.randn(6, 16), torch.randn(6, 16)
    weights = (0.5, 1.0, 2.0, 4.0)
    loss = MatryoshkaLoss(_in_batch_softmax, SIZES, weights=weights)
    total, per_size = loss(user, items, temperature=0.5)
    manual = {s: _in_batch_softmax(user[:, :s], items[:, :s], temperature=0.5) for s in SIZES}
    assert set(per_size) == set(SIZES)
    for size in SIZES:
        torch.testing.assert_close(per_size[size], manual[size])
    expected = sum(w * manual[s] for s, w in zip(SIZES, weights))
    torch.testing.assert_close(total, expected)
    # Distinct sizes give distinct losses, so the check above can tell sizes apart.
    assert len({round(v.item(), 6) for v in per_size.values()}) == len(SIZES)


def test_loss_default_weights_are_one_and_extra_tensors_are_sliced() -> None:
    user, positives, negatives = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 3, 8)
    seen_dims: list[tuple[int, int, int]] = []

    def bpr(u: Tensor, pos: Tensor, negatives: Tensor) -> Tensor:
        seen_dims.append((u.shape[-1], pos.shape[-1], negatives.shape[-1]))
        pos_score = (u * pos).sum(-1, keepdim=True)
        neg_score = torch.einsum("bd,bkd->bk", u, negatives)
        return -torch.nn.functional.logsigmoid(pos_score - neg_score).mean()

    total, per_size = MatryoshkaLoss(bpr, (2, 8))(user, positives, sliced={"negatives": negatives})
    assert seen_dims == [(2, 2, 2), (8, 8, 8)]
    torch.testing.assert_close(total, per_size[2] + per_size[8])
    torch.testing.assert_close(per_size[2], bpr(user[:, :2], positives[:, :2], negatives[..., :2]))


def test_loss_callable_form_and_errors() -> None:
    total, per_size = matryoshka_loss(lambda size: torch.tensor(float(size)), (1, 2, 3), weights=(1.0, 10.0, 100.0))
    assert total.item() == 1 + 20 + 300
    assert {k: v.item() for k, v in per_size.items()} == {1: 1.0, 2: 2.0, 3: 3.0}
    with pytest.raises(ValueError, match="2 weights for 3 sizes"):
        matryoshka_loss(lambda size: torch.tensor(0.0), (1, 2, 3), weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="smaller than the largest size 16"):
        MatryoshkaLoss(_in_batch_softmax, SIZES)(torch.randn(2, 8), torch.randn(2, 8))


def test_gradients_reach_every_block_through_the_loss() -> None:
    layer = MatryoshkaLinear(16, 16, SIZES, in_sizes=SIZES)
    user, items = layer(torch.randn(6, 16)), layer(torch.randn(6, 16))
    total, _ = MatryoshkaLoss(_in_batch_softmax, SIZES)(user, items)
    total.backward()
    for start, end in zip((0, *SIZES[:-1]), SIZES):
        assert layer.weight.grad[start:end].abs().sum() > 0
