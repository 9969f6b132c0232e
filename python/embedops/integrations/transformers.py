"""An ``attn_implementation="embedops"`` attention backend for Hugging Face transformers.

::

    import embedops.integrations.transformers as eo_hf
    eo_hf.register()
    model = AutoModel.from_pretrained(path, attn_implementation="embedops")
    # or: model.set_attn_implementation("embedops")
    ...
    eo_hf.fallback_counts()   # {} when every attention call ran through embedops

:func:`register` adds two functions to transformers under the name ``"embedops"``:

- an ``AttentionInterface`` function (:func:`attention_forward`) with the signature and the
  results of transformers' ``sdpa_attention_forward``: query/key/value ``(B, H, L, D)``, returns
  ``(attn_output (B, Lq, Hq, Dv), None)``. Where the call is plain attention with key padding it
  runs :func:`embedops.cross_attention` (the ``(B, H, L, D)`` tensors are read in place through
  their ``(B, L, H, D)`` transposes, GQA natively, the module's ``scaling``, the padding as
  ``kv_lengths``); everything else runs transformers' SDPA function for that call, and the reason
  is counted (:func:`fallback_counts`).
- an ``AttentionMaskInterface`` function (:func:`mask_function`): for a bidirectional padding
  mask it returns the padding row as a ``(B, 1, 1, Lk)`` boolean tensor *expanded* (stride 0) to
  the ``(B, 1, Lq, Lk)`` shape SDPA's mask has, so the attention function reads the key lengths
  from B x Lk values and SDPA (the fallback) reads the same mask; every other mask (causal,
  sliding windows, chunks, packed sequences, custom mask functions) is built by transformers'
  ``sdpa_mask`` unchanged.

When the embedops path runs (all of these, else fallback with the reason in brackets):

- no ``position_bias`` (T5-style additive bias) ["position_bias"], no ``sliding_window``
  ["sliding_window"], no ``softcap`` ["softcap"], no attention sinks ``s_aux`` ["sinks"];
- ``dropout == 0`` (eval mode, or training with attention dropout 0) ["dropout"];
- not under ``torch.jit.trace`` or ``torch.export`` (the choice depends on the mask's values,
  which a traced graph would freeze) ["tracing"];
- not causal: SDPA's own rule, ``is_causal`` (argument, else ``module.is_causal``, default True)
  applies only when the mask is None and Lq > 1 ["causal"];
- the mask is None or is pure key padding: the same for every head and query row, and per
  batch row a prefix of valid keys followed by padding (right padding), with at least one valid
  key. Boolean masks (True = attend) and additive float masks whose values are only 0 and
  -inf / the dtype's minimum are read; anything else falls back: ["causal"] when the call is
  causal, else ["mask_not_key_padding"] (differs between query rows or heads),
  ["padding_not_suffix"] (e.g. left padding), ["empty_key_row"] (a row with no valid key: SDPA
  gives NaN or the mean of the values there, embedops 0), ["float_mask_bias"] (other float
  values), ["mask_dtype"], ["mask_shape"], ["mask_type"] (not a tensor, e.g. a flex BlockMask),
  ["mask_requires_grad"] (a mask that is differentiated);
- q, k, v 4-D ["shape"], of one dtype among float32 / float16 / bfloat16 / float64 ["dtype"], on CPU or on CUDA
  with a CUDA build of embedops ["device"], head dims <= 256 on CUDA ["head_dim"], Hq a multiple
  of Hkv matching ``module.num_key_value_groups`` ["heads"], q's batch equal to k's ["batch"],
  Lk > 0 ["empty"].

Padded query rows are computed (not zeroed), as SDPA does with a key-padding mask, so the
outputs match SDPA at every position. Differentiable (training with dropout 0). Checking a mask
costs one host synchronisation per call (B x Lk values for the masks this module builds); under
``torch.compile`` that check is a graph break per attention call.
"""

from __future__ import annotations

import collections
import logging
import threading

import torch

import embedops

__all__ = ["NAME", "attention_forward", "call_counts", "fallback_counts", "is_registered", "mask_function",
           "register", "reset_fallback_counts"]

NAME = "embedops"

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_fallbacks: collections.Counter = collections.Counter()
_calls = {"embedops": 0, "fallback": 0}
_logged_reasons: set[str] = set()
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_CUDA_MAX_HEAD_DIM = 256
_cuda_built: bool | None = None
_NO_PADDING = object()  # _key_lengths_from_mask: a mask without padding (run without kv_lengths)


def _transformers():
    try:
        from transformers import masking_utils, modeling_utils
        from transformers.integrations import sdpa_attention
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError("embedops.integrations.transformers needs transformers: "
                          'pip install "embedops[transformers]"') from e
    return masking_utils, modeling_utils, sdpa_attention


# ---- counters ----------------------------------------------------------------------------------


def fallback_counts() -> dict[str, int]:
    """Attention calls that ran transformers' SDPA function instead of embedops since the last
    :func:`reset_fallback_counts`, by reason (see the module docstring for the reasons)."""
    with _lock:
        return dict(_fallbacks)


