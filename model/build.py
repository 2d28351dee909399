"""The one place where model configs meet constructors."""
from __future__ import annotations

from typing import Callable

from torch import nn

from encoders.build import build_image_encoder, build_text_encoder
from encoders.config import ImageEncoderConfig, TextEncoderConfig
from encoders.fusion import ItemEncoder
from model.config import ModelConfig
from model.lru import LRUSequenceModel
from matryoshka.layers import MatryoshkaLinear
from model.recommender import Recommender, nests_with
from model.sequence import SASRec

SEQUENCE_MODELS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "sasrec": lambda c, max_len: SASRec(
        dim=c.dim, max_len=max_len, num_layers=c.num_layers, num_heads=c.num_heads, dropout=c.dropout,
        ffn_multiplier=c.ffn_multiplier,
    ),
    # fMRLRec's LRU nests with the item space: its size-s slice is a real s-wide sequence model.
    "lru": lambda c, max_len: LRUSequenceModel(
        dim=c.dim, max_len=max_len, num_layers=c.num_layers, dropout=c.dropout, ffn_multiplier=c.ffn_multiplier,
        sizes=c.matryoshka_sizes if c.matryoshka_nested_backbone else (),
    ),
}


def build_recommender(
    model: ModelConfig, image: ImageEncoderConfig, text: TextEncoderConfig, *, num_items: int, max_history: int
) -> Recommender:
    item_encoder = ItemEncoder(
        image_encoder=build_image_encoder(image) if "image" in model.modalities else None,
        text_encoder=build_text_encoder(text) if "text" in model.modalities else None,
        dim=model.dim,
        num_items=num_items,
        use_id_embedding=model.use_id_embedding,
        dropout=model.dropout,
        id_init_std=model.id_init_std,
        id_dropout=model.id_dropout,
        matryoshka_sizes=model.matryoshka_sizes,
    )
    sizes = model.matryoshka_sizes
    sequence_model = SEQUENCE_MODELS[model.sequence_model](model, max_history)
    nested = nests_with(sequence_model, sizes)
    # Matryoshka user vectors. A nested sequence model (LRU): block i of the head reads the state prefix of
    # size s_i, so the whole size-s path is s wide. Otherwise (SASRec): block i reads the whole state.
    user_head = MatryoshkaLinear(model.dim, model.dim, sizes, in_sizes=sizes if nested else None,
                                 zero_outer=model.matryoshka_zero_outer_head) \
        if sizes and model.matryoshka_user_head else None
    return Recommender(item_encoder=item_encoder, sequence_model=sequence_model,
                       user_head=user_head, matryoshka_sizes=sizes, block_norm=model.matryoshka_block_norm)


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
