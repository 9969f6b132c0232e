"""int8 row-quantised tables (FBGEMM's fused row layout): quantize_table / dequantize_table, the
multiplexed_embedding_bag lookup over them against the float64 reference of the dequantised table,
QuantizedUnifiedEmbedding, fp16/bf16 tables, and the errors for bad tables."""

from __future__ import annotations

import pytest
import torch

import embedops
from embedops import reference
from embedops._ops import FusedEmbeddingBagUpdate
from embedops.nn import QuantizedUnifiedEmbedding, UnifiedEmbedding

from conftest import TOL, opcheck

OP = torch.ops.embedops.multiplexed_embedding_bag.default
BWD = torch.ops.embedops.multiplexed_embedding_bag_backward.default
UPD = torch.ops.embedops.multiplexed_embedding_bag_update.default

# The lookup reads the same values as dequantize_table(table, torch.float64) (exact); the only
# error is the float32 accumulation (and the float32 output).
INT8_TOL = dict(atol=1e-5, rtol=1e-5)


def make_table(num_rows, dim, *, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(num_rows, dim, generator=g) * torch.rand(num_rows, 1, generator=g) * 3
    w[0] = 0.25  # a constant row
    return embedops.quantize_table(w.to(device), "int8")


def make_bags(probes, batch, *, seed=0, max_len=5, index_dtype=torch.int64, device="cpu"):
    """Bags with an empty one, a repeated id, extreme and negative ids."""
    g = torch.Generator().manual_seed(seed)
    nf = len(probes)
    lengths = torch.randint(0, max_len + 1, (nf * batch,), generator=g)
    if lengths.numel() > 2:
        lengths[1] = 0
        lengths[2] = max(int(lengths[2]), 3)
    offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    n = int(offsets[-1])
    info = torch.iinfo(index_dtype)
    values = torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64)
    if n >= 6:
        values[:4] = torch.tensor([info.min, info.max, -1, 0])
        values[int(offsets[2]) + 1] = values[int(offsets[2])]
    psw = torch.rand(n, generator=g)
    return (values.to(index_dtype).to(device), offsets.to(index_dtype).to(device), psw.to(device))


def lookup(table, values, offsets, probes, **kw):
    return embedops.multiplexed_embedding_bag(table, values, offsets, num_probes=probes, **kw)


def reference_lookup(table, values, offsets, probes, **kw):
    if kw.get("per_sample_weights") is not None:
        kw["per_sample_weights"] = kw["per_sample_weights"].double().cpu()
    exact = embedops.dequantize_table(table.cpu(), torch.float64)
    return reference.multiplexed_embedding_bag(exact, values.cpu(), offsets.cpu(), probes, **kw)


def check(table, values, offsets, probes, **kw):
    out = lookup(table, values, offsets, probes, **kw)
    assert out.dtype == torch.float32 and out.device == table.device
    torch.testing.assert_close(out.double().cpu(), reference_lookup(table, values, offsets, probes, **kw),
                               **INT8_TOL)
    return out


# ---- quantize_table / dequantize_table --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_quantize_round_trip_within_half_a_step(device, dtype):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(300, 37, generator=g) * torch.logspace(-3, 2, 300)[:, None]).to(dtype).to(device)
    w[5] = -1.5  # constant rows: no division by zero, exact
    w[6] = 0.0
    before = w.clone()
    t = embedops.quantize_table(w, "int8")
    assert torch.equal(w, before)  # not modified
    assert t.dtype == torch.uint8 and t.shape == (300, 37 + 8) and t.device == w.device and t.is_contiguous()
    x = w.float()
    back = embedops.dequantize_table(t)
    assert back.dtype == torch.float32 and back.shape == (300, 37)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    scale = (hi - lo) / 255
    err = (back - x).abs()
    assert bool((err <= scale / 2 * (1 + 1e-4) + 1e-6 * x.abs() + 1e-30).all()), float((err / scale).max())
    assert torch.isfinite(back).all()
    assert torch.equal(back[5], x[5]) and torch.equal(back[6], x[6])


