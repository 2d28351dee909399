"""The package layering holds: the offline path (evaluate, export) loads no Ray, and no import runs upward."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERS = "matryoshka | encoders memory | pipeline model | training | serving | jobs | bench"  # README, "Layout"
# Everything `jobs.evaluate` and `jobs.export` import, at module level and inside main().
OFFLINE_MODULES = ["jobs.evaluate", "jobs.export", "pipeline.splits", "training.offline_eval", "training.export",
                   "training.registry", "training.tracking", "training.checkpoint", "training.job_config"]


def test_the_offline_path_imports_no_ray():
    code = (f"import sys\nfor m in {OFFLINE_MODULES!r}: __import__(m)\n"
            "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
            "assert not loaded, loaded[:5]\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_ray_module_is_detected_by_the_same_check():
    """The check above can fail: a module of the Ray wiring loads Ray."""
    code = "import sys, pipeline.stages\nassert 'ray' in sys.modules\nprint('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_no_import_runs_against_the_layers_and_no_file_cycles():
    tool = REPO.parent / "shared" / "tools" / "import_layers.py"
    if not tool.is_file():
        pytest.skip(f"{tool} not present in this checkout")
    done = subprocess.run([sys.executable, str(tool), "--layers", LAYERS], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert "0 imports against the layers, 0 file cycles" in done.stdout, done.stdout[-3000:]
