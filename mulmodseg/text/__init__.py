"""Text branch: CLIP tokenizer, CLIP text tower, prompts and the modality x class embedding table.

Typical use::

    from mulmodseg.text import load_text_encoder, build_embedding_table
    encoder = load_text_encoder("ViT-B-32.pt")
    table = build_embedding_table(encoder, "amos", ["CT", "MR"], "v3")   # (2, 14, 512)
    table.save("amos_v3.pt")

or from the shell: ``python -m mulmodseg.text --help``.
"""

from .clip import CheckpointError, CLIPTextEncoder, WeightsUnavailableError, load_text_encoder
from .prompts import CLASS_SETS, MODALITY_PHRASES, TEMPLATES, EmbeddingTable, TableError, build_embedding_table
from .tokenizer import decode, tokenize

__all__ = [
    "CLASS_SETS",
    "MODALITY_PHRASES",
    "TEMPLATES",
    "CLIPTextEncoder",
    "CheckpointError",
    "EmbeddingTable",
    "TableError",
    "WeightsUnavailableError",
    "build_embedding_table",
    "decode",
    "load_text_encoder",
    "tokenize",
]
