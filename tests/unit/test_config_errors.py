"""Config errors fail fast with a message that names the key and, where there is a fixed set, the valid choices."""
from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import time

import pytest

from training.job_config import JobConfig, build_config, tiny
from training.overrides import ConfigError
from model.config import ModelConfig
from tests.conftest import REPO_ROOT


def test_unknown_key_names_it_and_lists_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr': 'lrr' is not one of: .*\blr\b") as error:
        build_config("tiny", ["train.lrr=1"])
    assert "max_failures" in str(error.value) and "epochs" in str(error.value)
    with pytest.raises(ConfigError, match=r"'trian' is not one of: data, image, memory, model, .*\btrain\b"):
        build_config("tiny", ["trian.lr=1"])
    with pytest.raises(ConfigError, match=r"train is a section; set one of its keys: (train\.\w+, )*train\.batch_size, "):
        build_config("tiny", ["train=1"])
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        build_config("tiny", ["train.lr"])
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'; valid: tiny, movielens, movielens_e2e, movielens_mrl, gpu"):
        build_config("huge")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=two", r"train\.epochs: expected an int, got 'two'"),
        ("train.epochs=2.5", r"train\.epochs: expected an int, got '2\.5'"),
        ("train.lr=fast", r"train\.lr: expected a float, got 'fast'"),
        ("train.eval_mask_history=maybe", r"train\.eval_mask_history: expected a bool \(true/false\), got 'maybe'"),
        ("train.eval_ks=5,ten", r"train\.eval_ks: expected an int, got 'ten'"),
    ],
)
def test_wrong_types_name_the_key_and_the_expected_type(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("tiny", [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=-0.001", r"train\.lr='-0\.001' rejected: train\.lr must be > 0"),
        ("train.lr=0", r"train\.lr must be > 0"),
        ("train.lr=nan", r"train\.lr: expected a finite float, got 'nan'"),  # NaN passed `<= 0` checks before
        ("train.encoder_lr=inf", r"train\.encoder_lr: expected a finite float, got 'inf'"),
        ("train.epochs=0", r"train\.epochs must be >= 1, got 0"),
        ("train.num_workers=0", r"train\.num_workers must be >= 1, got 0"),
        ("train.use_gpu=maybe", r"train\.use_gpu='maybe'; valid: auto, true, false"),
        ("model.loss=bpr", r"model\.loss='bpr'; valid: auto, sampled_softmax, full_softmax"),
        ("model.sequence_model=gru", r"valid: sasrec, lru"),
        ("model.modalities=image,audio", r"model\.modalities has \['audio'\]; valid: image, text"),
        ("model.dim=33", r"model\.dim=33 must be divisible by model\.num_heads=2"),
        ("model.dropout=1.0", r"model\.dropout must be in \[0, 1\)"),
        ("model.id_dropout=1", r"model\.id_dropout must be in \[0, 1\)"),
        ("data.time_split_at=March", r"data\.time_split_at='March' is not an ISO date"),
        ("data.validation_from=1998-02-01", r"data\.validation_from needs data\.time_split_at"),
        ("data.max_bad_fraction=1.5", r"data\.max_bad_fraction must be in \[0, 1\], got 1\.5"),
        ("data.max_dropped_fraction=-0.1", r"data\.max_dropped_fraction must be in \[0, 1\]"),
    ],
)
def test_impossible_values_name_the_key_and_the_valid_range_or_choices(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("tiny", [override])


def test_matryoshka_size_larger_than_model_dim_is_refused():
    if "matryoshka_sizes" not in {f.name for f in dataclasses.fields(ModelConfig)}:
        pytest.skip("model.matryoshka_sizes does not exist yet (issue 4 adds it)")
    assert tiny().model.dim == 32
    with pytest.raises(ConfigError, match=r"model\.matryoshka_sizes.*64.*model\.dim=32"):
        build_config("tiny", ["model.matryoshka_sizes=8,16,64"])
    accepted = build_config("tiny", ["model.matryoshka_sizes=8,16,32"])
    assert accepted.model.matryoshka_sizes == (8, 16, 32)


def test_saved_configs_with_wrong_types_or_unknown_keys_are_refused():
    """`JobConfig.from_dict` reads configs back from checkpoints (resume, retrain, export): check them too."""
    saved = tiny().to_dict()
    assert JobConfig.from_dict(copy.deepcopy(saved)) == tiny()
    cases = [
        (("train", "lr"), "fast", r"train\.lr: expected float, got 'fast'"),
        (("train", "epochs"), 2.5, r"train\.epochs: expected int, got 2\.5"),
        (("model", "dim"), True, r"model\.dim: expected int, got True"),
        (("train", "eval_ks"), [5, "x"], r"train\.eval_ks: expected int, got 'x'"),
        (("train", "lr"), float("nan"), r"train\.lr: expected a finite float"),
        (("train", "lrr"), 1, r"unknown config keys \['train\.lrr'\]; valid: .*\blr\b"),
        (("train", "lr"), -1.0, r"train\.lr must be > 0"),
    ]
    for (section, key), value, message in cases:
        broken = copy.deepcopy(saved)
        broken[section][key] = value
        with pytest.raises(ConfigError, match=message):
            JobConfig.from_dict(broken)
    widened = copy.deepcopy(saved)
    widened["train"]["lr"] = 1  # JSON writes 1.0 as 1 in some tools: an int is a fine float
    assert JobConfig.from_dict(widened).train.lr == 1.0


def test_train_job_with_a_typo_exits_non_zero_before_ray_starts():
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--set", "train.lrr=1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )
    seconds = time.perf_counter() - started
    assert result.returncode == 2
    assert "error: unknown config key 'train.lrr'" in result.stderr
    assert "lr" in result.stderr.split("is not one of:")[1]
    assert "Traceback" not in result.stderr
    assert "Started a local Ray instance" not in result.stderr + result.stdout
    # imports (torch, transformers) dominate: ~5 s on an idle 2-core box; a Ray start + data prep would be minutes
    assert seconds < 120, f"took {seconds:.1f}s: it should fail before any Ray or data work"


# Keys a saved config (a checkpoint's state.json) may hold from before the config diet of 2026-12-03, with the
# values the tiny preset had then.
REMOVED_KEYS = {
    "data": {"split": "leave_one_out", "max_image_pixels": 40_000_000, "driver_decode_max_mb": 512,
             "shuffle_buffer": 2048, "cold_seed": 0,
             "source": {"interactions_file": "interactions.csv", "items_file": "items.csv", "list_separator": "|"}},
    "image": {"out_dim": None, "channels": 16, "freeze_norm_stats": False},
    "text": {"dim": 32},
    "model": {"id_init_std": 0.02, "ffn_multiplier": 4, "extra_negatives": 0,
              "logq_correction": True, "ctr_contrastive_weight": 1.0, "matryoshka_zero_outer_head": False,
              "matryoshka_nested_backbone": True, "matryoshka_block_norm": False, "matryoshka_user_head": True},
    "memory": {"max_inflight_updates": 4, "staleness_sample": 64, "fill_actors": 0},
    "train": {"weight_decay": 0.01, "grad_clip": 1.0, "torch_threads": 0, "eval_batch_size": 256,
              "keep_checkpoints": 2},
    "retrain": {"epochs": 1, "min_new_interactions": 20, "lock_stale_seconds": 21600.0, "seed": 0},
}


def test_a_checkpoint_config_with_removed_keys_still_loads_and_names_them(caplog):
    from training.job_config import tiny
    from training.offline_eval import job_config_of

    saved = tiny().to_dict()
    for section, keys in REMOVED_KEYS.items():
        for key, value in keys.items():
            if isinstance(value, dict):
                saved[section][key].update(value)
            else:
                saved[section][key] = value
    with caplog.at_level("WARNING"):
        loaded = job_config_of({"config": saved})
    assert loaded == tiny()
    assert "image.freeze_norm_stats" in caplog.text and "data.source.items_file" in caplog.text
    with pytest.raises(ConfigError, match="unknown config keys"):  # the strict path still refuses them
        JobConfig.from_dict(saved)
