"""Released CLIP weights: reading them in any of their layouts, and downloading OpenAI's (the role of
``clip.py`` in OpenAI's CLIP; the tower itself is `mulmodseg.text.clip`).

`load_text_encoder` reads, from a local path:

- OpenAI's released ``ViT-B-32.pt`` (a TorchScript archive; only its tensors are read, nothing is run),
- plain state dicts in the OpenAI / open_clip layout (``.pt``, ``.bin``; possibly nested under
  ``"state_dict"`` and/or prefixed, e.g. ``module.``),
- the Hugging Face layout (``openai/clip-vit-base-patch32``: a directory, ``pytorch_model.bin`` or
  ``model.safetensors``; a full ``CLIPModel`` or a ``CLIPTextModelWithProjection``),

and can download ``ViT-B-32.pt`` from OpenAI, checked against the SHA-256 in its address. Its errors are
``WeightsError`` and ``WeightsUnavailableError``, not ``mulmodseg.errors.UserError``: the text package imports
nothing outside itself, so that it can be copied alone.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import mmap
import os
import secrets
import sys
import urllib.request
import zipfile
from dataclasses import replace
from pathlib import Path

import torch

from .clip import ACTIVATIONS, CLIPTextEncoder, TextConfig

OPENAI_VIT_B_32_URL = (
    "https://openaipublic.azureedge.net/clip/models/"
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt"
)
DEFAULT_CACHE_DIR = Path("~/.cache/mulmodseg")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HOW_TO_FIX = "pass --clip_weights PATH (OpenAI ViT-B-32.pt, an open_clip or a Hugging Face CLIP checkpoint)"


class WeightsError(ValueError):
    """A weight file that cannot be read or holds no usable CLIP text tower."""


class WeightsUnavailableError(RuntimeError):
    """No CLIP weights could be found or downloaded."""


# ---------------------------------------------------------------------------------------------------------
# Reading weight files


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file: an 8-byte little-endian header size, a JSON header
    ``{name: {dtype, shape, data_offsets}}``, then raw little-endian data.

    The tensors are copy-on-write views of a memory map, so tensors that are never touched (an image
    tower) are never read from disk.
    """
    if sys.byteorder != "little":
        raise NotImplementedError("reading safetensors needs a little-endian machine")
    with open(path, "rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    header_size = int.from_bytes(buffer[:8], "little")
    if len(buffer) < 8 + header_size:
        raise ValueError(f"the header claims {header_size} bytes but the file has {len(buffer)}")
    header = json.loads(bytes(buffer[8 : 8 + header_size]))
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = (8 + header_size + offset for offset in info["data_offsets"])
        count = math.prod(info["shape"])
        if end > len(buffer) or end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {name!r} does not fit the file (truncated?)")
        flat = (
            torch.frombuffer(buffer, dtype=dtype, count=count, offset=begin) if count else torch.empty(0, dtype=dtype)
        )
        tensors[name] = flat.reshape(info["shape"])
    return tensors


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def _tensors_only(obj: object) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint (open_clip training files nest it under "state_dict")."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (file or Hugging Face directory), whatever its format.

    Raises WeightsError naming the file when it cannot be read (truncated, wrong format).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / name for name in HF_WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise WeightsError(f"{path} is a directory without {' or '.join(HF_WEIGHT_FILES)}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    is_zip = head[:4] == b"PK\x03\x04"
    is_safetensors = path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")
    if not (is_zip or is_safetensors or head[:1] == b"\x80"):  # \x80 opens a (legacy torch.save) pickle
        raise WeightsError(
            f"cannot read CLIP weights from {path}: "
            + ("the file is empty" if not head else "not a PyTorch, TorchScript or safetensors file")
        )
    try:
        if is_zip and _is_torchscript(path):
            # Loading a TorchScript archive only deserialises it; its CUDA code paths would run on forward.
            return _tensors_only(torch.jit.load(str(path), map_location="cpu").state_dict())
        if is_safetensors:
            return read_safetensors(path)
        return _tensors_only(torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip))
    except Exception as error:
        reason = str(error).strip().split("\n")[0][:200]
        raise WeightsError(
            f"cannot read CLIP weights from {path} ({type(error).__name__}: {reason}); "
            "the file may be truncated or in an unsupported format"
        ) from error


_OPENAI_TEXT_SINGLE = (
    "token_embedding.weight",
    "positional_embedding",
    "ln_final.weight",
    "ln_final.bias",
    "text_projection",
)
_HF_TO_OPENAI_BLOCK = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _common_prefix(state_dict: dict[str, torch.Tensor], suffix: str) -> str | None:
    """Shortest prefix p with p + suffix a key (prefixes such as "module." or "text." vary by trainer)."""
    prefixes = [k[: -len(suffix)] for k in state_dict if k.endswith(suffix)]
    return min(prefixes, key=len) if prefixes else None


_HF_TOKEN_KEY = "embeddings.token_embedding.weight"


def _from_hf(state_dict: dict[str, torch.Tensor], text_prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI-layout text tower from Hugging Face keys: q/k/v packed, text_projection transposed back.

    `text_prefix` comes before ``embeddings.``; text_projection sits beside ``text_model.``, or beside
    ``embeddings.`` when the keys have no ``text_model.`` level.
    """
    t = text_prefix
    outer = t[: -len("text_model.")] if t.endswith("text_model.") else t
    out = {
        "token_embedding.weight": state_dict[t + "embeddings.token_embedding.weight"],
        "positional_embedding": state_dict[t + "embeddings.position_embedding.weight"],
        "ln_final.weight": state_dict[t + "final_layer_norm.weight"],
        "ln_final.bias": state_dict[t + "final_layer_norm.bias"],
        # HF keeps a Linear (out x in); CLIP right-multiplies a (width x embed_dim) matrix
        "text_projection": state_dict[outer + "text_projection.weight"].t(),
    }
    layer_prefix = t + "encoder.layers."
    layers = {int(k[len(layer_prefix) :].split(".")[0]) for k in state_dict if k.startswith(layer_prefix)}
    for i in sorted(layers):
        src, dst = f"{layer_prefix}{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [state_dict[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
            for hf_name, openai_name in _HF_TO_OPENAI_BLOCK.items():
                out[f"{dst}{openai_name}.{kind}"] = state_dict[f"{src}{hf_name}.{kind}"]
    return out


def text_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text tower of any supported layout, in OpenAI key names; everything else is dropped.

    Raises WeightsError when no text tower is found or a key is missing.
    """
    hf_prefix = _common_prefix(state_dict, _HF_TOKEN_KEY)
    try:
        if hf_prefix is not None:
            return _from_hf(state_dict, hf_prefix)
        prefix = _common_prefix(state_dict, "token_embedding.weight")
        if prefix is None:
            raise WeightsError(
                "no CLIP text tower found (no key ending in token_embedding.weight or "
                "text_model.embeddings.token_embedding.weight)"
            )
        text = {}
        for key, value in state_dict.items():
            name = key[len(prefix) :]
            if key.startswith(prefix) and (name in _OPENAI_TEXT_SINGLE or name.startswith("transformer.resblocks.")):
                text[name] = value
        missing = [k for k in _OPENAI_TEXT_SINGLE if k not in text]
        if missing:
            raise WeightsError(f"the text tower lacks {missing}")
        return text
    except KeyError as error:
        raise WeightsError(f"the text tower lacks {error}") from error


def hf_text_options(config_path: Path) -> dict:
    """TextConfig fields that a Hugging Face ``config.json`` sets: activation, heads, LayerNorm eps.

    A CLIPModel config keeps them under ``text_config``; keys it lacks are left out. Raises
    WeightsError naming the file when it is unreadable, names an unsupported activation, or gives
    heads or eps that are not positive numbers.
    """
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise WeightsError(f"cannot read {config_path}: {error}") from error
    if isinstance(config, dict) and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    if not isinstance(config, dict):
        raise WeightsError(f"{config_path} is not a JSON object")
    options = {}
    if "hidden_act" in config:
        if config["hidden_act"] not in ACTIVATIONS:
            raise WeightsError(
                f"{config_path}: hidden_act {config['hidden_act']!r} is not supported; "
                f"supported: {', '.join(sorted(ACTIVATIONS))}"
            )
        options["activation"] = config["hidden_act"]
    if "num_attention_heads" in config:
        heads = config["num_attention_heads"]
        if type(heads) is not int or heads < 1:
            raise WeightsError(f"{config_path}: num_attention_heads must be a positive integer, got {heads!r}")
        options["heads"] = heads
    if "layer_norm_eps" in config:
        eps = config["layer_norm_eps"]
        if type(eps) not in (int, float) or not eps > 0:
            raise WeightsError(f"{config_path}: layer_norm_eps must be a positive number, got {eps!r}")
        options["layer_norm_eps"] = float(eps)
    return options


def load_text_encoder(
    path: str | Path | None = None,
    *,
    download: bool = False,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    normalize: bool = False,
    activation: str | None = None,
) -> CLIPTextEncoder:
    """A frozen CLIP text tower (eval mode, no grad) from `path`, in `dtype` on `device`.

    With no `path`, uses ``ViT-B-32.pt`` in `cache_dir` (default ``~/.cache/mulmodseg``), downloading
    it first when `download`. `activation` (a key of ACTIVATIONS) overrides what the weights' files
    say, or OpenAI's quick_gelu when they say nothing: open_clip models trained with ``nn.GELU`` (e.g.
    LAION's ViT-B-32) need ``"gelu"``. Raises ValueError for an unknown `activation`, WeightsError
    (unreadable file, no text tower) or WeightsUnavailableError (nothing to load, download failed),
    each saying what to do.
    """
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    if path is None:
        cached = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / OPENAI_VIT_B_32_URL.rsplit("/", 1)[1]
        if download:
            path = download_weights(cache_dir=cache_dir)
        elif cached.is_file():
            path = cached
        else:
            raise WeightsUnavailableError(f"no CLIP weights given and none in {cached}: {_HOW_TO_FIX}")
    path = Path(path).expanduser()
    weights = read_weights(path)
    # A state dict alone does not say how the tower computes; a Hugging Face folder's config.json does.
    hf_config = (path if path.is_dir() else path.parent) / "config.json"
    is_hf = _common_prefix(weights, _HF_TOKEN_KEY) is not None
    options = hf_text_options(hf_config) if is_hf and hf_config.is_file() else {}
    if activation is not None:
        options["activation"] = activation
    try:
        text = text_state_dict(weights)
        config = replace(TextConfig.from_state_dict(text), **options)
        encoder = CLIPTextEncoder(config, normalize=normalize, name=f"clip:{path.name}")
        encoder.load_state_dict(text)
    except WeightsError as error:
        raise WeightsError(f"{path}: {error}") from error
    except (RuntimeError, KeyError, ValueError) as error:
        raise WeightsError(f"{path}: the weights do not fit a CLIP text tower: {error}") from error
    return encoder.requires_grad_(False).eval().to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# Download


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_weights(
    url: str = OPENAI_VIT_B_32_URL, cache_dir: str | Path | None = None, timeout: float = 15.0
) -> Path:
    """Path of the file at `url` in `cache_dir` (default ``~/.cache/mulmodseg``), downloaded if needed.

    The expected SHA-256 is the second-to-last segment of the URL (OpenAI's naming). The file is
    written to a temporary name and renamed only once its hash matches, so an interrupted or wrong
    download leaves nothing behind. Network failures raise WeightsUnavailableError within `timeout`
    seconds per blocking operation.
    """
    expected = url.rstrip("/").split("/")[-2].lower()
    cache = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    target = cache / url.rsplit("/", 1)[1]
    if target.is_file() and _sha256(target) == expected:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # A unique name opened exclusively, not mkstemp, whose 0o600 would keep the shared cache from others (the text
    # package's own, not mulmodseg.files.atomic_write: it stays copyable alone, and checks the hash first).
    tmp_name = cache / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part"
    try:
        digest = hashlib.sha256()
        with open(tmp_name, "xb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        digest.update(chunk)
                        out.write(chunk)
            except (OSError, http.client.HTTPException) as error:
                raise WeightsUnavailableError(f"could not download {url} ({error}); {_HOW_TO_FIX}") from error
        if digest.hexdigest() != expected:
            raise WeightsUnavailableError(
                f"the file downloaded from {url} has SHA-256 {digest.hexdigest()}, expected {expected}; "
                f"it was discarded. {_HOW_TO_FIX[0].upper()}{_HOW_TO_FIX[1:]}"
            )
        os.replace(tmp_name, target)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return target
