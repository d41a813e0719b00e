"""CLIP's text tower (ViT-B/32 by default) and loaders for its released weights.

`CLIPTextEncoder` uses OpenAI's parameter names (``token_embedding``, ``positional_embedding``,
``transformer.resblocks.N.*``, ``ln_final``, ``text_projection``), so an OpenAI or open_clip state dict
loads into it once the image tower is dropped. `load_text_encoder` reads, from a local path:

- OpenAI's released ``ViT-B-32.pt`` (a TorchScript archive; only its tensors are read, nothing is run),
- plain state dicts in the OpenAI / open_clip layout (``.pt``, ``.bin``; possibly nested under
  ``"state_dict"`` and/or prefixed, e.g. ``module.``),
- the Hugging Face layout (``openai/clip-vit-base-patch32``: a directory, ``pytorch_model.bin`` or
  ``model.safetensors``; a full ``CLIPModel`` or a ``CLIPTextModelWithProjection``),

and can download ``ViT-B-32.pt`` from OpenAI, checked against the SHA-256 in its address.
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
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

OPENAI_VIT_B_32_URL = (
    "https://openaipublic.azureedge.net/clip/models/"
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt"
)
DEFAULT_CACHE_DIR = Path("~/.cache/mulmodseg")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HOW_TO_FIX = "pass --clip_weights PATH (OpenAI ViT-B-32.pt, an open_clip or a Hugging Face CLIP checkpoint)"


class CheckpointError(ValueError):
    """A weight file that cannot be read or holds no usable CLIP text tower."""


class WeightsUnavailableError(RuntimeError):
    """No CLIP weights could be found or downloaded."""


@dataclass(frozen=True)
class TextConfig:
    """Shape of a CLIP text tower; the defaults are ViT-B/32's.

    activation is a key of ACTIVATIONS (Hugging Face's ``hidden_act`` names); OpenAI's CLIP uses quick_gelu.
    """

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    embed_dim: int = 512
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> TextConfig:
        """Read the shape off an OpenAI-layout text state dict (heads = width // 64, as CLIP does).

        A state dict does not record the activation, heads or LayerNorm eps: these stay OpenAI's
        unless a Hugging Face config.json says otherwise (see `load_text_encoder`).
        """
        width = state_dict["ln_final.weight"].shape[0]
        layers = {k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")}
        return cls(
            vocab_size=state_dict["token_embedding.weight"].shape[0],
            context_length=state_dict["positional_embedding"].shape[0],
            width=width,
            layers=len(layers),
            heads=max(width // 64, 1),
            embed_dim=state_dict["text_projection"].shape[1],
        )


class LayerNorm(nn.LayerNorm):
    """LayerNorm that computes in fp32 and casts back, so fp16/bf16 towers keep fp32 statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# Hugging Face hidden_act names -> modules; gelu_new is the tanh approximation under another name.
ACTIVATIONS = {
    "quick_gelu": QuickGELU,
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
}


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with packed q/k/v projections (nn.MultiheadAttention's names)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, L, W) -> (N, L, W); token i attends to tokens 0..i."""
        n, length, width = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class MLP(nn.Module):
    """width -> 4 width -> width with the activation named `activation` (a key of ACTIVATIONS)."""

    def __init__(self, width: int, activation: str = "quick_gelu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not supported; use one of {sorted(ACTIVATIONS)}")
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = ACTIVATIONS[activation]()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, activation: str = "quick_gelu", eps: float = 1e-5) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = MLP(width, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The block stack; a module of its own only so that keys read ``transformer.resblocks.N``."""

    def __init__(self, width: int, layers: int, heads: int, activation: str = "quick_gelu", eps: float = 1e-5) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads, activation, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class CLIPTextEncoder(nn.Module):
    """CLIP text tower: token ids `(N, L)` (L <= context_length) -> embeddings `(N, embed_dim)`.

    The embedding is the final-LayerNorm state at each row's largest id (the end-of-text token, 49407)
    times `text_projection`. It is not normalised, as in CLIP's ``encode_text``, unless `normalize`.
    """

    def __init__(self, config: TextConfig = TextConfig(), normalize: bool = False, name: str = "clip-text") -> None:
        super().__init__()
        self.config = config
        self.normalize = normalize
        self.name = name
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = Transformer(
            config.width, config.layers, config.heads, config.activation, config.layer_norm_eps
        )
        self.ln_final = LayerNorm(config.width, eps=config.layer_norm_eps)
        self.text_projection = nn.Parameter(torch.empty(config.width, config.embed_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """CLIP's initialisation (only matters for tests: the tower is always loaded pretrained)."""
        width, layers = self.config.width, self.config.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (N, L) int token ids, SOT ... EOT then padding -> (N, embed_dim) in the module's dtype."""
        length = ids.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"{length} tokens per text, more than context_length={self.config.context_length}")
        x = self.token_embedding(ids) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x))
        pooled = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        out = pooled @ self.text_projection
        return F.normalize(out, dim=-1) if self.normalize else out


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

    Raises CheckpointError naming the file when it cannot be read (truncated, wrong format).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / name for name in HF_WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise CheckpointError(f"{path} is a directory without {' or '.join(HF_WEIGHT_FILES)}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    is_zip = head[:4] == b"PK\x03\x04"
    is_safetensors = path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")
    if not (is_zip or is_safetensors or head[:1] == b"\x80"):  # \x80 opens a (legacy torch.save) pickle
        raise CheckpointError(
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
        raise CheckpointError(
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

    Raises CheckpointError when no text tower is found or a key is missing.
    """
    hf_prefix = _common_prefix(state_dict, _HF_TOKEN_KEY)
    try:
        if hf_prefix is not None:
            return _from_hf(state_dict, hf_prefix)
        prefix = _common_prefix(state_dict, "token_embedding.weight")
        if prefix is None:
            raise CheckpointError(
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
            raise CheckpointError(f"the text tower lacks {missing}")
        return text
    except KeyError as error:
        raise CheckpointError(f"the text tower lacks {error}") from error


def hf_text_options(config_path: Path) -> dict:
    """TextConfig fields that a Hugging Face ``config.json`` sets: activation, heads, LayerNorm eps.

    A CLIPModel config keeps them under ``text_config``; keys it lacks are left out. Raises
    CheckpointError naming the file when it is unreadable, names an unsupported activation, or gives
    heads or eps that are not positive numbers.
    """
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {config_path}: {error}") from error
    if isinstance(config, dict) and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} is not a JSON object")
    options = {}
    if "hidden_act" in config:
        if config["hidden_act"] not in ACTIVATIONS:
            raise CheckpointError(
                f"{config_path}: hidden_act {config['hidden_act']!r} is not supported; "
                f"supported: {', '.join(sorted(ACTIVATIONS))}"
            )
        options["activation"] = config["hidden_act"]
    if "num_attention_heads" in config:
        heads = config["num_attention_heads"]
        if type(heads) is not int or heads < 1:
            raise CheckpointError(f"{config_path}: num_attention_heads must be a positive integer, got {heads!r}")
        options["heads"] = heads
    if "layer_norm_eps" in config:
        eps = config["layer_norm_eps"]
        if type(eps) not in (int, float) or not eps > 0:
            raise CheckpointError(f"{config_path}: layer_norm_eps must be a positive number, got {eps!r}")
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
    LAION's ViT-B-32) need ``"gelu"``. Raises ValueError for an unknown `activation`, CheckpointError
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
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from error
    except (RuntimeError, KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: the weights do not fit a CLIP text tower: {error}") from error
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
    # A unique name opened exclusively, not mkstemp, whose 0o600 would keep the shared cache from others.
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
