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


from .attention import co_attention as _co_attention  # noqa: E402
from .attention import mixture_attention as _mixture_attention  # noqa: E402


def _check_pos_int(cls: str, name: str, val) -> int:
    if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
        raise ValueError(f"{cls}: {name} must be a positive int, got {val!r}")
    return val


def _check_seq(cls: str, name: str, t, dim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 3 or (dim is not None and t.shape[-1] != dim):
        want = f"(B, L, {dim})" if dim is not None else "(B, L, dim)"
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{cls}: {name} must be a {want} tensor, got {got}")
    return t


class CoAttention(nn.Module):
    """Bidirectional co-attention between two modalities x and y with ONE shared affinity per head
    (:func:`embedops.co_attention`): x attends to y and y attends to x through the same
    ``S = scale * q_x k_y^T``, so the score GEMM is computed once for both directions.

    Args:
        dim_x, dim_y: feature sizes of the two inputs.
        num_heads: heads H.
        head_dim: per-head size D (default dim_x // num_heads).
        bias: bias in the projections.
        scale: affinity multiplier (default 1/sqrt(head_dim)).
        device, dtype: of the parameters.

    ``forward(x, y, *, x_lengths=None, y_lengths=None)``: x ``(B, Lx, dim_x)``, y ``(B, Ly, dim_y)``,
    optional lengths ``(B,)`` int (padding is a suffix). Returns ``(x_out, y_out)``:
    ``x_out (B, Lx, dim_x)`` (x's tokens updated from y), ``y_out (B, Ly, dim_y)``. Padded positions
    get only the output projection's bias.
    """

    def __init__(self, dim_x: int, dim_y: int, num_heads: int, *, head_dim: int | None = None, bias: bool = True,
                 scale: float | None = None, device=None, dtype=None):
        super().__init__()
        for name, val in (("dim_x", dim_x), ("dim_y", dim_y), ("num_heads", num_heads)):
            _check_pos_int("CoAttention", name, val)
        if head_dim is None:
            if dim_x % num_heads:
                raise ValueError(f"CoAttention: dim_x ({dim_x}) must be divisible by num_heads ({num_heads}) "
                                 "unless head_dim is given")
            head_dim = dim_x // num_heads
        _check_pos_int("CoAttention", "head_dim", head_dim)
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        f = dict(device=device, dtype=dtype)
        inner = num_heads * head_dim
        self.qx_proj = nn.Linear(dim_x, inner, bias=bias, **f)  # x's queries ...
        self.ky_proj = nn.Linear(dim_y, inner, bias=bias, **f)  # ... against y's keys: the shared affinity
        self.vx_proj = nn.Linear(dim_x, inner, bias=bias, **f)
        self.vy_proj = nn.Linear(dim_y, inner, bias=bias, **f)
        self.out_x = nn.Linear(inner, dim_x, bias=bias, **f)
        self.out_y = nn.Linear(inner, dim_y, bias=bias, **f)

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, x_lengths=None, y_lengths=None):
        x = _check_seq("CoAttention", "x", x, self.qx_proj.in_features)
        y = _check_seq("CoAttention", "y", y, self.ky_proj.in_features)
        B, Lx, _ = x.shape
        Ly = y.shape[1]
        H, D = self.num_heads, self.head_dim
        ox, oy = _co_attention(self.qx_proj(x).view(B, Lx, H, D), self.ky_proj(y).view(B, Ly, H, D),
                               self.vx_proj(x).view(B, Lx, H, D), self.vy_proj(y).view(B, Ly, H, D),
                               x_lengths=x_lengths, y_lengths=y_lengths, scale=self.scale)
        return self.out_x(ox.reshape(B, Lx, H * D)), self.out_y(oy.reshape(B, Ly, H * D))


