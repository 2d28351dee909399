"""Model shapes, the dedup/fresh-vector logic, the loss, and gradients reaching the content encoders."""
import numpy as np
import pytest
import torch

from encoders.config import ImageEncoderConfig, TextEncoderConfig, resolve_text_model_path
from model.build import build_recommender, encoder_parameters
from model.config import ModelConfig
from model.losses import FullSoftmaxLoss, SampledSoftmaxLoss, inclusion_log_prob
from model.recommender import replace_with_fresh, unique_first
from model.sequence import SASRec
from pipeline.content import ItemContentDecoder


def test_sasrec_is_causal_and_ignores_left_padding():
    torch.manual_seed(0)
    model = SASRec(dim=16, max_len=6, num_layers=2, num_heads=2, dropout=0.0).eval()
    x = torch.randn(1, 6, 16)
    mask = torch.tensor([[False, False, True, True, True, True]])
    out = model(x, mask)
    assert out.shape == (1, 6, 16)
    changed = x.clone()
    changed[0, 5] += 1.0  # the future must not change the past
    assert torch.allclose(model(changed, mask)[0, :5], out[0, :5], atol=1e-6)
    junk = x.clone()
    junk[0, :2] = 100.0  # padding content is invisible to real positions
    assert torch.allclose(model(junk, mask)[0, 2:], out[0, 2:], atol=1e-5)
    assert torch.isfinite(out).all()


def test_unique_first_and_fresh_replacement():
    ids = torch.tensor([7, 3, 7, 9, 3])
    unique, first, inverse = unique_first(ids)
    assert unique.tolist() == [3, 7, 9] and first.tolist() == [1, 0, 3]
    assert torch.equal(unique[inverse], ids)
    history = torch.tensor([[0, 3, 4], [9, 9, 1]])
    cached = torch.zeros(2, 3, 2)
    fresh = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    out = replace_with_fresh(history, cached, unique, fresh)
    assert out[0, 1].tolist() == [1.0, 1.0] and out[1, 0].tolist() == [3.0, 3.0] and out[1, 1].tolist() == [3.0, 3.0]
    assert out[0, 0].tolist() == [0.0, 0.0] and out[0, 2].tolist() == [0.0, 0.0] and out[1, 2].tolist() == [0.0, 0.0]


def test_sampled_softmax_masks_duplicate_targets():
    user = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    pos = user.clone()
    ids = torch.tensor([5, 5, 6])
    loss = SampledSoftmaxLoss(temperature=1.0)(user, pos, ids)
    # reference: row 0 and row 1 share item 5, so each excludes the other from its negatives
    logits = user @ pos.T
    expected = []
    for i in range(3):
        keep = [j for j in range(3) if j == i or ids[j] != ids[i]]
        expected.append(-(logits[i, i] - torch.logsumexp(logits[i, keep], 0)))
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-6)


def test_full_softmax_uses_fresh_positive():
    table = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    user = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    positive = table[[2, 4]].clone().requires_grad_(True)
    loss = FullSoftmaxLoss(temperature=0.5)(user, positive, torch.tensor([2, 4]), table)
    logits = user @ table.T / 0.5
    logits[:, 0] = float("-inf")
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, torch.tensor([2, 4])), atol=1e-6)
    loss.backward()
    assert positive.grad.abs().sum() > 0


def _real_batch(raw_data_dir, tmp_path, image_size, max_length):
    from pipeline.config import DataConfig
    from pipeline.sources import prepare_dataset

    prepared = tmp_path / "prep"
    prepare_dataset(DataConfig(), raw_data_dir, prepared)
    decoder = ItemContentDecoder(str(prepared / "items.parquet"), "target", image_size, resolve_text_model_path("minilm"), max_length)
    batch = decoder({"target": np.array([1, 2, 50, 2, 181, 300]), "history": np.array([[0, 0, 5, 6]] * 3 + [[7, 8, 2, 1]] * 3)})
    return {k: torch.as_tensor(v) for k, v in batch.items()}


