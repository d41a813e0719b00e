"""Text branch: CLIP tokenizer, CLIP text tower, prompts and the modality x class embedding table.

``tokenizer`` (CLIP's BPE), ``clip`` (the text tower), ``weights`` (reading and downloading its released
weights), ``prompts`` (class sets, templates, the table); the package imports nothing else of mulmodseg, so it
can be copied alone (its command line is ``mulmodseg.cli.text``, which ``__main__`` runs).

Typical use::

    from mulmodseg.text import load_text_encoder, build_embedding_table
    encoder = load_text_encoder("ViT-B-32.pt")
    table = build_embedding_table(encoder, "amos", ["CT", "MR"], "v3")   # (2, 14, 512)
    table.save("amos_v3.pt")

or from the shell: ``python -m mulmodseg.text --help``.
"""

from .clip import CLIPTextEncoder
from .prompts import (
    CLASS_SETS,
    MODALITY_PHRASES,
    TEMPLATES,
    EmbeddingTable,
    TableError,
    build_embedding_table,
    cached_clip_table,
)
from .tokenizer import decode, tokenize
from .weights import WeightsError, WeightsUnavailableError, load_text_encoder

__all__ = [
    "CLASS_SETS",
    "MODALITY_PHRASES",
    "TEMPLATES",
    "CLIPTextEncoder",
    "EmbeddingTable",
    "TableError",
    "WeightsError",
    "WeightsUnavailableError",
    "build_embedding_table",
    "cached_clip_table",
    "decode",
    "load_text_encoder",
    "tokenize",
]
