"""RoBERTa, XLM-RoBERTa and CamemBERT: BERT's body, positions counted from ``pad_token_id + 1``, and a
head whose dense layer sits under ``classifier.``."""

from __future__ import annotations

from ptmserve.models.families.bert import BODY, COMMON_IGNORED, encoder_family
from ptmserve.models.names import NameTable
from ptmserve.models.registry import register

NAMES = NameTable(
    prefix="roberta.",
    body=BODY,
    head={"classifier.dense": "head.dense", "classifier.out_proj": "head.out"},
    ignored=(*COMMON_IGNORED, r"lm_head\..*", r"(roberta\.)?pooler\..*"),  # the RoBERTa head skips it
)

FAMILY = register(encoder_family("roberta", ("roberta", "xlm-roberta", "camembert"), NAMES))