def test_quantize_layout_bytes():
    w = torch.tensor([[0.0, 1.0, 0.5, 2.0], [3.0, 3.0, 3.0, 3.0]])
    t = embedops.quantize_table(w, "int8")
    assert t[:, :4].tolist() == [[0, 128, 64, 255], [0, 0, 0, 0]]
    scale_bias = t[:, 4:].contiguous().view(torch.float32)  # little-endian float32 scale, bias
    assert scale_bias.tolist() == [[torch.tensor(2.0 / 255).item(), 0.0], [0.0, 3.0]]
    exact = embedops.dequantize_table(t, torch.float64)
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact[1], torch.full((4,), 3.0, dtype=torch.float64))
    assert embedops.dequantize_table(t, torch.bfloat16).dtype == torch.bfloat16


def test_quantize_matches_fbgemm_bytes():
    fbgemm_gpu = pytest.importorskip("fbgemm_gpu", exc_type=ImportError)  # noqa: F841
    g = torch.Generator().manual_seed(2)
    w = torch.randn(500, 64, generator=g) * torch.rand(500, 1, generator=g)
    w[3] = 7.0
    theirs = torch.ops.fbgemm.FloatToFused8BitRowwiseQuantized(w)
    assert torch.equal(embedops.quantize_table(w, "int8"), theirs)


def test_quantize_bad_input():
    with pytest.raises(ValueError, match="quantize_table: precision must be 'int8'"):
        embedops.quantize_table(torch.randn(3, 4), "int4")
    with pytest.raises(TypeError, match="quantize_table: weight must be float32"):
        embedops.quantize_table(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="quantize_table: weight must be a torch.Tensor"):
        embedops.quantize_table([[1.0]])
    with pytest.raises(ValueError, match="quantize_table: weight must have 2 dims"):
        embedops.quantize_table(torch.randn(4))
    with pytest.raises(ValueError, match="quantize_table: weight must be finite"):
        embedops.quantize_table(torch.tensor([[1.0, float("nan")]]))
    assert embedops.quantize_table(torch.randn(0, 5)).shape == (0, 13)
    with pytest.raises(TypeError, match="dequantize_table: table must be a uint8"):
        embedops.dequantize_table(torch.randn(3, 12))
    with pytest.raises(ValueError, match="dequantize_table: table must have 2 dims .* more than 8 columns"):
        embedops.dequantize_table(torch.zeros(3, 8, dtype=torch.uint8))


# ---- the lookup ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("combine", ["concat", "sum", "mean"])
@pytest.mark.parametrize("dim", [12, 16, 64, 128, 5])
def test_lookup_matches_reference(device, mode, combine, dim):
    probes = [2, 1, 3]
    table = make_table(97, dim, device=device)
    values, offsets, psw = make_bags(probes, 7, device=device)
    kw = dict(combine=combine, mode=mode, seed=11)
    out = check(table, values, offsets, probes, **kw)
    assert out.shape == (7, (6 if combine == "concat" else 3) * dim)
    if mode == "sum":
        check(table, values, offsets, probes, per_sample_weights=psw, **kw)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dim", [32, 24])
def test_lookup_int32_ids_and_collisions(device, index_dtype, dim):
    # 3 rows: nearly every id of a bag collides with another, and probes collide with each other
    table = make_table(3, dim, seed=4, device=device)
    values, offsets, psw = make_bags([2, 2], 9, seed=5, max_len=8, index_dtype=index_dtype, device=device)
    check(table, values, offsets, [2, 2], per_sample_weights=psw, seed=-7)
    check(table, values, offsets, [2, 2], mode="max")


