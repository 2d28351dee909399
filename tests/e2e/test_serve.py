"""`python -m jobs.serve` for real: two tiny models registered in a SQLite MLflow registry, the champion served by
Ray Serve on the shared local Ray, real HTTP requests, and a promoted challenger picked up without a restart.

The models are the session's `tiny_checkpoint` (conftest: the tiny preset trained in process, no Ray Train) and a
copy of it with perturbed weights (version 2); the serve job runs as its own process (its command line, as a user starts it) and joins
the `ray_cluster` fixture's Ray through RAY_ADDRESS. Answers are compared with the library API
(`ItemRecommender.recommend`) and with the offline evaluation's ranking (`training.evaluate.score_users`).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
MODEL = "mmrec"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _json(raw: bytes) -> dict:
    """The body as JSON; a body that is not (Serve's proxy answers plain text until the application is deployed)
    -> {"text": the body}, so a check sees what came back instead of a decoding error."""
    try:
        return json.loads(raw)
    except ValueError:
        return {"text": raw.decode(errors="replace")}


def _call(url: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, dict]:
    """-> (HTTP status, the JSON body)"""
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _json(response.read())
    except urllib.error.HTTPError as err:
        return err.code, _json(err.read())


def _post(base: str, payload: dict | bytes) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return _call(f"{base}/recommend", body)


def _perturbed_copy(checkpoint: Path, directory: Path) -> Path:
    """Another model for the promotion: the checkpoint's weights plus seeded noise (what this test checks is which
    version answers, not how it was trained; a second training would cost a minute here)."""
    import shutil

    from training.checkpoint import MODEL_FILE, load_tensors

    shutil.copytree(checkpoint, directory)
    state = load_tensors(checkpoint / MODEL_FILE)
    generator = torch.Generator().manual_seed(1)
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.dim() >= 2:  # weight matrices; BatchNorm statistics untouched
            state[name] = tensor + 0.1 * tensor.std().nan_to_num() * torch.randn(tensor.shape, generator=generator)
    torch.save(state, directory / MODEL_FILE)
    return directory


@pytest.fixture(scope="module")
def registry(prepared_dir, tiny_checkpoint, tmp_path_factory):
    """A SQLite registry with the tiny checkpoint as version 1 (@champion) and a longer-trained one as version 2."""
    from mlflow.tracking import MlflowClient

    from training.registry import ModelRegistry

    root = tmp_path_factory.mktemp("serve_registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    challenger = _perturbed_copy(tiny_checkpoint, root / "challenger")
    client = MlflowClient(uri)
    experiment = client.create_experiment("serve-e2e", artifact_location=(root / "art").as_uri())
    registry = ModelRegistry(uri, MODEL, storage_path=root / "runs")
    for checkpoint in (tiny_checkpoint, challenger):
        run_id = client.create_run(experiment).info.run_id
        registry.register(run_id=run_id, checkpoint_path=checkpoint, data_watermark=0, trained_through=0,
                          config_hash="e2e", metrics={})
    registry.set_alias("champion", "1")
    return registry


@pytest.fixture(scope="module")
def served(ray_cluster, registry, prepared_dir, tmp_path_factory):
    """`python -m jobs.serve` following models:/mmrec@champion (alias checked every second) -> its base URL."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve_job") / "serve.log"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO),
           "MLFLOW_TRACKING_URI": registry.tracking_uri}
    with open(log_path, "w") as log:
        job = subprocess.Popen(
            [sys.executable, "-m", "jobs.serve", "--port", str(port), "--poll-s", "1", "--cpus-per-replica", "0.5",
             "--prepared-dir", str(prepared_dir)],
            cwd=log_path.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    started = time.time()
    came_up = False
    try:
        deadline = started + 240
        while True:
            try:  # the proxy listens before the application is deployed: its 404/503 means "not yet"
                if _call(f"{base}/healthz", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if job.poll() is not None or time.time() > deadline:
                pytest.fail(f"jobs.serve did not come up (exit {job.poll()}):\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        print(f"\n[e2e] jobs.serve answered /healthz {time.time() - started:.0f}s after it was started")
        came_up = True
        yield base
    finally:
        job.send_signal(signal.SIGTERM)  # the job deletes its application and exits 0
        try:
            code = job.wait(timeout=60)
        except subprocess.TimeoutExpired:
            job.kill()
            code = job.wait()
        from ray import serve

        serve.shutdown()  # the proxy and controller live in the shared cluster, not in the job
        if came_up:  # otherwise the start-up failure above is the error to report, not the forced stop's exit code
            assert code == 0, log_path.read_text()[-3000:]
            assert "[serve] stopping" in log_path.read_text()


def _raw_ids(prepared_dir: Path) -> dict[int, str]:
    table = pq.read_table(prepared_dir / "items.parquet", columns=["item_index", "item_id"]).to_pydict()
    return dict(zip(table["item_index"], map(str, table["item_id"])))


def test_served_answers_are_the_library_and_offline_rankings_and_bad_requests_get_4xx(served, registry,
                                                                                       prepared_dir):
    from pipeline.sources import ITEMS_FILE
    from pipeline.splits import build_splits
    from serving.online import UserHistories
    from serving.recommender import loaded_recommender
    from training.evaluate import score_users
    from training.offline_eval import DecodedCatalogue, load_checkpoint

    champion = registry.get("champion")
    # one catalogue pass for both references: the library API and the offline evaluation's scores
    loaded = load_checkpoint(champion.checkpoint_path)
    content = DecodedCatalogue(prepared_dir / ITEMS_FILE, loaded.state["num_items"]).encode(loaded)
    raw = _raw_ids(prepared_dir)
    library = loaded_recommender(loaded, content, [raw[i] for i in range(1, len(raw) + 1)])
    status, model = _call(f"{served}/model")
    assert status == 200 and model["version"] == "1" and model["follows"] == f"models:/{MODEL}@champion"
    assert model["info"]["num_items"] == library.num_items and model["user_histories"] == 943

    # test users' histories, ranked offline exactly as the evaluation ranks them (history not excluded)
    test = build_splits(loaded.job.data, prepared_dir).test
    rows = [0, len(test) // 2, len(test) - 1]
    offline = torch.topk(score_users(loaded.model, content, torch.as_tensor(test.history[rows])), 10).indices
    for row, offline_top in zip(rows, offline.tolist()):
        history = [raw[int(i)] for i in test.history[row] if i]
        status, body = _post(served, {"history": history, "k": 10, "exclude_history": False})
        assert status == 200, body
        expected = library.recommend(history, 10, exclude_history=False)
        assert [item["item_id"] for item in body["items"]] == expected.item_ids == [raw[i] for i in offline_top]
        assert [item["score"] for item in body["items"]] == pytest.approx(expected.scores, abs=1e-5)
        assert body["model"] == {"source": f"models:/{MODEL}/1", "version": "1"} and body["unknown_history"] == []

    # a user by id (history from the prepared data), a Matryoshka size, the funnel, candidates, unknown ids
    user_history = UserHistories.from_prepared(prepared_dir).get("42")
    for request, kwargs in (
        ({"user_id": "42", "k": 5}, {}),
        ({"user_id": 42, "k": 7, "size": 16}, {"size": 16}),
        ({"user_id": "42", "mode": "funnel", "size": 8}, {"mode": "funnel", "size": 8}),
    ):
        status, body = _post(served, request)
        expected = library.recommend(user_history, request.get("k", 10), **kwargs)
        assert status == 200 and body["user_id"] == "42", body
        assert [item["item_id"] for item in body["items"]] == expected.item_ids and body["size"] == expected.size
    status, body = _post(served, {"history": ["50", "no-such-item", "172"], "k": 3, "candidates": ["1", "2", "3", "4"]})
    assert status == 200 and body["unknown_history"] == ["no-such-item"]
    assert {item["item_id"] for item in body["items"]} <= {"1", "2", "3", "4"} and len(body["items"]) == 3

    for payload, code, words in (
        (b"{not json", 400, "not valid JSON"),
        ({"user_id": "no-such-user"}, 404, "unknown user"),
        ({"history": []}, 422, "'history' is empty"),
        ({"history": ["50"], "k": 0}, 422, "'k' must be"),
        ({"history": ["50"], "k": 5000}, 422, "'k' must be"),
        ({"history": ["50"], "size": 12}, 422, "size 12 is not served"),
        ({"history": ["no-such-item"]}, 422, "none of the 1 history item ids"),
        ({"history": ["50"], "mode": "fast"}, 422, "'mode' must be one of"),
    ):
        status, body = _post(served, payload)
        assert status == code and list(body) == ["error"] and words in body["error"], (payload, status, body)
        assert "\n" not in body["error"]
    assert _call(f"{served}/no-such-route") == (404, {"error": "Not Found"})
    assert _call(f"{served}/recommend")[0] == 405


def test_a_promoted_challenger_is_served_without_a_restart_or_a_failed_request(served, registry, prepared_dir):
    from serving.recommender import ItemRecommender

    history = ["50", "172", "181", "1", "100"]
    before = _call(f"{served}/healthz")[1]
    assert before["version"] == "1"
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, body = _post(served, {"history": history, "k": 10})
            seen.append((status, body.get("model", {}).get("version", body.get("error", ""))))

    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(1.0)
        registry.set_alias("champion", "2")  # what a retrain's promotion does
        promoted = time.time()
        while time.time() - promoted < 90 and not any(version == "2" for _, version in seen[-3:]):
            time.sleep(0.25)
        time.sleep(1.0)  # some requests on the new version too
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    statuses = {status for status, _ in seen}
    versions = [version for _, version in seen]
    assert statuses == {200}, [entry for entry in seen if entry[0] != 200][:5]
    assert versions[0] == "1" and versions[-1] == "2", versions
    # requests already running when the swap happened finish on version 1; after them, only version 2
    assert "1" not in versions[versions.index("2") + len(clients):], versions
    print(f"\n{len(seen)} requests during the promotion, all 200; v2 served {time.time() - promoted:.1f}s after it")

    after = _call(f"{served}/healthz")[1]
    assert after["version"] == "2" and after["uptime_s"] > before["uptime_s"]  # the same replica: no restart
    status, body = _post(served, {"history": history, "k": 10})
    expected = ItemRecommender.from_checkpoint(registry.get("champion").checkpoint_path,
                                               prepared_dir=prepared_dir).recommend(history, 10)
    assert status == 200 and body["model"] == {"source": f"models:/{MODEL}/2", "version": "2"}
    assert [item["item_id"] for item in body["items"]] == expected.item_ids
    assert _call(f"{served}/model")[1]["last_refresh_error"] is None
