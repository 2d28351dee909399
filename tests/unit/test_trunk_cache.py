"""The frozen-trunk cache: cached and uncached paths give the same outputs and the same gradients (real items,
real encoders), and the cache is off, with a reason, where it could not be exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from encoders.config import ImageEncoderConfig, TextEncoderConfig
from model.build import build_recommender
from model.config import ModelConfig
from pipeline.content import ContentSpec, decode_catalog
from training.trunk_cache import RAW_CONTENT_FIELDS, TrunkCache, plan_trunk_cache

ITEMS = 48  # the first catalogue items of ml100k_mm (three batches of 16)

CONFIGS = {
    "tiny-top-blocks": (ImageEncoderConfig(kind="tiny_cnn", image_size=32, unfreeze_top=2),
                        TextEncoderConfig(kind="tiny", max_length=16, unfreeze_top=1)),
    "pretrained-top-layer": (ImageEncoderConfig(kind="efficientnet_lite0", image_size=64, unfreeze_top=1),
                             TextEncoderConfig(kind="hf", path="minilm", max_length=24, unfreeze_top=1)),
    "pretrained-frozen": (ImageEncoderConfig(kind="efficientnet_lite0", image_size=64, unfreeze_top=0),
                          TextEncoderConfig(kind="hf", path="minilm", max_length=24, unfreeze_top=0)),
}
SIDE_NETWORKS = {"tiny-side-network": 8, "pretrained-side-network": 16}  # model.side_network beside frozen encoders
CONFIGS["tiny-side-network"] = (ImageEncoderConfig(kind="tiny_cnn", image_size=32, unfreeze_top=0),
                                TextEncoderConfig(kind="tiny", max_length=16, unfreeze_top=0))
CONFIGS["pretrained-side-network"] = CONFIGS["pretrained-frozen"]


@pytest.fixture(scope="module")
def catalogue(prepared_dir):
    def decode(image_size: int, max_length: int) -> list[dict]:
        from encoders.config import resolve_text_model_path

        spec = ContentSpec(image_size=image_size, max_length=max_length,
                           tokenizer_path=resolve_text_model_path("minilm"))
        batches = []
        for batch in decode_catalog(prepared_dir / "items.parquet", spec, batch_size=16):
            batches.append({k: torch.as_tensor(v) for k, v in batch.items()})
            if len(batches) * 16 >= ITEMS:
                return batches
        return batches
    return decode


def _model(image, text, side_network: int = 0, precision: str = "fp32"):
    torch.manual_seed(0)
    model = build_recommender(ModelConfig(dim=32, num_layers=1, num_heads=2, use_id_embedding=True,
                                          side_network=side_network, encoder_precision=precision),
                              image, text, num_items=1682, max_history=5)
    for side in (model.item_encoder.image_side, model.item_encoder.text_side):
        if side is not None:  # its up-projection starts at zero, which would leave the layers below without gradient
            nn.init.normal_(side.up.weight, std=0.1)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_and_uncached_steps_give_equal_outputs_and_gradients(catalogue, name):
    image, text = CONFIGS[name]
    batches = catalogue(image.image_size, text.max_length)
    model = _model(image, text, SIDE_NETWORKS.get(name, 0)).train()
    cache = TrunkCache.build(model.item_encoder, batches, num_items=ITEMS, device=torch.device("cpu"))
    decoded = {k: torch.cat([b[k] for b in batches]) for k in ("item_index", *RAW_CONTENT_FIELDS)}

    targets = torch.tensor([3, 17, 3, 25, 1, 48, 9])
    history = torch.tensor([[0, 0, 2, 5, 3]] * 4 + [[1, 4, 6, 8, 10]] * 3)
    rows = targets - 1  # decoded rows are in item_index order from 1
    assert torch.equal(decoded["item_index"][rows], targets)

    def step(content):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks in the trained layers
        out = model(target_ids=targets, content=content, history_ids=history,
                    history_content=torch.zeros(*history.shape, 32))
        loss = -(F.normalize(out.user, dim=-1) * out.positive).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    uncached, uncached_grads = step({k: decoded[k][rows] for k in RAW_CONTENT_FIELDS})
    cached, cached_grads = step(cache.lookup(targets))
    torch.testing.assert_close(cached.unique_content, uncached.unique_content, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.user, uncached.user, rtol=1e-5, atol=1e-6)
    assert cached_grads.keys() == uncached_grads.keys()
    encoder_grads = [n for n in cached_grads if ".image_encoder." in n or ".text_encoder." in n]
    if name in SIDE_NETWORKS:  # the encoders stay frozen; every parameter of both side networks learns
        assert not encoder_grads and cache.encoders_frozen
        side = [n for n, p in model.named_parameters() if "_side." in n]
        assert side and all(cached_grads[n].abs().sum() > 0 for n in side)
    elif name == "pretrained-frozen":
        assert not encoder_grads
    else:
        assert any(".image_encoder." in n for n in encoder_grads) and any(".text_encoder." in n for n in encoder_grads)
    for key in cached_grads:
        torch.testing.assert_close(cached_grads[key], uncached_grads[key], rtol=1e-4, atol=1e-6, msg=key)
    # a frozen weight gets no gradient on either path
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and not set(frozen) & cached_grads.keys()


def test_a_catalogue_pass_from_the_cache_equals_encoding_the_decoded_items(catalogue):
    image, text = CONFIGS["pretrained-top-layer"]
    batches = catalogue(image.image_size, text.max_length)
    model = _model(image, text).eval()
    cache = TrunkCache.build(model.item_encoder, batches, num_items=ITEMS, device=torch.device("cpu"))
    from_cache = torch.cat([model.item_encoder.encode_fields({k: v for k, v in b.items() if k != "item_index"})
                            for b in cache.batches(16)])[:ITEMS]
    decoded = torch.cat([model.item_encoder.encode_content(*(b[k] for k in RAW_CONTENT_FIELDS)) for b in batches])
    torch.testing.assert_close(from_cache, decoded[:ITEMS], rtol=1e-5, atol=1e-6)


def test_bf16_backbones_stay_close_to_fp32_hand_on_fp32_and_keep_the_cache_exact(catalogue):
    """model.encoder_precision=bf16: the pretrained backbones run under bfloat16 autocast. Their output is not
    the fp32 one (so autocast is on) but close to it, reaches the fusion, the bank and the cache as fp32, the
    trained top layers get finite gradients, and the cached path equals the uncached one as in fp32."""
    image, text = CONFIGS["pretrained-top-layer"]
    batches = catalogue(image.image_size, text.max_length)
    fields = {k: torch.cat([b[k] for b in batches]) for k in RAW_CONTENT_FIELDS}
    fp32, bf16 = _model(image, text).eval(), _model(image, text, precision="bf16").eval()
    with torch.no_grad():
        exact, low = fp32.item_encoder.encode_fields(fields), bf16.item_encoder.encode_fields(fields)
        trunk = bf16.item_encoder.content_trunk(*(fields[k] for k in RAW_CONTENT_FIELDS))
    assert low.dtype == torch.float32 and all(v.dtype != torch.bfloat16 for v in trunk.values())
    assert not torch.equal(low, exact)
    assert F.cosine_similarity(low, exact, dim=-1).min() > 0.99
    cache = TrunkCache.build(bf16.item_encoder, batches, num_items=ITEMS, device=torch.device("cpu"))
    ids = torch.arange(1, ITEMS + 1)
    bf16.train()
    torch.manual_seed(1)
    uncached = bf16.item_encoder.encode_fields(fields)
    torch.manual_seed(1)
    cached = bf16.item_encoder.encode_fields(cache.lookup(ids))
    torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-6)
    cached.square().sum().backward()
    top = [p for n, p in bf16.named_parameters()
           if p.requires_grad and (".image_encoder." in n or ".text_encoder." in n)]
    assert top and all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
                       for p in top)
    assert any(p.grad.abs().sum() > 0 for p in top)


def test_bytes_per_item_of_the_movielens_encoders(catalogue):
    """The memory the cache costs per item (documented in README and memory.trunk_cache_max_mb)."""
    image, text = CONFIGS["pretrained-top-layer"]
    model = _model(image, text)
    plan = plan_trunk_cache(model.item_encoder, catalogue(64, 32)[0], 1682, wanted=True, max_mb=4096)
    assert plan.enabled and plan.reason == ""
    # text: hidden states entering MiniLM's last layer, 32 tokens x 384 floats; image: EfficientNet-Lite0's last
    # frozen block at 64 px, 192 x 2 x 2 floats; plus two masks and two token rows
    assert plan.bytes_per_item == 32 * 384 * 4 + 192 * 2 * 2 * 4 + 2 * 32 * 8 + 2 * 1
    assert plan.total_bytes == plan.bytes_per_item * 1683
    small = plan_trunk_cache(model.item_encoder, catalogue(64, 32)[0], 1682, wanted=True, max_mb=10)
    assert not small.enabled and "memory.trunk_cache_max_mb=10" in small.reason
    # the `movielens` preset's side network: every layer's pooled output, EfficientNet-Lite0's 16 blocks
    # (1,808 channels) and head (1,280), MiniLM's embeddings and 6 layers (7 x 384)
    side = _model(*CONFIGS["pretrained-side-network"], side_network=64)
    plan = plan_trunk_cache(side.item_encoder, catalogue(64, 32)[0], 1682, wanted=True, max_mb=4096)
    assert plan.enabled and plan.bytes_per_item == (1808 + 1280 + 7 * 384) * 4 + 2 * 32 * 8 + 2 * 1


def test_the_cache_is_off_with_a_reason_where_it_cannot_be_exact(catalogue):
    probe = catalogue(32, 16)[0]
    trains_everything = _model(ImageEncoderConfig(kind="tiny_cnn", image_size=32), TextEncoderConfig(kind="tiny",
                                                                                                     max_length=16))
    plan = plan_trunk_cache(trains_everything.item_encoder, probe, 1682, wanted=True, max_mb=4096)
    assert not plan.enabled and "unfreeze_top=-1" in plan.reason
    assert not plan_trunk_cache(trains_everything.item_encoder, probe, 1682, wanted=False, max_mb=4096).enabled

    class NoisyNormalizer(nn.Module):  # parameter-free, so it follows the encoder into training mode
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return F.dropout(self.inner(images), 0.5, self.training)

    image, text = CONFIGS["tiny-top-blocks"]
    noisy = _model(image, text)
    noisy.item_encoder.image_encoder.normalize = NoisyNormalizer(noisy.item_encoder.image_encoder.normalize)
    plan = plan_trunk_cache(noisy.item_encoder, probe, 1682, wanted=True, max_mb=4096)
    assert not plan.enabled and "not deterministic" in plan.reason
    clean = plan_trunk_cache(_model(image, text).item_encoder, probe, 1682, wanted=True, max_mb=4096)
    assert clean.enabled


def test_trunk_outputs_are_what_the_frozen_layers_make(catalogue):
    """With unfreeze_top=0 the cache is the whole encoder: the two-stage baseline's vectors computed once."""
    image, text = CONFIGS["pretrained-frozen"]
    batches = catalogue(image.image_size, text.max_length)
    model = _model(image, text).eval()
    cache = TrunkCache.build(model.item_encoder, batches, num_items=ITEMS, device=torch.device("cpu"))
    first = batches[0]
    with torch.no_grad():
        image_features = model.item_encoder.image_encoder(first["image"])
        text_features = model.item_encoder.text_encoder(first["input_ids"], first["attention_mask"])
    ids = first["item_index"]
    assert cache.fields["image_trunk"].shape == (ITEMS + 1, 1280) and cache.fields["text_trunk"].shape == (ITEMS + 1, 384)
    torch.testing.assert_close(cache.fields["image_trunk"][ids], image_features)
    torch.testing.assert_close(cache.fields["text_trunk"][ids], text_features)
    assert np.count_nonzero(cache.fields["text_trunk"][0].numpy()) == 0  # row 0 = padding


