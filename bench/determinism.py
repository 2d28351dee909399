"""Do two runs of one seed train to the same bits, and what does the step's row gather cost?

    python -m bench.determinism --prepared-dir <prepared ml100k_mm>      # ~4 min on 2 cores

Two parts, both at 2 torch threads (the CI machine's cores; one Ray Train worker on it uses them all):
- **gather**: the step's gather of item rows by id (`model.recommender.gather_rows`: a batch's 64 x 51 history ids
  over 1,683 rows of 128, ids repeating as they do in a step), backward 20 times from one upstream gradient, as
  `table[index]` (the product's gather until session 34) and as `gather_rows` (`index_select`): how many of the
  repeats give a gradient other than the first's, and milliseconds per forward + backward.
- **runs**: the `tiny` preset's trainer in two fresh processes, each `--steps` steps on the same decoded
  ml100k_mm batches (`bench.memory_bank.sampled_batches`, seed 0) after the same seeding; per step the loss and a digest of every parameter, once with each
  gather (the old one patched in for the comparison). Two settings (`SETTINGS`): the preset's own (both encoders
  trained, history from the memory bank: the setting whose runs drifted) and the `movielens` preset's shape of
  step on the tiny encoders (side networks on the trunk cache, ids, every position, one table of every item).
  Equal digests at every step = the two processes trained the same bits. A third setting (session 36) trains the
  first with the backbones under bfloat16 autocast (`model.encoder_precision=bf16`), with `gather_rows` only.

Prints a table and writes bench/results/determinism.json.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "determinism.json"
THREADS = 2
GATHERS = ("indexing", "gather_rows")
# the trainer settings the runs part trains, on the `tiny` preset's encoders: its own (both encoders trained,
# history from the bank) and the `movielens` preset's shape of step (frozen encoders on the trunk cache with side
# networks, item ids, a loss at every position over the exact full softmax, every item's vector in one table)
SETTINGS = {
    "tiny_bank": ["memory.mode=bank"],
    "side_networks_one_table": ["memory.mode=recompute", "image.unfreeze_top=0", "text.unfreeze_top=0",
                                "model.side_network=16", "model.use_id_embedding=true", "train.targets=all"],
    # the first setting with the backbones under bfloat16 autocast (`model.encoder_precision=bf16`, session 35)
    "tiny_bank_bf16": ["memory.mode=bank", "model.encoder_precision=bf16"],
}
# what the runs part trains twice: both gathers in the first two settings (session 34's comparison), and the
# product's gather under bf16 (session 36)
RUNS = [*((setting, gather) for setting in ("tiny_bank", "side_networks_one_table") for gather in GATHERS),
        ("tiny_bank_bf16", "gather_rows")]


def _indexing(table, index):
    return table[index]


def gather_part(repeats: int = 20) -> list[dict]:
    import torch

    from model.recommender import gather_rows

    torch.set_num_threads(THREADS)
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(0, 1683, (64, 51), generator=generator)
    upstream = torch.randn(64, 51, 128, generator=generator)
    rows = []
    for name, gather in zip(GATHERS, (_indexing, gather_rows)):
        grads, started = [], time.perf_counter()
        for _ in range(repeats):
            table = torch.randn(1683, 128, generator=torch.Generator().manual_seed(1)).requires_grad_()
            gather(table, index).backward(upstream)
            grads.append(table.grad)
        seconds = time.perf_counter() - started
        rows.append({"gather": name, "repeats": repeats,
                     "repeats_unlike_the_first": sum(not torch.equal(g, grads[0]) for g in grads[1:]),
                     "ms_forward_backward": round(1000 * seconds / repeats, 3)})
    return rows


def train_steps(prepared: Path, steps: int, gather: str, setting: str) -> list[tuple[float, str]]:
    """In this process: the tiny trainer's first `steps` steps in `setting` -> [(loss, parameter digest)] per
    step."""
    import numpy as np
    import torch

    import model.recommender as recommender
    from memory.local import LocalMemoryBankClient
    from pipeline.content import ItemContentDecoder
    from pipeline.sequences import item_popularity
    from pipeline.sources import ITEMS_FILE, load_manifest
    from pipeline.splits import build_splits
    from training.job_config import build_config
    from training.offline_eval import DecodedCatalogue, content_spec_of
    import training.trainer as trainer_module
    from bench.memory_bank import sampled_batches
    from training.trainer import build_trainer

    if gather == "indexing":  # the gather before session 34, for the comparison (both modules read their global)
        recommender.gather_rows = trainer_module.gather_rows = _indexing
    torch.set_num_threads(THREADS)
    job = build_config("tiny", [f"data.prepared_dir={prepared}", *SETTINGS[setting]])
    cached = job.model.side_network > 0  # frozen encoders: the trunk cache, as a run builds it
    num_items = load_manifest(prepared)["num_items"]
    splits = build_splits(job.data, prepared)
    spec = content_spec_of(job)
    decoder = ItemContentDecoder(str(prepared / ITEMS_FILE), "target", spec.image_size, spec.tokenizer_path,
                                 spec.max_length, with_history_content=True)
    batches = list(itertools.islice(sampled_batches(decoder, splits.train, job.train.batch_size, seed=0), steps))
    torch.manual_seed(0)
    np.random.seed(0)
    bank = LocalMemoryBankClient(capacity=num_items + 1, dim=job.model.dim)
    trainer = build_trainer(job, num_items, item_popularity(splits.train, num_items), bank, trunk_cache=cached)
    catalogue = DecodedCatalogue(prepared / ITEMS_FILE, num_items)
    if cached:
        trainer.build_trunk_cache(catalogue.batches(spec))
        assert trainer.one_table_a_step, "the setting should make every item's vector in one table a step"
    trainer.refresh_bank(trainer.encode_catalogue(catalogue.batches(spec)), wait=True)
    out = []
    for batch in batches:
        loss, _ = trainer.step(batch)
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in trainer.model.parameters()))
        out.append((float(loss.detach()), digest.hexdigest()[:16]))
    return out


def runs_part(prepared: Path, steps: int) -> list[dict]:
    rows = []
    for setting, gather in RUNS:
        runs = []
        for _ in range(2):
            command = [sys.executable, "-m", "bench.determinism", "--child", gather, "--setting", setting,
                       "--prepared-dir", str(prepared), "--steps", str(steps)]
            done = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"[determinism] child failed:\n{done.stderr[-2000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        first, second = runs
        differing = [i for i, (a, b) in enumerate(zip(first, second)) if a[1] != b[1]]
        rows.append({"setting": setting, "gather": gather, "steps": steps,
                     "steps_with_equal_parameters": steps - len(differing),
                     "first_differing_step": differing[0] if differing else None,
                     "losses_equal": [a[0] for a in first] == [b[0] for b in second],
                     "last_loss": [first[-1][0], second[-1][0]]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8, help="training steps per run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=GATHERS, help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=list(SETTINGS), default="tiny_bank", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.prepared_dir / "manifest.json").is_file():
        raise SystemExit(f"[determinism] {args.prepared_dir} is not a prepared dataset (python -m jobs.prepare)")
    if args.child:
        print(json.dumps(train_steps(args.prepared_dir, args.steps, args.child, args.setting)))
        return
    gather, runs = gather_part(), runs_part(args.prepared_dir, args.steps)
    print(f"{'gather':<12} {'repeats unlike the first':>25} {'ms fwd+bwd':>11}")
    for row in gather:
        print(f"{row['gather']:<12} {row['repeats_unlike_the_first']:>19} / {row['repeats'] - 1:<3} "
              f"{row['ms_forward_backward']:>11.3f}")
    print(f"\n{'setting':<24} {'gather':<12} {'steps with equal parameters':>28} {'first differing step':>21} "
          f"{'losses equal':>13}")
    for row in runs:
        print(f"{row['setting']:<24} {row['gather']:<12} {row['steps_with_equal_parameters']:>22} / {row['steps']:<4} "
              f"{str(row['first_differing_step']):>21} {str(row['losses_equal']):>13}")
    import torch
    result = {"command": "python -m bench.determinism " + " ".join(sys.argv[1:]), "torch_threads": THREADS,
              "torch": torch.__version__, "machine": platform.machine(), "measured": time.strftime("%Y-%m-%d %H:%M"),
              "gather": gather, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
