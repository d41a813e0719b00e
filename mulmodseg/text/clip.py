"""CLIP's text tower (ViT-B/32 by default): the role of ``model.py`` in OpenAI's CLIP.

`CLIPTextEncoder` uses OpenAI's parameter names (``token_embedding``, ``positional_embedding``,
``transformer.resblocks.N.*``, ``ln_final``, ``text_projection``), so an OpenAI or open_clip state dict
loads into it once the image tower is dropped. Reading, converting and downloading released weights is
`mulmodseg.text.weights` (the role of CLIP's ``clip.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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
        unless a Hugging Face config.json says otherwise (see `weights.load_text_encoder`).
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
