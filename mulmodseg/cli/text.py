"""Build a modality x class text-embedding table file: ``python -m mulmodseg.text`` or ``mulmodseg-text`` (the same
``main``), a command line over ``mulmodseg.text``::

    python -m mulmodseg.text --clip_weights ViT-B-32.pt --classes amos --template v3 \\
        --modalities CT MR --out amos_v3.pt

Every flag (the output, the device, the classes, modalities and template) is checked before the text tower
loads; the exit codes are the other commands' (``mulmodseg.cli``; no data, so never 3).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

from mulmodseg.cli import EXIT_BAD_ARGUMENTS, EXIT_CODES_HELP, add_version_argument, program_name, run
from mulmodseg.text.clip import ACTIVATIONS
from mulmodseg.text.prompts import (
    CLASS_SETS,
    DEFAULT_TEMPLATE,
    MODALITY_PHRASES,
    TEMPLATES,
    EmbeddingTable,
    build_embedding_table,
    make_prompts,
    resolve_classes,
    resolve_template,
)
from mulmodseg.text.weights import DEFAULT_CACHE_DIR, OPENAI_VIT_B_32_URL, WeightsUnavailableError, load_text_encoder


def build_parser() -> argparse.ArgumentParser:
    """The command's flags, ``--help`` and ``--version``."""
    templates = "; ".join(f"{k}: {v!r}" for k, v in TEMPLATES.items())
    phrases = "; ".join(f"{k}: {v!r}" for k, v in MODALITY_PHRASES.items())
    parser = argparse.ArgumentParser(
        prog=program_name("mulmodseg.text"),
        description="Encode one prompt per (modality, class) with CLIP's text tower and save the "
        "(M, K, 512) float32 table that MulModSeg conditions on.",
        epilog="Example: python -m mulmodseg.text --clip_weights ViT-B-32.pt --classes amos --template v3 "
        f"--modalities CT MR --out amos_v3.pt. {EXIT_CODES_HELP}",
    )
    add_version_argument(parser)
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
    parser.add_argument(
        "--activation",
        choices=sorted(ACTIVATIONS),
        help="the tower's MLP activation, overriding what the weights' files say: a state dict never records it, "
        "so without this flag it is OpenAI's quick_gelu unless a Hugging Face config.json names another. open_clip "
        "models trained with nn.GELU (names without -quickgelu, e.g. LAION's ViT-B-32 laion2b_s34b_b79k) need gelu",
    )
    parser.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings (the reference does not)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device for the encoder: cpu, cuda or cuda:N; gpu and gpu:N are cuda and cuda:N (default cpu)",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="output table file (.pt), in an existing folder; never the --clip_weights or --classes file",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it exists (without this flag an existing --out is an error, checked before any work)",
    )
    return parser


def output_problem(args: argparse.Namespace) -> str | None:
    """Why the table cannot be written to ``--out`` (None when it can), found before anything is loaded."""
    out = Path(args.out).expanduser()
    target = out.resolve()
    weights = args.clip_weights or Path(args.cache_dir or DEFAULT_CACHE_DIR) / OPENAI_VIT_B_32_URL.rsplit("/", 1)[1]
    inputs = [("--clip_weights", Path(weights))]
    if args.classes not in CLASS_SETS:
        inputs.append(("--classes", Path(args.classes)))
    for flag, path in inputs:
        source = path.expanduser().resolve()
        if target == source:
            return f"--out {args.out} is the {flag} file {path}; write the table elsewhere"
        if source in target.parents:  # a Hugging Face weights folder
            return f"--out {args.out} is inside the {flag} folder {path}; write the table elsewhere"
    if out.is_dir():
        return f"--out {args.out} is a folder; give the table's file name, e.g. --out {out / 'table.pt'}"
    if not out.parent.is_dir():
        return f"--out {args.out}: the folder {out.parent} does not exist; create it first"
    if not os.access(out.parent, os.W_OK | os.X_OK):
        return f"--out {args.out}: cannot write in the folder {out.parent}"
    if out.exists() and not args.overwrite:
        return f"--out {args.out} exists; pass --overwrite to replace it"
    return None


def device_name(name: str) -> str:
    """``--device`` as torch spells it: ``gpu`` and ``gpu:N`` are ``cuda`` and ``cuda:N``
    (TotalSegmentator's spelling)."""
    return re.sub(r"^gpu(?=$|:)", "cuda", name)


def device_problem(name: str) -> str | None:
    """Why ``--device name`` cannot run the encoder here (None when it can)."""
    try:
        device = torch.device(device_name(name))
    except RuntimeError:
        return f"--device {name}: not a device name; use cpu, cuda, cuda:N or gpu"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {name}: no CUDA device is available here; use --device cpu"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"--device {name}: this machine has {count} CUDA device(s), so N in cuda:N must be below {count}"
    elif device.type != "cpu":
        return f"--device {name}: use cpu, cuda or cuda:N"
    return None


def prompt_problem(args: argparse.Namespace) -> str | None:
    """Why ``--classes``, ``--modalities``, ``--phrase`` or ``--template`` cannot make the prompts (None when
    they can), found before the text tower loads."""
    for item in args.phrase:
        name, sep, words = item.partition("=")
        if not sep or not name or not words:
            return f"--phrase expects NAME=WORDS, got {item!r}"
    try:
        resolve_classes(args.classes)
    except (ValueError, OSError) as error:
        return f"--classes {args.classes}: {error}"
    try:
        resolve_template(args.template)
    except ValueError as error:
        return f"--template {args.template}: {error}"
    if len(set(args.modalities)) != len(args.modalities):
        return f"--modalities {' '.join(args.modalities)}: each modality is one row of the table; name it once"
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m mulmodseg.text`` and ``mulmodseg-text``: write the table ``argv`` describes (default: the command
    line); returns the exit status (``mulmodseg.cli``)."""
    args = build_parser().parse_args(argv)
    problem = output_problem(args) or device_problem(args.device) or prompt_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    classes = resolve_classes(args.classes)
    phrases = dict(item.split("=", 1) for item in args.phrase)
    table: EmbeddingTable | None = None

    def work() -> None:
        nonlocal table
        encoder = load_text_encoder(
            args.clip_weights, download=args.download, cache_dir=args.cache_dir, normalize=args.normalize,
            activation=args.activation,
        )
        table = build_embedding_table(
            encoder, classes, args.modalities, args.template, phrases=phrases,
            device=torch.device(device_name(args.device)),
        )
        table.save(args.out)

    # Weights that are missing or unusable (WeightsError is a ValueError) are the arguments' problem, as in train.py;
    # any other OSError is the system's (a full disk, a network that fails mid-download, ...).
    code = run(work, lambda error: f"{args.out} was not written",
               codes={FileNotFoundError: EXIT_BAD_ARGUMENTS, WeightsUnavailableError: EXIT_BAD_ARGUMENTS})
    if code:
        return code
    prompts = make_prompts(classes, args.modalities, args.template, phrases)
    shape = f"{len(table.modalities)} modalities x {len(table.classes)} classes x {table.dim}"
    print(f"wrote {args.out}: {shape} ({table.encoder})")
    for modality, row in zip(args.modalities, prompts):
        print(f"  {modality}: {row[0]!r} ... {row[-1]!r}")
    return 0
