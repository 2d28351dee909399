"""Unit tests for encoders/: configs, registries, shapes, partial unfreezing, offline HF loading.

HF loading is tested the way a user loads a model: a tiny model is built from a transformers
config class, saved with save_pretrained into a tmp dir, and loaded back through build_*.
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from encoders.build import (
    IMAGE_ENCODERS,
    TEXT_ENCODERS,
    build_image_encoder,
    build_text_encoder,
    trainable_parameter_count,
)
from encoders.config import (
    IMAGE_ENCODER_KINDS,
    TEXT_ENCODER_KINDS,
    ImageEncoderConfig,
    TextEncoderConfig,
    resolve_text_model_path,
)
from encoders.image import IMAGENET_MEAN
from encoders.text import load_tokenizer, tokenize_texts

MINILM_VOCAB = 30522


def random_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


def trainable_names(module: nn.Module) -> set[str]:
    return {name for name, parameter in module.named_parameters() if parameter.requires_grad}


def changed_after_one_step(module: nn.Module, run_forward) -> set[str]:
    """Names of parameters that differ after one SGD step on a dummy loss over all parameters."""
    before = {name: parameter.detach().clone() for name, parameter in module.named_parameters()}
    # All parameters go to the optimizer: frozen ones must stay put because no gradient reaches them.
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    module.train()
    loss = run_forward().pow(2).mean()
    loss.backward()
    optimizer.step()
    return {name for name, parameter in module.named_parameters() if not torch.equal(parameter, before[name])}


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return load_tokenizer("minilm")


@pytest.fixture(scope="module")
def text_batch(minilm_tokenizer) -> dict[str, torch.Tensor]:
    return tokenize_texts(["Toy Story (1995)", "a cat sits on the mat", ""], minilm_tokenizer, max_length=12)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory, minilm_tokenizer) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=MINILM_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    directory = tmp_path_factory.mktemp("tiny_bert")
    BertModel(config).save_pretrained(directory)
    minilm_tokenizer.save_pretrained(directory)
    return directory


def save_tiny_vit(directory: Path, *, with_pooler: bool, processor_mean: float | None) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    ViTModel(config, add_pooling_layer=with_pooler).save_pretrained(directory)
    if processor_mean is not None:
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

        mean = [processor_mean] * 3
        ViTImageProcessorPil(image_mean=mean, image_std=[0.5] * 3).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("tiny_vit"), with_pooler=True, processor_mean=0.25)


@pytest.fixture(scope="module")
def efficientnet_top1() -> nn.Module:
    return build_image_encoder(ImageEncoderConfig(kind="efficientnet_lite0", image_size=64, unfreeze_top=1))


# ---------------------------------------------------------------- configs and registries


@pytest.mark.parametrize(
    ("make_config", "key"),
    [
        (lambda: ImageEncoderConfig(kind="resnet"), "ImageEncoderConfig.kind"),
        (lambda: ImageEncoderConfig(kind="hf"), "ImageEncoderConfig.path"),
        (lambda: ImageEncoderConfig(image_size=8), "ImageEncoderConfig.image_size"),
        (lambda: ImageEncoderConfig(unfreeze_top=-2), "ImageEncoderConfig.unfreeze_top"),
        (lambda: TextEncoderConfig(kind="bow"), "TextEncoderConfig.kind"),
        (lambda: TextEncoderConfig(path=None), "TextEncoderConfig.path"),
        (lambda: TextEncoderConfig(max_length=0), "TextEncoderConfig.max_length"),
        (lambda: TextEncoderConfig(unfreeze_top=-3), "TextEncoderConfig.unfreeze_top"),
    ],
)
def test_config_validation_names_the_key(make_config, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        make_config()


def test_unknown_kind_lists_valid_kinds() -> None:
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        ImageEncoderConfig(kind="vit")
    image_cfg = ImageEncoderConfig()
    image_cfg.kind = "vit"  # bypasses __post_init__: the builder must still refuse it
    with pytest.raises(ValueError, match=r"valid kinds: \['efficientnet_lite0', 'hf', 'tiny_cnn'\]"):
        build_image_encoder(image_cfg)
    text_cfg = TextEncoderConfig()
    text_cfg.kind = "bow"
    with pytest.raises(ValueError, match=r"valid kinds: \['hf', 'tiny'\]"):
        build_text_encoder(text_cfg)


def test_registries_match_config_kinds() -> None:
    assert set(IMAGE_ENCODERS) == set(IMAGE_ENCODER_KINDS)
    assert set(TEXT_ENCODERS) == set(TEXT_ENCODER_KINDS)


def test_minilm_alias_resolves_to_local_folder() -> None:
    folder = Path(resolve_text_model_path("minilm"))
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert resolve_text_model_path("/some/model/dir") == "/some/model/dir"


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_on_real_titles_stays_in_vocab(raw_data_dir: Path, minilm_tokenizer) -> None:
    with open(raw_data_dir / "items.csv", newline="", encoding="utf-8") as handle:
        rows = [row for _, row in zip(range(64), csv.DictReader(handle))]
    texts = [f"{row['title']} {row['description']}" for row in rows]
    batch = tokenize_texts(texts, minilm_tokenizer, max_length=24)
    assert batch["input_ids"].shape == (64, 24) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].dtype == torch.int64
    assert int(batch["input_ids"].min()) >= 0 and int(batch["input_ids"].max()) < MINILM_VOCAB
    assert len(minilm_tokenizer) == MINILM_VOCAB
    # Real words, not [UNK]s: the vocabulary is the real one.
    unknown_fraction = (batch["input_ids"] == minilm_tokenizer.unk_token_id).float().mean().item()
    assert unknown_fraction < 0.01
    assert batch["input_ids"][:, 0].eq(minilm_tokenizer.cls_token_id).all()


def test_load_tokenizer_is_cached_per_process() -> None:
    assert load_tokenizer("minilm") is load_tokenizer("minilm")


# ---------------------------------------------------------------- image encoders


@pytest.mark.parametrize("size", [32, 64])
def test_tiny_cnn_shapes(size: int) -> None:
    encoder = build_image_encoder(ImageEncoderConfig(image_size=size), width=16)  # 8 channels: out 4 x 8
    features = encoder(random_images(2, size))
    assert encoder.out_dim == 32
    assert features.shape == (2, 32) and features.dtype == torch.float32
    assert torch.isfinite(features).all()


def test_image_encoders_refuse_float_pixels() -> None:
    encoder = build_image_encoder(ImageEncoderConfig(), width=16)
    with pytest.raises(TypeError, match="uint8"):
        encoder(torch.zeros(1, 3, 32, 32))


def test_tiny_cnn_unfreeze_top() -> None:
    frozen = build_image_encoder(ImageEncoderConfig(unfreeze_top=0), width=16)
    assert trainable_parameter_count(frozen) == 0
    top1 = build_image_encoder(ImageEncoderConfig(unfreeze_top=1), width=16)
    assert trainable_names(top1) == {name for name, _ in top1.named_parameters() if name.startswith("blocks.3.")}
    assert changed_after_one_step(top1, lambda: top1(random_images(2, 32))) == trainable_names(top1)


def test_efficientnet_lite0_gives_1280d_at_64px(efficientnet_top1: nn.Module) -> None:
    efficientnet_top1.eval()
    with torch.no_grad():
        features = efficientnet_top1(random_images(2, 64))
    assert efficientnet_top1.out_dim == 1280
    assert features.shape == (2, 1280) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and features.std() > 0
    # Pretrained weights, not a fresh init: the classifier is gone but the stem is ImageNet's.
    assert not any("_fc" in name for name, _ in efficientnet_top1.named_parameters())


def test_efficientnet_unfreeze_top1_trains_exactly_the_top_block(efficientnet_top1: nn.Module) -> None:
    expected_prefixes = ("backbone._blocks.15.", "backbone._conv_head.", "backbone._bn1.")
    trainable = trainable_names(efficientnet_top1)
    assert trainable and all(name.startswith(expected_prefixes) for name in trainable)
    assert {name for name, _ in efficientnet_top1.named_parameters() if name.startswith(expected_prefixes)} == trainable

    stem_bn = efficientnet_top1.backbone._bn0
    top_bn = efficientnet_top1.backbone._bn1
    stem_running_mean = stem_bn.running_mean.clone()
    top_running_mean = top_bn.running_mean.clone()
    changed = changed_after_one_step(efficientnet_top1, lambda: efficientnet_top1(random_images(2, 64, seed=1)))
    assert changed == trainable
    # Frozen blocks stay in eval mode under .train(); every BatchNorm, trained ones included, keeps its running
    # statistics (see the next test), so small batches move no statistics.
    assert not stem_bn.training and not efficientnet_top1.backbone._blocks[14].training
    assert not top_bn.training and efficientnet_top1.backbone._blocks[15].training
    assert torch.equal(stem_bn.running_mean, stem_running_mean)
    assert torch.equal(top_bn.running_mean, top_running_mean)


def test_efficientnet_keeps_batchnorm_running_statistics_but_trains_the_top_block() -> None:
    cfg = ImageEncoderConfig(kind="efficientnet_lite0", image_size=32, unfreeze_top=1)
    encoder = build_image_encoder(cfg)
    top_bn = encoder.backbone._bn1
    running_mean = top_bn.running_mean.clone()
    images = random_images(4, 32, seed=2)
    changed = changed_after_one_step(encoder.train(), lambda: encoder(images))
    # every BatchNorm normalises with its running statistics in training as in evaluation, and keeps them ...
    assert not any(module.training for module in encoder.modules() if isinstance(module, nn.BatchNorm2d))
    assert torch.equal(top_bn.running_mean, running_mean)
    # ... while the top block (its BN scale/shift included) still learns
    assert "backbone._bn1.weight" in changed and any(name.startswith("backbone._blocks.15.") for name in changed)
    assert changed == trainable_names(encoder)


def test_efficientnet_unfreeze_top0_is_frozen() -> None:
    encoder = build_image_encoder(ImageEncoderConfig(kind="efficientnet_lite0", image_size=32, unfreeze_top=0))
    assert trainable_parameter_count(encoder) == 0
    encoder.train()
    assert not any(module.training for module in encoder.backbone.modules() if isinstance(module, nn.BatchNorm2d))


def test_hf_vision_loads_saved_tiny_vit(tiny_vit_dir: Path) -> None:
    encoder = build_image_encoder(ImageEncoderConfig(kind="hf", path=str(tiny_vit_dir), image_size=32))
    assert encoder.out_dim == 32
    features = encoder(random_images(3, 32))
    assert features.shape == (3, 32) and features.dtype == torch.float32
    # The saved image processor's mean is used, not ImageNet's.
    assert torch.allclose(encoder.normalize.mean.flatten(), torch.full((3,), 0.25))
    # A pipeline image size different from the checkpoint's: position embeddings are interpolated.
    larger = build_image_encoder(ImageEncoderConfig(kind="hf", path=str(tiny_vit_dir), image_size=48))
    assert larger(random_images(2, 48)).shape == (2, 32)


def test_hf_vision_unfreeze_top1(tiny_vit_dir: Path) -> None:
    encoder = build_image_encoder(
        ImageEncoderConfig(kind="hf", path=str(tiny_vit_dir), image_size=32, unfreeze_top=1)
    )
    trainable = trainable_names(encoder)
    # transformers 5 registers ViT's blocks as `layers` (4.x: `encoder.layer`); the encoder finds either.
    top_block = "model.layers.1." if hasattr(encoder.model, "layers") else "model.encoder.layer.1."
    expected = (top_block, "model.layernorm.", "model.pooler.")
    assert trainable == {name for name, _ in encoder.named_parameters() if name.startswith(expected)}
    assert not any(name.startswith("model.embeddings.") for name in trainable)
    assert changed_after_one_step(encoder, lambda: encoder(random_images(2, 32))) == trainable
    frozen = build_image_encoder(ImageEncoderConfig(kind="hf", path=str(tiny_vit_dir), image_size=32, unfreeze_top=0))
    assert trainable_parameter_count(frozen) == 0


def test_hf_vision_without_pooler_weights_mean_pools(tmp_path: Path) -> None:
    directory = save_tiny_vit(tmp_path, with_pooler=False, processor_mean=None)
    encoder = build_image_encoder(ImageEncoderConfig(kind="hf", path=str(directory), image_size=32))
    assert not encoder.use_pooler_output
    assert torch.allclose(encoder.normalize.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert not any(parameter.requires_grad for parameter in encoder.model.pooler.parameters())
    encoder.eval()
    images = random_images(2, 32)
    with torch.no_grad():
        expected = encoder.model(pixel_values=encoder.normalize(images)).last_hidden_state.mean(dim=1)
        assert torch.allclose(encoder(images), expected)


# ---------------------------------------------------------------- text encoders


def test_tiny_text_encoder_shapes_and_padding_invariance(minilm_tokenizer, text_batch) -> None:
    encoder = build_text_encoder(TextEncoderConfig(kind="tiny"), width=16)
    assert encoder.token_embedding.num_embeddings == MINILM_VOCAB
    features = encoder(**text_batch)
    assert encoder.out_dim == 16 and features.shape == (3, 16) and features.dtype == torch.float32
    # Masked mean: extra padding must not change the encoding.
    wider = tokenize_texts(["Toy Story (1995)"], minilm_tokenizer, max_length=30)
    assert torch.allclose(encoder(**wider)[0], features[0], atol=1e-6)


def test_tiny_text_unfreeze_top(text_batch) -> None:
    encoder = build_text_encoder(TextEncoderConfig(kind="tiny", unfreeze_top=1), width=16)
    trainable = trainable_names(encoder)
    assert trainable == {name for name, _ in encoder.named_parameters() if name.startswith(("blocks.1.", "final_norm."))}
    assert changed_after_one_step(encoder, lambda: encoder(**text_batch)) == trainable
    frozen = build_text_encoder(TextEncoderConfig(kind="tiny", unfreeze_top=0), width=16)
    assert trainable_parameter_count(frozen) == 0


def test_hf_text_loads_saved_tiny_bert(tiny_bert_dir: Path, text_batch) -> None:
    encoder = build_text_encoder(TextEncoderConfig(kind="hf", path=str(tiny_bert_dir)))
    features = encoder(**text_batch)
    assert encoder.out_dim == 32 and features.shape == (3, 32) and features.dtype == torch.float32
    # unfreeze_top=-1 trains everything the mean pooling uses, but never the unused [CLS] pooler.
    assert trainable_names(encoder) == {
        name for name, _ in encoder.named_parameters() if not name.startswith("model.pooler.")
    }


def test_hf_text_unfreeze_top1_changes_only_the_top_layer(tiny_bert_dir: Path, text_batch) -> None:
    encoder = build_text_encoder(TextEncoderConfig(kind="hf", path=str(tiny_bert_dir), unfreeze_top=1))
    trainable = trainable_names(encoder)
    assert trainable == {name for name, _ in encoder.named_parameters() if name.startswith("model.encoder.layer.1.")}
    assert changed_after_one_step(encoder, lambda: encoder(**text_batch)) == trainable
    frozen = build_text_encoder(TextEncoderConfig(kind="hf", path=str(tiny_bert_dir), unfreeze_top=0))
    assert trainable_parameter_count(frozen) == 0


@pytest.mark.parametrize("unfreeze_top", [-1, 1])
def test_hf_text_trains_its_top_layers_without_dropout_and_everything_with_it(
        tiny_bert_dir: Path, text_batch, unfreeze_top: int) -> None:
    torch.manual_seed(0)
    encoder = build_text_encoder(TextEncoderConfig(kind="hf", path=str(tiny_bert_dir), unfreeze_top=unfreeze_top))
    encoder.train()
    with torch.no_grad():
        first, second = encoder(**text_batch), encoder(**text_batch)
        evaluated = encoder.eval()(**text_batch)
    # all layers trained keep BertConfig's dropout 0.1 (two training passes differ); a trained top layer runs
    # without it, so it trains on what evaluation computes
    deterministic = unfreeze_top != -1
    assert torch.equal(first, second) is deterministic
    assert torch.allclose(first, evaluated, atol=1e-6) is deterministic


@pytest.mark.parametrize("unfreeze_top", [-1, 2])
def test_efficientnet_drop_connect_only_when_every_block_trains(unfreeze_top: int) -> None:
    # the top two blocks: Lite0's block 14 has a skip connection (drop-connect 0.2 x 14 / 16), block 15 has none
    encoder = build_image_encoder(ImageEncoderConfig(kind="efficientnet_lite0", image_size=64,
                                                     unfreeze_top=unfreeze_top)).train()
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(encoder(images), encoder(images)) is (unfreeze_top != -1)


def test_real_minilm_through_alias_is_384d_and_semantic(minilm_tokenizer) -> None:
    encoder = build_text_encoder(TextEncoderConfig(kind="hf", path="minilm", unfreeze_top=0)).eval()
    assert encoder.out_dim == 384
    batch = tokenize_texts(
        ["a cat sits on the mat", "a kitten is lying on a rug", "the stock market fell sharply today"],
        minilm_tokenizer,
        max_length=16,
    )
    with torch.no_grad():
        features = nn.functional.normalize(encoder(**batch), dim=-1)
    assert features.shape == (3, 384)
    similar, unrelated = float(features[0] @ features[1]), float(features[0] @ features[2])
    assert similar > 0.5 and unrelated < 0.2
