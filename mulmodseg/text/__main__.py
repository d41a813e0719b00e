"""Command line: build a modality x class text-embedding table file.

    python -m mulmodseg.text --clip_weights ViT-B-32.pt --classes amos --template v3 \
        --modalities CT MR --out amos_v3.pt
"""

from __future__ import annotations

import argparse
import sys

import torch

from .clip import DEFAULT_CACHE_DIR, CheckpointError, WeightsUnavailableError, load_text_encoder
from .prompts import (
    CLASS_SETS,
    DEFAULT_TEMPLATE,
    MODALITY_PHRASES,
    TEMPLATES,
    build_embedding_table,
    make_prompts,
    resolve_classes,
)


def build_parser() -> argparse.ArgumentParser:
    templates = "; ".join(f"{k}: {v!r}" for k, v in TEMPLATES.items())
    phrases = "; ".join(f"{k}: {v!r}" for k, v in MODALITY_PHRASES.items())
    parser = argparse.ArgumentParser(
        prog="python -m mulmodseg.text",
        description="Encode one prompt per (modality, class) with CLIP's text tower and save the "
        "(M, K, 512) float32 table that MulModSeg conditions on.",
        epilog="Example: python -m mulmodseg.text --clip_weights ViT-B-32.pt --classes amos --template v3 "
        "--modalities CT MR --out amos_v3.pt",
    )
    parser.add_argument(
        "--clip_weights",
        metavar="PATH",
        help="OpenAI ViT-B-32.pt, an open_clip state dict, or a Hugging Face CLIP directory / "
        "pytorch_model.bin / model.safetensors. Default: ViT-B-32.pt in --cache_dir (see --download).",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="download OpenAI's ViT-B-32.pt (about 350 MB, SHA-256 checked) into --cache_dir if it is not there",
    )
    parser.add_argument("--cache_dir", metavar="DIR", help=f"download cache (default {DEFAULT_CACHE_DIR})")
    parser.add_argument(
        "--classes",
        default="amos",
        metavar="SET_OR_FILE",
        help=f"class set ({', '.join(CLASS_SETS)}) or a file with one name per line or a JSON list; "
        "channel order = list order, background first (default amos)",
    )
    parser.add_argument(
        "--template",
        default=DEFAULT_TEMPLATE,
        help=f"{templates}; or your own text with {{cls}} and optionally {{mod}} (default {DEFAULT_TEMPLATE})",
    )
    parser.add_argument(
        "--modalities",
        nargs="+",
        default=["CT", "MR"],
        metavar="NAME",
        help="modality names, one table row each, in this order (default CT MR)",
    )
    parser.add_argument(
        "--phrase",
        action="append",
        default=[],
        metavar="NAME=WORDS",
        help=f"words used for a modality in prompts (built in: {phrases}; others are written as their "
        "name). Repeat for several, e.g. --phrase 'T1=T1-weighted magnetic resonance imaging'",
    )
    parser.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings (the reference does not)")
    parser.add_argument("--device", default="cpu", help="torch device for the encoder (default cpu)")
    parser.add_argument("--out", required=True, metavar="PATH", help="output table file (.pt)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    phrases = {}
    for item in args.phrase:
        name, sep, words = item.partition("=")
        if not sep or not name or not words:
            print(f"error: --phrase expects NAME=WORDS, got {item!r}", file=sys.stderr)
            return 2
        phrases[name] = words
    try:
        classes = resolve_classes(args.classes)
        encoder = load_text_encoder(
            args.clip_weights, download=args.download, cache_dir=args.cache_dir, normalize=args.normalize
        )
        table = build_embedding_table(
            encoder, classes, args.modalities, args.template, phrases=phrases, device=torch.device(args.device)
        )
    except (CheckpointError, WeightsUnavailableError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    table.save(args.out)
    prompts = make_prompts(classes, args.modalities, args.template, phrases)
    shape = f"{len(table.modalities)} modalities x {len(table.classes)} classes x {table.dim}"
    print(f"wrote {args.out}: {shape} ({table.encoder})")
    for modality, row in zip(args.modalities, prompts):
        print(f"  {modality}: {row[0]!r} ... {row[-1]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
