"""`ray job submit` for real: a local head, the tiny train job, new days of data, a retrain behind the gate, an
idempotent second retrain, and the registered champion evaluated and exported through `models:/mmrec@champion`.

The data: a copy of ml100k_mm cut at HOLD_BACK_FROM (the last 10 days held back, and the 12 movies first rated
in them left out of the catalogue); the held-back rows are appended later, as the next days would arrive.

The head is this test's own: its own ports and --temp-dir (so `ray.init()` elsewhere, e.g. the `ray_cluster`
fixture or another engineer's tests, never finds and joins it), stopped by pid at the end (see `_stop_head`).
`ray stop` is NOT used: it stops every Ray on the machine. This test never calls `ray.init`; the jobs reach the
head through the job server. The three jobs that use Ray go through `ray job submit` (train, retrain, evaluate);
those that start no Ray (prepare, the no-op and the locked retrain, export, a bad alias) run their `main()` in this
process, as their command line would, without paying ~12 s of imports for a fresh interpreter each.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.conftest import read_raw_csv

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HOLD_BACK_FROM = "1998-04-13"
MODEL = "mmrec"
# Paths the job must not upload (also .gitignore'd; stated here so the test does not depend on that file).
UPLOAD_EXCLUDES = [".venv", ".git", "runs", "prepared", "mlartifacts", "mlflow.db", "mlruns", "**/__pycache__"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _session_pids(session_id: int) -> list[int]:
    """Pids of the processes in one session (field 6 of /proc/PID/stat)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session_id:
                pids.append(int(proc.name))
    return pids


def _stop_head(session_id: int, temp_dir: str) -> None:
    """Stop this head's processes only, by pid: those in the session `ray start` opened, and any process naming
    the head's temp dir. (`ray stop` would stop every Ray on the machine, other engineers' included.)"""
    for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 2.0)):
        targets = set(_session_pids(session_id))
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and temp_dir in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    targets.add(int(proc.name))
            except OSError:
                pass
        targets.discard(os.getpid())
        for pid in targets:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait_s
        while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in targets):
            time.sleep(0.5)


