"""The recommendation gallery: its top-k is the score ranking, its hits and ranks are the evaluation's."""
from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.build import build_recommender
from pipeline.sequences import Examples
from training.gallery import (CatalogueItem, build_gallery, load_catalogue_items, pick_examples, render_html,
                              thumbnail_base64)
from training.job_config import build_config

NUM_ITEMS = 50


def _model_and_content():
    job = build_config("tiny")
    torch.manual_seed(0)
    model = build_recommender(job.model, job.image, job.text, num_items=NUM_ITEMS, max_history=6).eval()
    content = torch.randn(NUM_ITEMS + 1, job.model.dim)
    content[0] = 0
    return model, content


def _examples() -> Examples:
    rng = np.random.default_rng(3)
    history = np.zeros((8, 6), np.int64)
    for row in range(8):
        length = 2 + row % 5
        history[row, -length:] = rng.choice(np.arange(1, NUM_ITEMS + 1), length, replace=False)
    return Examples(user=np.arange(100, 108), history=history, target=rng.integers(1, NUM_ITEMS + 1, 8),
                    timestamp=np.zeros(8, np.int64), rating=np.full(8, np.nan, np.float32))


def _loop_ranking(model, content, history_row: np.ndarray, mask: bool) -> list[tuple[float, int]]:
    """One user's (score, item) pairs, best first, by a plain loop over the catalogue (the reference)."""
    history = torch.as_tensor(history_row[None])
    with torch.inference_mode():
        user = model.user_vectors(history, content[history])[0]
        items = model.item_vectors(content, torch.arange(NUM_ITEMS + 1))
    seen = {int(i) for i in history_row if i}
    pairs = [(float(user @ items[i]), i) for i in range(1, NUM_ITEMS + 1) if not (mask and i in seen)]
    return sorted(pairs, key=lambda pair: -pair[0])


@pytest.mark.parametrize("mask", [True, False])
def test_gallery_top_k_is_the_score_ranking_and_the_rank_is_the_evaluations(mask: bool):
    model, content = _model_and_content()
    examples = _examples()
    rows = build_gallery(model, content, examples, [0, 3, 7], k=10, history_shown=3, mask_history=mask,
                         user_ids={103: "u103"})
    assert [row.example for row in rows] == [0, 3, 7] and rows[1].user_id == "u103" and rows[0].user_id == ""
    for row in rows:
        reference = _loop_ranking(model, content, examples.history[row.example], mask)
        assert row.top == [item for _, item in reference[:10]]
        assert row.scores == pytest.approx([score for score, _ in reference[:10]], abs=1e-5)
        target = int(examples.target[row.example])
        target_score = float(dict((i, s) for s, i in _loop_ranking(model, content, examples.history[row.example],
                                                                   False))[target])
        # the evaluation's rank: items (not excluded) scoring strictly higher, the target never excluded
        assert row.target == target
        assert row.target_rank == 1 + sum(score > target_score + 1e-6 for score, item in reference if item != target)
        history = [int(i) for i in examples.history[row.example] if i]
        assert row.history == history[-3:]
        if mask:
            assert not set(row.top) & set(history)


def test_hits_are_marked_and_every_poster_is_embedded():
    model, content = _model_and_content()
    examples = _examples()
    (probe,) = build_gallery(model, content, examples, [2], k=10, history_shown=5)
    examples.target[2] = probe.top[3]  # the held-out item is the 4th recommendation
    (row,) = build_gallery(model, content, examples, [2], k=10, history_shown=5)
    assert row.target_rank == 4
    jpeg = io.BytesIO()
    Image.new("RGB", (185, 278), (200, 10, 10)).save(jpeg, format="JPEG")
    thumb = thumbnail_base64(jpeg.getvalue())
    items = {i: CatalogueItem(f"raw{i}", f"Movie {i} (1995). Drama.", thumb if i % 2 else "")
             for i in range(1, NUM_ITEMS + 1)}
    page = render_html([row], items, heading="h", note="n")
    hits = re.findall(r'<figure class="hit" data-item-id="([^"]+)"', page)
    assert hits == [f"raw{probe.top[3]}"]
    top_strip = page.split("class='strip top'>")[1]
    assert re.findall(r'data-item-index="(\d+)"', top_strip) == [str(i) for i in row.top]
    assert "4 HIT" in top_strip and "held-out item at rank 4 (a hit)" in page
    images = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(images) == sum(i % 2 for i in (*row.history, *row.top))
    assert page.count("no poster") == sum(1 - i % 2 for i in (*row.history, *row.top))
    with Image.open(io.BytesIO(base64.b64decode(images[0]))) as decoded:
        assert decoded.format == "JPEG" and decoded.size[0] <= 96 and decoded.size[1] <= 144


def test_thumbnails_of_bad_bytes_are_empty_and_users_are_spread():
    assert thumbnail_base64(b"not a jpeg") == "" and thumbnail_base64(None) == ""
    assert pick_examples(120, 6) == [0, 24, 48, 71, 95, 119]
    assert pick_examples(3, 6) == [0, 1, 2] and pick_examples(0, 6) == []


def test_catalogue_items_come_from_the_prepared_items_table(prepared_dir: Path):
    items = load_catalogue_items(prepared_dir, {1, 50})
    assert set(items) == {1, 50}
    assert items[1].item_id == "1" and items[1].text.startswith("Toy Story (1995)")
    with Image.open(io.BytesIO(base64.b64decode(items[1].thumbnail))) as poster:
        assert poster.format == "JPEG"
