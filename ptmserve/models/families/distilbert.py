"""DistilBERT: no token types, its own layer names, and a ReLU ``pre_classifier`` head."""

from __future__ import annotations

from ptmserve.models.families.bert import COMMON_IGNORED, encoder_family
from ptmserve.models.names import NameTable
from ptmserve.models.registry import register

BODY = {
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
    "embeddings.LayerNorm": "embeddings.norm",
    "transformer.layer.{i}.attention.q_lin": "layers.{i}.q",
    "transformer.layer.{i}.attention.k_lin": "layers.{i}.k",
    "transformer.layer.{i}.attention.v_lin": "layers.{i}.v",
    "transformer.layer.{i}.attention.out_lin": "layers.{i}.o",
    "transformer.layer.{i}.sa_layer_norm": "layers.{i}.attn_norm",
    "transformer.layer.{i}.ffn.lin1": "layers.{i}.up",
    "transformer.layer.{i}.ffn.lin2": "layers.{i}.down",
    "transformer.layer.{i}.output_layer_norm": "layers.{i}.ffn_norm",
}

NAMES = NameTable(
    prefix="distilbert.",
    body=BODY,
    head={"pre_classifier": "head.dense", "classifier": "head.out"},
    ignored=(*COMMON_IGNORED, r"vocab_(transform|layer_norm|projector)\..*"),  # MLM head
)

FAMILY = register(encoder_family("distilbert", ("distilbert",), NAMES))