def _start_head(log_path: Path) -> tuple[subprocess.Popen, str, str]:
    """`ray start --head` in a new session -> (the finished `ray start`, its temp dir, the job server address)."""
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 bytes
    dashboard_port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
           "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "180"}  # default 60 s: too short on a busy 2-core machine
    env.pop("RAY_ADDRESS", None)
    with open(log_path, "a") as log:
        start = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", f"--port={_free_port()}", f"--dashboard-port={dashboard_port}",
             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4", f"--temp-dir={temp_dir}",
             "--disable-usage-stats",
             # Fixed defaults (52365, 10001, ...) collide with any other head on this machine: pick free ones.
             *(f"--{name}={_free_port()}" for name in (
                 "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                 "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port"))],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            start.wait(timeout=300)
        except subprocess.TimeoutExpired:
            start.kill()
            start.wait()
    return start, temp_dir, f"http://127.0.0.1:{dashboard_port}"


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """-> the job server address of a fresh local head (4 logical CPUs), stopped at the end.

    Without --block: with it, any one Ray subprocess that fails to start (seen: the client server timing out
    on a loaded machine) takes the whole head down. `ray start` runs in a new session, whose id then names
    every process of this head for the stop. A start that fails (seen on an overloaded machine: the GCS
    missing an RPC deadline) is cleaned up and tried again (3 tries).
    """
    log_path = tmp_path_factory.mktemp("ray_head") / "ray_start.log"
    for attempt in range(3):
        start, temp_dir, address = _start_head(log_path)
        if start.returncode == 0:
            break
        _stop_head(start.pid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    else:
        pytest.fail(f"ray start failed 3 times:\n{log_path.read_text()[-3000:]}")
    session_id = start.pid  # the session leader's pid is the session id
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the head's job server did not answer in 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield address
    finally:
        _stop_head(session_id, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cut_raw_copy(raw_data_dir: Path, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A raw dataset dir without the days from HOLD_BACK_FROM on; -> (held-back rows, the full items table)."""
    out.mkdir(parents=True)
    interactions = read_raw_csv(raw_data_dir / "interactions.csv")
    items = read_raw_csv(raw_data_dir / "items.csv")
    timestamp = interactions.timestamp.astype(np.int64)
    cut = int(pd.Timestamp(HOLD_BACK_FROM, tz="UTC").timestamp())
    first_rated = timestamp.groupby(interactions.item_id).min()
    unseen_items = set(first_rated[first_rated >= cut].index)
    interactions[timestamp < cut].to_csv(out / "interactions.csv", index=False)
    items[~items.item_id.isin(unseen_items)].to_csv(out / "items.csv", index=False)
    # copied, not linked: prepare reads no file that resolves outside data.raw_dir, links included
    shutil.copytree(raw_data_dir / "images", out / "images")
    return interactions[timestamp >= cut], items


def _digest(directory: Path) -> dict[str, str]:
    """Every file under `directory` -> its sha256."""
    return {str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(directory.rglob("*")) if f.is_file()}


def _append_new_days(out: Path, tail: pd.DataFrame, items: pd.DataFrame) -> None:
    tail.to_csv(out / "interactions.csv", mode="a", header=False, index=False)
    items.to_csv(out / "items.csv", index=False)


def test_train_retrain_and_serve_through_ray_job_submit(ray_head: str, raw_data_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    from mlflow.tracking import MlflowClient

    started = time.perf_counter()
    timings: dict[str, float] = {}
    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    tail, full_items = _cut_raw_copy(raw_data_dir, raw)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, "MMREC_GIT_COMMIT": commit or "unknown"},
                   "excludes": UPLOAD_EXCLUDES}
    common = ["--preset", "tiny", "--set", f"data.raw_dir={raw}", "--set", f"data.prepared_dir={prepared}",
              "--set", f"train.storage_path={tmp_path / 'runs'}", "--set", f"tracking.artifact_root={tmp_path / 'art'}"]
    cli_env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    cli_env.pop("RAY_ADDRESS", None)

    def submit(step: str, *entrypoint: str) -> subprocess.CompletedProcess:
        """`ray job submit` waits for the job and exits non-zero unless it SUCCEEDED."""
        t0 = time.perf_counter()
        for attempt in range(12):
            submission_id = f"{entrypoint[0].replace('.', '-')}-{len(timings)}-{attempt}-{os.getpid()}"
            try:
                result = subprocess.run(
                    [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--submission-id", submission_id,
                     "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
                     "--", "python", "-m", *entrypoint],
                    env=cli_env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                )
            except subprocess.TimeoutExpired:
                subprocess.run([str(BIN / "ray"), "job", "stop", "--address", ray_head, submission_id], env=cli_env,
                               capture_output=True, timeout=120)
                raise
            # A fresh head answers before its node's job agent has registered (slow on a loaded machine).
            if "No available agent to submit job" not in result.stderr:
                break
            time.sleep(5)
        timings[step] = time.perf_counter() - t0
        print(f"[e2e] {step}: {timings[step]:.1f} s", flush=True)
        return result

    def in_process(step: str, job_module: str, *argv: str) -> tuple[int, str, str]:
        """A job's `main()` in this process -> (exit code, stdout, stderr). The jobs run this way start no Ray;
        a fresh interpreter would spend ~12 s on 2 cores importing what this one has imported already."""
        t0 = time.perf_counter()
        out, err = io.StringIO(), io.StringIO()
        with monkeypatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
            patch.delenv("RAY_ADDRESS", raising=False)
            patch.setattr(sys, "argv", [job_module, *argv])
            try:
                code = importlib.import_module(job_module).main()
            except SystemExit as exit_:
                code = exit_.code
        timings[step] = time.perf_counter() - t0
        print(f"[e2e] {step}: {timings[step]:.1f} s", flush=True)
        return code, out.getvalue(), err.getvalue()

    # ---- day 0: prepare (a job, locally) and train through the job server
    code, stdout, stderr = in_process("prepare (in process)", "jobs.prepare", *common)
    assert code == 0, stderr[-3000:]
    assert "items_without_image:" in stdout and (prepared / "data_report.json").is_file()
    before = json.loads((prepared / "manifest.json").read_text())
    assert before["watermark"] < pd.Timestamp(HOLD_BACK_FROM, tz="UTC").timestamp()
    old_indices = pq.read_table(prepared / "items.parquet", columns=["item_id", "item_index"]).to_pandas()

    train = submit("train (ray job submit)", "jobs.train", *common, "--set", "train.epochs=1",
                   "--set", "train.max_steps_per_epoch=5")
    assert train.returncode == 0, (train.stdout + train.stderr)[-5000:]
    assert "succeeded" in train.stdout.lower()
    assert f"Registered models:/{MODEL}/1 as @champion" in train.stdout
    # the user-facing output: the metrics table against most-popular, progress with samples/s, each worker line
    # once (Ray Train's print patch used to double them)
    assert "popularity" in train.stdout and "ndcg@10" in train.stdout and "samples/s" in train.stdout
    assert train.stdout.count("[train] memory bank filled with") == 1

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("mmrec")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's training view
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("test_recall_at_10", "test_ndcg_at_10", "test_mrr"):
        assert 0.0 <= run.data.metrics[key] <= 1.0
    assert run.data.tags["preset"] == "tiny"
    assert {"config.json", "data_report.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    v1 = client.get_model_version_by_alias(MODEL, "champion")
    assert str(v1.version) == "1" and v1.run_id == run.info.run_id
    assert int(v1.tags["data_watermark"]) == int(v1.tags["trained_through"]) == before["watermark"]
    assert v1.tags["git_commit"] == (commit or "unknown") and len(v1.tags["config_hash"]) == 12
    assert float(v1.tags["metric.ndcg_at_10"]) == pytest.approx(run.data.metrics["test_ndcg_at_10"], rel=1e-5)
    # the registry owns a copy of the checkpoint, outside the Ray run folder that keep-last-N rotates
    v1_checkpoint = Path(v1.tags["checkpoint_path"])
    assert (v1_checkpoint / "model.pt").is_file()
    assert v1_checkpoint.is_relative_to(tmp_path / "runs" / "registered" / MODEL)
    v1_files = _digest(v1_checkpoint)

    # ---- new days arrive; the scheduled command re-prepares and retrains behind the gate
    _append_new_days(raw, tail, full_items)
    # (A retrain whose training dies changes nothing: tests/unit/test_registry_and_retrain.py.)
    # MRR as the gate metric: after 5 steps on 75 held-out examples, NDCG@10 is often 0 for both models.
    gate = ["--set", "retrain.steps=5", "--set", "retrain.metric=mrr"]
    retrain = submit("retrain --prepare (ray job submit)", "jobs.retrain", *common, "--prepare", *gate)
    assert retrain.returncode == 0, (retrain.stdout + retrain.stderr)[-5000:]
    after = json.loads((prepared / "manifest.json").read_text())
    assert after["num_items"] == before["num_items"] + 12 and after["watermark"] > before["watermark"]
    new_indices = pq.read_table(prepared / "items.parquet", columns=["item_id", "item_index"]).to_pandas()
    assert old_indices.merge(new_indices, on="item_id", suffixes=("_old", "_new")).pipe(
        lambda m: (m.item_index_old == m.item_index_new).all()), "item indices must be stable across re-prepare"

    versions = sorted(client.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == ["1", "2"]
    v2 = versions[1]
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == "2"
    champion_score, challenger_score = float(v2.tags["gate.champion_score"]), float(v2.tags["gate.challenger_score"])
    margin = float(v2.tags["gate.margin"])
    assert 0 < champion_score <= 1 and 0 < challenger_score <= 1  # MRR of a full ranking is never 0
    promoted = challenger_score >= champion_score - margin
    assert v2.tags["gate.decision"] == ("promoted" if promoted else "rejected")
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == ("2" if promoted else "1")
    assert v2.tags["gate.metric"] == "mrr" and v2.tags["parent_version"] == "1"
    assert f"challenger v2 {v2.tags['gate.decision']}" in retrain.stdout
    # the scores were recorded on the challenger's run too, and the window is newer than anything v1 saw
    retrain_run = client.get_run(v2.run_id)
    assert retrain_run.info.status == "FINISHED" and retrain_run.data.tags["gate.decision"] == v2.tags["gate.decision"]
    assert retrain_run.data.metrics["holdout_champion_mrr"] == pytest.approx(champion_score, rel=1e-6)
    assert retrain_run.data.metrics["holdout_challenger_mrr"] == pytest.approx(challenger_score, rel=1e-6)
    holdout_from = int(v2.tags["gate.holdout_from"])
    assert before["watermark"] < int(v2.tags["trained_through"]) < holdout_from <= after["watermark"]
    assert int(v2.tags["data_watermark"]) == after["watermark"]
    assert int(v2.tags["gate.holdout_examples"]) > 0 and int(v2.tags["gate.train_examples_new"]) > 0
    state = json.loads((Path(v2.tags["checkpoint_path"]) / "state.json").read_text())
    assert state["num_items"] == after["num_items"], "the challenger covers the grown catalogue"
    assert "warm start from" in retrain.stdout
    assert _digest(v1_checkpoint) == v1_files  # warm-starting from the champion never writes to its files

    # ---- nothing new: the scheduled retrain is a no-op
    code, stdout, stderr = in_process("retrain no-op (in process)", "jobs.retrain", *common, "--prepare", *gate)
    assert code == 0, (stdout + stderr)[-3000:]
    assert "nothing newer than the watermark" in stdout
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 2

    # ---- a retrain while another holds the lock exits 3 without training
    lock = tmp_path / "runs" / "locks" / f"retrain-{MODEL}.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": "test"}))
    code, _, stderr = in_process("retrain locked (in process)", "jobs.retrain", *common)
    assert code == 3 and "another retrain holds" in stderr
    lock.unlink()

    # ---- the champion, by alias: evaluated as a job, exported for serving
    evaluate = submit("evaluate (ray job submit)", "jobs.evaluate", "--model", f"models:/{MODEL}@champion",
                      "--split", "test", "--set", f"data.prepared_dir={prepared}")
    assert evaluate.returncode == 0, (evaluate.stdout + evaluate.stderr)[-3000:]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    (eval_run,) = client.search_runs([experiment.experiment_id], "tags.job = 'evaluate'")
    assert eval_run.data.tags["model_version"] == str(champion.version) and eval_run.info.status == "FINISHED"
    assert 0.0 <= eval_run.data.metrics["test_ndcg_at_10"] <= eval_run.data.metrics["test_recall_at_10"] <= 1.0

    out = tmp_path / "export"
    code, stdout, stderr = in_process("export (in process)", "jobs.export", "--model", f"models:/{MODEL}@champion",
                                      "--out", str(out), "--set", f"data.prepared_dir={prepared}")
    assert code == 0, (stdout + stderr)[-3000:]
    vectors = pq.read_table(out / "item_vectors_s32.parquet").to_pandas()
    exported_state = json.loads((out / "model" / "state.json").read_text())
    # every item of today's catalogue gets a vector, also those newer than the champion (content only)
    assert len(vectors) == after["num_items"] and vectors.item_index.tolist() == list(range(1, len(vectors) + 1))
    assert json.loads((out / "export.json").read_text())["new_items"] == after["num_items"] - exported_state["num_items"]
    norms = np.linalg.norm(np.stack(vectors.vector.to_numpy()), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert json.loads((out / "export.json").read_text())["registered_version"] == str(champion.version)

    # every registered version is an MLflow pyfunc model too: the champion loads; v2's answers are the library's
    import mlflow.pyfunc

    from serving.recommender import ItemRecommender

    assert champion.tags["pyfunc_model_uri"].startswith("models:/m-") and v2.tags["pyfunc_model_uri"] != \
        v1.tags["pyfunc_model_uri"]
    histories = pd.DataFrame({"history": [["1", "50", "181"], ["7", "no-such-item"]], "k": [5, 3]})
    with mlflow_tracking(tracking_uri):
        assert mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(histories).item_ids.map(len).tolist() \
            == [5, 3]
        predicted = mlflow.pyfunc.load_model(f"models:/{MODEL}/2").predict(histories)
    library = ItemRecommender.from_model_uri(f"models:/{MODEL}/2", tracking_uri, prepared_dir=prepared)
    assert predicted.item_ids.tolist() == [library.recommend(["1", "50", "181"], 5).item_ids,
                                           library.recommend(["7"], 3).item_ids]
    assert predicted.unknown_history.tolist() == [[], ["no-such-item"]]

    code, _, stderr = in_process("evaluate bad alias (in process)", "jobs.evaluate", "--model", f"models:/{MODEL}@nope")
    assert code == 2 and "has no alias 'nope'" in stderr

    timings["total"] = time.perf_counter() - started
    print("\n" + "\n".join(f"{step:<34} {seconds:6.1f} s" for step, seconds in timings.items()))


@contextlib.contextmanager
def mlflow_tracking(uri: str):
    """MLflow's fluent API (pyfunc.load_model) reads the global tracking URI: set it for the block only."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
