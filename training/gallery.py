"""The recommendation gallery: what a checkpoint recommends to a few test users, as one self-contained HTML page.

For each of a few test users (spread evenly over the test examples) it shows the posters of the last history items
beside the posters of the top-k, ranked by `training.evaluate.score_users` over a fresh catalogue pass (the same
scores the offline evaluation ranks by, under the run's history-masking protocol); the held-out test item is marked
where it appears. Posters are the prepared items.parquet JPEG bytes, shrunk to thumbnails and embedded as base64,
so the page opens from the MLflow UI's Artifacts tab or from a downloaded file with no other file beside it.

`build_gallery` computes the rows (plain data, tested), `render_html` draws them, `write_gallery` does both for a
checkpoint directory and a prepared dataset (what the driver calls at the end of training).
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from model.recommender import Recommender
from pipeline.sequences import Examples
from pipeline.sources import INTERACTIONS_DIR, ITEMS_FILE
from training.evaluate import score_users
from training.metrics import history_mask, target_ranks

GALLERY_DIR = "gallery"  # the run's artifact folder: gallery/index.html and gallery/gallery.json
GALLERY_USERS = 6  # test users shown (a constant, not a config key: the config keeps few keys on purpose)
THUMBNAIL_SIZE = (96, 144)  # width, height: posters are ~185 x 278


@dataclass
class GalleryRow:
    example: int  # row of the test examples
    user_index: int
    user_id: str  # raw, as in interactions.csv ("" when unknown)
    history: list[int]  # the last item indices of the history, oldest first
    top: list[int]  # top-k item indices, best first
    scores: list[float]  # their scores
    target: int  # the held-out test item
    target_rank: int  # its 1-based rank under the same protocol (history masked or not)


def pick_examples(num_examples: int, count: int) -> list[int]:
    """`count` example rows spread evenly over `num_examples` (deterministic: the same users every run)."""
    if num_examples <= 0 or count <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, num_examples - 1, min(count, num_examples)).round()})


def build_gallery(model: Recommender, content: torch.Tensor, examples: Examples, rows: list[int], *, k: int = 10,
                  history_shown: int = 5, mask_history: bool = True,
                  user_ids: dict[int, str] | None = None, item_offset: torch.Tensor | None = None) -> list[GalleryRow]:
    """content [N+1, D] (row 0 padding), examples' `rows` -> one `GalleryRow` each, top-k by `score_users`
    (item_offset [N+1]: the new items' score offset, `training.evaluate.item_offsets`)."""
    if not rows:
        return []
    history = torch.as_tensor(examples.history[rows])  # [U, L], left-padded with 0
    scores = score_users(model, content, history, item_offset=item_offset)  # [U, N+1], column 0 = -inf
    exclude = history_mask(history, content.shape[0], pad_id=0) if mask_history else None  # [U, N+1]
    targets = torch.as_tensor(examples.target[rows])
    ranks = target_ranks(scores, targets, exclude) + 1  # [U], 1-based, exactly as the evaluation ranks
    shown = scores if exclude is None else scores.masked_fill(exclude, float("-inf"))
    top = torch.topk(shown, min(k, content.shape[0] - 1), dim=1)
    out = []
    for position, row in enumerate(rows):
        past = [int(i) for i in examples.history[row] if i != 0][-history_shown:]
        user_index = int(examples.user[row])
        out.append(GalleryRow(example=row, user_index=user_index, user_id=(user_ids or {}).get(user_index, ""),
                              history=past, top=top.indices[position].tolist(),
                              scores=[round(float(s), 6) for s in top.values[position]], target=int(targets[position]),
                              target_rank=int(ranks[position])))
    return out


def thumbnail_base64(image: bytes | None, size: tuple[int, int] = THUMBNAIL_SIZE) -> str:
    """JPEG bytes -> a base64 JPEG thumbnail fitting `size` ("" when there is no image or it does not decode)."""
    if not image:
        return ""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image)) as picture:
            picture = picture.convert("RGB")
            picture.thumbnail(size)
            buffer = io.BytesIO()
            picture.save(buffer, format="JPEG", quality=80)
    except (UnidentifiedImageError, OSError, ValueError):
        return ""
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class CatalogueItem:
    item_id: str
    text: str
    thumbnail: str  # base64 JPEG, "" when the item has no poster


def load_catalogue_items(prepared_dir: Path, indices: set[int]) -> dict[int, CatalogueItem]:
    """item index -> raw id, text and poster thumbnail, for the `indices` asked for only (thumbnails cost time)."""
    table = pq.read_table(Path(prepared_dir) / ITEMS_FILE, columns=["item_index", "item_id", "text", "image"])
    index_column = table.column("item_index").to_numpy()
    wanted = np.flatnonzero(np.isin(index_column, list(indices)))
    subset = table.take(wanted).to_pydict()
    return {int(i): CatalogueItem(str(item_id), text or "", thumbnail_base64(image))
            for i, item_id, text, image in zip(subset["item_index"], subset["item_id"], subset["text"], subset["image"])}


def load_user_ids(prepared_dir: Path) -> dict[int, str]:
    """user index -> raw user id, from the prepared interactions."""
    root = Path(prepared_dir) / INTERACTIONS_DIR
    if not root.is_dir():
        return {}
    pairs = pq.read_table(root, columns=["user_index", "user_id"]).to_pandas().drop_duplicates("user_index")
    return dict(zip(pairs.user_index.astype(int), pairs.user_id.astype(str)))