def call_counts() -> dict[str, int]:
    """``{"embedops": n, "fallback": m}``: attention calls of each kind since the last reset."""
    with _lock:
        return dict(_calls)


def reset_fallback_counts() -> None:
    """Zero :func:`fallback_counts` and :func:`call_counts`."""
    with _lock:
        _fallbacks.clear()
        _calls["embedops"] = 0
        _calls["fallback"] = 0


def _count(reason: str | None) -> None:
    with _lock:
        if reason is None:
            _calls["embedops"] += 1
            return
        _calls["fallback"] += 1
        _fallbacks[reason] += 1
        first = reason not in _logged_reasons
        _logged_reasons.add(reason)
    if first:
        logger.info("embedops attention: falling back to SDPA (%s); see fallback_counts()", reason)


# ---- registration --------------------------------------------------------------------------------


def register() -> str:
    """Register the ``"embedops"`` attention and mask functions with transformers (idempotent).

    Returns the name to pass as ``attn_implementation``.
    """
    masking_utils, modeling_utils, _ = _transformers()
    modeling_utils.AttentionInterface.register(NAME, attention_forward)
    masking_utils.AttentionMaskInterface.register(NAME, mask_function)
    return NAME


def is_registered() -> bool:
    """Whether :func:`register` has run (both functions are in transformers' global mappings)."""
    masking_utils, modeling_utils, _ = _transformers()
    return (modeling_utils.AttentionInterface._global_mapping.get(NAME) is attention_forward
            and masking_utils.AttentionMaskInterface._global_mapping.get(NAME) is mask_function)


# ---- the mask function ---------------------------------------------------------------------------


def mask_function(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                  allow_is_causal_skip: bool = True, allow_is_bidirectional_skip: bool = False,
                  use_vmap: bool = False, device="cpu", **kwargs):
    """``AttentionMaskInterface`` function of the ``"embedops"`` implementation.

    A plain bidirectional mask (``mask_function`` is transformers' ``bidirectional_mask_function``)
    becomes the 2D padding row ``(B, Lk)`` viewed as ``(B, 1, 1, Lk)`` and expanded to
    ``(B, 1, q_length, kv_length)`` (no copy; what SDPA's boolean mask means, True = attend), or
    None where ``sdpa_mask`` returns None (no padding and the skip allowed). Any other mask is
    ``sdpa_mask``'s, built with the same arguments.
    """
    masking_utils, _, _ = _transformers()
    mask_fn = masking_utils.causal_mask_function if mask_function is None else mask_function
    if (mask_fn is masking_utils.bidirectional_mask_function and not use_vmap and isinstance(kv_offset, int)
            and (attention_mask is None or attention_mask.dim() == 2)):
        padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if allow_is_bidirectional_skip and masking_utils._ignore_bidirectional_mask_sdpa(padding, kv_length,
                                                                                        local_size):
            return None
        if padding is None:
            row = torch.ones((1, kv_length), dtype=torch.bool, device=device)
        else:
            row = padding[:, kv_offset:kv_offset + kv_length]
            if row.dtype != torch.bool:
                row = row.bool()
        return row[:, None, None, :].expand(batch_size, 1, q_length, kv_length)
    return masking_utils.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                                   kv_offset=kv_offset, mask_function=mask_fn, attention_mask=attention_mask,
                                   local_size=local_size, allow_is_causal_skip=allow_is_causal_skip,
                                   allow_is_bidirectional_skip=allow_is_bidirectional_skip, use_vmap=use_vmap,
                                   device=device, **kwargs)


# ---- reading key padding from a mask ----------------------------------------------------------


def _squeeze_broadcast(m: torch.Tensor, dim: int) -> torch.Tensor:
    """m narrowed to one index along ``dim`` where it is a stride-0 (expanded) dimension."""
    if m.size(dim) > 1 and m.stride(dim) == 0:
        return m.narrow(dim, 0, 1)
    return m


def _key_lengths_from_mask(mask: torch.Tensor, batch: int, heads: int, q_length: int, kv_length: int):
    """``(kv_lengths, None)`` when ``mask`` (an SDPA ``attn_mask`` for scores ``(B, H, Lq, Lk)``)
    is exactly right key padding with at least one valid key per batch row, else
    ``(None, reason)``. kv_lengths: ``(B,)`` int64 on the mask's device.

    Exact means: SDPA with this mask and :func:`embedops.cross_attention` with these kv_lengths
    compute the same softmax; ``kv_lengths`` is the marker ``_NO_PADDING`` where every key is
    valid. One host synchronisation (two for a materialised mask whose first
    and last query rows agree).
    """
    if mask.dim() > 4 or mask.dim() == 0:
        return None, "mask_shape"
    m = mask[(None,) * (4 - mask.dim())]
    for dim, full in enumerate((batch, heads, q_length, kv_length)):
        if m.size(dim) not in (1, full) or (dim == 3 and m.size(3) != full):
            return None, "mask_shape"
    for dim in (1, 2):
        m = _squeeze_broadcast(m, dim)
    flags = []
    if m.dtype == torch.bool:
        allowed = m
    elif m.dtype.is_floating_point:
        allowed = m == 0
        blocked = (m == float("-inf")) | (m == torch.finfo(m.dtype).min)
        flags.append(("float_mask_bias", (allowed | blocked).all()))
    else:
        return None, "mask_dtype"
    varies = allowed.size(1) > 1 or allowed.size(2) > 1
    if varies:  # cheap first: the first and the last query row (a causal mask differs there)
        first = allowed[:, :1, :1, :]
        flags.append(("mask_not_key_padding", (allowed[:, :, -1:, :] == first).all()))
    row = allowed[:, 0, 0, :]
    lengths = row.sum(-1)
    suffix = torch.arange(kv_length, device=row.device)[None, :] < lengths[:, None]
    flags.append(("padding_not_suffix", (row == suffix).all()))
    flags.append(("empty_key_row", (lengths > 0).all()))
    ok = torch.stack([f for _, f in flags] + [(lengths == kv_length).all()]).tolist()
    for (reason, _), good in zip(flags, ok):
        if not good:
            return None, reason
    if varies and not bool((allowed == allowed[:, :1, :1, :]).all()):
        return None, "mask_not_key_padding"
    if ok[-1]:  # no padding at all
        return _NO_PADDING, None
    if lengths.size(0) != batch:
        lengths = lengths.expand(batch)
    return lengths, None


