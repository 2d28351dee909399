"""bench/serve.py on a small synthetic catalogue: its rows, goals and table, and that a run keeps the sections of
earlier runs that it does not redo."""
from __future__ import annotations

import json

from bench.serve import bench_synthetic, format_table, save_sections


def test_synthetic_part_rows_goals_and_kept_sections(tmp_path):
    out = tmp_path / "serve.json"
    out.write_text(json.dumps({"http": {"p50_ms": 3.0}, "synthetic": {"stale": True}}))
    section = bench_synthetic(2000, 16, queries=20, ef_search=(16, 256))
    assert [(r["query_set"], r["mode"]) for r in section["rows"]] == \
        [("random", "exact"), ("random", "hnsw"), ("random", "hnsw"), ("near", "exact"), ("near", "hnsw"),
         ("near", "hnsw")]
    exact, wide = section["rows"][0], section["rows"][2]
    assert exact["recall@10"] == 1.0 and wide["recall@10"] >= 0.9  # a wide beam on 2,000 items is near exact
    assert all(r["speedup_vs_exact"] > 0 for r in section["rows"] if r["mode"] == "hnsw")
    result = save_sections({"synthetic": section}, out)
    saved = json.loads(out.read_text())
    assert saved["http"] == {"p50_ms": 3.0} and "stale" not in saved["synthetic"]  # other parts kept, this replaced
    best = max(r["speedup_vs_exact"] for r in section["rows"] if r["mode"] == "hnsw")
    assert saved["goals"]["synthetic_hnsw_speedup_max"] == best
    assert saved["goals"]["synthetic_speedup_goal_20x_met"] == (best >= 20)
    table = format_table(result)
    assert "synthetic: 2,000 items" in table and "near" in table