@pytest.mark.parametrize(
    "image, text",
    [
        (ImageEncoderConfig(kind="tiny_cnn", image_size=32), TextEncoderConfig(kind="tiny", max_length=16)),
        (ImageEncoderConfig(kind="efficientnet_lite0", image_size=32, unfreeze_top=1),
         TextEncoderConfig(kind="hf", path="minilm", max_length=12, unfreeze_top=1)),
    ],
    ids=["builtin", "pretrained-partially-unfrozen"],
)
def test_gradient_reaches_image_and_text_encoders(raw_data_dir, tmp_path, image, text):
    torch.manual_seed(0)
    model = build_recommender(ModelConfig(dim=16, num_layers=1, dropout=0.0), image, text, num_items=1682, max_history=4)
    batch = _real_batch(raw_data_dir, tmp_path, image.image_size, text.max_length)
    backbone, rest = encoder_parameters(model)
    assert backbone, "the content encoders must have trainable weights"
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_image = {n: p.detach().clone() for n, p in model.item_encoder.image_encoder.named_parameters() if p.requires_grad}
    trainable_text = {n: p.detach().clone() for n, p in model.item_encoder.text_encoder.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(backbone + rest, lr=0.5)
    out = model(
        target_ids=batch["target"], history_ids=batch["history"],
        content={k: batch[k] for k in ("image", "image_mask", "input_ids", "attention_mask", "text_mask")},
        history_content=torch.zeros(6, 4, 16),
    )
    assert out.user.shape == (6, 16) and out.positive.shape == (6, 16)
    assert out.unique_ids.tolist() == [1, 2, 50, 181, 300] and out.unique_content.shape == (5, 16)
    loss = SampledSoftmaxLoss(temperature=0.1)(out.user, out.positive, batch["target"])
    loss.backward()
    optimizer.step()
    image_changed = [n for n, p in model.item_encoder.image_encoder.named_parameters() if p.requires_grad
                     and not torch.equal(p, trainable_image[n])]
    text_changed = [n for n, p in model.item_encoder.text_encoder.named_parameters() if p.requires_grad
                    and not torch.equal(p, trainable_text[n])]
    assert image_changed and text_changed
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"frozen weight {name} changed"


def test_the_id_table_starts_small_and_random():
    text = TextEncoderConfig(kind="tiny", max_length=6)
    default = build_recommender(ModelConfig(dim=16, num_layers=1, num_heads=2, modalities=("text",),
                                            use_id_embedding=True), ImageEncoderConfig(), text, num_items=5,
                                max_history=4)
    assert 0.005 < default.item_encoder.id_embedding.weight[1:].std() < 0.05



def test_id_dropout_removes_whole_id_vectors_in_training_only():
    text = TextEncoderConfig(kind="tiny", max_length=6)
    model = build_recommender(ModelConfig(dim=16, num_layers=1, num_heads=2, modalities=("text",),
                                          use_id_embedding=True, id_dropout=0.25), ImageEncoderConfig(), text,
                              num_items=5, max_history=4)
    encoder, ids = model.item_encoder, torch.arange(1, 6).repeat(2000)  # 10,000 occurrences
    full = encoder.id_embedding(ids)
    torch.manual_seed(0)
    encoder.train()
    dropped = encoder.id_vectors(ids)
    zero = (dropped == 0).all(dim=-1)
    assert 0.23 < float(zero.float().mean()) < 0.27
    torch.testing.assert_close(dropped[~zero], full[~zero])  # kept vectors whole, not rescaled
    encoder.eval()
    torch.testing.assert_close(encoder.id_vectors(ids), full)

def test_all_positions_adds_each_history_positions_next_item_and_keeps_the_last_rows():
    """train.targets=all: the rows of the last position equal the one-target forward; an inner row is the state
    at that position (causal: later items do not change it), and its positive is the next history item."""
    torch.manual_seed(0)
    model = build_recommender(ModelConfig(dim=16, modalities=(), use_id_embedding=True, num_layers=2, num_heads=2,
                                          dropout=0.0), ImageEncoderConfig(kind="tiny_cnn"), TextEncoderConfig(kind="tiny"),
                              num_items=30, max_history=5).eval()

    def forward(history, targets, **kwargs):
        return model(target_ids=targets, content={"item_ids": targets}, history_ids=history,
                     history_content=torch.zeros(*history.shape, 16), **kwargs)

    history = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 6], [0, 0, 0, 0, 9]])
    targets = torch.tensor([7, 8, 10])
    last, dense = forward(history, targets), forward(history, targets, all_positions=True)
    inner = int((history[:, :-1] > 0).sum())
    assert dense.user.shape == (inner + 3, 16) and inner == 2 + 4 + 0
    assert torch.allclose(dense.user[-3:], last.user, atol=1e-6) and torch.allclose(dense.positive[-3:], last.positive)
    assert dense.positive_ids.tolist() == [4, 5, 2, 3, 4, 6, 7, 8, 10]
    # row 3: user 1 after items 1, 2 predicts item 3; the items after position 1 do not change that state
    changed = forward(torch.tensor([[1, 2, 11, 12, 13]]), torch.tensor([14]), all_positions=True)
    assert torch.allclose(dense.user[3], changed.user[1], atol=1e-5)
    assert not torch.allclose(dense.user[4], changed.user[2], atol=1e-3)
    assert torch.allclose(dense.positive[3], model.item_vectors(torch.zeros(16), torch.tensor(3)), atol=1e-6)


