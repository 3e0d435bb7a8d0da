"""The RuCLIP network: an OpenAI-CLIP-style ViT image tower and a causal text transformer.

Parameter names follow Sber's reference `ruclip/model.py`, so official state dicts load with strict=True.
Differences from the reference are speed only: attention runs through F.scaled_dot_product_attention, and
the text tower stops at the longest EOS position of the batch (a causal model never looks further).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import registry
from .errors import CheckpointError
from .tokenizer import BPETokenizer

PARTS = ("text", "image")


@dataclass
class CLIPConfig:
    """The fields of a RuCLIP `config.json` (unknown keys are ignored)."""

    embed_dim: int = 768  # size of the joint embedding
    image_resolution: int = 224  # input side in pixels
    vision_layers: int = 24
    vision_width: int = 1024  # vision heads = vision_width // 64
    vision_patch_size: int = 14
    context_length: int = 77  # text positions, BOS and EOS included
    vocab_size: int = 49408
    transformer_width: int = 768
    transformer_heads: int = 12
    transformer_layers: int = 12
    eos_id: int = 3
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _onednn_linear_available() -> bool:
    try:
        x, w = torch.ones(1, 2), torch.ones(3, 2)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        return bool(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "").sum() == 6)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


_ONEDNN = _onednn_linear_available()
PACKED_MAX_ROWS = 256  # text batches up to ~18 short queries; image batches (257 rows an image) stay on F.linear


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, but through oneDNN with a pre-packed weight for fp32 CPU inference on few rows.

    On a search query's few tokens this is 3-5x faster than the default BLAS call on some CPUs (AMD EPYC
    here) and equal to float32 rounding. The packed copy is cached on the weight and rebuilt if it changes;
    large inputs (an image batch: 257+ rows) keep the plain call and need no second copy of the weights.
    """
    rows = x.numel() // x.shape[-1]
    if not (_ONEDNN and rows <= PACKED_MAX_ROWS and x.dtype == torch.float32 and x.device.type == "cpu"):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() or torch.is_inference(weight):  # training, or no version counter to check
        return F.linear(x, weight, bias)
    cached = weight.__dict__.get("_onednn_packed")
    if cached is None or cached[0] != weight._version:
        cached = (weight._version, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows))
        weight.__dict__["_onednn_packed"] = cached
    return torch.ops.mkldnn._linear_pointwise(x, cached[1], bias, "none", [], "")


def project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a linear layer: the fast path above for a plain nn.Linear, the module itself otherwise (int8)."""
    if type(module) is nn.Linear:
        return linear(x, module.weight, module.bias)
    return module(x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, as in the reference (matters for fp16); its weights
    stay fp32 in a half-precision model (see `cast`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (CUDA's layer_norm refuses half-precision input with float32 weights, seen on an H200 with torch 2.11:
        # hence the casts, although the CPU's accepts it)
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (in_proj_*, out_proj)."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x) if hasattr(self, "qkv") else linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.split(C, dim=-1)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)
        return project(self.out_proj, y)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.attn = Attention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(d_model, d_model * 4)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(d_model * 4, d_model)),
                ]
            )
        )
        self.ln_2 = LayerNorm(d_model)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        h = self.mlp.gelu(project(self.mlp.c_fc, self.ln_2(x)))
        return x + project(self.mlp.c_proj, h)


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, causal: bool):
        super().__init__()
        self.width, self.layers, self.causal = width, layers, causal
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        for block in self.resblocks:
            x = block(x, self.causal)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, causal=False)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))
        for p in (self.class_embedding, self.positional_embedding, self.proj):  # CLIP's scale * randn
            nn.init.normal_(p, std=scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, D)
        x = self.conv1(x)  # (B, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid**2, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, grid**2 + 1, width)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0, :]) @ self.proj  # (B, D)


class CLIP(nn.Module):
    """RuCLIP with either tower optional: a search process can hold the text tower alone."""

    def __init__(self, config: CLIPConfig, parts: Iterable[str] = PARTS):
        super().__init__()
        parts = tuple(parts)
        unknown = set(parts) - set(PARTS)
        if unknown or not parts:
            raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {parts}")
        self.config, self.parts = config, parts
        c = config
        if "image" in parts:
            self.visual = VisionTransformer(
                input_resolution=c.image_resolution,
                patch_size=c.vision_patch_size,
                width=c.vision_width,
                layers=c.vision_layers,
                heads=c.vision_width // 64,
                output_dim=c.embed_dim,
            )
        if "text" in parts:
            self.transformer = Transformer(c.transformer_width, c.transformer_layers, c.transformer_heads, causal=True)
            self.token_embedding = nn.Embedding(c.vocab_size, c.transformer_width)
            self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.transformer_width))
            self.ln_final = LayerNorm(c.transformer_width)
            self.text_projection = nn.Parameter(torch.empty(c.transformer_width, c.embed_dim))
            self._init_text()
        self.logit_scale = nn.Parameter(torch.full([], math.log(1 / 0.07)))

    def _init_text(self) -> None:
        """CLIP's initialisation, so random-weight models (tests, benchmarks) behave like real ones."""
        w, n = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=w**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=(w**-0.5) * ((2 * n) ** -0.5))
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * w) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=(w**-0.5) * ((2 * n) ** -0.5))
        nn.init.normal_(self.text_projection, std=w**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, D) unnormalised image embeddings."""
        return self.visual(pixel_values.to(self.dtype))

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, context_length) token ids, one EOS per row -> (B, D) unnormalised text embeddings."""
        is_eos = input_ids == self.config.eos_id
        if not bool(is_eos.any(dim=1).all()):
            raise ValueError("every row of input_ids needs an EOS token (use model.tokenize)")
        eos_pos = is_eos.int().argmax(dim=1)  # (B,) first EOS per row
        T = int(eos_pos.max()) + 1  # causal: positions after the last EOS never influence it
        x = self.token_embedding(input_ids[:, :T]).to(self.dtype)  # (B, T, C)
        x = x + self.positional_embedding[:T].to(self.dtype)
        x = self.ln_final(self.transformer(x))  # (B, T, C)
        x = x[torch.arange(x.shape[0], device=x.device), eos_pos]  # (B, C)
        return x @ self.text_projection  # (B, D)

    def load_checkpoint_state(self, state_dict: dict[str, torch.Tensor], assign: bool = False) -> None:
        """Load an official (full) state dict strictly, keeping only the towers this model has.

        assign=True adopts the given tensors instead of copying them (for a model built on the meta device).
        """
        drop = []
        if "image" not in self.parts:
            drop.append("visual.")
        if "text" not in self.parts:
            drop += [
                "transformer.",
                "token_embedding.",
                "positional_embedding",
                "ln_final.",
                "text_projection",
            ]
        sd = {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in drop)}
        self.load_state_dict(sd, strict=True, assign=assign)


