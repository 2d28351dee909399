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
        ("train.schedule=step", "valid: cosine, plateau"),
    ],
)
def test_bad_overrides_are_refused_with_the_reason(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("tiny", [override])


def test_a_plateau_schedule_needs_a_patience_it_can_drop_halfway_through_in_either_override_order():
    with pytest.raises(ConfigError, match="train.patience >= 4"):
        build_config("tiny", ["train.schedule=plateau"])  # tiny: patience 0, so the rate would never drop
    for order in (["train.schedule=plateau", "train.patience=4"], ["train.patience=4", "train.schedule=plateau"]):
        config = build_config("tiny", order)
        assert (config.train.schedule, config.train.patience) == ("plateau", 4)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="valid: tiny"):
        build_config("huge")


def test_flatten_for_mlflow_params():
    flat = flatten(build_config("tiny").to_dict())
    assert flat["train.lr"] == 3e-3 and flat["data.source.user_column"] == "user_id"


# the config diet of 2026-12-03 (it was 104): add a key only with a preset that needs it; 75th: data.validation_from
# (the time split's validation window, which data.time_split_at users need to choose epochs on a period like the test);
# 76th: model.side_network (end to end at the frozen model's cost, IISAN-style; BENCHMARKS.md session 24); 77th,
# without a preset: model.id_dropout (as trained, with ids, end to end > frozen > ID-only on warm items, at new
# items' cost: a choice the user makes; BENCHMARKS.md session 27; session 28: that gain is new items placed lower,
# not a better warm ranking at a fixed cold recall); 78th, without a preset: model.new_item_offset (the level of the
# items in no training example, which no loss sets and every model trades against warm accuracy: the user's choice
# of exposure for new items, the same in evaluation, export and serving; session 33); 79th: train.schedule (plateau:
# the rate holds until validation stalls, so the epoch cap no longer moves where a run peaks; session 34); 81st,
# without a preset: train.refit (after selecting on data.validation_from's window, retrain the chosen epochs on it
# too, so the data nearest the test trains; ID-only got back 55% of what the window cost; session 38)
MAX_SETTABLE_KEYS = 81
# (+1 train.average_epochs, the weight averaging of bench.quality and the movielens preset)
# (+1 memory.trunk_cache, on in every preset with a frozen trunk; +1 train.targets, SASRec's every-position loss)
# (+1 model.unseen_from_content, on by default; bench.quality measures it off)


def test_every_settable_key_has_a_one_line_meaning_and_there_are_few():
    from training.overrides import settable_keys

    keys = [(key, meaning) for key, _, meaning in settable_keys(build_config("tiny")) if key != "preset"]
    assert len(keys) <= MAX_SETTABLE_KEYS, f"{len(keys)} settable keys"
    assert [key for key, meaning in keys if not meaning.strip() or "\n" in meaning] == []


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_print_config_lists_every_key_as_set_would_take_it(preset, capsys):
    import argparse

    from jobs.cli import config_from_args
    from training.overrides import flatten

    for fmt in ("text", "json"):
        args = argparse.Namespace(preset=preset, overrides=["train.eval_ks=5,10"], print_config=fmt)
        with pytest.raises(SystemExit) as done:
            config_from_args(args)
        assert done.value.code == 0
        printed = capsys.readouterr().out
        if fmt == "json":
            import json

            assert JobConfig.from_dict(json.loads(printed)) == build_config(preset, ["train.eval_ks=5,10"])
            continue
        lines = printed.splitlines()
        assert len(lines) == len(flatten(build_config(preset).to_dict()))
        assert "train.eval_ks = 5,10" in printed and f"preset = {preset}" in printed
        # every line is `key = value    # meaning`, and its value is accepted back by --set
        overrides = [line.split("    # ")[0].rstrip().replace(" = ", "=", 1) for line in lines]
        assert all("    # " in line for line in lines)
        rebuilt = build_config(preset, [o.replace('=""', "=") for o in overrides if not o.startswith("preset=")])
        assert rebuilt == build_config(preset, ["train.eval_ks=5,10"])
