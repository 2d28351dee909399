import pytest

from training.job_config import PRESETS, JobConfig, build_config
from training.overrides import ConfigError, flatten


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_and_round_trip(preset):
    config = build_config(preset)
    assert JobConfig.from_dict(config.to_dict()) == config


def test_overrides_are_typed():
    config = build_config("tiny", ["train.lr=0.01", "train.eval_ks=1,5", "model.modalities=text", "train.eval_mask_history=true"])
    assert config.train.lr == 0.01 and config.train.eval_ks == (1, 5)
    assert config.model.modalities == ("text",) and config.train.eval_mask_history is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "'lrr' is not one of"),
        ("trian.lr=1", "'trian' is not one of"),
        ("train.lr=fast", "expected a float"),
        ("train.epochs=1.5", "expected an int"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("model.sequence_model=gru", "valid: sasrec, lru"),
        ("train=3", "is a section"),
        ("train.lr", "must look like section.key=value"),
    ],
)
def test_bad_overrides_are_refused_with_the_reason(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("tiny", [override])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="valid: tiny"):
        build_config("huge")


def test_flatten_for_mlflow_params():
    flat = flatten(build_config("tiny").to_dict())
    assert flat["train.lr"] == 3e-3 and flat["data.source.user_column"] == "user_id"