def cast(model: CLIP, device: torch.device | str, dtype: torch.dtype) -> CLIP:
    """Move the model to `device` with its weights in `dtype`, except LayerNorm's, which stay float32 as in the
    reference (OpenAI's convert_weights halves convolutions, linear layers and projections only): LayerNorm runs
    in float32, and layer_norm refuses a float32 input with half-precision weights. In half precision QuickGELU
    becomes SiLU (fold_quick_gelu); float32 keeps the reference's operations exactly."""
    model = model.to(device=device)
    if dtype != torch.float32:
        fold_quick_gelu(model)
        for module in model.modules():
            if not isinstance(module, LayerNorm):
                for p in module.parameters(recurse=False):
                    p.data = p.data.to(dtype)
    return model


def fold_quick_gelu(model: CLIP) -> CLIP:
    """Rewrite each MLP's QuickGELU as SiLU, which is one fused kernel instead of three passes: since
    x * sigmoid(1.702 x) = silu(1.702 x) / 1.702, c_fc's weights are scaled by 1.702 and c_proj's by 1 / 1.702.
    Exact in real arithmetic; done in the weights' precision (`cast` does it before halving them). In place."""
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, ResidualAttentionBlock) and isinstance(block.mlp.gelu, QuickGELU):
                block.mlp.c_fc.weight.mul_(1.702)
                block.mlp.c_fc.bias.mul_(1.702)
                block.mlp.c_proj.weight.div_(1.702)
                block.mlp.gelu = nn.SiLU()
    return model


def quantize_int8(model: CLIP) -> CLIP:
    """Dynamic int8 linear layers for CPU inference (optional; ~cosine 0.99+ to fp32). Changes the model in place."""
    import warnings

    for module in model.modules():
        if isinstance(module, Attention):  # give the fused q/k/v projection an nn.Linear to quantize
            module.qkv = nn.Linear(module.in_proj_weight.shape[1], module.in_proj_weight.shape[0])
            module.qkv.weight, module.qkv.bias = module.in_proj_weight, module.in_proj_bias
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks its quantized tensors deprecated; the API still works
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors without running any code from it (weights_only / safetensors)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}): download it again") from e
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} was refused: its pickle asks to run code or build objects other than tensors. "
            "Load only checkpoints you trust; re-save it as a plain state dict or as model.safetensors"
        ) from e
    except Exception as e:
        raise CheckpointError(
            f"{path} is corrupt or truncated ({type(e).__name__}): delete it and download again"
        ) from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors: it is not a RuCLIP checkpoint")
    return sd


def read_config(folder: str | os.PathLike) -> CLIPConfig:
    """Parse `config.json` of a RuCLIP folder."""
    path = Path(folder) / "config.json"
    try:
        return CLIPConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid RuCLIP config ({e}): download it again") from e


_INIT_FUNCTIONS = ("normal_", "uniform_", "xavier_uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_",
                   "constant_")  # fmt: skip


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Make torch.nn.init's functions no-ops while a model is built on the meta device.

    Initialising a meta tensor computes nothing, but it runs through torch._refs, whose first use imports
    torch._dynamo: measured 2.5 s of every process start (CLI search, serve) for values the checkpoint replaces.
    Hand-written because torch offers no switch for it (transformers patches these same functions).
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def from_pretrained(name_or_path: str | os.PathLike, parts: Iterable[str] = PARTS) -> tuple[CLIP, BPETokenizer, str]:
    """Load a released model by name (hub cache) or a local folder: (network in eval mode, tokenizer, name)."""
    folder = registry.resolve(name_or_path)
    config = read_config(folder)
    tokenizer = BPETokenizer.from_file(folder / "bpe.model")
    weights = registry._weights_file(folder)
    with torch.device("meta"), _skip_init():  # no init: the checkpoint's (memory-mapped) tensors become the parameters
        model = CLIP(config, parts)
    sd = load_state_dict(weights)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}  # checkpoints saved from DataParallel
    try:
        model.load_checkpoint_state(sd, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[:3]
        raise CheckpointError(
            f"{weights} does not match {folder / 'config.json'}: {' '.join(first)[:400]}; "
            "the two files come from different models"
        ) from e
    return model.eval(), tokenizer, registry.model_key(name_or_path)
