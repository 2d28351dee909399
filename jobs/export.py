"""Export a registered model (or a checkpoint) for serving: item vectors for the ANN index, and the model.

    python -m jobs.export --model models:/mmrec@champion --out exports/champion
    python -m jobs.export --model models:/mmrec@champion --out exports/s64 --size 64   # a Matryoshka size
    python -m jobs.export --model models:/mmrec@champion --out exports/all --all-sizes # every supported size
    ray job submit --working-dir . -- python -m jobs.export --model models:/mmrec@champion --out /shared/exports/x
Writes into --out:
    item_vectors_s<size>.parquet   item_index, item_id, vector (L2-normalised float32 [size]) for every item
    model/model.pt, model/state.json   the weights and the config they need (state.json "config")
    export.json                     what was written, from which checkpoint / registered version
Runs in this process (no Ray cluster needed); --out must be on storage the serving side can read. The export is
built in a staging folder beside --out and swapped in whole; an existing --out is replaced only when it is a
previous export (its export.json), anything else is refused.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from jobs.cli import run_main
from jobs.cli import add_model_arguments, resolve_model_arguments


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory: new, empty, or a previous export (which is replaced whole)")
    parser.add_argument("--size", type=int, default=0,
                        help="vector size: one of the model's Matryoshka sizes (default: the full model.dim)")
    parser.add_argument("--all-sizes", action="store_true",
                        help="write one item_vectors_s<size>.parquet per Matryoshka size the model supports")
    args = parser.parse_args()

    from pipeline.owned_dirs import check_no_overlap, require_replaceable, staged
    from training.checkpoint import MODEL_FILE, STATE_FILE
    from training.export import EXPORT_MANIFEST, EXPORT_MODEL_DIR, EXPORT_WHAT, export_item_vectors, is_export_dir
    from training.offline_eval import checkpoint_job_config

    out = Path(args.out).resolve()
    # Refused before any work (UnsafePathError: one line, exit 2): --out is replaced whole, so it must be new,
    # empty or a previous export.
    require_replaceable(out, is_export_dir, EXPORT_WHAT)
    resolved = resolve_model_arguments(args)
    if resolved is None:
        return 2
    checkpoint, version = resolved
    job = checkpoint_job_config(checkpoint, args.overrides)
    check_no_overlap(out, checkpoint, what="--out", other_what="the checkpoint")
    check_no_overlap(out, Path(job.data.prepared_dir), what="--out", other_what="the prepared data")
    size = args.size or job.model.dim
    print(f"[export] {args.model or checkpoint} -> {out} (size {'all' if args.all_sizes else size})")
    try:
        with staged(out, is_export_dir, EXPORT_WHAT) as staging:
            written = export_item_vectors(checkpoint, staging, None if args.all_sizes else [size],
                                          prepared_dir=job.data.prepared_dir,
                                          new_item_offset=job.model.new_item_offset)
            model_dir = staging / EXPORT_MODEL_DIR
            model_dir.mkdir()
            for name in (MODEL_FILE, STATE_FILE):
                shutil.copy2(checkpoint / name, model_dir / name)
            manifest = json.loads((staging / EXPORT_MANIFEST).read_text())
            manifest.update(model_dir=EXPORT_MODEL_DIR, model_uri=args.model or "",
                            registered_version=version.version if version else "",
                            git_commit=version.tags.get("git_commit", "") if version else "")
            (staging / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    except ValueError as err:  # an unsupported size, or a refused path (UnsafePathError)
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"[export] wrote {out / path.name}")
    print(f"[export] wrote {out / EXPORT_MODEL_DIR} and {out / EXPORT_MANIFEST}")
    return 0


if __name__ == "__main__":
    run_main(main)
