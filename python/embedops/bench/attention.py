"""Attention family benchmarks: cross-modal shapes, embedops vs SDPA and an eager reference.

Shapes: text->image (Lq 77, Lk 1024..4096), image->text (Lq 1024..4096, Lk 77), latents->tokens
(Lq 32, Lk 4096); with and without 30 % key padding (SDPA then takes a boolean mask); forward and
forward+backward. FLOPs: 2*B*H*Lq*Lk*(D+Dv) forward (= 4*B*H*Lq*Lk*D), x3.5 forward+backward,
counted over the nominal Lk (padding included), as for SDPA.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import embedops
from embedops import reference

from .core import Case, assert_close

_TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _case(device: str, B: int, Lq: int, Lk: int, H: int, D: int, dtype: torch.dtype, pad: bool,
          backward: bool, label: str, tensor_cores: bool = False) -> Case:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Lq, H, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Lk, H, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Lk, H, D, generator=g).to(device=device, dtype=dtype)
    kvl = None
    mask = None
    if pad:  # 30 % of the keys are padding (lengths 0.6..0.8 Lk, mean 0.7)
        kvl = torch.linspace(0.6 * Lk, 0.8 * Lk, B).round().to(torch.int64).to(device)
        mask = (torch.arange(Lk, device=device)[None, :] < kvl[:, None])[:, None, None, :]
    go = torch.randn(B, Lq, H, D, generator=g).to(device=device, dtype=dtype)

    def sdpa_fwd(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask).transpose(1, 2)

    def eager_fwd(q, k, v):
        return reference.cross_attention(q, k, v, kv_lengths=kvl, dtype=dtype)[0]

    def ours_fwd(q, k, v):
        if not tensor_cores:
            return embedops.cross_attention(q, k, v, kv_lengths=kvl)
        os.environ["EMBEDOPS_ATTN_TENSOR_CORES"] = "1"  # the opt-in wmma forward
        try:
            return embedops.cross_attention(q, k, v, kv_lengths=kvl)
        finally:
            del os.environ["EMBEDOPS_ATTN_TENSOR_CORES"]

    if backward:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

        def wrap(f):
            return lambda: torch.autograd.grad(f(*leaves), leaves, go)
    else:
        def wrap(f):
            def run():
                with torch.no_grad():
                    return f(q, k, v)
            return run

    baselines = {"sdpa" + (" (bool mask)" if pad else ""): wrap(sdpa_fwd)}
    if device == "cuda" and not pad:
        # the named SDPA backends on the GPU (flash takes no mask); dropped where unavailable
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)):
            def fwd(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return sdpa_fwd(q, k, v)
            try:
                wrap(fwd)()
                baselines[name] = wrap(fwd)
            except RuntimeError:
                pass
    baselines["eager"] = wrap(eager_fwd)
    tol = _TOL[dtype] * (4 if backward else 1)

    def check(ours, theirs):
        assert_close(ours, theirs, atol=tol, rtol=tol, what="grads" if backward else "out")

    flops = 4.0 * B * H * Lq * Lk * D * (3.5 if backward else 1.0)
    dt = str(dtype).replace("torch.", "")
    shapes = f"B{B} H{H} Lq{Lq} Lk{Lk} D{D} {dt}" + (" pad30%" if pad else "")
    return Case(
        name=f"{label} {'fwd+bwd' if backward else 'fwd'}" + (" (tensor cores)" if tensor_cores else ""),
        shapes=shapes,
        fn=wrap(ours_fwd),
        baselines=baselines,
        check=check,
        flops=flops,
        bytes=(q.numel() + k.numel() + v.numel() + go.numel()) * q.element_size() * (2 if backward else 1),
    )


def cases(device: str, quick: bool):
    out = []

    def add(*args, **kw):
        out.append(lambda: _case(device, *args, **kw))

    if device == "cuda":
        B, H, D = (4, 16, 128) if quick else (16, 16, 128)
        dtypes = [torch.bfloat16]
    else:
        B, H, D = (2, 8, 64) if quick else (4, 8, 64)
        dtypes = [torch.float32]
    big = 1024 if quick else 4096
    for dtype in dtypes:
        for pad in (False, True):
            add(B, 77, 1024, H, D, dtype, pad, False, label="text->image")
            if not quick:
                add(B, 77, big, H, D, dtype, pad, False, label="text->image")
            add(B, 1024, 77, H, D, dtype, pad, False, label="image->text")
            if not quick:
                add(B, big, 77, H, D, dtype, pad, False, label="image->text")
                add(B, 32, big, H, D, dtype, pad, False, label="latents->tokens")
        for pad in (False, True):
            add(B, 77, 1024, H, D, dtype, pad, True, label="text->image")
            add(B, 1024, 77, H, D, dtype, pad, True, label="image->text")
    if device == "cpu":
        add(B, 77, 1024, H, D, torch.bfloat16, False, False, label="text->image")
        if not quick:
            add(B, 77, 1024, H, 128, torch.float32, True, False, label="text->image")
    else:
        add(B, 77, 1024, H, D, torch.float32, False, False, label="text->image")
        for pad in (False, True):
            add(B, 77, 1024, H, D, torch.bfloat16, pad, False, label="text->image", tensor_cores=True)
            add(B, 1024, 77, H, D, torch.bfloat16, pad, False, label="image->text", tensor_cores=True)
    return out
