"""nn.Modules built on embedops' ops; each family keeps its modules in one block below."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ._ops import FusedEmbeddingBagUpdate
from ._utils import check_int

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


# ---- embedding ---------------------------------------------------------------------------------

_OPTIMIZERS = (None, "sgd", "rowwise_adagrad")


class _FeatureLayout:
    """The output layout of a module over ``features`` (name -> probes), ``dim`` and ``combine``
    (UnifiedEmbedding and its quantised / sharded forms)."""

    @property
    def num_probes(self) -> list[int]:
        return list(self.features.values())

    @property
    def out_dim(self) -> int:
        blocks = sum(self.features.values()) if self.combine == "concat" else len(self.features)
        return blocks * self.dim


class UnifiedEmbedding(_FeatureLayout, torch.nn.Module):
    """Unified Embedding (feature multiplexing): many categorical features in one hashed table.

    Args:
        num_rows: R, rows of the shared table (> 0).
        dim: D, embedding width (> 0).
        features: ordered mapping ``{name: num_probes}`` (P_f >= 1 lookups per id); the output
            has the features in this order.
        combine: ``"concat"`` (P_f*D columns per feature), ``"sum"`` or ``"mean"`` (D columns).
        mode: pooling over a bag: ``"sum"``, ``"mean"`` or ``"max"``.
        optimizer: ``None`` (default): a normal dense, deterministic gradient in ``weight.grad``
            for any torch optimizer. ``"sgd"`` or ``"rowwise_adagrad"``: the backward applies the
            update to the touched rows in place (FBGEMM-style fused optimizer) and ``weight.grad``
            stays None; no (R, D) gradient is ever made. Row-wise Adagrad keeps one accumulator
            per row in the buffer ``momentum`` (in ``state_dict``):
            ``momentum[r] += mean_d(g[r]^2); weight[r] -= lr * g[r] / (sqrt(momentum[r]) + eps)``;
            SGD: ``weight[r] -= lr * g[r]``. g[r] is the row's gradient summed over the batch.
        lr, eps: optimizer hyper-parameters (defaults 0.01, 1e-8).
        seed: hash seed.
        validate: see :func:`embedops.multiplexed_embedding_bag` (CUDA offsets checks).
        dtype, device: of the table (default float32, CPU). Initialised U(-1/sqrt(D), 1/sqrt(D)).

    Input of ``forward``: any of
        - a dict ``{name: (values, offsets)}`` with (N_f,) ids and (B + 1,) offsets per feature,
        - a dict ``{name: {"values": v, "lengths": l}}`` (or ``"offsets"``) per feature,
        - a flat ``(values, offsets)`` tuple in the op's feature-major layout ((F*B + 1,) offsets,
          features in the module's order), or ``{"values": v, "lengths": l}``.
        Every feature of the module must be present, with the same batch size B.
    ``per_sample_weights``: optional (N,) weights (mode "sum"), a flat tensor for the flat input,
    or a dict ``{name: (N_f,)}`` for dict input.

    Returns: (B, out_dim) of the table's dtype.
    """

    def __init__(self, num_rows: int, dim: int, features: Mapping[str, int], *, combine: str = "concat",
                 mode: str = "sum", optimizer: str | None = None, lr: float = 0.01, eps: float = 1e-8,
                 seed: int = 0, validate: bool = True, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        op = "UnifiedEmbedding"
        num_rows = check_int(op, "num_rows", num_rows)
        dim = check_int(op, "dim", dim)
        if num_rows <= 0:
            raise ValueError(f"{op}: num_rows must be > 0, got {num_rows}")
        if dim <= 0:
            raise ValueError(f"{op}: dim must be > 0, got {dim}")
        if not isinstance(features, Mapping) or not features:
            raise ValueError(f"{op}: features must be a non-empty mapping {{name: num_probes}}, got {features!r}")
        probes = {}
        for name, p in features.items():
            p = check_int(op, f"features[{name!r}]", p)
            if p <= 0:
                raise ValueError(f"{op}: features[{name!r}] (probe count) must be > 0, got {p}")
            probes[str(name)] = p
        if combine not in ("concat", "sum", "mean"):
            raise ValueError(f"{op}: combine must be 'concat', 'sum' or 'mean', got {combine!r}")
        if mode not in ("sum", "mean", "max"):
            raise ValueError(f"{op}: mode must be 'sum', 'mean' or 'max', got {mode!r}")
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"{op}: optimizer must be None, 'sgd' or 'rowwise_adagrad', got {optimizer!r}")
        if not (isinstance(lr, (int, float)) and lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"{op}: lr must be a finite float >= 0, got {lr!r}")
        if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
            raise ValueError(f"{op}: eps must be a finite float >= 0, got {eps!r}")
        self.num_rows, self.dim = num_rows, dim
        self.features = probes
        self.combine, self.mode, self.optimizer = combine, mode, optimizer
        self.lr, self.eps = float(lr), float(eps)
        self.seed = check_int(op, "seed", seed)
        self.validate = bool(validate)
        dtype = dtype or torch.float32
        bound = 1.0 / math.sqrt(dim)
        self.weight = torch.nn.Parameter(torch.empty(num_rows, dim, dtype=dtype, device=device).uniform_(-bound, bound))
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        if optimizer == "rowwise_adagrad":
            self.register_buffer("momentum", torch.zeros(num_rows, dtype=state_dtype, device=device))
        else:
            self.register_buffer("momentum", torch.zeros(0, dtype=state_dtype, device=device), persistent=False)

    def extra_repr(self) -> str:
        return (f"num_rows={self.num_rows}, dim={self.dim}, features={self.features}, combine={self.combine!r}, "
                f"mode={self.mode!r}, optimizer={self.optimizer!r}, lr={self.lr}, seed={self.seed}")

    def quantized(self, precision: str = "int8") -> "QuantizedUnifiedEmbedding":
        """An inference copy of this module with a compressed table: :class:`QuantizedUnifiedEmbedding`.

        ``precision``: ``"int8"`` (row-wise int8 in FBGEMM's fused layout, see
        :func:`embedops.quantize_table`: D + 8 bytes a row, every element within half its row's
        step ``(max - min) / 255``), ``"fp16"`` or ``"bf16"`` (the table rounded to that dtype).
        The copy has the same features, combine, mode, seed and forward inputs, returns this
        module's dtype, has no parameters and no gradient; this module is not modified.
        """
        return QuantizedUnifiedEmbedding(self.num_rows, self.dim, self.features, combine=self.combine,
                                         mode=self.mode, seed=self.seed, validate=self.validate,
                                         precision=precision, weight=self.weight.detach(),
                                         out_dtype=self.weight.dtype, device=self.weight.device)

    @staticmethod
    def _jagged(op: str, name: str, x):
        """(values, offsets) of one jagged input given as a tuple or a dict."""
        from .embedding import lengths_to_offsets

        if isinstance(x, Mapping):
            if "values" not in x or (("offsets" in x) == ("lengths" in x)):
                raise ValueError(f"{op}: {name} must have 'values' and exactly one of 'offsets' and 'lengths'")
            values = x["values"]
            offsets = x["offsets"] if "offsets" in x else lengths_to_offsets(x["lengths"], op=op)
        elif isinstance(x, (tuple, list)) and len(x) == 2:
            values, offsets = x
        else:
            raise TypeError(f"{op}: {name} must be a (values, offsets) tuple or a dict with values and "
                            f"offsets/lengths, got {type(x).__name__}")
        for what, t in (("values", values), ("offsets", offsets)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name} {what} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 1:
                raise ValueError(f"{op}: {name} {what} must be 1-D, got shape {tuple(t.shape)}")
        return values, offsets

    def _flatten(self, x, per_sample_weights, op: str = "UnifiedEmbedding"):
        if _is_kjt(x):
            x, per_sample_weights = _from_kjt(op, x, per_sample_weights, self.features)
        if isinstance(x, Mapping) and set(x) - {"values", "offsets", "lengths"}:
            missing = [n for n in self.features if n not in x]
            extra = [n for n in x if n not in self.features]
            if missing or extra:
                raise ValueError(f"{op}: input features must be exactly {list(self.features)}; missing {missing}, "
                                 f"unknown {extra}")
            vals, offs, psws = [], [], []
            batch = None
            base = 0
            for name in self.features:
                v, o = self._jagged(op, f"features[{name!r}]", x[name])
                if o.numel() < 1:
                    raise ValueError(f"{op}: features[{name!r}] offsets must have B + 1 >= 1 entries")
                if batch is None:
                    batch = o.numel() - 1
                elif o.numel() - 1 != batch:
                    raise ValueError(f"{op}: features[{name!r}] has batch size {o.numel() - 1}, but the first "
                                     f"feature has {batch}")
                if self.validate and o.numel() and (int(o[0]) != 0 or int(o[-1]) != v.numel()):
                    raise ValueError(f"{op}: features[{name!r}] offsets must start at 0 and end at len(values) = "
                                     f"{v.numel()}, got {int(o[0])} .. {int(o[-1])}")
                # shift this feature's offsets past the previous features' values
                o = o.to(torch.int64)
                vals.append(v.to(torch.int64) if v.dtype != torch.int64 else v)
                offs.append(o[:-1] + base if len(offs) < len(self.features) - 1 else o + base)
                base = base + v.numel()
                if per_sample_weights is not None:
                    if not isinstance(per_sample_weights, Mapping) or name not in per_sample_weights:
                        raise ValueError(f"{op}: per_sample_weights must be a dict with an entry for every feature "
                                         f"when the input is a dict (missing {name!r})")
                    psws.append(per_sample_weights[name])
            return torch.cat(vals), torch.cat(offs), (torch.cat(psws) if psws else None)
        values, offsets = self._jagged(op, "input", x)
        if per_sample_weights is not None and not isinstance(per_sample_weights, torch.Tensor):
            raise TypeError(f"{op}: per_sample_weights must be a tensor for a flat input")
        return values, offsets, per_sample_weights

    def forward(self, x, per_sample_weights=None, *, keyed_tensor: bool = False):
        """``keyed_tensor=True`` returns a ``torchrec.KeyedTensor`` (keys: the features, each its
        block of columns) instead of the (B, out_dim) tensor; ``x`` may also be a
        ``torchrec.KeyedJaggedTensor`` (its keys: the module's features, its weights: the
        per-sample weights). torchrec is imported only for these."""
        values, offsets, psw = self._flatten(x, per_sample_weights)
        if self.optimizer is None or not torch.is_grad_enabled():
            out, _ = torch.ops.embedops.multiplexed_embedding_bag(
                self.weight, values, offsets, self.num_probes, self.combine, self.mode, psw, self.seed,
                self.validate)
        else:
            cfg = (self.num_probes, self.combine, self.mode, self.seed, self.validate, self.optimizer, self.lr,
                   self.eps)
            out = FusedEmbeddingBagUpdate.apply(self.weight, self.momentum, values, offsets, psw, cfg)
        return _keyed_tensor(self, out) if keyed_tensor else out


def _is_kjt(x) -> bool:
    """A torchrec.KeyedJaggedTensor, recognised without importing torchrec."""
    return type(x).__name__ == "KeyedJaggedTensor" and type(x).__module__.startswith("torchrec")


def _from_kjt(op: str, kjt, per_sample_weights, features):
    """A KeyedJaggedTensor as the module's dict input ({name: {"values", "offsets"}}) plus its weights."""
    keys = list(kjt.keys())
    missing = [n for n in features if n not in keys]
    extra = [n for n in keys if n not in features]
    if missing or extra:
        raise ValueError(f"{op}: the KeyedJaggedTensor's keys must be exactly the features {list(features)}; "
                         f"missing {missing}, unknown {extra}")
    if getattr(kjt, "variable_stride_per_key", lambda: False)():
        raise ValueError(f"{op}: a KeyedJaggedTensor with a variable batch size per key is not supported")
    weights = kjt.weights_or_none()
    if weights is not None and per_sample_weights is not None:
        raise ValueError(f"{op}: the KeyedJaggedTensor has weights; do not pass per_sample_weights too")
    values, offsets = kjt.values(), kjt.offsets()
    if offsets.dim() != 1 or offsets.numel() != len(keys) * kjt.stride() + 1:
        raise ValueError(f"{op}: KeyedJaggedTensor offsets have shape {tuple(offsets.shape)}, expected "
                         f"(len(keys) * stride + 1,) = ({len(keys) * kjt.stride() + 1},)")
    B = kjt.stride()
    x, psw = {}, ({} if weights is not None else per_sample_weights)
    for i, name in enumerate(keys):
        a, e = int(offsets[i * B]), int(offsets[(i + 1) * B])
        x[name] = (values[a:e], offsets[i * B: (i + 1) * B + 1] - offsets[i * B])
        if weights is not None:
            psw[name] = weights[a:e]
    return x, psw


