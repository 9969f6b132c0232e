"""nn.Modules built on embedops' ops; each family keeps its modules in one block below."""

from __future__ import annotations

import torch
from torch import nn

# ---- attention ---------------------------------------------------------------------------------

from .attention import cross_attention as _cross_attention  # noqa: E402


class CrossAttention(nn.Module):
    """Multi-head cross attention (queries from x, keys/values from a context of another modality)
    with GQA/MQA, running the fused :func:`embedops.cross_attention` op.

    Args:
        dim_q: feature size of the queries' input x.
        dim_kv: feature size of the context.
        num_heads: query heads Hq.
        num_kv_heads: key/value heads Hkv (default Hq); must divide num_heads.
        head_dim: per-head size D (default dim_q // num_heads).
        out_dim: output feature size (default dim_q).
        bias: bias in the four projections.
        scale: score multiplier (default 1/sqrt(head_dim)).
        device, dtype: of the parameters.

    ``forward(x, context, *, kv_lengths=None, key_padding_mask=None, q_lengths=None)``:
        x ``(B, Lq, dim_q)``; context ``(B, Lk, dim_kv)``; either ``kv_lengths`` ``(B,)`` int (keys
        ``j >= kv_lengths[b]`` ignored) or ``key_padding_mask`` ``(B, Lk)`` bool with True marking
        padding, as in ``nn.MultiheadAttention`` (the padding must be a suffix of each row);
        ``q_lengths`` ``(B,)``: rows ``i >= q_lengths[b]`` output only the output projection's bias.
        Returns ``(B, Lq, out_dim)``.
    """

    def __init__(self, dim_q: int, dim_kv: int, num_heads: int, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, out_dim: int | None = None, bias: bool = True,
                 scale: float | None = None, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, val in (("dim_q", dim_q), ("dim_kv", dim_kv), ("num_heads", num_heads),
                          ("num_kv_heads", num_kv_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"CrossAttention: {name} must be a positive int, got {val!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"CrossAttention: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if head_dim is None:
            if dim_q % num_heads:
                raise ValueError(f"CrossAttention: dim_q ({dim_q}) must be divisible by num_heads ({num_heads}) "
                                 "unless head_dim is given")
            head_dim = dim_q // num_heads
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        f = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(dim_q, num_heads * head_dim, bias=bias, **f)
        self.k_proj = nn.Linear(dim_kv, num_kv_heads * head_dim, bias=bias, **f)
        self.v_proj = nn.Linear(dim_kv, num_kv_heads * head_dim, bias=bias, **f)
        self.out_proj = nn.Linear(num_heads * head_dim, dim_q if out_dim is None else out_dim, bias=bias, **f)

    def forward(self, x: torch.Tensor, context: torch.Tensor, *, kv_lengths=None, key_padding_mask=None,
                q_lengths=None) -> torch.Tensor:
        if x.dim() != 3 or context.dim() != 3:
            raise ValueError(f"CrossAttention: x and context must be (B, L, dim), got {tuple(x.shape)} and "
                             f"{tuple(context.shape)}")
        if key_padding_mask is not None:
            if kv_lengths is not None:
                raise ValueError("CrossAttention: give kv_lengths or key_padding_mask, not both")
            kv_lengths = _lengths_from_padding_mask(key_padding_mask, context.shape[:2])
        B, Lq, _ = x.shape
        Lk = context.shape[1]
        q = self.q_proj(x).view(B, Lq, self.num_heads, self.head_dim)
        k = self.k_proj(context).view(B, Lk, self.num_kv_heads, self.head_dim)
        v = self.v_proj(context).view(B, Lk, self.num_kv_heads, self.head_dim)
        o = _cross_attention(q, k, v, kv_lengths=kv_lengths, q_lengths=q_lengths, scale=self.scale)
        return self.out_proj(o.reshape(B, Lq, self.num_heads * self.head_dim))


def _lengths_from_padding_mask(mask, shape) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError("CrossAttention: key_padding_mask must be a bool tensor (True = padding)")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"CrossAttention: key_padding_mask must have shape (B, Lk) = {tuple(shape)}, "
                         f"got {tuple(mask.shape)}")
    lengths = (~mask).sum(1)
    if not torch.compiler.is_compiling():
        suffix = torch.arange(mask.shape[1], device=mask.device)[None, :] >= lengths[:, None]
        if not torch.equal(suffix, mask):
            raise ValueError("CrossAttention: key_padding_mask must mark a suffix of each row as padding "
                             "(valid keys first); use kv_lengths-compatible padding")
    return lengths

