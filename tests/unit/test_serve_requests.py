"""The /recommend request contract, user histories and the jobs.serve command line (no Ray, no HTTP)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from serving.online import RequestError, UserHistories, parse_recommend_request

def test_a_full_request_is_parsed():
    request = parse_recommend_request(json.dumps({"history": ["50", 172], "k": 5, "size": 16, "exclude_history": False,
                                                  "candidates": ["1", 2], "mode": "funnel"}).encode())
    assert request.history == ["50", "172"] and request.user_id is None and request.k == 5 and request.size == 16
    assert request.exclude_history is False and request.candidates == ["1", "2"] and request.mode == "funnel"
    defaults = parse_recommend_request(b'{"user_id": 42}')
    assert defaults.user_id == "42" and defaults.history is None and defaults.k == 10 and defaults.size is None
    assert defaults.exclude_history is True and defaults.candidates is None and defaults.mode is None


@pytest.mark.parametrize("body, status, words", [
    (b"{bad", 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b'{"history": ["1"], "kk": 3}', 400, "unknown field(s) 'kk'"),
    (b'{"k": 3}', 400, "exactly one of 'history'"),
    (b'{"history": ["1"], "user_id": "2"}', 400, "exactly one of 'history'"),
    (b'{"history": "1"}', 400, "'history' must be a list"),
    (b'{"history": [null]}', 400, "'history' must be a list"),
    (b'{"history": []}', 422, "'history' is empty"),
    (b'{"user_id": [1]}', 400, "'user_id' must be"),
    (b'{"history": ["1"], "k": 0}', 422, "'k' must be an integer from 1 to 1000, got 0"),
    (b'{"history": ["1"], "k": 1001}', 422, "'k' must be an integer from 1 to 1000"),
    (b'{"history": ["1"], "k": "5"}', 422, "'k' must be an integer"),
    (b'{"history": ["1"], "k": true}', 422, "'k' must be an integer"),
    (b'{"history": ["1"], "k": 2.5}', 422, "'k' must be an integer"),
    (b'{"history": ["1"], "size": "big"}', 422, "'size' must be an integer"),
    (b'{"history": ["1"], "exclude_history": "yes"}', 422, "'exclude_history' must be true or false"),
    (b'{"history": ["1"], "candidates": []}', 422, "'candidates' is empty"),
    (b'{"history": ["1"], "mode": "fast"}', 422, "'mode' must be one of exact, hnsw, funnel"),
])
def test_bad_requests_get_a_status_and_one_line(body: bytes, status: int, words: str):
    with pytest.raises(RequestError) as caught:
        parse_recommend_request(body)
    assert caught.value.status == status and words in str(caught.value) and "\n" not in str(caught.value)


def test_user_histories_are_the_prepared_interactions_newest_last(prepared_dir: Path, raw_data_dir: Path):
    histories = UserHistories.from_prepared(prepared_dir, keep=30)
    raw = pd.read_csv(raw_data_dir / "interactions.csv", dtype=str)
    raw["order"] = range(len(raw))
    raw["timestamp"] = raw.timestamp.astype(int)
    for user in ("1", "42", "943"):
        expected = raw[raw.user_id == user].sort_values(["timestamp", "order"]).item_id.tolist()[-30:]
        assert histories.get(user) == expected
    assert len(histories) == 943
    with pytest.raises(RequestError) as caught:
        histories.get("no-such-user")
    assert caught.value.status == 404 and "unknown user 'no-such-user'" in str(caught.value)


def _serve_main(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """`python -m jobs.serve ARGV` in this process (as its command line runs it) -> (exit code, stderr)."""
    from jobs.cli import run_main
    from jobs.serve import main

    monkeypatch.setattr(sys, "argv", ["jobs.serve", *argv])
    with pytest.raises(SystemExit) as exited:
        run_main(main)
    return exited.value.code, capsys.readouterr().err


def test_serve_command_line_refuses_bad_input_in_one_line(tmp_path: Path, monkeypatch, capsys):
    from jobs.serve import ServeOptions
    from training.overrides import ConfigError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for argv, words in ((["--port", "0"], "--port must be 1..65535"),
                        (["--model", "models:/mmrec@nope"], "no alias 'nope'"),
                        (["--checkpoint", str(tmp_path)], "is not a training checkpoint")):
        code, err = _serve_main(argv, monkeypatch, capsys)
        ours = [line for line in err.splitlines() if "mlflow.store.db.utils" not in line]  # MLflow's DB creation
        assert code == 2 and len(ours) == 1 and ours[0].startswith("error: ") and words in ours[0], err
    code, err = _serve_main(["--port", "x"], monkeypatch, capsys)
    assert code == 2 and "invalid int value: 'x'" in err
    # `serve run jobs.serve:app_builder key=value` arguments are checked the same way
    from ray.serve import Application

    from jobs.serve import app_builder

    assert ServeOptions.from_strings({"poll_s": "2.5", "user_histories": "false"}).poll_s == 2.5
    assert isinstance(app_builder({"model": "models:/mmrec@champion", "replicas": "2", "max_batch": "4"}), Application)
    with pytest.raises(ConfigError, match="unknown serve argument"):
        ServeOptions.from_strings({"polls": "2"})
    with pytest.raises(ConfigError, match="is not a valid int"):
        ServeOptions.from_strings({"port": "eighty"})


def test_answers_in_a_batch_equal_answers_one_by_one(tiny_checkpoint: Path, prepared_dir: Path):
    """What jobs.serve's dynamic batching runs: one model pass per (model, options) group; a group the
    recommender refuses is answered one by one, so only the bad request fails."""
    from serving.online import Served, answer, answer_batch
    from serving.recommender import ItemRecommender

    served = Served(ItemRecommender.from_checkpoint(tiny_checkpoint, prepared_dir=prepared_dir), "checkpoint", "")
    histories = UserHistories.from_prepared(prepared_dir)
    bodies = [{"history": ["50", "172", "181"], "k": 5}, {"user_id": "42", "k": 5}, {"history": ["1", "2"], "k": 5},
              {"history": ["no-such-item"], "k": 5}, {"user_id": "no-such-user", "k": 5},
              {"history": ["50"], "k": 3, "size": 16}, {"history": ["7", "8"], "k": 3, "size": 16},
              {"history": ["50"], "k": 3, "size": 12}, {"user_id": "7", "k": 4, "mode": "funnel", "size": 8}]
    requests = [parse_recommend_request(json.dumps(body)) for body in bodies]
    together = answer_batch([(served, request) for request in requests], histories)
    for body, request, batched in zip(bodies, requests, together):
        try:
            alone = answer(served, request, histories)
        except RequestError as err:
            assert isinstance(batched, RequestError), body
            assert (batched.status, str(batched)) == (err.status, str(err))
            continue
        assert not isinstance(batched, RequestError), (body, batched)
        assert [i["item_id"] for i in batched["items"]] == [i["item_id"] for i in alone["items"]], body
        assert [i["score"] for i in batched["items"]] == pytest.approx([i["score"] for i in alone["items"]], abs=1e-5)
        assert batched["size"] == alone["size"] and batched.get("user_id") == alone.get("user_id")
    assert [type(r).__name__ for r in together].count("RequestError") == 3
    assert [r.status for r in together if isinstance(r, RequestError)] == [422, 404, 422]


def test_a_promoted_version_that_fails_to_load_leaves_the_served_one(tiny_checkpoint: Path, prepared_dir: Path,
                                                                       tmp_path: Path):
    from mlflow.tracking import MlflowClient

    from serving.online import ModelSlot, ModelSource, load_warm_recommender
    from training.registry import ModelRegistry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("slot", artifact_location=(tmp_path / "art").as_uri())
    registry = ModelRegistry(uri, "m", storage_path=tmp_path / "runs")
    versions = [registry.register(run_id=client.create_run(experiment).info.run_id, checkpoint_path=tiny_checkpoint,
                                  data_watermark=0, trained_through=0, config_hash="x", metrics={})
                for _ in range(2)]
    registry.set_alias("champion", "1")
    slot = ModelSlot(ModelSource(model_uri="models:/m@champion", tracking_uri=uri),
                     lambda target: load_warm_recommender(target, uri, prepared_dir=prepared_dir))
    assert slot.served.version == "1" and slot.refresh() is False  # the alias has not moved
    (versions[1].checkpoint_path / "model.pt").write_bytes(b"not a checkpoint")  # version 2's copy is broken
    registry.set_alias("champion", "2")
    before = slot.served
    assert slot.refresh() is False and slot.served is before
    assert slot.describe()["last_refresh_error"].startswith("CheckpointError:")
    registry.set_alias("champion", "1")
    assert slot.refresh() is False and slot.describe()["last_refresh_error"] is None
