"""The one place where encoder configs meet encoder constructors.

`IMAGE_ENCODERS` / `TEXT_ENCODERS` map a config `kind` to a builder taking that config and the model width;
register a new backbone by adding an entry (and its kind to `encoders.config`). The built-in encoders are sized
by the model width (`model.dim`): the tiny CNN's first layer has width / 2 channels (so it outputs 2 x width
features), the tiny text encoder is width wide. Pretrained encoders have their own fixed width; the fusion
layer projects every encoder's features to the model width.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from encoders.config import ImageEncoderConfig, TextEncoderConfig
from encoders.image import EfficientNetLite0ImageEncoder, HFVisionImageEncoder, TinyCNNImageEncoder
from encoders.text import HFTextEncoder, TinyTextEncoder, load_tokenizer


def _tiny_cnn(cfg: ImageEncoderConfig, width: int) -> nn.Module:
    return TinyCNNImageEncoder(channels=max(1, width // 2), unfreeze_top=cfg.unfreeze_top)


def _efficientnet_lite0(cfg: ImageEncoderConfig, width: int) -> nn.Module:
    return EfficientNetLite0ImageEncoder(unfreeze_top=cfg.unfreeze_top, image_size=cfg.image_size)


def _hf_vision(cfg: ImageEncoderConfig, width: int) -> nn.Module:
    assert cfg.path is not None  # ImageEncoderConfig refuses kind="hf" without a path
    return HFVisionImageEncoder(path=cfg.path, unfreeze_top=cfg.unfreeze_top, image_size=cfg.image_size)


def _tiny_text(cfg: TextEncoderConfig, width: int) -> nn.Module:
    assert cfg.path is not None  # TextEncoderConfig requires a tokenizer path
    # len() counts added special tokens too, which vocab_size does not.
    vocab_size = len(load_tokenizer(cfg.path))
    return TinyTextEncoder(vocab_size=vocab_size, dim=width, unfreeze_top=cfg.unfreeze_top)


def _hf_text(cfg: TextEncoderConfig, width: int) -> nn.Module:
    assert cfg.path is not None
    encoder = HFTextEncoder(path=cfg.path, unfreeze_top=cfg.unfreeze_top)
    tokenizer_vocab = len(load_tokenizer(cfg.path))
    if tokenizer_vocab > encoder.vocab_size:
        # Ids past the embedding table would fail deep inside forward with an index error.
        raise ValueError(
            f"TextEncoderConfig.path={cfg.path!r}: tokenizer has {tokenizer_vocab} tokens but the model "
            f"embeds only {encoder.vocab_size}"
        )
    return encoder


IMAGE_ENCODERS: dict[str, Callable[[ImageEncoderConfig, int], nn.Module]] = {
    "tiny_cnn": _tiny_cnn,
    "efficientnet_lite0": _efficientnet_lite0,
    "hf": _hf_vision,
}

TEXT_ENCODERS: dict[str, Callable[[TextEncoderConfig, int], nn.Module]] = {
    "tiny": _tiny_text,
    "hf": _hf_text,
}


def build_image_encoder(cfg: ImageEncoderConfig, width: int = 64) -> nn.Module:
    """ImageEncoderConfig, model width -> module mapping uint8 [B, 3, S, S] to [B, module.out_dim]."""
    if cfg.kind not in IMAGE_ENCODERS:
        raise ValueError(f"ImageEncoderConfig.kind={cfg.kind!r} is unknown; valid kinds: {sorted(IMAGE_ENCODERS)}")
    return IMAGE_ENCODERS[cfg.kind](cfg, width)


def build_text_encoder(cfg: TextEncoderConfig, width: int = 64) -> nn.Module:
    """TextEncoderConfig, model width -> module mapping (input_ids [B, T], attention_mask [B, T]) to [B, module.out_dim]."""
    if cfg.kind not in TEXT_ENCODERS:
        raise ValueError(f"TextEncoderConfig.kind={cfg.kind!r} is unknown; valid kinds: {sorted(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[cfg.kind](cfg, width)


def trainable_parameter_count(module: nn.Module) -> int:
    """Number of scalar parameters in `module` with requires_grad=True."""
    return sum(parameter.numel() for parameter in module.parameters() if parameter.requires_grad)
