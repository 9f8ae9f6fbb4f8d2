"""Backbone (timm ViT by name), DINO head, and the network run as student and as EMA teacher.

A trained backbone is read back by `dirl.encoders.load_backbone` (used by `dirl extract` and
`dirl attention`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dirl.errors import DirlError
from dirl.ssl.losses import pool_classes


def create_backbone(arch: str, img_size: int, drop_path: float = 0.0) -> nn.Module:
    """A timm ViT without classifier, accepting any input size (`dynamic_img_size`)."""
    import timm

    try:
        return timm.create_model(
            arch, pretrained=False, num_classes=0, img_size=img_size, dynamic_img_size=True, drop_path_rate=drop_path
        )
    except (RuntimeError, TypeError) as e:  # unknown name, or a model without these options
        raise DirlError(
            f"cannot build backbone {arch!r} with timm ({e}); use a ViT name such as "
            "vit_small_patch16_224 or vit_tiny_patch16_224"
        ) from e


def patch_size(backbone: nn.Module) -> int:
    p = backbone.patch_embed.patch_size
    p = p if isinstance(p, int) else p[0]
    return int(p)


def embed(tokens: torch.Tensor, num_prefix: int, mode: str) -> torch.Tensor:
    """Image embedding from forward_features tokens (B, prefix + N, D): [CLS] or mean of patch tokens."""
    if mode == "cls":
        if num_prefix == 0:
            raise DirlError("embed: cls needs a backbone with a class token; use embed: mean")
        return tokens[:, 0]
    return tokens[:, num_prefix:].mean(1)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation and the gain fixed to 1 (DINO's
    `norm_last_layer=True`): each output unit's weight vector is normalised to unit length."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    """3-layer MLP (GELU; BatchNorm before each GELU with `use_bn`, DINO's use_bn_in_head) ->
    bottleneck -> L2 normalise -> weight-normed linear to `out_dim`."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                if use_bn:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6 if x.dtype == torch.float32 else 1e-4)
        return self.last_layer(x)


class SSLNet(nn.Module):
    """Backbone + DINO head (+ dense head for DiRL). The same class is the student and the teacher.

    forward(global_views (G, B, 3, S, S), local_views (L, B, 3, s, s) or None, occupancy (G, B, N, C)
    or None) -> dict with
      out   (G + L, B, K)      DINO head logits of every view
      dense (G, B, C, Kd)      dense head logits of the class representations of the global views
      mass  (G, B, C)          class areas in tokens (after the overlap mask, if any)
    """

    def __init__(
        self,
        arch: str,
        img_size: int,
        embed_mode: str,
        out_dim: int,
        dense_out_dim: int | None,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        drop_path: float = 0.0,
        head_bn: bool = False,
    ):
        super().__init__()
        self.backbone = create_backbone(arch, img_size, drop_path)
        self.embed_mode = embed_mode
        self.num_prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
        self.embed_dim = int(self.backbone.embed_dim)
        self.patch = patch_size(self.backbone)
        self.head = DINOHead(self.embed_dim, out_dim, hidden_dim, bottleneck_dim, use_bn=head_bn)
        self.dense_head = (
            DINOHead(self.embed_dim, dense_out_dim, hidden_dim, bottleneck_dim, use_bn=head_bn)
            if dense_out_dim
            else None
        )
        self._compiled = None

    def compile_backbone(self) -> None:
        """torch.compile the backbone's forward_features (state dict keys unchanged)."""
        self._compiled = torch.compile(self.backbone.forward_features)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return (self._compiled or self.backbone.forward_features)(x)

    def forward(
        self,
        global_views: torch.Tensor,
        local_views: torch.Tensor | None = None,
        occupancy: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`valid` (B, C) bool: the (image, class) pairs the dense loss uses; the dense head runs on
        those only (its BatchNorm, if any, sees no absent classes), other entries of `dense` are 0."""
        g, b = global_views.shape[:2]
        tokens = self._features(global_views.flatten(0, 1))  # (G*B, T, D)
        embs = [embed(tokens, self.num_prefix, self.embed_mode)]
        if local_views is not None and local_views.numel():
            lt = self._features(local_views.flatten(0, 1))
            embs.append(embed(lt, self.num_prefix, self.embed_mode))
        out = self.head(torch.cat(embs)).unflatten(0, (-1, b))  # (V, B, K)
        result = {"out": out}
        if occupancy is not None and self.dense_head is not None:
            patches = tokens[:, self.num_prefix :]  # (G*B, N, D)
            if patches.shape[1] != occupancy.shape[2]:
                raise DirlError(
                    f"prior occupancy has {occupancy.shape[2]} tokens but the backbone "
                    f"produced {patches.shape[1]}: crop size and patch size disagree"
                )
            z, mass = pool_classes(patches, occupancy.flatten(0, 1))  # (G*B, C, D), (G*B, C)
            z = z.unflatten(0, (g, b))  # (G, B, C, D)
            # BatchNorm needs two entries in training: with fewer valid pairs, run on all (masked later)
            pick = valid if valid is not None and int(valid.sum()) >= 2 else None
            if pick is None:
                dense = self.dense_head(z.flatten(0, 2)).unflatten(0, z.shape[:3])
            else:
                sel = self.dense_head(z[:, pick].flatten(0, 1)).unflatten(0, (g, -1))  # (G, Nv, Kd)
                dense = sel.new_zeros(*z.shape[:3], sel.shape[-1])
                dense[:, pick] = sel
            result["dense"] = dense
            result["mass"] = mass.unflatten(0, (g, b))
        return result
