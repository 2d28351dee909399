"""Matryoshka (nested-dimension) layers and the multi-size loss wrapper of fMRLRec.

This module owns the *structure* that lets one trained model be deployed at many widths
(Wang et al., "Train Once, Deploy Anywhere", EMNLP Findings 2024):

- ``MatryoshkaLinear``: fMRLRec's "efficient linear transformation that embeds smaller
  features into larger ones". For nested output sizes ``s_1 < ... < s_k = out_features``
  the output block ``(s_{i-1}, s_i]`` reads only the input prefix ``x[..., :in_sizes[i]]``,
  so its weight is block-lower-triangular and the first ``s_i`` outputs of the full layer
  are exactly a size-``s_i`` layer run alone on that input prefix.
- ``MatryoshkaLoss``: evaluates any base loss on every prefix size and sums with weights.

The fast path (one masked matmul) has a plain loop-over-blocks reference beside it
(``forward_reference``); tests compare the two. (A per-block LayerNorm, per-block vector normalisation and a
zero-initialised outer-block option served Matryoshka variants that lost in ``bench/matryoshka.py`` and were
removed; they are in git history at e629acf.)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "validate_sizes",
    "truncate",
    "at_size",
    "nested_mask",
    "MatryoshkaLinear",
    "MatryoshkaLoss",
    "matryoshka_loss",
]


def validate_sizes(sizes: Sequence[int], dim: int, *, require_full: bool = False) -> tuple[int, ...]:
    """Check nested sizes against a vector width ``dim`` and return them as a tuple.

    Sizes must be non-empty, positive, strictly increasing (hence unique) and ``<= dim``;
    with ``require_full`` the last one must equal ``dim`` (layers need every output covered).
    Raises ValueError naming the offending size and ``dim``.
    """
    sizes = tuple(int(s) for s in sizes)
    if not sizes:
        raise ValueError(f"sizes must be non-empty (dim={dim})")
    for index, size in enumerate(sizes):
        if size <= 0:
            raise ValueError(f"size {size} at position {index} is not positive (dim={dim})")
        if size > dim:
            raise ValueError(f"size {size} at position {index} exceeds dim={dim}")
        if index > 0 and size <= sizes[index - 1]:
            raise ValueError(
                f"size {size} at position {index} is not larger than the previous size "
                f"{sizes[index - 1]}: sizes must be sorted and unique (dim={dim})"
            )
    if require_full and sizes[-1] != dim:
        raise ValueError(f"last size {sizes[-1]} must equal dim={dim}")
    return sizes


def truncate(x: Tensor, size: int) -> Tensor:
    """[*, D] -> [*, size]: the Matryoshka prefix of the last dim."""
    if not 0 < size <= x.shape[-1]:
        raise ValueError(f"cannot truncate a last dim of {x.shape[-1]} to size {size}")
    return x[..., :size]


def at_size(vectors: Tensor, size: int | None) -> Tensor:
    """[*, D] -> [*, size]: the Matryoshka prefix, L2-normalised (size None = the whole vector)."""
    return F.normalize(vectors if size is None else truncate(vectors, size), dim=-1)


def _block_bounds(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """[(start, end)] of each nested block: (0, s_1), (s_1, s_2), ..."""
    return list(zip((0, *sizes[:-1]), sizes))


def nested_mask(sizes: Sequence[int], in_sizes: Sequence[int], in_features: int) -> Tensor:
    """[sizes[-1], in_features] 0/1 mask: row o is 1 on the input prefix its block may read.

    Block i (rows ``(sizes[i-1], sizes[i]]``) reads ``x[..., :in_sizes[i]]``; a weight multiplied by this
    mask is fMRLRec's block-lower-triangular map.
    """
    mask = torch.zeros(sizes[-1], in_features)
    for (start, end), in_size in zip(_block_bounds(sizes), in_sizes):
        mask[start:end, :in_size] = 1.0
    return mask


class MatryoshkaLinear(nn.Module):
    """Block-lower-triangular linear map: [*, in_features] -> [*, out_features].

    ``in_sizes=None`` means the input is a plain feature vector (e.g. a frozen image
    encoder's output): every output block sees the whole input. Given ``in_sizes`` (one per
    output size, last == in_features), the input is itself a Matryoshka vector and output
    block i reads only ``x[..., :in_sizes[i]]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        sizes: Sequence[int],
        in_sizes: Sequence[int] | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.sizes = validate_sizes(sizes, out_features, require_full=True)
        self.in_nested = in_sizes is not None
        if in_sizes is None:
            self.in_sizes = tuple(in_features for _ in self.sizes)
        else:
            self.in_sizes = validate_sizes(in_sizes, in_features, require_full=True)
            if len(self.in_sizes) != len(self.sizes):
                raise ValueError(
                    f"in_sizes {self.in_sizes} and sizes {self.sizes} must have the same length"
                )
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # [O, I]
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        # mask[o, i] = 1 iff input i is in the prefix that output o's block may read.
        self.register_buffer("mask", nested_mask(self.sizes, self.in_sizes, in_features), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default scale, but with each block's own fan-in: a block that reads
        # an 8-wide prefix should not be initialised as if it read all 1024 inputs.
        with torch.no_grad():
            self.weight.zero_()
            if self.bias is not None:
                self.bias.zero_()
            for (start, end), in_size in zip(_block_bounds(self.sizes), self.in_sizes):
                bound = 1.0 / math.sqrt(in_size)
                self.weight[start:end, :in_size].uniform_(-bound, bound)
                if self.bias is not None:
                    self.bias[start:end].uniform_(-bound, bound)

    def in_prefix(self, size: int) -> int:
        """How many input features the first ``size`` outputs read (``size`` in ``sizes``)."""
        if size not in self.sizes:
            raise ValueError(f"size {size} is not one of the nested sizes {self.sizes}")
        return self.in_sizes[self.sizes.index(size)]

    def forward(self, x: Tensor) -> Tensor:
        """[*, in_features] -> [*, out_features], one masked matmul."""
        return F.linear(x, self.weight * self.mask, self.bias)

    def forward_prefix(self, x_prefix: Tensor, size: int) -> Tensor:
        """[*, in_prefix(size)] -> [*, size]: the size-``size`` sub-layer, same parameters.

        Equals ``forward(x)[..., :size]`` when ``x_prefix == x[..., :in_prefix(size)]``;
        this is how a truncated model is deployed without the full-width weights.
        """
        in_size = self.in_prefix(size)
        if x_prefix.shape[-1] != in_size:
            raise ValueError(f"size {size} needs an input prefix of {in_size}, got {x_prefix.shape[-1]}")
        weight = self.weight[:size, :in_size] * self.mask[:size, :in_size]
        bias = None if self.bias is None else self.bias[:size]
        return F.linear(x_prefix, weight, bias)

    def forward_reference(self, x: Tensor) -> Tensor:
        """[*, in_features] -> [*, out_features], one small matmul per block (reference)."""
        blocks = []
        for (start, end), in_size in zip(_block_bounds(self.sizes), self.in_sizes):
            bias = None if self.bias is None else self.bias[start:end]
            blocks.append(F.linear(x[..., :in_size], self.weight[start:end, :in_size], bias))
        return torch.cat(blocks, dim=-1)

    def extra_repr(self) -> str:
        in_sizes = self.in_sizes if self.in_nested else None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"sizes={self.sizes}, in_sizes={in_sizes}"
        )