# ---- the attention function --------------------------------------------------------------------


def _device_ok(q: torch.Tensor) -> str | None:
    global _cuda_built
    if q.device.type == "cpu":
        return None
    if q.device.type == "cuda":
        if _cuda_built is None:
            _cuda_built = bool(embedops.build_info().get("cuda"))
        return None if _cuda_built else "device"
    return "device"


def _plan(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
    """``(kv_lengths or None, None)`` for the embedops path, or ``(None, reason)`` to fall back."""
    if kwargs.get("position_bias") is not None:
        return None, "position_bias"
    if kwargs.get("sliding_window") is not None:
        return None, "sliding_window"
    if kwargs.get("softcap") is not None:
        return None, "softcap"
    if kwargs.get("s_aux") is not None:
        return None, "sinks"
    if dropout:
        return None, "dropout"
    if torch.jit.is_tracing() or torch.compiler.is_exporting():  # a traced graph cannot keep the choice
        return None, "tracing"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return None, "shape"
    if not (query.dtype in _DTYPES and key.dtype == query.dtype and value.dtype == query.dtype):
        return None, "dtype"
    reason = _device_ok(query)
    if reason is not None or key.device != query.device or value.device != query.device:
        return None, reason or "device"
    B, Hq, Lq, D = query.shape
    Bk, Hkv, Lk, Dk = key.shape
    if B != Bk or value.size(0) != B:
        return None, "batch"
    if Hkv == 0 or Hq % Hkv != 0 or value.size(1) != Hkv or value.size(2) != Lk or Dk != D:
        return None, "heads"
    groups = getattr(module, "num_key_value_groups", None)
    if isinstance(groups, int) and groups > 1 and Hkv * groups != Hq:
        return None, "heads"
    if query.device.type == "cuda" and max(D, value.size(3)) > _CUDA_MAX_HEAD_DIM:
        return None, "head_dim"
    if Lk == 0:
        return None, "empty"
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None:
        if Lq > 1 and causal:
            return None, "causal"
        return None, None
    if not isinstance(attention_mask, torch.Tensor):
        return None, "mask_type"
    if attention_mask.requires_grad:  # a learned bias: SDPA differentiates through it
        return None, "mask_requires_grad"
    lengths, reason = _key_lengths_from_mask(attention_mask, B, Hq, Lq, Lk)
    if reason is not None:
        if causal and reason in ("mask_not_key_padding", "padding_not_suffix") and Lq > 1:
            reason = "causal"
        return None, reason
    if lengths is _NO_PADDING:
        return None, None
    return lengths.to(device=query.device), None


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """``AttentionInterface`` function of the ``"embedops"`` implementation.

    Args:
        module: the attention module calling (reads ``is_causal`` and ``num_key_value_groups``).
        query: ``(B, Hq, Lq, D)``; key: ``(B, Hkv, Lk, D)``; value: ``(B, Hkv, Lk, Dv)``, one dtype.
        attention_mask: None, or an SDPA ``attn_mask`` broadcastable to ``(B, Hq, Lq, Lk)``: bool
            (True = attend) or additive float.
        dropout: attention dropout probability (non-zero falls back to SDPA).
        scaling: score multiplier; None means ``1 / sqrt(D)``.
        is_causal: as in ``sdpa_attention_forward``.
        **kwargs: passed to SDPA on fallback (``position_bias``, ``sliding_window`` ... fall back).

    Returns:
        ``(attn_output (B, Lq, Hq, Dv) contiguous, None)``, as ``sdpa_attention_forward``.
    """
    lengths, reason = _plan(module, query, key, value, attention_mask, dropout, is_causal, kwargs)
    _count(reason)
    if reason is not None:
        _, _, sdpa_attention = _transformers()
        return sdpa_attention.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                                     scaling=scaling, is_causal=is_causal, **kwargs)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = embedops.cross_attention(q, k, v, kv_lengths=lengths, scale=scaling)
    return out, None
