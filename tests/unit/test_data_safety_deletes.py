"""Nothing the product did not write is deleted: every place that deletes or replaces a directory refuses
anything that is not recognisably its own, with one line that names the path (jobs: `error: ...`, exit 2).

Covers prepare (`data.prepared_dir`, `<prepared>.old`, staging leftovers), export `--out`, the registry's
checkpoint copies, the training run directory and the retrain lock, on a real slice of ml100k_mm.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import DataConfig
from pipeline.sources import ITEMS_FILE, MANIFEST_FILE, prepare_dataset

NUM_ITEMS = 40


@pytest.fixture(scope="module")
def pristine_raw(real_slice, tmp_path_factory) -> Path:
    """Items 1..40 of ml100k_mm with their images and the interactions naming them, copied once."""
    return real_slice("slice", NUM_ITEMS, root=tmp_path_factory.mktemp("slice") / "raw")


@pytest.fixture
def raw(pristine_raw: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine_raw, tmp_path / "raw"))


def _fingerprint(directory: Path) -> dict[str, str]:
    """Every file and folder under `directory` (relative path -> content hash; folders -> "dir")."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


def _project_folder(path: Path) -> Path:
    """What a user keeps in a project folder: notes and an MLflow database."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("experiment notes\n")
    (path / "mlflow.db").write_bytes(b"SQLite format 3\x00" + b"\x01" * 64)
    return path


def _run_job(module: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run `python -m <module> <argv>` in this process through its `run_main`; -> (exit code, stderr)."""
    import importlib

    from jobs.cli import run_main

    job = importlib.import_module(module)
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(SystemExit) as exited:
        run_main(job.main)
    return exited.value.code, capsys.readouterr().err


def _prepare_job(raw: Path, out: Path, monkeypatch, capsys) -> tuple[int, str]:
    return _run_job("jobs.prepare", ["--set", f"data.raw_dir={raw}", "--set", f"data.prepared_dir={out}"],
                    monkeypatch, capsys)


def _assert_one_line_refusal(code: int, err: str, path: Path) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(path.resolve()) in lines[0]
    assert "delete it yourself" in lines[0] or "separate directory" in lines[0]  # says what to do


# ---------------------------------------------------------------------------------------------- prepare


def test_prepare_into_a_project_folder_is_refused_and_nothing_is_deleted(raw, tmp_path, monkeypatch, capsys):
    project = _project_folder(tmp_path / "project")
    before = _fingerprint(project)
    code, err = _prepare_job(raw, project, monkeypatch, capsys)
    _assert_one_line_refusal(code, err, project)
    assert _fingerprint(project) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project", "raw"]  # no staging or backup either


@pytest.mark.parametrize("where", ["the raw dir", "inside the raw dir", "the parent of the raw dir"])
def test_prepare_overlapping_the_raw_dir_is_refused_and_nothing_is_deleted(where, raw, tmp_path, monkeypatch,
                                                                            capsys):
    out = {"the raw dir": raw, "inside the raw dir": raw / "prepared", "the parent of the raw dir": tmp_path}[where]
    before = _fingerprint(tmp_path)
    code, err = _prepare_job(raw, out, monkeypatch, capsys)
    _assert_one_line_refusal(code, err, out)
    assert "raw" in err
    assert _fingerprint(tmp_path) == before  # not one file written or removed, raw data intact


def test_a_foreign_old_sibling_is_refused_and_left_alone(raw, tmp_path, monkeypatch, capsys):
    out = tmp_path / "prepared"
    prepare_dataset(DataConfig(), raw, out)
    foreign_old = _project_folder(tmp_path / "prepared.old")
    before_old, before_out = _fingerprint(foreign_old), _fingerprint(out)
    code, err = _prepare_job(raw, out, monkeypatch, capsys)
    _assert_one_line_refusal(code, err, foreign_old)
    assert _fingerprint(foreign_old) == before_old and _fingerprint(out) == before_out


def test_a_prepared_dir_holding_a_users_file_is_refused(raw, tmp_path):
    out = tmp_path / "prepared"
    prepare_dataset(DataConfig(), raw, out)
    (out / "my_analysis.ipynb").write_text("{}")
    before = _fingerprint(out)
    with pytest.raises(ValueError, match="delete it yourself"):
        prepare_dataset(DataConfig(), raw, out)
    assert _fingerprint(out) == before