@pytest.mark.parametrize("kind", ["sasrec", "lru1", "lru2"])
def test_the_user_state_computed_for_the_last_position_only_is_the_full_forwards_last(kind):
    """`last_state` (what serving and evaluation call) skips the other positions' work in the last block."""
    from model.lru import LRUSequenceModel

    torch.manual_seed(0)
    model = (SASRec(dim=32, max_len=9, num_layers=2, num_heads=2, dropout=0.0) if kind == "sasrec"
             else LRUSequenceModel(dim=32, max_len=9, num_layers=int(kind[-1]), dropout=0.0)).eval()
    x = torch.randn(4, 9, 32)
    real = torch.ones(4, 9, dtype=torch.bool)
    real[1, :5] = False  # a short history
    real[2, :8] = False  # one item
    assert torch.allclose(model.last_state(x * real[..., None], real), model(x * real[..., None], real)[:, -1],
                          atol=1e-5)


def test_sampled_softmax_over_distinct_items_is_the_full_softmax_when_every_item_is_in_the_step():
    """train.targets=all: each distinct positive item is one candidate; with every catalogue item among the
    positives (and no logQ) that is exactly the full softmax over their vectors, and a row whose positive vector
    differs from its item's first row keeps its own logit."""
    torch.manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)  # row 0: padding
    ids = torch.tensor([3, 1, 2, 5, 4, 3, 1, 2])  # items 1..5, some twice
    user = torch.nn.functional.normalize(torch.randn(8, 8), dim=-1)
    unique = SampledSoftmaxLoss(temperature=0.1, unique_candidates=True)
    assert torch.allclose(unique(user, table[ids], ids), FullSoftmaxLoss(temperature=0.1)(user, table[ids], ids,
                                                                                          table), atol=1e-5)
    own = table[ids].clone()
    own[5] = torch.nn.functional.normalize(torch.randn(8), dim=-1)  # item 3's second row: another vector
    logits = user[5] @ table[1:].T / 0.1
    logits[2] = user[5] @ own[5] / 0.1  # column of item 3
    expected_row = -(logits[2] - torch.logsumexp(logits, 0))
    full = unique(user, own, ids) * 8
    rest = sum(FullSoftmaxLoss(temperature=0.1)(user[[i]], own[[i]], ids[[i]], table) for i in range(8) if i != 5)
    assert full.item() == pytest.approx((rest + expected_row).item(), abs=1e-4)


