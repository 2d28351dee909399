"""The one place where model configs meet constructors."""
from __future__ import annotations

from typing import Callable

from torch import nn

from encoders.build import build_image_encoder, build_text_encoder
from encoders.config import ImageEncoderConfig, TextEncoderConfig
from encoders.fusion import ItemEncoder
from model.config import ModelConfig
from model.lru import LRUSequenceModel
from model.recommender import Recommender
from model.sequence import SASRec

# Feed-forward width: 4 x dim in SASRec (the transformer convention), 1 x dim in the LRU (fMRLRec's square layers,
# half the CPU time per step at dim 512 for no measured loss; BENCHMARKS.md session 5).
SEQUENCE_MODELS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "sasrec": lambda c, max_len: SASRec(
        dim=c.dim, max_len=max_len, num_layers=c.num_layers, num_heads=c.num_heads, dropout=c.dropout,
        ffn_multiplier=4,
    ),
    "lru": lambda c, max_len: LRUSequenceModel(
        dim=c.dim, max_len=max_len, num_layers=c.num_layers, dropout=c.dropout, ffn_multiplier=1,
    ),
}


def build_recommender(
    model: ModelConfig, image: ImageEncoderConfig, text: TextEncoderConfig, *, num_items: int, max_history: int
) -> Recommender:
    item_encoder = ItemEncoder(
        image_encoder=build_image_encoder(image, model.dim) if "image" in model.modalities else None,
        text_encoder=build_text_encoder(text, model.dim) if "text" in model.modalities else None,
        dim=model.dim,
        num_items=num_items,
        use_id_embedding=model.use_id_embedding,
        dropout=model.dropout,
        matryoshka_sizes=model.matryoshka_sizes,
        side_width=model.side_network,
        id_dropout=model.id_dropout,
        bf16_backbones=model.encoder_precision == "bf16",
    )
    sequence_model = SEQUENCE_MODELS[model.sequence_model](model, max_history)
    return Recommender(item_encoder=item_encoder, sequence_model=sequence_model,
                       matryoshka_sizes=model.matryoshka_sizes)


def encoder_parameters(recommender: Recommender) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(trainable params of the pretrained/content backbones, all other trainable params)."""
    backbone_ids = set()
    for module in (recommender.item_encoder.image_encoder, recommender.item_encoder.text_encoder):
        if module is not None:
            backbone_ids.update(id(p) for p in module.parameters())
    backbone, rest = [], []
    for param in recommender.parameters():
        if param.requires_grad:
            (backbone if id(param) in backbone_ids else rest).append(param)
    return backbone, rest