def matryoshka_loss(
    loss_at_size: Callable[[int], Tensor],
    sizes: Sequence[int],
    weights: Sequence[float] | None = None,
) -> tuple[Tensor, dict[int, Tensor]]:
    """Weighted sum over sizes of ``loss_at_size(size)``; also returns the per-size losses.

    The callable form suits losses whose inputs are not just (user, item) pairs: the caller
    closes over whatever it needs and slices it to ``size`` itself.
    """
    sizes = tuple(int(s) for s in sizes)
    weights = _check_weights(sizes, weights)
    per_size = {size: loss_at_size(size) for size in sizes}
    total = sum(weight * per_size[size] for size, weight in zip(sizes, weights))
    return total, per_size


def _check_weights(sizes: tuple[int, ...], weights: Sequence[float] | None) -> tuple[float, ...]:
    if weights is None:
        return tuple(1.0 for _ in sizes)
    weights = tuple(float(w) for w in weights)
    if len(weights) != len(sizes):
        raise ValueError(f"got {len(weights)} weights for {len(sizes)} sizes {sizes}")
    return weights


class MatryoshkaLoss(nn.Module):
    """Apply ``base_loss`` at every nested size and sum with weights (fMRLRec's objective).

    ``base_loss(user_vectors [B, D_s], item_vectors [..., D_s], **kwargs) -> scalar`` is any
    loss over embeddings (in-batch softmax against [B, D_s] positives, full softmax against an
    [N, D_s] item table, BCE, ...). The last dim of ``user_vectors``, ``item_vectors`` and of
    every tensor in ``sliced`` (e.g. sampled negatives [B, K, D]) is truncated to each size;
    other ``kwargs`` (targets, masks) pass through unchanged.
    """

    def __init__(
        self,
        base_loss: Callable[..., Tensor],
        sizes: Sequence[int],
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.base_loss = base_loss  # registered as a submodule when it is an nn.Module
        self.sizes = validate_sizes(sizes, max(int(s) for s in sizes) if sizes else 0)
        self.weights = _check_weights(self.sizes, weights)

    def forward(
        self,
        user_vectors: Tensor,
        item_vectors: Tensor,
        *,
        sliced: Mapping[str, Tensor] | None = None,
        **kwargs: object,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """[B, D], [..., D] -> (weighted total, {size: loss at that size})."""
        sliced = dict(sliced or {})
        for name, tensor in {"user_vectors": user_vectors, "item_vectors": item_vectors, **sliced}.items():
            if tensor.shape[-1] < self.sizes[-1]:
                raise ValueError(
                    f"{name} has last dim {tensor.shape[-1]}, smaller than the largest size {self.sizes[-1]}"
                )

        def loss_at_size(size: int) -> Tensor:
            extra = {name: tensor[..., :size] for name, tensor in sliced.items()}
            return self.base_loss(user_vectors[..., :size], item_vectors[..., :size], **extra, **kwargs)

        return matryoshka_loss(loss_at_size, self.sizes, self.weights)