@pytest.mark.parametrize("dim", [64, 20])
@pytest.mark.parametrize("mode", ["sum", "max"])
def test_lookup_long_bags(device, dim, mode):
    # a bag longer than a hash block (2048 rows) is reduced in chunks
    g = torch.Generator().manual_seed(6)
    table = make_table(5000, dim, seed=6, device=device)
    lengths = torch.tensor([5000, 3, 0, 2100, 7, 1])
    offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device)
    values = torch.randint(-(2**62), 2**62, (int(lengths.sum()),), generator=g).to(device)
    psw = torch.rand(values.numel(), generator=g).to(device) if mode == "sum" else None
    kw = dict(mode=mode, per_sample_weights=psw, seed=1)
    got = lookup(table, values, offsets, [2, 1], **kw)
    want = reference_lookup(table, values, offsets, [2, 1], **kw)
    # 5000-term float32 sums: the bound is the float op's own error on the same values in float32
    flt = lookup(embedops.dequantize_table(table, torch.float64).float(), values, offsets, [2, 1], **kw)
    err = (got.double().cpu() - want).abs().max().item()
    float_err = (flt.double().cpu() - want).abs().max().item()
    assert err <= 3 * float_err + 1e-5, (err, float_err)


def test_lookup_empty_bags_and_empty_batch(device):
    table = make_table(50, 16, device=device)
    values = torch.arange(4, device=device)
    offsets = torch.tensor([0, 0, 0, 4, 4], device=device)
    for mode in ("sum", "mean", "max"):
        out = check(table, values, offsets, [1, 1], mode=mode)
        assert torch.equal(out[:, :16], torch.zeros(2, 16, device=device))  # feature 0: both bags empty
        assert torch.equal(out[1, 16:], torch.zeros(16, device=device))
    out = lookup(table, values[:0], torch.tensor([0], device=device), [1, 2])
    assert out.shape == (0, 48) and out.dtype == torch.float32


def test_lookup_big_output_at_every_fixed_dim(device):
    # outputs >= 16 MB may be written with streaming stores (fixed D)
    table = make_table(1 << 12, 64, seed=7, device=device)
    values, offsets, _ = make_bags([1] * 8, 8300, seed=8, max_len=3, device=device)
    out = check(table, values, offsets, [1] * 8)
    out2 = check(table, values, offsets, [1] * 8)  # the allocator's pages are resident now
    assert torch.equal(out, out2)


def test_lookup_inputs_not_modified_and_noncontiguous_ids(device):
    table = make_table(40, 16, device=device)
    values, offsets, psw = make_bags([1], 6, device=device)
    wide = torch.stack([values, values], 1)[:, 0]  # non-contiguous ids are fine
    keep = (table.clone(), values.clone(), psw.clone())
    check(table, wide, offsets, [1], per_sample_weights=psw)
    assert torch.equal(table, keep[0]) and torch.equal(values, keep[1]) and torch.equal(psw, keep[2])


def test_lookup_equals_float_lookup_of_dequantised_table(device):
    # the int8 table gives the float op's answer on its float32 dequantisation (to fp32 rounding)
    table = make_table(300, 64, seed=9, device=device)
    values, offsets, psw = make_bags([2, 1], 33, seed=9, device=device)
    a = lookup(table, values, offsets, [2, 1], per_sample_weights=psw, seed=2)
    b = lookup(embedops.dequantize_table(table), values, offsets, [2, 1], per_sample_weights=psw, seed=2)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_fp16_bf16_tables(device, dtype, mode):
    g = torch.Generator().manual_seed(10)
    w = torch.randn(80, 64, generator=g).to(dtype).to(device)
    values, offsets, psw = make_bags([2, 1], 9, seed=10, device=device)
    kw = dict(mode=mode, per_sample_weights=psw.to(dtype) if mode == "sum" else None, seed=3)
    out = embedops.multiplexed_embedding_bag(w, values, offsets, num_probes=[2, 1], **kw)
    assert out.dtype == dtype
    want = reference.multiplexed_embedding_bag(w.double().cpu(), values.cpu(), offsets.cpu(), [2, 1],
                                               mode=mode, seed=3, per_sample_weights=None if kw["per_sample_weights"]
                                               is None else kw["per_sample_weights"].double().cpu())
    torch.testing.assert_close(out.double().cpu(), want, **TOL[dtype])


# ---- errors -------------------------------------------------------------------------------------------


