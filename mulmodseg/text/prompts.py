"""Class vocabularies, prompt templates, and the modality x class text-embedding table.

A table holds one D-dimensional embedding per (modality, class) pair, `(M, K, D)` float32, made by
encoding the prompt ``template.format(mod=<modality phrase>, cls=<class name>)`` with a frozen text
encoder. The segmentation model selects row ``table.row(modality)`` `(K, D)` for each scan.

Class names. ``"amos"`` uses correct anatomical names ("gallbladder", "aorta", "inferior vena cava").
``"amos_reference"`` keeps the strings of the reference notebook (taken from AMOS's dataset.json):
"gall bladder", the misspelling "arota", and "postcava"; use it to reproduce the reference embeddings
(the spelling changes the tokens and so the embedding). ``"mmwhs"`` lists the 7 heart substructures in
ascending order of their label values (205, 420, 500, 550, 600, 820, 850). Channel 0 is "background"
in every set, and it is prompted like any other class, as in the reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Formatter

import torch
from torch import nn

from .tokenizer import tokenize
from .weights import load_text_encoder

CLASS_SETS: dict[str, tuple[str, ...]] = {
    "amos": (
        "background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver",
        "stomach", "aorta", "inferior vena cava", "pancreas", "right adrenal gland", "left adrenal gland",
        "duodenum",
    ),
    "amos_reference": (
        "background", "spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver",
        "stomach", "arota", "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum",
    ),
    "mmwhs": (
        "background", "left ventricle myocardium", "left atrium blood cavity", "left ventricle blood cavity",
        "right atrium blood cavity", "right ventricle blood cavity", "ascending aorta", "pulmonary artery",
    ),
}  # fmt: skip

# V1-V3 are the paper's templates; V2 is worded as in the reference notebook, where it is the active one
# (the paper prints it as "There is [CLS] in this {MOD}.", without the "a"); V3 is the default.
TEMPLATES: dict[str, str] = {
    "v1": "A photo of a {cls}.",
    "v2": "There is a {cls} in this {mod}.",
    "v3": "A {mod} of a {cls}.",
}
DEFAULT_TEMPLATE = "v3"

MODALITY_PHRASES: dict[str, str] = {
    "CT": "computed tomography imaging",
    "MR": "magnetic resonance imaging",
}

# Order of the reference's [2, K, 512] tensor (the notebook iterates {'MR': ..., 'CT': ...}).
REFERENCE_MODALITIES = ("MR", "CT")
TABLE_FORMAT = "mulmodseg.embedding_table"
TABLE_VERSION = 1
_TABLE_KEYS = ("format", "version", "modalities", "classes", "template", "encoder", "embeddings")


class TableError(ValueError):
    """An embedding table (file, dict or arguments) that cannot be used, with the reason."""


def resolve_classes(spec: str | Path | Sequence[str]) -> tuple[str, ...]:
    """Class names from a set name in CLASS_SETS, a file (JSON list, or one name per line; blank
    lines and lines starting with '#' skipped), or a sequence of names. Channel order = list order."""
    if isinstance(spec, (str, Path)):
        if str(spec) in CLASS_SETS:
            return CLASS_SETS[str(spec)]
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"unknown class set {str(spec)!r}: use one of {sorted(CLASS_SETS)} or a file of names")
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            names = json.loads(text)
        else:
            names = [line.strip() for line in text.splitlines()]
            names = [n for n in names if n and not n.startswith("#")]
    else:
        names = list(spec)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"class names must be a non-empty list of non-empty strings, got {names!r}")
    names = [n.strip() for n in names]  # before the repeat check: "liver " is "liver"
    if len(set(names)) != len(names):
        raise ValueError(f"class names repeat: {names}")
    return tuple(names)


def resolve_template(spec: str) -> str:
    """A template from its key in TEMPLATES (case-insensitive) or a literal string using {cls} and
    optionally {mod}, e.g. ``"A {mod} scan showing the {cls}."``."""
    template = TEMPLATES.get(spec.lower(), spec)
    fields = {name for _, name, _, _ in Formatter().parse(template) if name is not None}
    if "cls" not in fields or not fields <= {"cls", "mod"}:
        raise ValueError(
            f"template {spec!r} must be one of {sorted(TEMPLATES)} or text with a {{cls}} field "
            f"and optionally {{mod}}, and no other fields (found {sorted(fields)})"
        )
    return template


def modality_phrase(modality: str, phrases: Mapping[str, str] | None = None) -> str:
    """The words a prompt uses for `modality`: from `phrases`, else MODALITY_PHRASES, each matched exactly
    then case-insensitively (so a user's "ct" replaces the built-in "CT"); an unknown modality (PET, T1,
    ...) is written as its own name."""
    for table in (phrases or {}, MODALITY_PHRASES):
        if modality in table:
            return table[modality]
        by_upper = {k.upper(): v for k, v in table.items()}
        if modality.upper() in by_upper:
            return by_upper[modality.upper()]
    return modality


def make_prompts(
    classes: Sequence[str], modalities: Sequence[str], template: str, phrases: Mapping[str, str] | None = None
) -> tuple[tuple[str, ...], ...]:
    """Prompts `(M, K)`: row m, column k is the template filled with modality m and class k."""
    template = resolve_template(template)
    return tuple(tuple(template.format(mod=modality_phrase(m, phrases), cls=c) for c in classes) for m in modalities)


def _names(values: object, what: str) -> tuple[str, ...]:
    """`values` as a tuple, checked to be a non-empty list or tuple of distinct non-empty strings."""
    if not isinstance(values, (list, tuple)) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise TableError(f"{what} must be a non-empty list of non-empty strings, got {values!r}")
    if len(set(values)) != len(values):
        raise TableError(f"{what} repeat: {list(values)}")
    return tuple(values)


@dataclass(eq=False)  # tensors have no single truth value, so no field-wise ==
class EmbeddingTable:
    """Text embeddings per modality and class.

    embeddings: (M, K, D) float32, M = len(modalities), K = len(classes).
    template: the prompt template used (None for one-hot or reference tables).
    encoder: what produced the embeddings, e.g. "clip:ViT-B-32.pt", "onehot", "reference".
    """

    modalities: tuple[str, ...]
    classes: tuple[str, ...]
    embeddings: torch.Tensor
    template: str | None = None
    encoder: str = ""

    def __post_init__(self) -> None:
        """Check every field (TableError) and store the embeddings as float32 on the CPU."""
        self.modalities = _names(self.modalities, "modalities")
        self.classes = _names(self.classes, "classes")
        if not isinstance(self.embeddings, torch.Tensor) or not self.embeddings.is_floating_point():
            found = getattr(self.embeddings, "dtype", type(self.embeddings).__name__)
            raise TableError(f"embeddings must be a floating-point tensor, got {found}")
        expected = (len(self.modalities), len(self.classes))
        if self.embeddings.dim() != 3 or tuple(self.embeddings.shape[:2]) != expected or self.embeddings.shape[2] < 1:
            raise TableError(
                f"embeddings of shape {tuple(self.embeddings.shape)} do not match "
                f"{expected[0]} modalities x {expected[1]} classes x D (D >= 1)"
            )
        self.embeddings = self.embeddings.detach().to(device="cpu", dtype=torch.float32)
        bad = (~torch.isfinite(self.embeddings)).sum().item()
        if bad:
            raise TableError(f"embeddings hold {bad} NaN or infinite value(s) (in float32)")
        if self.template is not None and not isinstance(self.template, str):
            raise TableError(f"template must be a string or None, got {type(self.template).__name__}")
        if not isinstance(self.encoder, str):
            raise TableError(f"encoder must be a string, got {type(self.encoder).__name__}")

    @property
    def dim(self) -> int:
        """D, the embedding size."""
        return self.embeddings.shape[2]

    def row(self, modality: str) -> torch.Tensor:
        """Embeddings `(K, D)` of one modality."""
        if modality not in self.modalities:
            raise KeyError(f"modality {modality!r} is not in the embedding table {list(self.modalities)}")
        return self.embeddings[self.modalities.index(modality)]

    def to_dict(self) -> dict:
        """Plain dict (lists, strings, one tensor) for torch.save or embedding in a checkpoint."""
        return {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "modalities": list(self.modalities),
            "classes": list(self.classes),
            "template": self.template,
            "encoder": self.encoder,
            "embeddings": self.embeddings,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> EmbeddingTable:
        """Inverse of `to_dict`; raises TableError (a ValueError) saying what is wrong."""
        if not isinstance(data, Mapping) or data.get("format") != TABLE_FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise TableError(f"not an embedding table (format {found!r})")
        missing = [key for key in _TABLE_KEYS if key not in data]
        if missing:
            raise TableError(f"the embedding table lacks {missing}")
        version = data["version"]
        if type(version) is not int or version < 1:
            raise TableError(f"embedding table version must be a positive integer, got {version!r}")
        if version > TABLE_VERSION:
            raise TableError(f"embedding table version {version} is newer than this code ({TABLE_VERSION})")
        return cls(data["modalities"], data["classes"], data["embeddings"], data["template"], data["encoder"])

    def save(self, path: str | Path) -> None:
        """Write the table with torch.save, atomically (temporary file, then rename)."""
        path = Path(path)
        # The text package's own atomic write, not mulmodseg.files.atomic_write: it stays copyable alone.
        # A unique name opened exclusively, not mkstemp: the table gets the umask's mode, not 0o600.
        tmp_name = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp_name, "xb") as f:
                torch.save(self.to_dict(), f)
            os.replace(tmp_name, path)
        finally:
            Path(tmp_name).unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path, classes: Sequence[str] | None = None) -> EmbeddingTable:
        """Read a table written by `save`, or the reference's raw tensor `(2, K, D)`.

        A saved table must hold exactly `classes`, in that order, when they are given. A raw tensor's
        rows are MR (index 0) then CT (index 1), as the reference stores them; its class names are
        `classes`, by default CLASS_SETS["amos_reference"] when K is 14. Every problem raises TableError
        (a ValueError) naming the file.
        """
        try:
            data = torch.load(Path(path), map_location="cpu", weights_only=True)
        except FileNotFoundError as error:
            raise TableError(f"embedding table not found: {path}") from error
        except Exception as error:  # torch.load fails in many ways on a file that is not a table
            reason = str(error).strip().split("\n")[0][:200]
            raise TableError(f"cannot read the embedding table {path} ({type(error).__name__}: {reason})") from error
        try:
            if isinstance(data, dict):
                table = cls.from_dict(data)
            elif isinstance(data, torch.Tensor) and data.dim() == 3 and data.shape[0] == len(REFERENCE_MODALITIES):
                if classes is None and data.shape[1] != len(CLASS_SETS["amos_reference"]):
                    raise TableError(f"it holds {data.shape[1]} classes; pass their names as `classes`")
                names = CLASS_SETS["amos_reference"] if classes is None else tuple(classes)
                table = cls(REFERENCE_MODALITIES, names, data, None, "reference")
            else:
                raise TableError(
                    "neither an embedding table nor a reference tensor of shape (2, K, D) "
                    f"(found {type(data).__name__} {tuple(getattr(data, 'shape', ()))})"
                )
        except TableError as error:
            raise TableError(f"{path}: {error}") from error
        if classes is not None and table.classes != tuple(classes):
            raise TableError(
                f"{path} was built for other classes or another order: the table has {list(table.classes)}, "
                f"expected {list(classes)}; rebuild it with these classes, in this order"
            )
        return table

    @classmethod
    def onehot(cls, modalities: Sequence[str], classes: Sequence[str]) -> EmbeddingTable:
        """A table without text: entry (m, k) is one-hot(m) over M concatenated with one-hot(k) over K,
        so `embeddings` is `(M, K, M + K)`; each (modality, class) pair gets its own code."""
        m, k = len(modalities), len(classes)
        embeddings = torch.cat(
            [torch.eye(m)[:, None, :].expand(m, k, m), torch.eye(k)[None, :, :].expand(m, k, k)], dim=2
        )
        return cls(tuple(modalities), tuple(classes), embeddings, None, "onehot")


def model_table(
    table: EmbeddingTable | str | Path | None, modalities: Sequence[str] = ("CT", "MR"),
    classes: Sequence[str] | None = None,
) -> tuple[torch.Tensor | None, tuple[str, ...], tuple[str, ...] | None]:
    """``(embeddings (M, K, D), modalities, classes)``, the arguments ``mulmodseg.model.MulModSeg`` takes after
    the backbone and class count, for a table given as an `EmbeddingTable`, the path of a saved one (both
    bring their own names), ``"onehot"`` (`EmbeddingTable.onehot` of ``modalities`` x ``classes``), or None
    (the vision-only model: no embeddings, the names as given)."""
    if table is None:
        return None, tuple(modalities), tuple(classes) if classes else None
    if isinstance(table, (str, Path)) and str(table) == "onehot":
        if not classes:
            raise TableError("a one-hot table needs the class names")
        table = EmbeddingTable.onehot(modalities, classes)
    elif isinstance(table, (str, Path)):
        table = EmbeddingTable.load(table)
    return table.embeddings, table.modalities, table.classes


@torch.no_grad()
def build_embedding_table(
    encoder: nn.Module,
    classes: str | Path | Sequence[str],
    modalities: Sequence[str],
    template: str = DEFAULT_TEMPLATE,
    *,
    phrases: Mapping[str, str] | None = None,
    device: str | torch.device | None = None,
) -> EmbeddingTable:
    """Encode all M x K prompts in one batch with `encoder` (ids `(N, 77)` -> `(N, D)`) into a table.

    classes: a CLASS_SETS name, a file of names, or names. template: "v1"/"v2"/"v3" or a literal
    template with {cls} and {mod}. device: moves the encoder there first (default: leave it). The result is
    float32 on the CPU whatever the encoder's dtype.
    """
    classes = resolve_classes(classes)
    template = resolve_template(template)
    prompts = make_prompts(classes, modalities, template, phrases)
    if device is not None:
        encoder.to(device)
    ids = tokenize([p for row in prompts for p in row]).to(next(encoder.parameters()).device)
    flat = encoder(ids).float().cpu()
    embeddings = flat.reshape(len(modalities), len(classes), -1)
    return EmbeddingTable(
        tuple(modalities), classes, embeddings, template, getattr(encoder, "name", type(encoder).__name__)
    )



def cached_clip_table(weights: str | Path | None, classes: Sequence[str], modalities: Sequence[str], template: str,
                      activation: str | None, cache_dir: str | Path) -> EmbeddingTable:
    """The table of CLIP prompts (``build_embedding_table`` with the text tower of ``weights``; None: the official
    download), cached in ``cache_dir`` under a key of the weights file (path, size, mtime), the classes,
    modalities, template and activation, so later runs skip loading the 250 MB text tower."""
    weights = Path(weights).expanduser().resolve() if weights else None
    stat = weights.stat() if weights and weights.is_file() else None
    key = json.dumps([str(weights), stat and stat.st_size, stat and stat.st_mtime_ns, list(classes),
                      list(modalities), template, activation])
    cached = Path(cache_dir) / f"text_table_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if stat is not None and cached.is_file():
        return EmbeddingTable.load(cached)
    encoder = load_text_encoder(weights, download=weights is None, activation=activation)
    table = build_embedding_table(encoder, classes, modalities, template)
    if stat is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        table.save(cached)
    return table
