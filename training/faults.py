"""Faults that tests inject into a training run through the trainer's step callbacks (never set by a config)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class KillRankZeroAt:
    """`os._exit(1)` on rank 0 when global step `step` is about to run, on the first attempt only: the marker
    file it writes first keeps the attempt Ray Train restarts alive."""

    step: int
    marker: str
    # Ray Train's controller takes a report (and its checkpoint) when it next polls the workers: a kill right after
    # one can come first, and the restart then begins from scratch. With faster steps (2026-12-03) it did.
    settle_s: float = 5.0

    def __call__(self, global_step: int) -> None:
        import ray.train

        if global_step != self.step or ray.train.get_context().get_world_rank() != 0 or Path(self.marker).exists():
            return
        Path(self.marker).write_text("fault injected\n")
        import time

        time.sleep(self.settle_s)
        print(f"[train] fault injection: killing rank 0 at step {global_step}", flush=True)
        os._exit(1)