def test_bad_tables(device):
    values, offsets, psw = make_bags([1], 3, device=device)
    good = make_table(10, 4, device=device)
    with pytest.raises(TypeError, match="multiplexed_embedding_bag: weight must be float32, float16, bfloat16 or "
                                        "float64 \\(a float table\\), or uint8 \\(an int8 row-quantised .* got Char"):
        lookup(good.to(torch.int8), values, offsets, [1])
    with pytest.raises(ValueError, match="multiplexed_embedding_bag: weight must have 2 dims \\(num_rows, dim \\+ 8\\)"):
        lookup(good.flatten(), values, offsets, [1])
    for cols in (8, 3):
        with pytest.raises(ValueError, match="weight is a uint8 row-quantised table .* needs more than 8 columns, got "
                                             f"shape \\[10, {cols}\\]"):
            lookup(good[:, :cols].contiguous(), values, offsets, [1])
    with pytest.raises(ValueError, match="weight \\(a uint8 row-quantised table\\) must be contiguous"):
        lookup(torch.cat([good, good], 1)[:, :12], values, offsets, [1])
    with pytest.raises(ValueError, match="weight must have num_rows > 0 rows"):
        lookup(good[:0], values, offsets, [1])
    with pytest.raises(TypeError, match="per_sample_weights must be float32 \\(the output's dtype\\) with a uint8"):
        lookup(good, values, offsets, [1], per_sample_weights=psw.double())
    with pytest.raises(ValueError, match="per_sample_weights is only supported with mode=\"sum\""):
        lookup(good, values, offsets, [1], per_sample_weights=psw, mode="mean")
    with pytest.raises(ValueError, match="offsets\\[0\\] must be 0"):
        lookup(good, values, offsets + 1, [1])


def test_quantised_table_has_no_backward(device):
    table = make_table(10, 4, device=device)
    values, offsets, psw = make_bags([1], 3, device=device)
    out, argmax = OP(table, values, offsets, [1], "concat", "max", None, 0, True)
    assert argmax.shape == (0,)  # no argmax: nothing to route a gradient to
    g = torch.ones_like(out)
    msg = "{}: weight is a uint8 row-quantised table, which is for inference only"
    with pytest.raises(TypeError, match=msg.format("multiplexed_embedding_bag_backward")):
        BWD(g, table, values, offsets, argmax, [1], "concat", "sum", None, 0, True, False)
    with pytest.raises(TypeError, match=msg.format("multiplexed_embedding_bag_update")):
        UPD(table, torch.zeros(10, device=device), g, values, offsets, argmax, [1], "concat", "sum", None, 0,
            "sgd", 0.1, 0.0)
    cfg = ([1], "concat", "sum", 0, True, "sgd", 0.1, 0.0)
    with pytest.raises(TypeError, match="FusedEmbeddingBagUpdate: weight is a uint8 row-quantised table"):
        FusedEmbeddingBagUpdate.apply(table, torch.zeros(0, device=device), values, offsets, None, cfg)
    # per_sample_weights that require grad: the forward works, the backward refuses clearly
    p = psw.clone().requires_grad_()
    out = lookup(table, values, offsets, [1], per_sample_weights=p)
    with pytest.raises(TypeError, match=msg.format("multiplexed_embedding_bag_backward")):
        out.sum().backward()
    assert torch.equal(table, make_table(10, 4, device=device))


# ---- fake / opcheck / torch.compile ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_opcheck(device, mode):
    table = make_table(9, 16, seed=3, device=device)
    values, offsets, psw = make_bags([2, 1], 4, seed=3, max_len=3, device=device)
    opcheck(OP, (table, values, offsets, [2, 1], "concat", mode, psw if mode == "sum" else None, 3, True))
    opcheck(OP, (make_table(9, 5, device=device), values.int(), offsets, [2, 1], "mean", mode, None, 0, False))


def test_torch_compile_fullgraph(device):
    table = make_table(60, 16, seed=4, device=device)
    values, offsets, psw = make_bags([2, 1], 5, seed=4, device=device)

    def f(t, p):
        out = embedops.multiplexed_embedding_bag(t, values, offsets, num_probes=[2, 1], combine="sum",
                                                 per_sample_weights=p)
        return out * 2

    compiled = torch.compile(f, fullgraph=True)
    a = compiled(table, psw)
    assert a.dtype == torch.float32 and a.shape == (5, 32)
    torch.testing.assert_close(a, f(table, psw))


