"""jobs.recommend on the shared Ray cluster: every user's (or the listed users') top-k from a real tiny checkpoint,
written by an actor pool, equal to `ItemRecommender` called directly; bad input is one line and exit 2; --out
is replaced only when it is this job's output."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.integration


def run_job(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    from jobs.cli import run_main

    job = importlib.import_module("jobs.recommend")
    monkeypatch.setattr(sys, "argv", ["jobs.recommend", *argv])
    with pytest.raises(SystemExit) as exited:
        run_main(job.main)
    return exited.value.code, capsys.readouterr().err


def test_every_user_top_k_equals_the_library(ray_cluster, tiny_checkpoint, prepared_dir, tmp_path, monkeypatch,
                                              capsys):
    from jobs.recommend import user_histories
    from serving.recommender import ItemRecommender

    out = tmp_path / "recs"
    common = ["--checkpoint", str(tiny_checkpoint), "--set", f"data.prepared_dir={prepared_dir}"]
    code, err = run_job([*common, "--out", str(out), "--k", "5", "--actors", "2", "--cpus-per-actor", "0.5",
                         "--batch-size", "200"], monkeypatch, capsys)
    assert code == 0, err
    recs = pd.read_parquet(out / "recommendations.parquet")
    assert list(recs.columns) == ["user_id", "rank", "item_id", "score"]
    histories, _ = user_histories(prepared_dir, None)
    assert recs.user_id.nunique() == histories.num_rows == 943 and len(recs) == 943 * 5
    assert all(ranks == [1, 2, 3, 4, 5] for ranks in recs.groupby("user_id")["rank"].apply(list))
    library = ItemRecommender.from_checkpoint(tiny_checkpoint, prepared_dir=prepared_dir)
    users = histories.column("user_id").to_pylist()
    expected = library.recommend_batch(histories.column("history").to_pylist(), 5)
    by_user = recs.sort_values(["user_id", "rank"]).groupby("user_id")
    got = {user: list(group.item_id) for user, group in by_user}
    assert [got[u] for u in users] == [r.item_ids for r in expected]
    for user, history in zip(users[:50], histories.column("history").to_pylist()[:50]):
        assert not set(got[user]) & set(history)  # history excluded by default
    manifest = json.loads((out / "recommend.json").read_text())
    assert manifest["users"] == 943 and manifest["rows"] == 943 * 5 and manifest["mode"] == "exact"

    # a list of users, another mode; the previous output is replaced whole
    code, err = run_job([*common, "--out", str(out), "--users", "1,42", "--k", "3", "--mode", "funnel", "--size",
                         "8"], monkeypatch, capsys)
    assert code == 0, err
    recs = pd.read_parquet(out / "recommendations.parquet")
    assert sorted(recs.user_id.unique()) == ["1", "42"] and len(recs) == 6
    assert (recs.score.diff().fillna(-1)[recs["rank"] > 1] <= 1e-6).all()


@pytest.mark.parametrize("extra, message", [
    (["--users", "1,no-such-user"], "1 of the requested users have no interactions"),
    (["--size", "12"], "size 12 is not served"),
    (["--k", "0"], "--k, --actors and --batch-size must be >= 1"),
    (["--users-file", "/nonexistent/users.txt"], "--users-file: No such file"),
])
def test_bad_input_is_one_line_and_exit_2(ray_cluster, tiny_checkpoint, prepared_dir, tmp_path, monkeypatch, capsys,
                                          extra, message):
    code, err = run_job(["--checkpoint", str(tiny_checkpoint), "--set", f"data.prepared_dir={prepared_dir}",
                         "--out", str(tmp_path / "recs"), *extra], monkeypatch, capsys)
    # (lines that Ray forwards from the previous test's actors, prefixed "(MapWorker... pid=...)", are not ours)
    lines = [line for line in err.splitlines() if line.strip() and " pid=" not in line and not line.startswith(" ")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "recs").exists()


def test_a_foreign_out_dir_is_refused_and_left_alone(tiny_checkpoint, prepared_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, err = run_job(["--checkpoint", str(tiny_checkpoint), "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: ") and str(out) in err
    assert (out / "notes.txt").read_text() == "keep me"