def test_the_logq_correction_is_the_chance_an_item_is_among_a_steps_distinct_candidates():
    """Candidates are the distinct items of a step's targets, so an item's correction is the probability that it
    is among them: 1 - (1 - p)^draws, measured here by drawing steps. The usual p * draws exceeds 1 for popular
    items (the most popular ml100k_mm item at 2,560 targets a step: 15), over-correcting them."""
    generator = torch.Generator().manual_seed(0)
    popularity = 1.0 / torch.arange(1, 201, dtype=torch.float64)  # Zipf over 200 items
    p = popularity / popularity.sum()
    draws, steps = 300, 4000
    picked = torch.multinomial(p.expand(steps, -1), draws, replacement=True, generator=generator)
    seen = torch.zeros(steps, 200, dtype=torch.bool).scatter_(1, picked, True).double().mean(0)
    predicted = inclusion_log_prob(p.log(), draws).exp()
    assert torch.allclose(predicted, seen, atol=0.03)
    assert predicted[0] == pytest.approx(1.0, abs=1e-6) and p[0] * draws > 15  # the old term: 51x too big
    rare = p[-1] * draws  # ~0.26: both agree within ~15% where an item is rarely in a step
    assert predicted[-1].item() == pytest.approx(rare.item(), rel=0.15)


def test_sampled_softmax_with_logq_is_the_full_softmax_when_every_item_is_in_every_step():
    """train.targets=all, each of 5 items among 2,000 targets: every item is a candidate of every step (inclusion
    ~1), so the corrected softmax over distinct items must equal the full softmax, whatever the popularities
    (the former log(p * draws) shifted the items by 7.1 down to 3.0 nats: loss 4.71 against the full 4.23)."""
    torch.manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    ids = torch.arange(1, 6).repeat(400)
    user = torch.nn.functional.normalize(torch.randn(len(ids), 8), dim=-1)
    popularity = torch.tensor([0.0, 0.60, 0.25, 0.10, 0.04, 0.01])
    log_prob = torch.log(popularity.clamp_min(1e-12))
    full = FullSoftmaxLoss(temperature=0.1)(user, table[ids], ids, table)
    sampled = SampledSoftmaxLoss(temperature=0.1, item_log_prob=log_prob, unique_candidates=True)
    assert sampled(user, table[ids], ids).item() == pytest.approx(full.item(), abs=1e-4)


def test_full_softmax_over_a_fresh_table_scores_the_targets_own_row():
    """An exact catalogue (computed this step, with gradients): the positive argument is not used, so a
    positive made differently (e.g. through dropout) cannot be told apart from the other rows."""
    torch.manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1).requires_grad_()
    user = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    ids = torch.tensor([2, 5, 1])
    noisy = torch.nn.functional.normalize(table[ids] + 0.5, dim=-1)
    loss = FullSoftmaxLoss(temperature=0.2, fresh_table=True)(user, noisy, ids, table)
    logits = user @ table.T / 0.2
    logits[:, 0] = float("-inf")
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, ids))
    loss.backward()
    assert table.grad[ids].abs().sum() > 0 and table.grad[0].abs().sum() == 0


def test_gathering_rows_matches_indexing_and_its_backward_repeats_to_the_last_bit():
    from model.recommender import gather_rows

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the CI machine's cores: where table[index]'s backward varied from call to call
    try:
        generator = torch.Generator().manual_seed(0)
        index = torch.randint(0, 300, (64, 51), generator=generator)  # a step's history ids: many repeats
        upstream = torch.randn(64, 51, 32, generator=generator)

        def gradient(gather) -> torch.Tensor:
            table = torch.randn(300, 32, generator=torch.Generator().manual_seed(1)).requires_grad_()
            gather(table, index).backward(upstream)
            return table.grad

        first = gradient(gather_rows)
        assert all(torch.equal(gradient(gather_rows), first) for _ in range(10))
        table = torch.randn(300, 32)
        assert torch.equal(gather_rows(table, index), table[index])
        torch.testing.assert_close(first, gradient(lambda t, i: t[i]))
        assert gather_rows(table, index[0, :0]).shape == (0, 32)
    finally:
        torch.set_num_threads(threads)
