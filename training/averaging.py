"""An exponential moving average of a model's trained parameters: the weights a run evaluates, keeps and serves.

Why: on ml100k_mm one epoch's weights are a noisy draw around the curve. End to end's test warm NDCG@10 at its
successive best epochs read 0.0701, 0.0724, 0.0641, 0.0697, 0.0584 while validation stayed within 0.061-0.065
(BENCHMARKS.md, session 13): which epoch happened to be kept moved the result by as much as the gaps between
methods. Averaging the weights along the trajectory (Polyak averaging; SWA and the EMA of timm and of most
diffusion and language-model trainers) removes most of that step-to-step noise from the model itself, where
averaging validation scores (`EarlyStopping.window`) only makes the choice of epoch less lucky.

The optimizer keeps stepping the raw weights; only trainable parameters are averaged (frozen ones and buffers are
the model's own). A checkpoint's `model.pt` holds the averaged weights (evaluation, registry, serving and warm
starts all read it) and `trained_weights.pt` the raw trainable parameters a resumed run continues from.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

TRAINED_WEIGHTS_FILE = "trained_weights.pt"


def average_decay(epochs: float, steps_per_epoch: int) -> float:
    """The per-step decay whose average spans about `epochs` epochs of `steps_per_epoch` steps (0 = no averaging)."""
    if epochs <= 0:
        return 0.0
    return 1.0 - 1.0 / max(1.0, epochs * steps_per_epoch)


class WeightAverage:
    """shadow <- d * shadow + (1 - d) * weights after every optimizer step, with d = min(decay, (1 + n) / (10 + n))
    at the n-th update: early on the average follows the weights closely (it would otherwise stay near the random
    initialisation for a whole horizon), then settles at `decay`."""

    def __init__(self, model: torch.nn.Module, decay: float, updates: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.reset(model, updates)

    def reset(self, model: torch.nn.Module, updates: int = 0) -> None:
        """Start the average at the model's current weights (a fresh run, a warm start, a resume)."""
        self.shadow = {name: p.detach().clone() for name, p in _trained_parameters(model).items()}
        self.updates = updates

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        self.updates += 1
        for name, p in _trained_parameters(model).items():
            self.shadow[name].lerp_(p.detach(), weight)

    @contextmanager
    @torch.no_grad()
    def applied(self, model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        """Within the block the model holds the averaged weights; -> the raw trained parameters (copies), which
        are put back on leaving (also after an error). Changes made to the model inside the block are dropped."""
        params = _trained_parameters(model)
        raw = {name: p.detach().clone() for name, p in params.items()}
        try:
            for name, p in params.items():
                p.copy_(self.shadow[name])
            yield raw
        finally:
            for name, p in params.items():
                p.copy_(raw[name])

    def load_trained(self, model: torch.nn.Module, trained: dict[str, torch.Tensor]) -> None:
        """Resume: the model holds the averaged weights (its checkpoint's model.pt); make them the average and put
        the raw `trained` parameters back into the model."""
        self.shadow = {name: p.detach().clone() for name, p in _trained_parameters(model).items()}
        load_trained_parameters(model, trained)


def _trained_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trained_parameters(model: torch.nn.Module, trained: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's raw trainable parameters (`trained_weights.pt`) into the model."""
    params = _trained_parameters(model)
    missing = sorted(set(params) - set(trained))
    if missing:
        raise ValueError(f"the saved trained weights lack {len(missing)} parameters, e.g. {missing[0]}")
    for name, p in params.items():
        p.copy_(trained[name])