def _keyed_tensor(module, out: torch.Tensor):
    """(B, out_dim) output -> torchrec.KeyedTensor, one key per feature."""
    try:
        from torchrec.sparse.jagged_tensor import KeyedTensor
    except ImportError as e:
        raise ImportError(f"{type(module).__name__}: keyed_tensor=True needs torchrec (pip install "
                          f"'embedops[torchrec]'): {e}") from None
    per_key = [p * module.dim if module.combine == "concat" else module.dim for p in module.features.values()]
    return KeyedTensor(keys=list(module.features), length_per_key=per_key, values=out, key_dim=1)


_PRECISIONS = {"int8": torch.uint8, "fp16": torch.float16, "bf16": torch.bfloat16}


class QuantizedUnifiedEmbedding(_FeatureLayout, torch.nn.Module):
    """Inference-only UnifiedEmbedding with an int8 row-quantised, fp16 or bf16 table.

    Usually made with :meth:`UnifiedEmbedding.quantized`. The forward takes exactly the inputs of
    :class:`UnifiedEmbedding` (dict of jagged features, flat ``(values, offsets)``, ``lengths``,
    a TorchRec KeyedJaggedTensor, ``keyed_tensor=True``) and hashes ids the same way, so it
    replaces a trained module in a serving path.

    Args:
        num_rows, dim, features, combine, mode, seed, validate: as :class:`UnifiedEmbedding`.
        precision: ``"int8"``: the buffer ``weight`` is a (R, D + 8) uint8 table in FBGEMM's
            fused row layout (D codes, float32 scale, float32 bias per row; see
            :func:`embedops.quantize_table`), looked up with float32 accumulation;
            ``"fp16"`` / ``"bf16"``: ``weight`` is a (R, D) table of that dtype.
        weight: optional (R, D) float table to compress (not modified); default zeros (load a
            ``state_dict`` into it).
        out_dtype: dtype of the output (default float32; :meth:`UnifiedEmbedding.quantized`
            passes the source module's dtype). ``per_sample_weights`` may be of any float dtype.
        device: of the table.

    ``weight`` is a buffer (in ``state_dict``), not a parameter: nothing here has a gradient.
    Returns: (B, out_dim) tensor of ``out_dtype`` (or a KeyedTensor with ``keyed_tensor=True``).
    """

    def __init__(self, num_rows: int, dim: int, features: Mapping[str, int], *, combine: str = "concat",
                 mode: str = "sum", seed: int = 0, validate: bool = True, precision: str = "int8",
                 weight: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        op = "QuantizedUnifiedEmbedding"
        # the configuration checks of UnifiedEmbedding, on a (1, 1) stand-in table
        cfg = UnifiedEmbedding(1, dim, features, combine=combine, mode=mode, seed=seed, validate=validate)
        num_rows = check_int(op, "num_rows", num_rows)
        if num_rows <= 0:
            raise ValueError(f"{op}: num_rows must be > 0, got {num_rows}")
        if precision not in _PRECISIONS:
            raise ValueError(f"{op}: precision must be 'int8', 'fp16' or 'bf16', got {precision!r}")
        if out_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"{op}: out_dtype must be float32, float16, bfloat16 or float64, got {out_dtype}")
        self.num_rows, self.dim = num_rows, cfg.dim
        self.features = dict(cfg.features)
        self.combine, self.mode, self.seed, self.validate = cfg.combine, cfg.mode, cfg.seed, cfg.validate
        self.precision, self.out_dtype = precision, out_dtype
        table_dtype = _PRECISIONS[precision]
        if weight is None:
            cols = self.dim + 8 if precision == "int8" else self.dim
            table = torch.zeros(num_rows, cols, dtype=table_dtype, device=device)
        else:
            if not isinstance(weight, torch.Tensor):
                raise TypeError(f"{op}: weight must be a torch.Tensor, got {type(weight).__name__}")
            if tuple(weight.shape) != (num_rows, self.dim):
                raise ValueError(f"{op}: weight must have shape (num_rows, dim) = ({num_rows}, {self.dim}), got "
                                 f"{tuple(weight.shape)}")
            w = weight.detach().to(device) if device is not None else weight.detach()
            if precision == "int8":
                from .embedding import quantize_table

                table = quantize_table(w, "int8")
            else:
                table = w.to(table_dtype, copy=True).contiguous()
        self.register_buffer("weight", table)

    # the input handling of UnifiedEmbedding (same features, same forms)
    _jagged = staticmethod(UnifiedEmbedding._jagged)

    def extra_repr(self) -> str:
        return (f"num_rows={self.num_rows}, dim={self.dim}, features={self.features}, precision={self.precision!r}, "
                f"combine={self.combine!r}, mode={self.mode!r}, seed={self.seed}, out_dtype={self.out_dtype}")

    def forward(self, x, per_sample_weights=None, *, keyed_tensor: bool = False):
        values, offsets, psw = UnifiedEmbedding._flatten(self, x, per_sample_weights, op="QuantizedUnifiedEmbedding")
        if psw is not None:
            if not isinstance(psw, torch.Tensor) or not psw.is_floating_point():
                raise TypeError("QuantizedUnifiedEmbedding: per_sample_weights must be a float tensor")
            psw = psw.detach().to(torch.float32 if self.precision == "int8" else self.weight.dtype)
        with torch.no_grad():
            out, _ = torch.ops.embedops.multiplexed_embedding_bag(
                self.weight, values, offsets, self.num_probes, self.combine, self.mode, psw, self.seed,
                self.validate)
        out = out.to(self.out_dtype)
        return _keyed_tensor(self, out) if keyed_tensor else out


# ---- end embedding -----------------------------------------------------------------------------
