"""A side network over a frozen encoder's layers (`model.side_network`), after IISAN (SIGIR 2024).

Training an encoder's top layer end to end runs that layer forward and backward for every item of every step: on
2 cores a MiniLM layer makes a step ~14x the frozen model's (BENCHMARKS.md, frozen-trunk cache). IISAN keeps the
backbone frozen and trains a small network beside it that reads every layer's hidden states; the frozen part is
then a pure function of the item, computed once (the trunk cache), and only the side network runs per step.

Here the side network reads each layer's pooled output (an image block's globally averaged map, a text layer's
masked mean over tokens), not the token-level states IISAN reads: a cached item is then a few KiB, and the
network costs a few small matrix products per item. It walks the layers bottom to top with a running state of
`width` features, each layer adding what its (standardised, down-projected) output says given the state so far, and
adds an up-projection of the final state to the encoder's own output. The up-projection starts at zero, so
training starts exactly from the frozen encoder.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SideNetwork(nn.Module):
    """[B, sum(layer_widths)] every layer's pooled output (the last part: the encoder's own output) ->
    [B, layer_widths[-1]] the correction added to the encoder's output."""

    def __init__(self, layer_widths: Sequence[int], width: int) -> None:
        super().__init__()
        if width < 1 or not layer_widths:
            raise ValueError(f"a side network needs width >= 1 and at least one layer, got {width}, {layer_widths}")
        self.layer_widths = tuple(int(w) for w in layer_widths)
        self.downs = nn.ModuleList(nn.Linear(w, width) for w in self.layer_widths)
        self.mixes = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in self.layer_widths[1:])
        self.up = nn.Linear(width, self.layer_widths[-1])
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, layers: torch.Tensor) -> torch.Tensor:
        # each layer standardised (a layer norm whose scale and shift the down-projection absorbs: with no
        # parameter of its own it needs no backward pass, over thousands of features per item)
        parts = [F.layer_norm(part, part.shape[-1:]) for part in torch.split(layers, self.layer_widths, dim=-1)]
        state = F.gelu(self.downs[0](parts[0]))
        for part, down, mix in zip(parts[1:], self.downs[1:], self.mixes):
            state = state + F.gelu(down(part) + mix(state))
        return self.up(state)
