"""Checkpoint files are opened with `weights_only=True`: a crafted pickle is refused with one line, never run.

`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1` makes torch >= 2.6 behave like torch 2.4-2.5 (which pyproject allows), whose
`torch.load` default unpickles anything: the checks below hold under it only because every load in the product
passes `weights_only=True` itself.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from training.job_config import tiny
from model.build import build_recommender
from training.checkpoint import (CheckpointError, load_model_weights, load_tensors, save_checkpoint, MODEL_FILE,
                                 OPTIMIZER_FILE)

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "jobs", "encoders", "memory", "model", "training", "bench")


class _Payload:
    """Unpickling this calls `open(marker, "w")`: harmless, and visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _crafted_model_file(directory: Path, marker: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MODEL_FILE
    torch.save({"item_encoder.id_embedding.weight": torch.zeros(2, 2), "payload": _Payload(marker)}, path)
    return path


@pytest.fixture(autouse=True)
def _old_torch_default(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def test_a_crafted_pickle_is_refused_with_one_line_and_never_runs(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = _crafted_model_file(tmp_path / "ckpt", marker)
    with pytest.raises(CheckpointError) as refused:
        load_tensors(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "weights_only=True" in message
    assert not marker.exists()
    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError):
        load_model_weights(model, path)
    assert not marker.exists()


def test_real_model_and_optimizer_files_still_load(tmp_path: Path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path, model, optimizer, {"epoch": 0})
    restored = torch.nn.Linear(3, 2)
    restored.load_state_dict(load_tensors(tmp_path / MODEL_FILE))
    torch.testing.assert_close(restored.weight, model.weight)
    again = torch.optim.AdamW(restored.parameters(), lr=1e-3)
    again.load_state_dict(load_tensors(tmp_path / OPTIMIZER_FILE))
    assert again.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_tensors(tmp_path / "missing.pt")


def test_evaluate_job_refuses_a_crafted_checkpoint_with_one_line(prepared_dir: Path, tmp_path: Path, monkeypatch,
                                                                 capsys):
    import jobs.evaluate
    from pipeline.sources import load_manifest

    marker = tmp_path / "pwned"
    job = tiny()
    job.data = dataclasses.replace(job.data, prepared_dir=str(prepared_dir))
    num_items = load_manifest(prepared_dir)["num_items"]
    checkpoint = tmp_path / "checkpoint"
    _crafted_model_file(checkpoint, marker)
    (checkpoint / "state.json").write_text(json.dumps({"config": job.to_dict(), "num_items": num_items,
                                                       "watermark": 0}))
    monkeypatch.setattr(sys, "argv", ["jobs.evaluate", "--checkpoint", str(checkpoint),
                                      "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    with pytest.raises(SystemExit) as exited:
        jobs.evaluate.run_main(jobs.evaluate.main)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "refused" in err[0], err
    assert not marker.exists()


def test_a_real_checkpoint_from_build_recommender_loads(tmp_path: Path):
    job = tiny()
    model = build_recommender(job.model, job.image, job.text, num_items=20, max_history=job.data.max_history)
    torch.save(model.state_dict(), tmp_path / MODEL_FILE)
    fresh = build_recommender(job.model, job.image, job.text, num_items=20, max_history=job.data.max_history)
    assert load_model_weights(fresh, tmp_path / MODEL_FILE) == 0
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], tensor)


def _torch_load_calls(path: Path) -> list[tuple[int, bool]]:
    """(line, passes weights_only=True) for every `torch.load(...)` call in a file."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            calls.append((node.lineno, safe))
    return calls


def test_every_torch_load_in_the_product_passes_weights_only_true():
    unsafe, seen = [], 0
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for line, safe in _torch_load_calls(path):
                seen += 1
                if not safe:
                    unsafe.append(f"{path.relative_to(REPO)}:{line}")
    assert seen >= 1, "the scan found no torch.load at all: it is not looking at the product"
    assert unsafe == [], f"torch.load without weights_only=True: {unsafe}"
