"""cross_attention / cross_attention_varlen: forward, backward, masking, layouts, errors."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

import embedops
from embedops import reference

from conftest import FLOAT_DTYPES, TOL, opcheck

# (B, Lq, Lk, Hq, Hkv, D, Dv): Lq = 1, Lk = 1, odd sizes, D not a power of two, GQA / MQA, Dv != D,
# and key lengths crossing the CPU kernel's key tiles (512..2048 keys, depending on the query tile).
SHAPES = [
    (1, 3, 2100, 2, 1, 8, 8),
    (2, 300, 1300, 2, 2, 16, 8),
    (2, 7, 13, 4, 2, 16, 16),
    (1, 1, 33, 2, 2, 24, 24),
    (3, 19, 1, 4, 1, 8, 8),
    (2, 77, 600, 4, 2, 40, 24),
    (2, 130, 77, 3, 3, 33, 17),
]


def _inputs(shape, dtype, device, seed=0, lengths=True):
    B, Lq, Lk, Hq, Hkv, D, Dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Hq, D, generator=g).to(dtype).to(device)
    k = torch.randn(B, Lk, Hkv, D, generator=g).to(dtype).to(device)
    v = torch.randn(B, Lk, Hkv, Dv, generator=g).to(dtype).to(device)
    kvl = ql = None
    if lengths:
        kvl = torch.randint(1, Lk + 1, (B,), generator=g)
        kvl[0] = Lk
        ql = torch.randint(1, Lq + 1, (B,), generator=g)
        ql[-1] = Lq
        kvl, ql = kvl.to(device), ql.to(device)
    return q, k, v, kvl, ql


def _err(a, b):
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    return (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0


def _check_close(ours, ref64, ref_lowp, dtype, what):
    """fp32/fp64: TOL; fp16/bf16: error <= 2x the error of plain PyTorch in that dtype (+ tiny slack)."""
    assert not torch.isnan(ours).any(), f"{what}: NaN"
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(ours.double(), ref64.double(), **TOL[dtype], msg=what)
        return
    bound = 2 * _err(ref_lowp, ref64) + 1e-4
    assert _err(ours, ref64) <= bound, f"{what}: error {_err(ours, ref64):.3g} > 2x eager {bound:.3g}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_reference(device, dtype, shape):
    q, k, v, kvl, ql = _inputs(shape, dtype, device)
    out, lse = embedops.cross_attention(q, k, v, kv_lengths=kvl, q_lengths=ql, return_lse=True)
    assert out.dtype == dtype and out.shape == (*q.shape[:3], v.shape[-1])
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref_out, ref_lse = reference.cross_attention(q, k, v, kv_lengths=kvl, q_lengths=ql)
    low_out, _ = reference.cross_attention(q, k, v, kv_lengths=kvl, q_lengths=ql, dtype=dtype)
    _check_close(out, ref_out, low_out, dtype, "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    tol = TOL[torch.float64] if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], **tol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(2, 21, 45, 4, 2, 24, 16), (1, 5, 2300, 2, 1, 8, 8)], ids=["small", "long"])
def test_backward_matches_reference(device, dtype, shape):
    q, k, v, kvl, ql = _inputs(shape, dtype, device, seed=1)
    go = torch.randn(q.shape[:3] + (v.shape[-1],), generator=torch.Generator().manual_seed(2)).to(dtype).to(device)

    def grads(fn, dt):
        xs = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out = fn(*xs)
        return torch.autograd.grad(out, xs, go.to(dt))

    ours = grads(lambda a, b, c: embedops.cross_attention(a, b, c, kv_lengths=kvl, q_lengths=ql), dtype)
    ref = grads(lambda a, b, c: reference.cross_attention(a, b, c, kv_lengths=kvl, q_lengths=ql)[0], torch.float64)
    low = grads(lambda a, b, c: reference.cross_attention(a, b, c, kv_lengths=kvl, q_lengths=ql, dtype=dtype)[0],
                dtype)
    for name, a, r, lo in zip("qkv", ours, ref, low):
        assert a.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(a.double(), r, atol=1e-4, rtol=1e-4, msg=f"d{name}")
        else:
            _check_close(a, r, lo, dtype, f"d{name}")


def test_gradcheck_float64(device):
    shape = (2, 5, 7, 2, 1, 6, 4)
    q, k, v, kvl, ql = _inputs(shape, torch.float64, device, seed=3)
    kvl = torch.tensor([7, 3], device=device)
    ql = torch.tensor([4, 5], device=device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def fn(a, b, c):
        out, lse = embedops.cross_attention(a, b, c, kv_lengths=kvl, q_lengths=ql, scale=0.7, return_lse=True)
        return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_varlen_float64(device):
    g = torch.Generator().manual_seed(4)
    cq, ck = torch.tensor([0, 3, 3, 8], device=device), torch.tensor([0, 4, 6, 6], device=device)
    q = torch.randn(8, 2, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    k = torch.randn(6, 1, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    v = torch.randn(6, 1, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    fn = lambda a, b, c: embedops.cross_attention_varlen(a, b, c, cq, ck, 5, 4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
def test_fully_masked_rows_are_zero_never_nan(device, dtype):
    q, k, v, _, _ = _inputs((3, 6, 9, 2, 2, 8, 8), dtype, device, lengths=False)
    kvl = torch.tensor([0, 9, 4], device=device)
    ql = torch.tensor([6, 0, 2], device=device)
    # huge scores: fp16 overflow territory for a naive -finfo.max mask
    q, k = q * 30, k * 30
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = embedops.cross_attention(q, k, v, kv_lengths=kvl, q_lengths=ql, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out[0] == 0).all() and (out[1] == 0).all() and (out[2, 2:] == 0).all()
    assert torch.isneginf(lse[0]).all() and torch.isneginf(lse[1]).all() and torch.isneginf(lse[2, :, 2:]).all()
    assert torch.isfinite(lse[2, :, :2]).all()
    out.float().square().sum().backward()
    for t in (q, k, v):
        assert not torch.isnan(t.grad).any()
    assert (q.grad[0] == 0).all() and (q.grad[1] == 0).all() and (q.grad[2, 2:] == 0).all()
    assert (k.grad[0] == 0).all() and (v.grad[0] == 0).all()
    assert (k.grad[1] == 0).all() and (v.grad[1] == 0).all()  # its queries are all padding
    assert (k.grad[2, 4:] == 0).all() and (v.grad[2, 4:] == 0).all()


def test_empty_and_zero_length_keys(device):
    q = torch.randn(2, 3, 2, 4, device=device)
    k = torch.randn(2, 0, 1, 4, device=device)
    v = torch.randn(2, 0, 1, 5, device=device)
    out, lse = embedops.cross_attention(q, k, v, return_lse=True)
    assert out.shape == (2, 3, 2, 5) and (out == 0).all() and torch.isneginf(lse).all()
    q0 = torch.randn(0, 3, 2, 4, device=device)
    assert embedops.cross_attention(q0, k[:0], v[:0]).shape == (0, 3, 2, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_equals_padded(device, dtype):
    B, Lq, Lk, Hq, Hkv, D, Dv = 3, 11, 14, 4, 2, 16, 12
    q, k, v, _, _ = _inputs((B, Lq, Lk, Hq, Hkv, D, Dv), dtype, device, lengths=False)
    ql = torch.tensor([11, 4, 7], device=device)
    kvl = torch.tensor([5, 14, 0], device=device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = embedops.cross_attention(q, k, v, kv_lengths=kvl, q_lengths=ql, return_lse=True)
    go = torch.randn_like(out)
    gp = torch.autograd.grad(out, (q, k, v), go)

    qp = torch.cat([q[b, : ql[b]] for b in range(B)])
    kp = torch.cat([k[b, : kvl[b]] for b in range(B)])
    vp = torch.cat([v[b, : kvl[b]] for b in range(B)])
    cq = torch.nn.functional.pad(ql.cumsum(0), (1, 0)).to(torch.int32)
    ck = torch.nn.functional.pad(kvl.cumsum(0), (1, 0)).to(torch.int32)
    out_v, lse_v = embedops.cross_attention_varlen(qp, kp, vp, cq, ck, 11, 14, return_lse=True)
    gop = torch.cat([go[b, : ql[b]] for b in range(B)])
    gv = torch.autograd.grad(out_v, (q, k, v), gop)
    torch.testing.assert_close(out_v, torch.cat([out[b, : ql[b]] for b in range(B)]), atol=0, rtol=0)
    torch.testing.assert_close(lse_v, torch.cat([lse[b, :, : ql[b]] for b in range(B)], 1), atol=0, rtol=0)
    for a, b in zip(gp, gv):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_varlen_matches_reference(device):
    g = torch.Generator().manual_seed(5)
    cq, ck = torch.tensor([0, 1, 40, 45]), torch.tensor([0, 700, 701, 780])
    q = torch.randn(45, 4, 20, generator=g).to(device)
    k = torch.randn(780, 2, 20, generator=g).to(device)
    v = torch.randn(780, 2, 8, generator=g).to(device)
    out, lse = embedops.cross_attention_varlen(q, k, v, cq.to(device), ck.to(device), 39, 700, return_lse=True)
    ref, ref_lse = reference.cross_attention_varlen(q, k, v, cq, ck)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


def test_non_contiguous_inputs(device):
    g = torch.Generator().manual_seed(6)
    # (B, H, L, D) tensors viewed as (B, L, H, D), and a strided last dim
    q = torch.randn(2, 4, 9, 16, generator=g).to(device).transpose(1, 2)
    k = torch.randn(2, 2, 30, 32, generator=g).to(device).transpose(1, 2)[..., ::2]
    v = torch.randn(2, 30, 2, 8, generator=g).to(device).expand(2, 30, 2, 8)
    kvl = torch.tensor([30, 11], device=device)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    out = embedops.cross_attention(q, k, v, kv_lengths=kvl)
    ref = embedops.cross_attention(q.contiguous(), k.contiguous(), v.contiguous(), kv_lengths=kvl)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.double(), reference.cross_attention(q, k, v, kv_lengths=kvl)[0], **TOL[torch.float32])
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)  # inputs untouched
    # broadcast keys (stride 0 over the tokens)
    kb = torch.randn(2, 1, 2, 16, generator=g).to(device).expand(2, 30, 2, 16)
    torch.testing.assert_close(embedops.cross_attention(q, kb, v), embedops.cross_attention(q, kb.contiguous(), v))


def test_scale_and_return_lse(device):
    q, k, v, kvl, ql = _inputs((2, 5, 6, 2, 2, 8, 8), torch.float32, device, lengths=False)
    out = embedops.cross_attention(q, k, v, scale=0.3)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out.double(), reference.cross_attention(q, k, v, scale=0.3)[0], **TOL[torch.float32])
    d = embedops.cross_attention(q, k, v)
    torch.testing.assert_close(d, embedops.cross_attention(q, k, v, scale=1 / math.sqrt(8)))


def test_opcheck(device):
    # torch 2.14's FakeTensor conversion reads .grad of the saved (non-leaf) outputs inside
    # opcheck's aot_dispatch test and warns about it; that warning is torch's, not the op's.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
        _opcheck_all(device)


def _opcheck_all(device):
    q, k, v, kvl, ql = _inputs((2, 5, 7, 4, 2, 8, 6), torch.float32, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    opcheck(torch.ops.embedops.cross_attention.default, (q, k, v, kvl, ql, None))
    opcheck(torch.ops.embedops.cross_attention.default, (q, k, v, None, None, 0.5))
    cq = torch.tensor([0, 2, 5], device=device)
    ck = torch.tensor([0, 4, 7], device=device)
    qv, kv_, vv = q[0].detach().requires_grad_(), k[0].detach().requires_grad_(), v[0].detach().requires_grad_()
    opcheck(torch.ops.embedops.cross_attention_varlen.default, (qv, kv_, vv, cq, ck, 3, 4, None))
    with torch.no_grad():
        out, lse = torch.ops.embedops.cross_attention(q, k, v, kvl, ql, None)
    opcheck(torch.ops.embedops.cross_attention_backward.default,
            (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, None, kvl, ql, 0.35))
    with torch.no_grad():
        out, lse = torch.ops.embedops.cross_attention_varlen(qv, kv_, vv, cq, ck, 3, 4, None)
    opcheck(torch.ops.embedops.cross_attention_varlen_backward.default,
            (torch.randn_like(out), qv.detach(), kv_.detach(), vv.detach(), out, lse, torch.randn_like(lse), cq, ck,
             3, 4, 0.35))


def test_torch_compile_fullgraph(device):
    q, k, v, kvl, _ = _inputs((2, 6, 10, 4, 2, 8, 8), torch.float32, device)
    cq = torch.tensor([0, 2, 6], device=device)
    ck = torch.tensor([0, 3, 10], device=device)

    def fn(q, k, v, kvl):
        a = embedops.cross_attention(q, k, v, kv_lengths=kvl)
        b = embedops.cross_attention_varlen(q[0], k[0], v[0], cq, ck, 4, 7)
        return a.square().sum() + b.square().sum()

    eager_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    compiled_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    eager = fn(*eager_in, kvl)
    compiled = torch.compile(fn, fullgraph=True)(*compiled_in, kvl)
    torch.testing.assert_close(compiled, eager)
    eager.backward()
    compiled.backward()
    for a, b in zip(eager_in, compiled_in):
        torch.testing.assert_close(a.grad, b.grad)


def _bad_cases(device):
    f = dict(device=device)
    q = torch.randn(2, 3, 4, 8, **f)
    k = torch.randn(2, 5, 2, 8, **f)
    v = torch.randn(2, 5, 2, 6, **f)
    return [
        (dict(q=q[0]), ValueError, "q must have 4 dims"),
        (dict(k=k[0]), ValueError, "k must have 4 dims"),
        (dict(k=torch.randn(3, 5, 2, 8, **f)), ValueError, "the batch size B of q"),
        (dict(k=torch.randn(2, 5, 3, 8, **f), v=torch.randn(2, 5, 3, 6, **f)), ValueError, "multiple of"),
        (dict(k=torch.randn(2, 5, 2, 7, **f)), ValueError, "k's head dim"),
        (dict(v=torch.randn(2, 4, 2, 6, **f)), ValueError, "the key length Lk of k"),
        (dict(v=torch.randn(2, 5, 1, 6, **f)), ValueError, "key/value heads Hkv"),
        (dict(k=k.double()), TypeError, "k must have the dtype of q"),
        (dict(q=q.int(), k=k.int(), v=v.int()), TypeError, "q must be float32"),
        (dict(kv_lengths=torch.tensor([5, 6], **f)), ValueError, "kv_lengths[1] must be in [0, 5]"),
        (dict(kv_lengths=torch.tensor([-1, 2], **f)), ValueError, "kv_lengths[0] must be in [0, 5]"),
        (dict(kv_lengths=torch.tensor([5.0, 2.0], **f)), TypeError, "kv_lengths must be an integer tensor"),
        (dict(kv_lengths=torch.tensor([5], **f)), ValueError, "kv_lengths must have shape (B,)"),
        (dict(q_lengths=torch.tensor([4, 1], **f)), ValueError, "q_lengths[0] must be in [0, 3]"),
        (dict(scale="x"), TypeError, "scale must be a float"),
        (dict(scale=float("nan")), ValueError, "scale must be a finite number"),
        (dict(q=q.numpy() if device == "cpu" else None), TypeError, "q must be a torch.Tensor"),
        (dict(return_lse=1), TypeError, "return_lse must be a bool"),
    ], (q, k, v)


def test_bad_inputs(device):
    cases, (q, k, v) = _bad_cases(device)
    for change, exc, msg in cases:
        args = dict(q=q, k=k, v=v, kv_lengths=None, q_lengths=None, scale=None, return_lse=False)
        args.update(change)
        with pytest.raises(exc, match="cross_attention: .*" + re.escape(msg)):
            embedops.cross_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_bad_varlen_inputs(device):
    f = dict(device=device)
    q, k, v = torch.randn(6, 2, 8, **f), torch.randn(9, 1, 8, **f), torch.randn(9, 1, 4, **f)
    cq, ck = torch.tensor([0, 2, 6], **f), torch.tensor([0, 4, 9], **f)
    ok = dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=4, max_seqlen_k=5)
    assert embedops.cross_attention_varlen(**ok).shape == (6, 2, 4)
    bad = [
        (dict(cu_seqlens_q=torch.tensor([0, 4, 2, 6], **f), cu_seqlens_k=torch.tensor([0, 4, 4, 9], **f)),
         ValueError, "cu_seqlens_q must be non-decreasing"),
        (dict(cu_seqlens_k=torch.tensor([0, 4, 8], **f)), ValueError, "cu_seqlens_k must end at the number of tokens"),
        (dict(cu_seqlens_k=torch.tensor([1, 4, 9], **f)), ValueError, r"cu_seqlens_k\[0\] must be 0"),
        (dict(cu_seqlens_k=torch.tensor([0, 9], **f)), ValueError, "cu_seqlens_k must have the length of cu_seqlens_q"),
        (dict(cu_seqlens_q=cq.float()), TypeError, "cu_seqlens_q must be an integer tensor"),
        (dict(max_seqlen_q=3), ValueError, "max_seqlen_q"),
        (dict(max_seqlen_k=2.5), TypeError, "max_seqlen_k must be an int"),
        (dict(q=q[None]), ValueError, "q must have 3 dims"),
    ]
    for change, exc, msg in bad:
        args = dict(ok)
        args.update(change)
        with pytest.raises(exc, match="cross_attention_varlen: .*" + msg):
            embedops.cross_attention_varlen(**args)


def test_cross_attention_module(device):
    torch.manual_seed(0)
    m = embedops.nn.CrossAttention(32, 20, num_heads=4, num_kv_heads=2).to(device)
    x = torch.randn(3, 7, 32, device=device)
    ctx = torch.randn(3, 11, 20, device=device)
    kvl = torch.tensor([11, 5, 1], device=device)
    pad = torch.arange(11, device=device)[None, :] >= kvl[:, None]
    y = m(x, ctx, kv_lengths=kvl)
    assert y.shape == (3, 7, 32)
    torch.testing.assert_close(m(x, ctx, key_padding_mask=pad), y)
    # the same block written with plain PyTorch
    q = m.q_proj(x).view(3, 7, 4, 8)
    k = m.k_proj(ctx).view(3, 11, 2, 8)
    v = m.v_proj(ctx).view(3, 11, 2, 8)
    ref = m.out_proj(reference.cross_attention(q, k, v, kv_lengths=kvl, dtype=torch.float32)[0].reshape(3, 7, 32))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    with pytest.raises(ValueError, match="suffix"):
        m(x, ctx, key_padding_mask=~pad)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        embedops.nn.CrossAttention(32, 20, num_heads=4, num_kv_heads=3)


def test_backward_is_deterministic(device):
    q, k, v, kvl, ql = _inputs((2, 70, 90, 4, 1, 32, 32), torch.float32, device, seed=7)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    go = torch.randn(2, 70, 4, 32, generator=torch.Generator().manual_seed(8)).to(device)
    runs = [torch.autograd.grad(embedops.cross_attention(q, k, v, kv_lengths=kvl, q_lengths=ql), (q, k, v), go)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_head_dims(device, dtype):
    shape = (1, 9, 40, 2, 1, 256, 200)
    q, k, v, kvl, ql = _inputs(shape, dtype, device, seed=9)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = embedops.cross_attention(q, k, v, kv_lengths=kvl, q_lengths=ql)
    ref, _ = reference.cross_attention(q, k, v, kv_lengths=kvl, q_lengths=ql)
    low, _ = reference.cross_attention(q, k, v, kv_lengths=kvl, q_lengths=ql, dtype=dtype)
    _check_close(out.detach(), ref.detach(), low.detach(), dtype, "out")
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    if dtype == torch.float32:
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if device == "cuda":  # the CUDA kernels stop at 256
        big = torch.randn(1, 3, 1, 264, device=device)
        with pytest.raises(ValueError, match="head dims up to 256"):
            embedops.cross_attention(big, big, big)


def test_double_backward_raises(device):
    q, k, v, _, _ = _inputs((1, 3, 4, 1, 1, 4, 4), torch.float64, device, lengths=False)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    (gq,) = torch.autograd.grad(embedops.cross_attention(q, k, v).sum(), (q,), create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gq.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_core_forward_cuda(device, dtype, monkeypatch):
    """The opt-in wmma forward (EMBEDOPS_ATTN_TENSOR_CORES=1) against the reference; on the CPU
    the variable changes nothing."""
    monkeypatch.setenv("EMBEDOPS_ATTN_TENSOR_CORES", "1")
    for shape in [(2, 77, 300, 4, 2, 64, 64), (3, 130, 77, 2, 1, 128, 32), (1, 5, 1, 2, 2, 16, 16)]:
        q, k, v, kvl, ql = _inputs(shape, dtype, device, seed=11)
        kvl[-1] = 0
        out, lse = embedops.cross_attention(q, k, v, kv_lengths=kvl, q_lengths=ql, return_lse=True)
        ref, ref_lse = reference.cross_attention(q, k, v, kv_lengths=kvl, q_lengths=ql)
        low, _ = reference.cross_attention(q, k, v, kv_lengths=kvl, q_lengths=ql, dtype=dtype)
        _check_close(out, ref, low, dtype, f"out {shape}")
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        fin = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse.double()[fin], ref_lse[fin], atol=1e-2, rtol=1e-2)