def test_reprepare_replaces_its_own_output_including_one_from_before_the_marker(raw, tmp_path):
    out = tmp_path / "prepared"
    prepare_dataset(DataConfig(), raw, out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["written_by"] == "mmrec.prepare"
    del manifest["written_by"]  # as an older version wrote it
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    prepare_dataset(DataConfig(), raw, out)
    assert json.loads((out / MANIFEST_FILE).read_text())["num_items"] == NUM_ITEMS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "raw"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _staging_leftover(parent: Path, name: str, marker: dict | None) -> Path:
    path = parent / name
    (path / "interactions").mkdir(parents=True)
    (path / ITEMS_FILE).write_bytes(b"half written")
    if marker is not None:
        (path / ".mmrec-staging.json").write_text(json.dumps(marker))
    return path


def test_staging_left_by_a_killed_run_is_removed_but_live_and_foreign_ones_stay(raw, tmp_path):
    import socket

    out = tmp_path / "prepared"
    host = socket.gethostname()
    live_run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _staging_leftover(tmp_path, f".prepared.staging-{_dead_pid()}-0a1b",
                                 {"written_by": "mmrec", "target": "prepared", "host": host, "pid": _dead_pid()})
        live = _staging_leftover(tmp_path, f".prepared.staging-{live_run.pid}-2c3d",
                                 {"written_by": "mmrec", "target": "prepared", "host": host, "pid": live_run.pid})
        other_host = _staging_leftover(tmp_path, ".prepared.staging-1-4e5f",
                                       {"written_by": "mmrec", "target": "prepared", "host": "elsewhere", "pid": 1})
        foreign = _staging_leftover(tmp_path, ".prepared.staging-12345-my-own", None)  # a user's, similar name
        kept = {path: _fingerprint(path) for path in (live, other_host, foreign)}
        prepare_dataset(DataConfig(), raw, out)
        assert not dead.exists()
        assert {path: _fingerprint(path) for path in kept} == kept
        assert (out / ITEMS_FILE).is_file()
    finally:
        live_run.kill()
        live_run.wait()


# ---------------------------------------------------------------------------------------------- export


@pytest.fixture
def checkpoint_and_data(raw, tmp_path) -> tuple[Path, Path]:
    """A real (untrained) tiny checkpoint with three Matryoshka sizes, and the prepared data it belongs to."""
    import dataclasses

    import torch

    from training.job_config import tiny
    from model.build import build_recommender

    prepared = tmp_path / "prepared"
    prepare_dataset(DataConfig(), raw, prepared)
    job = tiny()
    job.model = dataclasses.replace(job.model, matryoshka_sizes=(8, 16, 32), use_id_embedding=True)
    torch.manual_seed(0)
    model = build_recommender(job.model, job.image, job.text, num_items=NUM_ITEMS, max_history=job.data.max_history)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    torch.save(model.state_dict(), checkpoint / "model.pt")
    (checkpoint / "state.json").write_text(json.dumps({"config": job.to_dict(), "num_items": NUM_ITEMS,
                                                       "matryoshka_sizes": [8, 16, 32], "watermark": 0}))
    return checkpoint, prepared


def _export_job(checkpoint: Path, prepared: Path, out: Path, extra: list[str], monkeypatch, capsys):
    return _run_job("jobs.export", ["--checkpoint", str(checkpoint), "--out", str(out),
                                    "--set", f"data.prepared_dir={prepared}", *extra], monkeypatch, capsys)


def test_export_into_a_foreign_non_empty_dir_is_refused(checkpoint_and_data, tmp_path, monkeypatch, capsys):
    checkpoint, prepared = checkpoint_and_data
    project = _project_folder(tmp_path / "project")
    before = _fingerprint(project)
    code, err = _export_job(checkpoint, prepared, project, ["--size", "8"], monkeypatch, capsys)
    _assert_one_line_refusal(code, err, project)
    assert _fingerprint(project) == before


def test_export_replaces_a_previous_export_whole(checkpoint_and_data, tmp_path, monkeypatch, capsys):
    checkpoint, prepared = checkpoint_and_data
    out = tmp_path / "export"
    assert _export_job(checkpoint, prepared, out, ["--all-sizes"], monkeypatch, capsys)[0] == 0
    assert {p.name for p in out.glob("item_vectors_s*.parquet")} == {f"item_vectors_s{s}.parquet" for s in (8, 16, 32)}
    assert _export_job(checkpoint, prepared, out, ["--size", "16"], monkeypatch, capsys)[0] == 0
    # the new export, nothing stale from the old one (the s8/s32 files would disagree with export.json)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "item_vectors_s16.parquet", "model"]
    assert json.loads((out / "export.json").read_text())["files"] == ["item_vectors_s16.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "export", "prepared", "raw"]


# ---------------------------------------------------------------------------------------------- registry


def _checkpoint(directory: Path, payload: bytes) -> Path:
    directory.mkdir(parents=True)
    (directory / "model.pt").write_bytes(payload)
    (directory / "state.json").write_text(json.dumps({"watermark": 1000}))
    return directory


def test_registry_pin_onto_a_foreign_existing_target_is_refused_cleanly(tmp_path):
    from training.registry import pin_checkpoint

    source = _checkpoint(tmp_path / "run" / "checkpoint_000001", b"weights")
    root = tmp_path / "registered" / "m"
    foreign = _project_folder(root / "run-a" / "checkpoint_000001")  # exists, but is no copy (no model.pt)
    before = _fingerprint(root)
    with pytest.raises(ValueError, match="delete it yourself") as refused:
        pin_checkpoint(source, root, "run-a")
    assert str(foreign) in str(refused.value) and "\n" not in str(refused.value)
    assert _fingerprint(root) == before  # untouched, and no staging folder left


def test_registry_pin_onto_an_empty_target_copies_and_cleans_dead_staging(tmp_path):
    import socket

    from training.registry import pin_checkpoint

    source = _checkpoint(tmp_path / "run" / "checkpoint_000001", b"weights")
    root = tmp_path / "registered" / "m"
    (root / "run-a" / "checkpoint_000001").mkdir(parents=True)
    dead = _staging_leftover(root / "run-a", ".checkpoint_000001.staging-9-dead",
                             {"written_by": "mmrec", "target": "checkpoint_000001", "host": socket.gethostname(),
                              "pid": _dead_pid()})
    pinned = pin_checkpoint(source, root, "run-a")
    assert (pinned / "model.pt").read_bytes() == b"weights" and not dead.exists()
    assert sorted(p.name for p in (root / "run-a").iterdir()) == ["checkpoint_000001"]


# ---------------------------------------------------------------------------------------------- training runs


def test_train_run_dir_must_be_new_empty_or_a_run_of_ours(raw, tmp_path):
    from training.driver import claim_run_dir

    prepared = tmp_path / "prepared"
    project = _project_folder(tmp_path / "runs" / "project")
    before = _fingerprint(project)
    with pytest.raises(ValueError, match="delete it yourself"):
        claim_run_dir(project, prepared_dir=prepared, raw_dir=raw)
    assert _fingerprint(project) == before
    with pytest.raises(ValueError, match="separate directory"):
        claim_run_dir(raw / "run", prepared_dir=prepared, raw_dir=raw)
    fresh = tmp_path / "runs" / "tiny-1"
    claim_run_dir(fresh, prepared_dir=prepared, raw_dir=raw)
    claim_run_dir(fresh, prepared_dir=prepared, raw_dir=raw)  # resuming the same run is fine


@pytest.mark.parametrize("override", ["train.run_name=../elsewhere", "train.run_name=registered",
                                      "tracking.registered_model=../../home"])
def test_names_that_become_folders_under_storage_path_stay_plain(override):
    from training.job_config import build_config
    from training.overrides import ConfigError

    with pytest.raises(ConfigError, match="plain folder name"):
        build_config("tiny", [override])


# ---------------------------------------------------------------------------------------------- retrain lock


def test_retrain_lock_takeover_never_deletes_a_file_that_is_not_a_lock(tmp_path):
    from training.retrain.lock import RetrainLock, RetrainLockedError

    path = tmp_path / "locks" / "retrain-m.lock"
    path.parent.mkdir()
    path.write_text("a user's file that happens to sit at the lock path\n")
    old = time.time() - 7200
    os.utime(path, (old, old))  # older than the stale age: a lock would be taken over
    with pytest.raises(RetrainLockedError, match="not a retrain lock"):
        RetrainLock(path, stale_after_s=60).acquire()
    assert path.read_text().startswith("a user's file")

    path.unlink()
    holder = RetrainLock(path, stale_after_s=60)
    holder.acquire()  # a real lock of a holder that then died: taken over as before
    os.utime(path, (old, old))
    taker = RetrainLock(path, stale_after_s=60)
    taker.acquire()
    assert json.loads(path.read_text())["token"] == taker._token
    taker.release()
    assert not path.exists()
