"""LEMUR's training recipe on plain torch: de-duplicated encoding, encoder sampling, recompute, the CTR loss."""
import numpy as np
import pytest
import torch

from encoders.config import ImageEncoderConfig, TextEncoderConfig
from memory.client import LocalMemoryBankClient
from model.build import build_recommender
from model.config import ModelConfig
from model.losses import CTRLoss, SampledSoftmaxLoss
from training.metrics import grouped_auc, grouped_auc_reference

IMAGE = ImageEncoderConfig(kind="tiny_cnn", image_size=16)  # 4 channels at model.dim 8
TEXT = TextEncoderConfig(kind="tiny", max_length=6)  # 8 wide at model.dim 8


def make_model():
    torch.manual_seed(0)
    return build_recommender(ModelConfig(dim=8, num_layers=1, dropout=0.0), IMAGE, TEXT, num_items=20, max_history=3).eval()


def content_for(ids: torch.Tensor) -> dict:
    """Deterministic fake decoded content per item id (the same id always gives the same content)."""
    g = torch.Generator().manual_seed(1)
    table_img = torch.randint(0, 255, (21, 3, 16, 16), generator=g, dtype=torch.uint8)
    table_tok = torch.randint(1, 1000, (21, 6), generator=g)
    return {"image": table_img[ids], "image_mask": ids > 0, "input_ids": table_tok[ids],
            "attention_mask": torch.ones_like(table_tok[ids]), "text_mask": ids > 0}


def forward(model, targets, history, **kw):
    return model(target_ids=targets, history_ids=history, content=content_for(targets), **kw)


def test_deduplicated_encoding_gives_the_same_loss_as_naive_encoding():
    model = make_model()
    targets = torch.tensor([3, 5, 3, 7, 5])
    history = torch.tensor([[0, 1, 2], [1, 2, 3], [0, 0, 4], [5, 6, 3], [2, 2, 2]])
    cached = torch.randn(5, 3, 8)
    out = forward(model, targets, history, history_content=cached)
    assert out.unique_ids.tolist() == [3, 5, 7]
    # naive: encode every row's target separately, then substitute fresh vectors in histories by hand
    c = content_for(targets)
    naive_content = model.item_encoder.encode_content(c["image"], c["image_mask"], c["input_ids"], c["attention_mask"], c["text_mask"])
    positive = model.item_vectors(naive_content, targets)
    fresh_history = cached.clone()
    for b in range(5):
        for t in range(3):
            rows = (targets == history[b, t]).nonzero()
            if history[b, t] > 0 and len(rows):
                fresh_history[b, t] = naive_content[rows[0, 0]]
    user = model.user_vectors(history, fresh_history)
    loss_fn = SampledSoftmaxLoss(temperature=0.1)
    assert torch.allclose(loss_fn(out.user, out.positive, targets), loss_fn(user, positive, targets), atol=1e-5)


def test_encoder_sampling_uses_bank_vectors_for_unsampled_rows():
    model = make_model()
    targets = torch.tensor([3, 5, 7, 9])
    history = torch.tensor([[0, 1, 2]] * 4)
    cached_targets = torch.randn(4, 8)
    mask = torch.tensor([True, False, True, False])
    out = forward(model, targets, history, history_content=torch.zeros(4, 3, 8), encode_mask=mask,
                  target_cached_content=cached_targets)
    assert out.unique_ids.tolist() == [3, 7]  # only sampled rows ran the encoder
    expected = model.item_vectors(cached_targets[[1, 3]], targets[[1, 3]])
    assert torch.allclose(out.positive[[1, 3]], expected, atol=1e-6)


def test_recompute_mode_equals_bank_mode_with_exact_bank():
    """With every history vector freshly encoded (recompute) vs read from a bank holding exactly those vectors."""
    model = make_model()
    targets = torch.tensor([3, 5])
    history = torch.tensor([[0, 1, 2], [4, 6, 8]])
    recomputed = forward(model, targets, history, history_content=torch.zeros(2, 3, 8),
                         history_item_content=content_for(history))
    assert recomputed.unique_ids.tolist() == [1, 2, 3, 4, 5, 6, 8]
    bank = LocalMemoryBankClient(capacity=21, dim=8)
    bank.update(recomputed.unique_ids.numpy(), recomputed.unique_content.detach().numpy(), step=0)
    cached = torch.from_numpy(bank.lookup(history.reshape(-1).numpy()).vectors.copy()).view(2, 3, 8)
    from_bank = forward(model, targets, history, history_content=cached)
    assert torch.allclose(recomputed.user, from_bank.user, atol=1e-5)


def test_ctr_loss_bce_plus_grouped_contrastive():
    torch.manual_seed(0)
    user = torch.nn.functional.normalize(torch.randn(4, 5), dim=-1)
    item = torch.nn.functional.normalize(torch.randn(4, 5), dim=-1)
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 1, 0])
    loss = CTRLoss(temperature=0.5, contrastive_weight=2.0)(user, item, labels, groups)
    logits = (user * item).sum(-1) / 0.5
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    sims = user @ item.T / 0.5
    # anchors 0, 2, 3; negatives exclude rows of the same group: anchor 0 sees {0, 2}; 2 sees {0,1,2,3}; 3 sees {2,3}
    terms = [-(sims[0, 0] - torch.logsumexp(sims[0, [0, 2]], 0)),
             -(sims[2, 2] - torch.logsumexp(sims[2, [0, 1, 2, 3]], 0)),
             -(sims[3, 3] - torch.logsumexp(sims[3, [2, 3]], 0))]
    assert torch.allclose(loss, bce + 2.0 * torch.stack(terms).mean(), atol=1e-6)


def test_gauc_matches_reference_on_grouped_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + labels
    groups = rng.integers(0, 30, 300)
    for weighted in (True, False):
        fast, ref = grouped_auc(labels, scores, groups, weighted), grouped_auc_reference(labels, scores, groups, weighted)
        assert fast["gauc"] == pytest.approx(ref["gauc"]) and fast["groups_used"] == ref["groups_used"]
