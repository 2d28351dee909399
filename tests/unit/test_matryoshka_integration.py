"""fMRLRec end to end: Matryoshka config, recommender-level slice property, per-size loss, per-size evaluation,
the size report and the item-vector export.

The layer-level slice test lives in test_matryoshka.py; here the whole recommender (real tiny encoders, SASRec
and LRU) must keep the property, and the training/evaluation code must use it as documented.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.job_config import build_config, tiny
from training.overrides import ConfigError
from model.build import build_recommender
from model.config import ModelConfig
from model.losses import FullSoftmaxLoss, SampledSoftmaxLoss
from model.losses import NestedSizesLoss
from model.recommender import Recommender, at_size
from pipeline.sequences import Examples
from training.evaluate import (evaluate_protocols, evaluate_ranking, example_ranks, score_users, size_table,
                               write_size_report)
from training.metrics import RankingAccumulator, history_mask, ranking_metrics, target_ranks

SIZES = (8, 16, 32)
NUM_ITEMS = 40
HISTORY = 6


# ---------------------------------------------------------------------------------------------- config


def test_config_defaults_off_and_supported_sizes():
    assert ModelConfig().matryoshka_sizes == ()
    assert ModelConfig(dim=64).supported_sizes == (64,)
    config = ModelConfig(dim=32, matryoshka_sizes=SIZES, matryoshka_weights=(0.5, 1.0, 2.0))
    assert config.supported_sizes == SIZES
    assert config.loss_weights == (0.5, 1.0, 2.0)
    assert ModelConfig(dim=32, matryoshka_sizes=SIZES).loss_weights == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"matryoshka_sizes": (8, 64)}, "size 64 at position 1 exceeds dim=32"),
        ({"matryoshka_sizes": (8, 16)}, "last size 16 must equal dim=32"),
        ({"matryoshka_sizes": (16, 8, 32)}, "sorted and unique"),
        ({"matryoshka_sizes": (8, 32), "matryoshka_weights": (1.0,)}, "1 entries for 2"),
        ({"matryoshka_weights": (1.0,)}, "matryoshka_sizes is empty"),
        ({"matryoshka_sizes": (8, 32), "matryoshka_weights": (-1.0, 1.0)}, ">= 0"),
    ],
)
def test_config_rejects_bad_sizes_naming_the_key_and_dim(kwargs, message):
    with pytest.raises(ValueError, match="model.matryoshka") as error:
        ModelConfig(dim=32, **kwargs)
    assert message in str(error.value)
    if "matryoshka_weights" not in kwargs:
        assert "model.dim=32" in str(error.value)


def test_config_overrides_from_the_command_line():
    job = build_config("tiny", ["model.matryoshka_sizes=8,16,32", "model.matryoshka_weights=1,1,2"])
    assert job.model.matryoshka_sizes == (8, 16, 32) and job.model.matryoshka_weights == (1.0, 1.0, 2.0)
    with pytest.raises(ConfigError, match=r"model.matryoshka_sizes.*model.dim=32"):
        build_config("tiny", ["model.matryoshka_sizes=8,16,64"])
    # setting dim first, then sizes that end at it, is the documented order
    job = build_config("tiny", ["model.dim=64", "model.matryoshka_sizes=16,64"])
    assert job.model.supported_sizes == (16, 64)


def test_movielens_mrl_preset_is_movielens_with_the_matryoshka_lru_measured_at_convergence():
    from bench.quality import method_overrides

    mrl, base = build_config("movielens_mrl"), build_config("movielens")
    model = mrl.model
    assert (model.sequence_model, model.num_layers, model.dim) == ("lru", 1, 128)
    assert model.matryoshka_sizes == (32, 64, 128) and model.loss_weights == (0.25, 0.5, 1.0)
    assert (mrl.data, mrl.image, mrl.text, mrl.train, mrl.memory) == (base.data, base.image, base.text, base.train,
                                                                      base.memory)
    # the model bench.quality trained to early stopping under this name (BENCHMARKS.md, session 29)
    measured = build_config("movielens", method_overrides("matryoshka_lru_32_64_128"))
    assert model == measured.model and (mrl.image.unfreeze_top, mrl.text.unfreeze_top) == (0, 0)


# ---------------------------------------------------------------------------------------- recommender


def build_model(sizes: tuple[int, ...] = SIZES, sequence_model: str = "sasrec", use_id: bool = True,
                **model: object) -> Recommender:
    job = tiny()
    model_config = dataclasses.replace(job.model, matryoshka_sizes=sizes, sequence_model=sequence_model,
                                       use_id_embedding=use_id, **model)
    torch.manual_seed(0)
    model = build_recommender(model_config, job.image, job.text, num_items=NUM_ITEMS, max_history=HISTORY)
    return model.eval()


def content_batch(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g),
        "image_mask": torch.tensor([True, False] * (batch // 2) + [True] * (batch % 2)),
        "input_ids": torch.randint(100, 2000, (batch, 24), generator=g),
        "attention_mask": torch.ones(batch, 24, dtype=torch.long),
        "text_mask": torch.ones(batch, dtype=torch.bool),
    }


def histories(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(1, NUM_ITEMS + 1, (batch, HISTORY), generator=g)
    history[0, :3] = 0  # left padding
    return history


@pytest.mark.parametrize("sequence_model", ["sasrec", "lru"])
@torch.inference_mode()
def test_recommender_vectors_at_size_are_exact_prefixes(sequence_model):
    model = build_model(sequence_model=sequence_model)
    assert model.supported_sizes == SIZES
    batch = content_batch(5)
    content = model.item_encoder.encode_content(**batch)  # [5, 32]
    table = torch.randn(NUM_ITEMS + 1, 32, generator=torch.Generator().manual_seed(2))
    table[0] = 0
    history = histories(4)
    ids = torch.arange(1, 6)
    full_item = model.raw_item_vectors(content, ids)
    full_user = model.raw_user_vectors(history, table[history])
    for size in SIZES:
        # the size-s sub-layers alone (forward_prefix) produce the first s dims of the full vectors
        prefix_content = model.item_encoder.encode_content(**batch, size=size)
        torch.testing.assert_close(prefix_content, content[:, :size], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.raw_item_vectors(prefix_content, ids, size), full_item[:, :size])
        user = model.raw_user_vectors(history, table[history], size)
        assert user.shape == (4, size)
        torch.testing.assert_close(user, full_user[:, :size], rtol=1e-5, atol=1e-6)
        # normalised vectors: normalise the prefix, which equals renormalising a truncated unit vector
        torch.testing.assert_close(model.user_vectors(history, table[history], size), F.normalize(user, dim=-1))
        torch.testing.assert_close(at_size(model.user_vectors(history, table[history]), size),
                                   F.normalize(full_user[:, :size], dim=-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.item_vectors(content, ids, size),
                                   F.normalize(full_item[:, :size], dim=-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"size 12 is not supported.*\[8, 16, 32\]"):
        model.user_vectors(history, table[history], 12)


@torch.inference_mode()
def test_small_sizes_ignore_the_weights_of_larger_blocks():
    """Changing every projection weight outside the size-8 block leaves size-8 content vectors untouched."""
    model = build_model()
    batch = content_batch(4)
    before_item = model.item_encoder.encode_content(**batch)
    layer = model.item_encoder.projection
    layer.weight[8:] += 1.0
    layer.bias[8:] -= 1.0
    layer.weight[:8, :] += 0.0  # (rows of block 1 read the whole input: in_sizes=None)
    after_item = model.item_encoder.encode_content(**batch)
    torch.testing.assert_close(after_item[:, :8], before_item[:, :8])
    assert not torch.allclose(after_item[:, 8:], before_item[:, 8:])


def test_off_by_default_keeps_the_plain_architecture():
    model = build_model(sizes=())
    assert model.supported_sizes == (32,)
    assert isinstance(model.item_encoder.projection, torch.nn.Linear)
    assert not any(name.startswith("user_head") for name in model.state_dict())
    with pytest.raises(ValueError, match="need a Matryoshka projection"):
        model.item_encoder.encode_content(**content_batch(2), size=8)


@torch.inference_mode()
def test_the_lru_stays_full_width_so_small_sizes_read_every_input_dim():
    """Matryoshka sizes nest the loss and the item projection; the LRU itself is a plain full-width model."""
    model = build_model(sequence_model="lru")
    assert not any(name.endswith("mask") for name, _ in model.sequence_model.named_buffers())
    history, table = histories(3), torch.randn(NUM_ITEMS + 1, 32, generator=torch.Generator().manual_seed(3))
    before = model.raw_user_vectors(history, table[history], SIZES[0])
    table[:, SIZES[-1] - 1] += 1.0  # the last input dim: outside the size-8 prefix
    after = model.raw_user_vectors(history, table[history], SIZES[0])
    assert not torch.allclose(before, after)  # a full-width backbone: size 8 depends on every input dim


# ------------------------------------------------------------------------------------------------ loss


def unit(shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_nested_loss_is_the_weighted_sum_of_per_size_base_losses():
    user, positive = unit((6, 32), 0), unit((6, 32), 1)
    ids = torch.tensor([3, 5, 7, 3, 9, 11])  # a duplicate target: masked as a negative by the base loss
    base = SampledSoftmaxLoss(temperature=0.1)
    weights = (0.25, 1.0, 2.0)
    loss = NestedSizesLoss(base, SIZES, weights)
    total = loss(user, positive, ids)
    by_hand = [base(F.normalize(user[:, :s], dim=-1), F.normalize(positive[:, :s], dim=-1), ids) for s in SIZES]
    expected = sum(w * v for w, v in zip(weights, by_hand))
    torch.testing.assert_close(total, expected)
    assert loss.last_per_size == pytest.approx({s: float(v) for s, v in zip(SIZES, by_hand)})
    assert len({round(v, 6) for v in loss.last_per_size.values()}) == 3  # the sizes really differ


def test_nested_full_softmax_truncates_and_renormalises_the_item_table():
    table = unit((NUM_ITEMS + 1, 32), 2)
    table[0] = 0
    user, ids = unit((4, 32), 3), torch.tensor([1, 2, 3, 4])
    positive = table[ids]
    base = FullSoftmaxLoss(temperature=0.05)
    total = NestedSizesLoss(base, SIZES)(user, positive, ids, table, None)
    expected = sum(base(at_size(user, s), at_size(positive, s), ids, at_size(table, s)) for s in SIZES)
    torch.testing.assert_close(total, expected)


def test_loss_at_a_small_size_only_trains_that_prefix():
    user = unit((6, 32), 4).requires_grad_(True)
    positive = unit((6, 32), 5)
    NestedSizesLoss(SampledSoftmaxLoss(temperature=0.1), (8,))(user, positive, torch.arange(1, 7)).backward()
    assert user.grad[:, :8].abs().sum() > 0
    assert torch.count_nonzero(user.grad[:, 8:]) == 0


def test_training_gradient_reaches_every_block():
    model = build_model().train()
    batch, history = content_batch(6), histories(6)
    out = model(target_ids=torch.arange(1, 7), history_ids=history,
                history_content=torch.randn(6, HISTORY, 32), content=batch)
    NestedSizesLoss(SampledSoftmaxLoss(temperature=0.1), SIZES)(out.user, out.positive, torch.arange(1, 7)).backward()
    layer = model.item_encoder.projection
    grad = layer.weight.grad
    assert grad[:8].abs().sum() > 0 and grad[16:].abs().sum() > 0
    assert torch.count_nonzero(grad * (1 - layer.mask)) == 0  # masked (upper) blocks never learn


# ------------------------------------------------------------------------------------------ evaluation


def random_examples(count: int, seed: int = 4) -> Examples:
    rng = np.random.default_rng(seed)
    history = rng.integers(1, NUM_ITEMS + 1, size=(count, HISTORY))
    history[: count // 3, :2] = 0
    return Examples(user=np.arange(count), history=history, target=rng.integers(1, NUM_ITEMS + 1, size=count),
                    timestamp=np.zeros(count, np.int64), rating=np.full(count, np.nan, np.float32))


@torch.inference_mode()
def test_evaluation_reports_every_metric_at_every_size():
    model = build_model()
    content = torch.randn(NUM_ITEMS + 1, 32, generator=torch.Generator().manual_seed(6))
    content[0] = 0
    examples = random_examples(50)
    ks = (5, 10)
    metrics = evaluate_ranking(model, content, examples, ks=ks, mask_history=True, batch_size=16, sizes=SIZES)
    names = ["recall@5", "recall@10", "ndcg@5", "ndcg@10", "mrr"]
    for size in SIZES:
        for name in names:
            assert math.isfinite(metrics[f"{name}@s{size}"])
    assert set(metrics) == set(names) | {f"{n}@s{s}" for n in names for s in SIZES}
    for name in names:  # the full size is the unsuffixed metric
        assert metrics[f"{name}@s32"] == metrics[name]
    # reference: score at each size through the model's own size-s API (sequence model re-run per size)
    for size in SIZES:
        acc = RankingAccumulator(ks=ks)
        for start in range(0, len(examples), 16):
            history = torch.as_tensor(examples.history[start : start + 16])
            scores = score_users(model, content, history, size)
            acc.update(target_ranks(scores, torch.as_tensor(examples.target[start : start + 16]),
                                    history_mask(history, NUM_ITEMS + 1, pad_id=0)))
        expected = acc.compute()
        for name in names:
            assert metrics[f"{name}@s{size}"] == pytest.approx(expected[name], abs=1e-6)
    assert metrics["mrr@s8"] != metrics["mrr@s32"]  # sizes are scored separately


def test_example_ranks_are_what_evaluate_ranking_averages():
    model = build_model().train()  # both score in eval mode and leave the mode as they found it
    content = torch.randn(NUM_ITEMS + 1, 32, generator=torch.Generator().manual_seed(6))
    content[0] = 0
    examples = random_examples(50)
    for mask in (True, False):
        ranks = example_ranks(model, content, examples, mask_history=mask, batch_size=16)
        assert ranks.shape == (50,) and ranks.min() >= 0 and ranks.max() < NUM_ITEMS
        metrics = evaluate_ranking(model, content, examples, ks=(10,), mask_history=mask, batch_size=16)
        assert metrics["mrr"] == pytest.approx(float(np.mean(1.0 / (ranks + 1))), abs=1e-6)
        assert metrics["recall@10"] == pytest.approx(float(np.mean(ranks < 10)), abs=1e-6)
    masked = example_ranks(model, content, examples, mask_history=True)
    assert (masked <= ranks).all() and (masked < ranks).any()  # masking the history only lifts targets
    assert model.training  # left as it was found


def test_both_protocols_and_row_subsets_come_from_one_pass_of_the_sequence_model():
    model = build_model()
    content = torch.randn(NUM_ITEMS + 1, 32, generator=torch.Generator().manual_seed(8))
    content[0] = 0
    examples = random_examples(50)
    cold = np.zeros(50, dtype=bool)
    cold[::4] = True
    passes = []
    model.user_vectors = (lambda run: lambda *a, **k: passes.append(1) or run(*a, **k))(model.user_vectors)
    scored = evaluate_protocols(model, content, examples, ks=(10,), headline_mask=False, batch_size=16, sizes=SIZES,
                                subsets={"warm": ~cold, "cold": cold, "none": np.zeros(50, dtype=bool)})
    assert len(passes) == 4  # ceil(50 / 16) batches, each through the sequence model once
    assert set(scored) == {"", "warm", "cold"}  # a subset with no rows is left out
    scores = score_users(model, content, torch.as_tensor(examples.history))
    targets = torch.as_tensor(examples.target)
    mask = history_mask(torch.as_tensor(examples.history), NUM_ITEMS + 1, pad_id=0)
    for name, rows in (("", np.ones(50, dtype=bool)), ("warm", ~cold), ("cold", cold)):
        rows = torch.as_tensor(rows)
        unmasked = ranking_metrics(target_ranks(scores[rows], targets[rows]), ks=(10,))
        masked = ranking_metrics(target_ranks(scores[rows], targets[rows], mask[rows]), ks=(10,))
        for key in ("recall@10", "ndcg@10", "mrr"):  # headline unmasked, the other protocol prefixed
            assert scored[name][key] == pytest.approx(unmasked[key], abs=1e-9)
            assert scored[name][f"masked_{key}"] == pytest.approx(masked[key], abs=1e-9)
        assert masked["mrr"] > unmasked["mrr"]  # the protocols differ on this data
    assert {k for k in scored[""] if "@s" in k} == {f"{k}@s{s}" for k in ("recall@10", "ndcg@10", "mrr") for s in SIZES}
    assert not any("@s" in k for k in scored["cold"])  # sizes on the whole set only
    assert scored[""]["mrr@s8"] == pytest.approx(evaluate_ranking(
        model, content, examples, ks=(10,), mask_history=False, sizes=SIZES)["mrr@s8"], abs=1e-9)
    with pytest.raises(ValueError, match="subset 'bad' has"):
        evaluate_protocols(model, content, examples, ks=(10,), headline_mask=True, subsets={"bad": cold[:10]})


def test_example_ranks_leave_out_the_excluded_items_but_never_the_target():
    model = build_model()
    content = torch.randn(NUM_ITEMS + 1, 32, generator=torch.Generator().manual_seed(7))
    content[0] = 0
    examples = random_examples(50)
    full = example_ranks(model, content, examples, mask_history=False)
    scores = score_users(model, content, torch.as_tensor(examples.history))
    excluded = torch.zeros(NUM_ITEMS + 1, dtype=torch.bool)
    excluded[1::3] = True
    targets = torch.as_tensor(examples.target)
    among = example_ranks(model, content, examples, mask_history=False, exclude_items=excluded, batch_size=16)
    above = scores > scores.gather(1, targets[:, None])
    assert among.tolist() == (above & ~excluded[None, :]).sum(1).tolist()  # only the kept items above it count
    assert (among <= full).all() and (among < full).any()
    assert excluded[targets].any()  # some targets are themselves excluded items: still ranked, not dropped
    both = example_ranks(model, content, examples, mask_history=True, exclude_items=excluded)
    assert (both <= among).all()  # the history mask adds to the exclusion


def test_size_report_table_and_plot(tmp_path: Path):
    metrics = {"test_ndcg@10": 0.3, "epoch": 2}
    for size, value in ((64, 0.25), (8, 0.1), (16, 0.2)):
        metrics.update({f"test_ndcg@10@s{size}": value, f"test_recall@10@s{size}": 2 * value,
                        f"val_ndcg@10@s{size}": 9.0})
    rows = size_table(metrics)
    assert [r["size"] for r in rows] == [8, 16, 64]
    assert rows[1] == {"size": 16, "ndcg@10": 0.2, "recall@10": 0.4}
    paths = write_size_report(metrics, tmp_path / "report")
    assert [p.name for p in paths] == ["matryoshka_sizes.json", "matryoshka_sizes.csv", "ndcg_at_10_vs_size.png"]
    assert json.loads(paths[0].read_text())["rows"] == rows
    assert paths[1].read_text().splitlines()[0] == "size,ndcg@10,recall@10"
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_size_report({"test_ndcg@10": 0.3}, tmp_path / "none") == []


# ---------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def prepared_dir(raw_data_dir, tmp_path_factory) -> Path:
    from pipeline.config import DataConfig
    from pipeline.sources import prepare_dataset

    out = tmp_path_factory.mktemp("prepared")
    prepare_dataset(DataConfig(), raw_data_dir, out)
    return out


def test_export_item_vectors_per_size(prepared_dir: Path, tmp_path: Path):
    from pipeline.sources import load_manifest
    from training.export import export_item_vectors, read_item_vectors

    num_items = load_manifest(prepared_dir)["num_items"]
    job = tiny()
    job.model = dataclasses.replace(job.model, matryoshka_sizes=SIZES, use_id_embedding=True)
    torch.manual_seed(0)
    model = build_recommender(job.model, job.image, job.text, num_items=num_items, max_history=job.data.max_history)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    torch.save(model.state_dict(), checkpoint / "model.pt")
    (checkpoint / "state.json").write_text(json.dumps({"config": job.to_dict(), "num_items": num_items,
                                                       "matryoshka_sizes": list(SIZES), "watermark": 0}))
    written = export_item_vectors(checkpoint, tmp_path / "out", None, prepared_dir=prepared_dir)
    assert [p.name for p in written] == [f"item_vectors_s{s}.parquet" for s in SIZES]
    ids_full, full = read_item_vectors(written[-1])
    assert ids_full.tolist() == list(range(1, num_items + 1))
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
    for path, size in zip(written, SIZES):
        ids, vectors = read_item_vectors(path)
        assert vectors.shape == (num_items, size) and (ids == ids_full).all()
        # a size-s file is the renormalised prefix of the full-size vectors
        prefix = full[:, :size] / np.linalg.norm(full[:, :size], axis=1, keepdims=True)
        np.testing.assert_allclose(vectors, prefix, atol=1e-5)
    manifest = json.loads((tmp_path / "out" / "export.json").read_text())
    assert manifest["sizes"] == list(SIZES) and manifest["num_items"] == num_items
    with pytest.raises(ValueError, match=r"supports \[8, 16, 32\]"):
        export_item_vectors(checkpoint, tmp_path / "bad", [12], prepared_dir=prepared_dir)


@pytest.mark.parametrize("sequence_model", ["sasrec", "lru"])
@torch.inference_mode()
def test_the_user_vector_is_the_full_width_state_truncated(sequence_model):
    """No user head: every size's user vector is a prefix of the sequence model's last state."""
    model = build_model(sequence_model=sequence_model)
    assert not any(name.startswith("user_head") for name in model.state_dict())
    history, table = histories(3), torch.randn(NUM_ITEMS + 1, 32, generator=torch.Generator().manual_seed(4))
    real = history > 0
    inputs = model.item_vectors(table[history], history) * real[..., None]
    state = model.sequence_model(inputs, real)[:, -1]
    for size in SIZES:
        torch.testing.assert_close(model.raw_user_vectors(history, table[history], size), state[:, :size])