_STYLE = """
body { font-family: sans-serif; margin: 16px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 15px; margin: 18px 0 6px; }
.row { display: flex; gap: 18px; align-items: flex-start; }
.strip { display: flex; gap: 6px; } .label { font-size: 12px; color: #555; margin-bottom: 4px; }
figure { margin: 0; width: 96px; font-size: 10px; line-height: 1.2; }
figure img, figure .noimg { width: 96px; height: 144px; object-fit: contain; background: #eee; display: block; }
figure .noimg { display: flex; align-items: center; justify-content: center; color: #888; }
figure.hit { outline: 4px solid #1a9e3c; } figure.hit figcaption b { color: #1a9e3c; }
.sep { border-left: 2px solid #ccc; align-self: stretch; }
"""


def _figure(index: int, item: CatalogueItem | None, caption: str, hit: bool = False) -> str:
    item = item or CatalogueItem("?", "", "")
    title = html.escape(item.text)
    short = html.escape(item.text[:48] + ("..." if len(item.text) > 48 else ""))
    image = (f'<img alt="item {html.escape(item.item_id)}" src="data:image/jpeg;base64,{item.thumbnail}">'
             if item.thumbnail else '<div class="noimg">no poster</div>')
    classes = ' class="hit"' if hit else ""
    return (f'<figure{classes} data-item-id="{html.escape(item.item_id)}" data-item-index="{index}" title="{title}">'
            f'{image}<figcaption>{caption}<br>{short}</figcaption></figure>')


def render_html(rows: list[GalleryRow], items: dict[int, CatalogueItem], *, heading: str, note: str) -> str:
    """The gallery page: one section per user, history (oldest to newest) | top-k, the held-out item outlined."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(heading)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(heading)}</h1><p>{html.escape(note)}</p>"]
    for row in rows:
        hit_text = f"held-out item at rank {row.target_rank}" + (" (a hit)" if row.target in row.top else "")
        target = items.get(row.target)
        parts.append(
            f'<section class="user" data-user-id="{html.escape(row.user_id)}" data-user-index="{row.user_index}">'
            f"<h2>user {html.escape(row.user_id or str(row.user_index))}: {hit_text}; held out: "
            f"{html.escape(target.text[:60] if target else str(row.target))}</h2><div class='row'>"
            f"<div><div class='label'>last {len(row.history)} of the history (newest last)</div><div class='strip history'>"
            + "".join(_figure(i, items.get(i), f"#{n + 1}") for n, i in enumerate(row.history))
            + f"</div></div><div class='sep'></div><div><div class='label'>top {len(row.top)}</div>"
              "<div class='strip top'>"
            + "".join(_figure(i, items.get(i), f"<b>{rank + 1}{' HIT' if i == row.target else ''}</b> {score:.3f}",
                              hit=i == row.target)
                      for rank, (i, score) in enumerate(zip(row.top, row.scores)))
            + "</div></div></div></section>")
    parts.append("</body></html>")
    return "".join(parts)


def write_gallery(checkpoint_dir: Path, prepared_dir: Path, examples: Examples, out_dir: Path, *,
                  users: int = GALLERY_USERS, k: int = 10, history_shown: int = 5,
                  batch_size: int = 256) -> list[Path]:
    """A checkpoint and its test examples -> out_dir/index.html and out_dir/gallery.json (the rows); -> paths."""
    from pipeline.sources import load_manifest
    from training.offline_eval import DecodedCatalogue, load_checkpoint

    num_items = int(load_manifest(Path(prepared_dir))["num_items"])
    loaded = load_checkpoint(Path(checkpoint_dir), num_items)
    content = DecodedCatalogue(Path(prepared_dir) / ITEMS_FILE, num_items, batch_size).encode(loaded)
    mask = loaded.job.train.eval_mask_history
    rows = build_gallery(loaded.model, content, examples, pick_examples(len(examples), users), k=k,
                         history_shown=history_shown, mask_history=mask, user_ids=load_user_ids(prepared_dir),
                         item_offset=loaded.item_offset())
    shown = {i for row in rows for i in (*row.history, *row.top, row.target)}
    items = load_catalogue_items(prepared_dir, shown)
    hits = sum(row.target in row.top for row in rows)
    heading = f"Top-{k} recommendations of {Path(checkpoint_dir).name} ({loaded.job.preset})"
    note = (f"{len(rows)} test users; left: the last {history_shown} items of each history, right: the top {k} by "
            f"score over all {num_items} items ({'history items excluded' if mask else 'history items not excluded'}"
            f", as in the run's evaluation). Green outline: the held-out test item ({hits} of {len(rows)} users hit).")
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / "index.html"
    page.write_text(render_html(rows, items, heading=heading, note=note), encoding="utf-8")
    data = out_dir / "gallery.json"
    data.write_text(json.dumps({"k": k, "mask_history": mask, "checkpoint": str(checkpoint_dir),
                                "rows": [{**asdict(row), "item_ids": {str(i): items[i].item_id for i in
                                                                       (*row.history, *row.top, row.target)
                                                                       if i in items}} for row in rows]}, indent=1))
    return [page, data]
