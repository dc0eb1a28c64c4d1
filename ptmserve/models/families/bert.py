"""BERT (and MiniLM, which is a BERT): post-LN encoder, token types, positions from 0.

The module is the shared padding-free ``Encoder``; this file holds what is BERT's own: which
``config.json`` files it reads and how its checkpoint names map to ours.
"""

from __future__ import annotations

from ptmserve.models.config import EncoderConfig
from ptmserve.models.encoder import Encoder, group_names_for
from ptmserve.models.names import NameTable
from ptmserve.models.registry import Family, register

BODY = {
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
    "embeddings.token_type_embeddings": "embeddings.token_type",
    "embeddings.LayerNorm": "embeddings.norm",
    "encoder.layer.{i}.attention.self.query": "layers.{i}.q",
    "encoder.layer.{i}.attention.self.key": "layers.{i}.k",
    "encoder.layer.{i}.attention.self.value": "layers.{i}.v",
    "encoder.layer.{i}.attention.output.dense": "layers.{i}.o",
    "encoder.layer.{i}.attention.output.LayerNorm": "layers.{i}.attn_norm",
    "encoder.layer.{i}.intermediate.dense": "layers.{i}.up",
    "encoder.layer.{i}.output.dense": "layers.{i}.down",
    "encoder.layer.{i}.output.LayerNorm": "layers.{i}.ffn_norm",
}
"""BERT's body names; RoBERTa's are the same."""

COMMON_IGNORED = (
    r"(\w+\.)?embeddings\.position_ids",  # a buffer in older checkpoints
    r"(\w+\.)?embeddings\.token_type_ids",  # a buffer in some versions
)

NAMES = NameTable(
    prefix="bert.",
    body=BODY,
    head={"bert.pooler.dense": "head.dense", "classifier": "head.out"},
    ignored=(*COMMON_IGNORED, r"cls\..*"),  # MLM / NSP heads
    ignored_without_head=(r"(bert\.)?pooler\..*",),  # BertModel's pooler feeds nothing we serve
)


def encoder_family(name: str, hf_model_types: tuple[str, ...], names: NameTable) -> Family:
    """A family run by the shared ``Encoder`` (BERT, RoBERTa, DistilBERT)."""
    return Family(
        name=name,
        hf_model_types=hf_model_types,
        config_from_hf=EncoderConfig.from_hf,
        config_from_dict=EncoderConfig.from_dict,
        names=names,
        build=Encoder,
        group_names=group_names_for,
    )


FAMILY = register(encoder_family("bert", ("bert",), NAMES))
