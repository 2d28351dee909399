"""Export a registered model (or a checkpoint) for serving: item vectors for the ANN index, and the model.

    python -m jobs.export --model models:/mmrec@champion --out exports/champion
    python -m jobs.export --model models:/mmrec@champion --out exports/s64 --size 64   # a Matryoshka size
    python -m jobs.export --model models:/mmrec@champion --out exports/all --all-sizes # every supported size
    ray job submit --working-dir . -- python -m jobs.export --model models:/mmrec@champion --out /shared/exports/x
Writes into --out:
    item_vectors_s<size>.parquet   item_index, item_id, vector (L2-normalised float32 [size]) for every item
    model/model.pt, model/state.json   the weights and the config they need (state.json "config")
    export.json                     what was written, from which checkpoint / registered version
Runs in this process (no Ray cluster needed); --out must be on storage the serving side can read.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from jobs.cli import run_main
from jobs.evaluate import add_model_arguments, resolve_model_arguments


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    parser.add_argument("--size", type=int, default=0,
                        help="vector size: one of the model's Matryoshka sizes (default: the full model.dim)")
    parser.add_argument("--all-sizes", action="store_true",
                        help="write one item_vectors_s<size>.parquet per Matryoshka size the model supports")
    args = parser.parse_args()

    from training.export import EXPORT_MANIFEST, export_item_vectors
    from training.checkpoint import MODEL_FILE, STATE_FILE
    from training.offline_eval import checkpoint_job_config

    resolved = resolve_model_arguments(args)
    if resolved is None:
        return 2
    checkpoint, version = resolved
    job = checkpoint_job_config(checkpoint, args.overrides)
    size = args.size or job.model.dim
    out = Path(args.out).resolve()
    print(f"[export] {args.model or checkpoint} -> {out} (size {'all' if args.all_sizes else size})")
    try:
        written = export_item_vectors(checkpoint, out, None if args.all_sizes else [size],
                                      prepared_dir=job.data.prepared_dir)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, STATE_FILE):
        shutil.copy2(checkpoint / name, model_dir / name)
    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    manifest.update(model_dir="model", model_uri=args.model or "",
                    registered_version=version.version if version else "",
                    git_commit=version.tags.get("git_commit", "") if version else "")
    (out / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    for path in written:
        print(f"[export] wrote {path}")
    print(f"[export] wrote {model_dir} and {out / EXPORT_MANIFEST}")
    return 0


if __name__ == "__main__":
    run_main(main)
