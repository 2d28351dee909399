"""encoders.dropout: the CPU dropout every model and encoder uses is inverted dropout with the asked probability,
seeded by torch's generator, and the attention spelled out for it equals SDPA's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from encoders.dropout import Dropout, drop_threshold, dropout, keep_mask
from model.sequence import CausalSelfAttentionBlock, SASRec


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_each_element_is_kept_with_probability_one_minus_p_independently_of_its_lane(p):
    torch.manual_seed(0)
    mask = keep_mask((600, 1000), p).reshape(-1).float()  # 600,000 draws: a std of 0.0007 at p = 0.5
    assert mask.mean().item() == pytest.approx(1 - p, abs=0.003)
    for lane in range(3):  # each int64 word gives three elements: none of them biased
        assert mask[lane::3].mean().item() == pytest.approx(1 - p, abs=0.005)
    # neighbours are independent: P(both kept) = (1 - p)^2
    assert (mask[:-1] * mask[1:]).mean().item() == pytest.approx((1 - p) ** 2, abs=0.005)


def test_the_output_keeps_the_input_expectation_and_the_gradient_is_the_same_mask():
    torch.manual_seed(1)
    x = torch.full((400, 1000), 2.0, requires_grad=True)
    out = dropout(x, 0.3)
    kept = out != 0
    scale = 2 ** 16 / (2 ** 16 - drop_threshold(0.3))
    assert torch.equal(out[kept], torch.full_like(out[kept], 2.0 * scale))
    assert out.mean().item() == pytest.approx(2.0, rel=0.005)
    out.sum().backward()
    assert torch.equal(x.grad, kept.float() * scale)


def test_seeded_like_torch_and_off_outside_training():
    x = torch.randn(64, 32)
    torch.manual_seed(7)
    first = dropout(x, 0.2)
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.2), first) and not torch.equal(dropout(x, 0.2), first)
    module = Dropout(0.2).eval()
    assert module(x) is x and dropout(x, 0.0) is x and dropout(x, 0.5, training=False) is x
    assert str(Dropout(0.25)) == "Dropout(p=0.25)" and not list(Dropout(0.1).state_dict())
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(1.0)


def test_the_spelled_out_attention_is_sdpa_and_its_dropout_follows_the_mode():
    torch.manual_seed(0)
    block = CausalSelfAttentionBlock(dim=16, num_heads=2, dropout=0.0)
    block.attn_dropout = 1e-9  # rounds to no drop at all: the CPU path without any mask, against SDPA
    x = torch.randn(3, 7, 16)
    mask = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].expand(3, 1, 7, 7)
    block.train()
    spelled = block(x, mask)
    block.eval()
    assert torch.allclose(spelled, block(x, mask), atol=1e-6)
    # with dropout on, train-mode outputs vary between calls and eval-mode ones do not
    model = SASRec(dim=16, max_len=7, num_layers=1, num_heads=2, dropout=0.3)
    real = torch.ones(3, 7, dtype=torch.bool)
    model.train()
    assert not torch.allclose(model(x, real), model(x, real))
    model.eval()
    assert torch.equal(model(x, real), model(x, real))


def test_faster_than_bernoulli_dropout_on_cpu_for_a_training_activation():
    """Not a timing goal (bench/ has those): the reason this module exists, checked by operation count instead of
    time. F.dropout calls bernoulli_ once per element; ours never does."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(256, 64, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        dropout(x, 0.2).sum().backward()
        F.dropout(x, 0.2, True).sum().backward()
    names = [event.key for event in prof.key_averages()]
    assert names.count("aten::bernoulli_") == 1  # F.dropout's, not ours