@pytest.mark.parametrize("name", list(SIDE_NETWORKS))
def test_a_side_network_starts_from_the_frozen_encoders_output(catalogue, name):
    """Its up-projection starts at zero: before training, item vectors equal the frozen model's (same weights)."""
    image, text = CONFIGS[name]
    batch = catalogue(image.image_size, text.max_length)[0]
    frozen = _model(image, text).eval()
    torch.manual_seed(0)
    with_side = build_recommender(ModelConfig(dim=32, num_layers=1, num_heads=2, use_id_embedding=True,
                                              side_network=SIDE_NETWORKS[name]), image, text, num_items=1682,
                                  max_history=5).eval()
    missing, unexpected = with_side.load_state_dict(frozen.state_dict(), strict=False)
    assert not unexpected and missing and all("_side." in key for key in missing)
    content = [batch[k] for k in RAW_CONTENT_FIELDS]
    fields = with_side.item_encoder.content_trunk(*content)
    widths = with_side.item_encoder.image_side.layer_widths
    assert fields["image_trunk"].shape == (16, sum(widths)) and widths[-1] == frozen.item_encoder.image_encoder.out_dim
    torch.testing.assert_close(with_side.item_encoder.encode_content(*content),
                               frozen.item_encoder.encode_content(*content), rtol=0, atol=0)


def test_a_side_network_needs_frozen_encoders():
    from training.job_config import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"model.side_network=16 .*image.unfreeze_top=1: set model.side_network=0"):
        build_config("tiny", ["image.unfreeze_top=1", "text.unfreeze_top=0", "model.side_network=16"])
    assert build_config("tiny", ["image.unfreeze_top=0", "text.unfreeze_top=0", "model.side_network=16"])
    # `movielens` (and `movielens_mrl`, built on it) trains one; the presets that train top layers do not
    assert build_config("movielens").model.side_network == 64
    assert build_config("movielens", ["model.side_network=0", "text.unfreeze_top=1"]).text.unfreeze_top == 1
    assert [build_config(name).model.side_network for name in ("movielens_e2e", "gpu")] == [0, 0]
    assert build_config("movielens_mrl").model.side_network == 64
    with pytest.raises(ValueError, match="model.side_network=-1"):
        ModelConfig(side_network=-1)
    with pytest.raises(ConfigError, match="image.kind=hf does not give"):
        build_config("tiny", ["image.path=/nowhere", "image.kind=hf", "image.unfreeze_top=0", "text.unfreeze_top=0",
                              "model.side_network=16"])