class ModalityMixtureAttention(nn.Module):
    """Attention from queries x to a context made of M modalities concatenated along the sequence
    (:func:`embedops.mixture_attention`): each modality gets its own softmax and the per-modality
    results are mixed per query with weights.

    The weights are, in order of precedence: the ``weights`` argument of forward; the text-guided
    head when ``text_dim`` is given (SHIFNet's SACF: ``weights = softmax_m(gamma * cos(phi_m(x_i), t))``
    with one linear map ``phi_m: dim_q -> text_dim`` per modality, a learnable ``gamma`` and a text
    embedding ``t``); else uniform ``1 / M``.

    Args:
        dim_q: feature size of x.
        dim_kv: feature size of the context.
        num_heads: query heads Hq; ``num_kv_heads`` (default Hq) must divide it.
        num_modalities: M.
        head_dim: per-head size D (default dim_q // num_heads).
        text_dim: enables the text-guided weight head (size of the text embedding t).
        gamma: initial temperature of the text-guided head (learnable).
        bias, scale, device, dtype: as in :class:`CrossAttention`.

    ``forward(x, context, segment_lengths, *, weights=None, text=None)``: x ``(B, Lq, dim_q)``,
    context ``(B, Lk, dim_kv)``, segment_lengths ``(B, M)`` int (modality m is the m-th contiguous
    segment of the context, packed from 0; the rest is padding), weights ``(B, Lq, M)`` or
    ``(B, Lq, Hq, M)``, text ``(B, text_dim)`` or ``(B, Lq, text_dim)``. Returns ``(B, Lq, out_dim)``.
    """

    def __init__(self, dim_q: int, dim_kv: int, num_heads: int, num_modalities: int, *,
                 num_kv_heads: int | None = None, head_dim: int | None = None, text_dim: int | None = None,
                 gamma: float = 10.0, out_dim: int | None = None, bias: bool = True, scale: float | None = None,
                 device=None, dtype=None):
        super().__init__()
        cls = "ModalityMixtureAttention"
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, val in (("dim_q", dim_q), ("dim_kv", dim_kv), ("num_heads", num_heads),
                          ("num_modalities", num_modalities), ("num_kv_heads", num_kv_heads)):
            _check_pos_int(cls, name, val)
        if num_heads % num_kv_heads:
            raise ValueError(f"{cls}: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if dim_q % num_heads:
                raise ValueError(f"{cls}: dim_q ({dim_q}) must be divisible by num_heads ({num_heads}) "
                                 "unless head_dim is given")
            head_dim = dim_q // num_heads
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.num_modalities = num_modalities
        f = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(dim_q, num_heads * head_dim, bias=bias, **f)
        self.k_proj = nn.Linear(dim_kv, num_kv_heads * head_dim, bias=bias, **f)
        self.v_proj = nn.Linear(dim_kv, num_kv_heads * head_dim, bias=bias, **f)
        self.out_proj = nn.Linear(num_heads * head_dim, dim_q if out_dim is None else out_dim, bias=bias, **f)
        self.text_dim = text_dim
        if text_dim is not None:
            _check_pos_int(cls, "text_dim", text_dim)
            self.phi = nn.Linear(dim_q, num_modalities * text_dim, bias=bias, **f)  # phi_1..phi_M stacked
            self.gamma = nn.Parameter(torch.tensor(float(gamma), **f))

    def modality_weights(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """SACF's text-guided weights ``softmax_m(gamma * cos(phi_m(x_i), t))``, ``(B, Lq, M)``."""
        if self.text_dim is None:
            raise ValueError("ModalityMixtureAttention: the text-guided weight head needs text_dim at construction")
        B, Lq, _ = x.shape
        if not isinstance(text, torch.Tensor) or text.shape[-1] != self.text_dim or text.dim() not in (2, 3):
            got = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
            raise ValueError(f"ModalityMixtureAttention: text must be (B, {self.text_dim}) or (B, Lq, "
                             f"{self.text_dim}), got {got}")
        t = text[:, None, :] if text.dim() == 2 else text  # (B, 1 or Lq, T)
        feats = self.phi(x).view(B, Lq, self.num_modalities, self.text_dim)
        cos = torch.nn.functional.cosine_similarity(feats, t[:, :, None, :], dim=-1)  # (B, Lq, M)
        return torch.softmax(self.gamma * cos, dim=-1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, segment_lengths: torch.Tensor, *, weights=None,
                text=None) -> torch.Tensor:
        cls = "ModalityMixtureAttention"
        x = _check_seq(cls, "x", x, self.q_proj.in_features)
        context = _check_seq(cls, "context", context, self.k_proj.in_features)
        B, Lq, _ = x.shape
        Lk = context.shape[1]
        if weights is None:
            if text is not None:
                weights = self.modality_weights(x, text)
            else:
                weights = x.new_full((B, Lq, self.num_modalities), 1.0 / self.num_modalities)
        elif text is not None:
            raise ValueError(f"{cls}: give weights or text, not both")
        elif not isinstance(weights, torch.Tensor):
            raise TypeError(f"{cls}: weights must be a torch.Tensor, got {type(weights).__name__}")
        q = self.q_proj(x).view(B, Lq, self.num_heads, self.head_dim)
        k = self.k_proj(context).view(B, Lk, self.num_kv_heads, self.head_dim)
        v = self.v_proj(context).view(B, Lk, self.num_kv_heads, self.head_dim)
        o = _mixture_attention(q, k, v, segment_lengths, weights.to(q.dtype), scale=self.scale)
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