# ---- QuantizedUnifiedEmbedding -----------------------------------------------------------------------


def _module_inputs(device, batch=6):
    g = torch.Generator().manual_seed(12)
    x = {}
    for name in ("user", "item", "ctx"):
        lengths = torch.randint(0, 5, (batch,), generator=g)
        x[name] = {"values": torch.randint(-(2**40), 2**40, (int(lengths.sum()),), generator=g).to(device),
                   "lengths": lengths.to(device)}
    psw = {name: torch.rand(int(x[name]["lengths"].sum()), generator=g).to(device) for name in x}
    return x, psw


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("combine", ["concat", "mean"])
def test_quantized_module_matches_module_on_dequantised_table(device, mode, combine):
    ue = UnifiedEmbedding(200, 32, {"user": 2, "item": 1, "ctx": 3}, combine=combine, mode=mode, seed=5,
                          device=device)
    q = ue.quantized("int8")
    assert isinstance(q, QuantizedUnifiedEmbedding)
    assert list(q.parameters()) == [] and q.weight.dtype == torch.uint8 and q.weight.shape == (200, 40)
    assert q.out_dim == ue.out_dim and q.num_probes == ue.num_probes
    x, psw = _module_inputs(device)
    with torch.no_grad():
        ue.weight.copy_(embedops.dequantize_table(q.weight))
    kw = {"per_sample_weights": psw} if mode == "sum" else {}
    got, want = q(x, **kw), ue(x, **kw)
    assert not got.requires_grad and got.dtype == torch.float32
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    # the flat (values, offsets) form
    flat_v = torch.cat([x[n]["values"] for n in x])
    flat_o = embedops.lengths_to_offsets(torch.cat([x[n]["lengths"] for n in x]))
    torch.testing.assert_close(q((flat_v, flat_o)), ue((flat_v, flat_o)).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision", ["int8", "fp16", "bf16"])
def test_quantized_module_precisions_and_state_dict(device, precision):
    ue = UnifiedEmbedding(150, 16, {"user": 2, "item": 1, "ctx": 1}, seed=3, device=device)
    before = ue.weight.detach().clone()
    q = ue.quantized(precision)
    assert torch.equal(ue.weight, before)  # the source module is not modified
    x, psw = _module_inputs(device)
    want = ue(x, per_sample_weights=psw).detach()
    got = q(x, per_sample_weights=psw)
    assert got.dtype == torch.float32
    # int8: each element within half a step of its row, scaled by the bag's weights
    tol = {"int8": 0.05, "fp16": 2e-3, "bf16": 2e-2}[precision]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    sd = q.state_dict()
    assert set(sd) == {"weight"}
    fresh = QuantizedUnifiedEmbedding(150, 16, {"user": 2, "item": 1, "ctx": 1}, seed=3, precision=precision,
                                      device=device)
    assert not torch.equal(fresh(x, per_sample_weights=psw), got)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x, per_sample_weights=psw), got)


def test_quantized_module_bad_config():
    with pytest.raises(ValueError, match="QuantizedUnifiedEmbedding: precision must be 'int8', 'fp16' or 'bf16'"):
        UnifiedEmbedding(10, 4, {"a": 1}).quantized("int4")
    with pytest.raises(ValueError, match="QuantizedUnifiedEmbedding: weight must have shape"):
        QuantizedUnifiedEmbedding(10, 4, {"a": 1}, weight=torch.randn(10, 5))
    with pytest.raises(ValueError, match="mode must be"):
        QuantizedUnifiedEmbedding(10, 4, {"a": 1}, mode="median")
    with pytest.raises(ValueError, match="input features must be exactly"):
        QuantizedUnifiedEmbedding(10, 4, {"a": 1})({"b": (torch.arange(2), torch.tensor([0, 2]))})
