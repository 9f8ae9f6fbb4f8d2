"""MIL models: one registry, one calling convention.

`model(x)` takes one bag (N, D) of any size N >= 1 and returns (logits (K,), attention (N,) summing to
1 or None). Register another model with `@register("name")`; its constructor takes
(in_dim, n_classes, **options).

* `abmil`   — gated attention MIL (Ilse, Tomczak & Welling, ICML 2018), as in CLAM: fc -> ReLU ->
               dropout, attention a = w^T (tanh(V h) * sigmoid(U h)), softmax over tiles, M = sum a_i h_i.
* `transmil` — TransMIL (Shao et al., NeurIPS 2021): fc -> [CLS] + tokens (squared by repeating the first
               tokens) -> attention layer -> PPEG (depth-wise 7/5/3 convolutions on the token grid) ->
               attention layer -> LayerNorm -> [CLS] -> linear. The attention map returned is the last
               layer's [CLS] row over the tiles, averaged over heads. `attention="exact"` (default) is
               softmax attention through `scaled_dot_product_attention` (flash / memory-efficient
               kernels: memory linear in the bag size on GPU); `attention="nystrom"` is the paper's
               Nyström approximation (Xiong et al., AAAI 2021: segment-mean landmarks, iterative
               Moore-Penrose inverse, depth-wise residual convolution on the values), cheaper on CPU for
               bags of tens of thousands of tiles. Exact is the default because on small cohorts the
               Nyström layers trained markedly worse here (near-uniform early attention makes the
               landmark matrix ill-conditioned; see tests/test_mil_models.py).
* `meanpool` — mean of the tile features -> linear: the baseline every MIL model should beat. Its
               attention is uniform.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dirl.errors import ConfigError

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(cls):
        MODELS[name] = cls
        return cls

    return deco


def build(name: str, in_dim: int, n_classes: int, **options) -> nn.Module:
    if name not in MODELS:
        raise ConfigError(f"unknown MIL model {name!r}: choose one of {sorted(MODELS)}")
    return MODELS[name](in_dim, n_classes, **options)


# --------------------------------------------------------------------------------------------------
@register("meanpool")
class MeanPool(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, dropout: float = 0.0, **_):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, n_classes)

    def forward(self, x):
        n = x.shape[0]
        return self.fc(self.drop(x.mean(0))), x.new_full((n,), 1.0 / n)


@register("abmil")
class ABMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, hidden: int = 256, attn_dim: int = 128, dropout: float = 0.25, **_):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attn_u = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.attn_w = nn.Linear(attn_dim, 1)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x):
        h = self.fc(x)  # (N, H)
        a = self.attn_w(self.attn_v(h) * self.attn_u(h)).squeeze(-1)  # (N,)
        a = torch.softmax(a.float(), dim=0)
        m = (a.to(h.dtype).unsqueeze(-1) * h).sum(0)  # (H,)
        return self.classifier(m), a


# --------------------------------------------------------------------------------------------------
# TransMIL
def _pinv_iter(x, iters: int = 6):
    """Moore-Penrose pseudo-inverse by the iterative scheme of Nyströmformer (Razavi et al. init)."""
    abs_x = x.abs()
    col = abs_x.sum(dim=-1)
    row = abs_x.sum(dim=-2)
    z = x.transpose(-1, -2) / (col.amax(dim=-1) * row.amax(dim=-1))[..., None, None]
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int | None = None,
        landmarks: int | None = None,
        pinv_iters: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
    ):
        super().__init__()
        dim_head = dim_head or dim // heads
        self.heads, self.dim_head = heads, dim_head
        self.landmarks = landmarks or dim // 2
        self.pinv_iters = pinv_iters
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))
        pad = residual_kernel // 2
        self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(pad, 0), groups=heads, bias=False)

    def forward(self, x, return_cls_attn: bool = False):
        b, n, _ = x.shape
        m = min(self.landmarks, n)
        rem = n % m
        if rem:  # pad at the front so the token count divides into m segments
            x = F.pad(x, (0, 0, m - rem, 0))
        pad = (m - rem) if rem else 0
        npad = x.shape[1]
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, npad, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        q = q * self.scale
        seg = npad // m
        q_l = q.reshape(b, self.heads, m, seg, self.dim_head).mean(-2)
        k_l = k.reshape(b, self.heads, m, seg, self.dim_head).mean(-2)
        attn1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)  # (b, h, n, m)
        attn2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)  # (b, h, m, m)
        attn3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)  # (b, h, m, n)
        attn2_inv = _pinv_iter(attn2.float(), self.pinv_iters).to(attn2.dtype)
        left = attn1 @ attn2_inv
        out = left @ (attn3 @ v) + self.res_conv(v)
        out = out.transpose(1, 2).reshape(b, npad, self.heads * self.dim_head)
        out = self.to_out(out)[:, pad:]
        if not return_cls_attn:
            return out, None
        cls_row = (left[:, :, pad : pad + 1] @ attn3)[:, :, 0, pad:]  # the [CLS] row (first real token)
        return out, cls_row.mean(1)  # (b, n)


class ExactAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.heads, self.dim_head = heads, dim // heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.attn_drop = dropout

    def forward(self, x, return_cls_attn: bool = False):
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, self.dim_head).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = self.to_out(out.transpose(1, 2).reshape(b, n, d))
        if not return_cls_attn:
            return out, None
        row = torch.softmax((q[:, :, :1] @ k.transpose(-1, -2)).float() * self.dim_head**-0.5, dim=-1)
        return out, row[:, :, 0].mean(1)  # (b, n)


class _TransLayer(nn.Module):
    def __init__(self, dim: int, dropout: float, attention: str = "exact"):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        if attention == "exact":
            self.attn = ExactAttention(dim, heads=8, dropout=dropout)
        elif attention == "nystrom":
            self.attn = NystromAttention(dim, heads=8, dim_head=dim // 8, landmarks=dim // 2, dropout=dropout)
        else:
            raise ConfigError(f"TransMIL attention {attention!r}: choose 'exact' or 'nystrom'")

    def forward(self, x, return_cls_attn: bool = False):
        out, a = self.attn(self.norm(x), return_cls_attn)
        return x + out, a


class _PPEG(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, side: int):
        b, _, c = x.shape
        cls, feat = x[:, :1], x[:, 1:]
        g = feat.transpose(1, 2).reshape(b, c, side, side)
        g = g + self.proj(g) + self.proj1(g) + self.proj2(g)
        return torch.cat([cls, g.flatten(2).transpose(1, 2)], dim=1)


@register("transmil")
class TransMIL(nn.Module):
    def __init__(
        self, in_dim: int, n_classes: int, hidden: int = 256, dropout: float = 0.1, attention: str = "exact", **_
    ):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.layer1 = _TransLayer(hidden, dropout, attention)
        self.ppeg = _PPEG(hidden)
        self.layer2 = _TransLayer(hidden, dropout, attention)
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x):
        n = x.shape[0]
        h = self.fc(x).unsqueeze(0)  # (1, N, H)
        side = int(math.ceil(math.sqrt(n)))
        extra = side * side - n
        if extra:  # square the token grid by repeating the first tokens (as the paper's code does)
            reps = h.repeat(1, (extra + n - 1) // n, 1)[:, :extra]
            h = torch.cat([h, reps], dim=1)
        h = torch.cat([self.cls_token.to(h.dtype), h], dim=1)
        h, _ = self.layer1(h)
        h = self.ppeg(h, side)
        h, a = self.layer2(h, return_cls_attn=True)
        logits = self.classifier(self.norm(h[:, 0]))[0]
        a = a[0, 1 : 1 + n].float().clamp_min(0)  # [CLS] attention over the real tiles
        a = a / a.sum().clamp_min(1e-12)
        return logits, a


# --------------------------------------------------------------------------------------------------
class Standardized(nn.Module):
    """Per-dimension feature standardisation (statistics of the training fold's tiles) before a model.

    Kept as buffers so a saved checkpoint carries them."""

    def __init__(self, core: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.core = core
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("inv_std", 1.0 / std.float().clamp_min(1e-6))

    def forward(self, x):
        return self.core((x - self.mean) * self.inv_std)
