"""multiplexed_embedding_bag: forward, backward, fused optimizer, module, errors vs the float64 reference."""

from __future__ import annotations


import pytest
import torch

import embedops
from embedops import reference
from embedops.nn import UnifiedEmbedding

from conftest import CUDA_OK, FLOAT_DTYPES, TOL, _CUDA_SKIP
from conftest import opcheck

MODES = ["sum", "mean", "max"]
COMBINES = ["concat", "sum", "mean"]
OP = torch.ops.embedops.multiplexed_embedding_bag.default
BWD = torch.ops.embedops.multiplexed_embedding_bag_backward.default
UPD = torch.ops.embedops.multiplexed_embedding_bag_update.default


def make_bags(probes, batch, *, num_rows=97, dim=12, dtype=torch.float32, index_dtype=torch.int64, device="cpu",
              seed=0, max_len=5):
    """Random bags with empty ones, repeated ids in a bag, negative and extreme ids."""
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
        start = int(offsets[2])
        values[start + 1] = values[start]  # a repeated id inside one bag
    weight = torch.randn(num_rows, dim, generator=g, dtype=torch.float64).to(dtype)
    return (weight.to(device), values.to(index_dtype).to(device), offsets.to(index_dtype).to(device),
            torch.rand(n, generator=g, dtype=torch.float64).to(dtype).to(device))


def run(weight, values, offsets, probes, **kw):
    return embedops.multiplexed_embedding_bag(weight, values, offsets, num_probes=probes, **kw)


def ref(weight, values, offsets, probes, **kw):
    return reference.multiplexed_embedding_bag(weight, values, offsets, probes, **kw)


def check_forward(weight, values, offsets, probes, tol, **kw):
    """The op's output against the float64 reference on the same bags; returns the output."""
    out = run(weight, values, offsets, probes, **kw)
    ref_kw = dict(kw)
    if ref_kw.get("per_sample_weights") is not None:
        ref_kw["per_sample_weights"] = ref_kw["per_sample_weights"].double().cpu()
    want = ref(weight.double().cpu(), values.cpu(), offsets.cpu(), probes, **ref_kw)
    torch.testing.assert_close(out.double().cpu(), want, **tol)
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_forward_matches_reference(device, mode, combine, dtype, index_dtype):
    probes = [2, 1, 3]
    w, v, o, psw = make_bags(probes, 7, dtype=dtype, index_dtype=index_dtype, device=device)
    kw = dict(combine=combine, mode=mode, seed=11)
    if mode == "sum":
        kw["per_sample_weights"] = psw
    out = check_forward(w, v, o, probes, TOL[dtype], **kw)
    assert out.dtype == dtype and out.device.type == device
    assert out.shape == (7, (6 if combine == "concat" else 3) * 12)


@pytest.mark.parametrize("dim", [16, 32, 64, 128])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_forward_vector_widths(device, dim, mode, dtype, index_dtype):
    # the CPU kernel has register-accumulator variants for these widths (their ids hashed through a
    # pointer to the index type's hash_rows_block)
    probes = [1, 3]
    w, v, o, psw = make_bags(probes, 9, num_rows=50, dim=dim, dtype=dtype, index_dtype=index_dtype, device=device,
                             seed=dim, max_len=25)
    for combine in COMBINES:
        kw = dict(combine=combine, mode=mode, seed=4)
        if mode == "sum":
            kw["per_sample_weights"] = psw
        check_forward(w, v, o, probes, TOL[dtype], **kw)


@pytest.mark.parametrize("dim", [16, 64])
def test_forward_long_bags(device, dim):
    # bags with more (id, probe) rows than the CPU kernel's hash block (2048) are reduced in chunks
    probes = [3, 1]
    g = torch.Generator().manual_seed(dim)
    lengths = torch.tensor([1500, 0, 3, 2049, 700, 5000, 1, 0])  # F=2 features x B=4 bags
    offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device)
    values = torch.randint(-(2**62), 2**62, (int(lengths.sum()),), generator=g).to(device)
    w = torch.randn(300, dim, generator=g, dtype=torch.float64).float().to(device)
    psw = torch.rand(values.numel(), generator=g, dtype=torch.float64).float().to(device)
    for mode, combine in [("sum", "concat"), ("mean", "sum"), ("sum", "mean")]:
        kw = dict(combine=combine, mode=mode, seed=2)
        if mode == "sum":
            kw["per_sample_weights"] = psw
        check_forward(w, values, offsets, probes, dict(rtol=1e-5, atol=1e-4), **kw)


def test_forward_big_output(device):
    # a >= 16 MB output: the CPU kernel may write it with streaming stores (when its pages are
    # already mapped, as for memory the allocator reuses: hence several calls)
    probes = [1] * 64
    w, v, o, _ = make_bags(probes, 4096, num_rows=1000, dim=16, device=device, seed=5, max_len=2)
    want = ref(w.double().cpu(), v.cpu(), o.cpu(), probes, seed=6)
    assert want.numel() * 4 >= 16 << 20
    first = None
    for _ in range(3):
        out = run(w, v, o, probes, seed=6)
        torch.testing.assert_close(out.double().cpu(), want, **TOL[torch.float32])
        if first is None:
            first = out.clone()
        assert torch.equal(out, first)
        del out


def test_empty_bags_give_zeros_and_empty_batch(device):
    w = torch.randn(10, 4, device=device)
    v = torch.tensor([5, 6], device=device)
    o = torch.tensor([0, 0, 2, 2], device=device)  # 3 bags: empty, 2 ids, empty
    for mode in MODES:
        out = run(w, v, o, [1], mode=mode, num_features=None)
        assert out.shape == (3, 4)
        assert torch.all(out[0] == 0) and torch.all(out[2] == 0)
    out = run(w, v[:0], torch.zeros(1, dtype=torch.int64, device=device), [2, 1])
    assert out.shape == (0, 12)
    # all bags empty: zeros, and a zero gradient
    wg = w.clone().requires_grad_()
    out = run(wg, v[:0], torch.zeros(5, dtype=torch.int64, device=device), [1, 3], mode="max")
    assert out.shape == (2, 16) and torch.all(out == 0)
    out.sum().backward()
    assert torch.all(wg.grad == 0)


def test_single_row_table(device):
    w = torch.randn(1, 5, dtype=torch.float64, device=device)
    v = torch.tensor([3, -9, 2**40], device=device)
    o = torch.tensor([0, 1, 3], device=device)
    out = run(w, v, o, 2, num_features=1, combine="concat")
    torch.testing.assert_close(out, torch.stack([torch.cat([w[0], w[0]]), torch.cat([2 * w[0], 2 * w[0]])]))


def test_lengths_form_and_int_num_probes(device):
    w, v, o, _ = make_bags([2, 2, 2], 5, device=device)
    a = run(w, v, o, [2, 2, 2], mode="mean")
    b = embedops.multiplexed_embedding_bag(w, v, lengths=o.diff(), num_probes=2, num_features=3, mode="mean")
    assert torch.equal(a, b)


def test_int32_values_hash_like_int64(device):
    w, v, o, _ = make_bags([1, 2], 6, index_dtype=torch.int32, device=device)
    assert torch.equal(run(w, v, o, [1, 2]), run(w, v.long(), o.long(), [1, 2]))


def test_noncontiguous_inputs_and_not_modified(device):
    w, v, o, psw = make_bags([2, 1], 4, dtype=torch.float64, device=device)
    wt = w.t().contiguous().t()  # same values, column-major
    v2 = torch.stack([v, v], 1)[:, 0]
    before = (w.clone(), v.clone(), o.clone(), psw.clone())
    out = run(wt, v2, o, [2, 1], per_sample_weights=psw)
    assert torch.equal(out, run(w, v, o, [2, 1], per_sample_weights=psw))
    for a, b in zip((w, v, o, psw), before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_backward_matches_reference(device, mode, combine, dtype):
    probes = [2, 3]
    w, v, o, psw = make_bags(probes, 6, num_rows=13, dtype=dtype, device=device, seed=1)
    w.requires_grad_()
    psw.requires_grad_()
    kw = dict(combine=combine, mode=mode, seed=2)
    if mode == "sum":
        kw["per_sample_weights"] = psw
    out = run(w, v, o, probes, **kw)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out.backward(gout.to(dtype).to(device))
    w64 = w.detach().double().cpu().requires_grad_()
    ref_kw = dict(kw)
    if mode == "sum":
        p64 = psw.detach().double().cpu().requires_grad_()
        ref_kw["per_sample_weights"] = p64
    want = ref(w64, v.cpu(), o.cpu(), probes, **ref_kw)
    want.backward(gout.to(dtype).double())
    tol = dict(TOL[dtype])
    if dtype == torch.bfloat16:
        tol = dict(atol=3e-2, rtol=3e-2)  # a bf16 grad row sums several bf16 products
    torch.testing.assert_close(w.grad.double().cpu(), w64.grad, **tol)
    if mode == "sum":
        torch.testing.assert_close(psw.grad.double().cpu(), p64.grad, **tol)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(device, mode):
    probes = [2, 1]
    w, v, o, psw = make_bags(probes, 3, num_rows=7, dim=3, dtype=torch.float64, device=device, seed=3, max_len=3)
    w.requires_grad_()
    if mode == "sum":
        psw.requires_grad_()
        f = lambda w_, p_: run(w_, v, o, probes, mode=mode, combine="mean", per_sample_weights=p_)  # noqa: E731
        assert torch.autograd.gradcheck(f, (w, psw))
    else:
        # max: perturbations must not flip the argmax; the random table has no near-ties
        f = lambda w_: run(w_, v, o, probes, mode=mode, combine="concat")  # noqa: E731
        assert torch.autograd.gradcheck(f, (w,), eps=1e-7)


def test_backward_deterministic(device):
    probes = [2, 1, 2]
    w, v, o, psw = make_bags(probes, 400, num_rows=50, dim=16, device=device, seed=4, max_len=20)
    # Zipf-like hot ids: many contributions per row
    v = (v.abs() % 30).to(v.dtype)
    grads = []
    threads = torch.get_num_threads()
    try:
        for nt in (threads, 1, threads):
            torch.set_num_threads(nt)
            for mode in ("sum", "max"):
                wg = w.clone().requires_grad_()
                out = run(wg, v, o, probes, mode=mode, per_sample_weights=psw if mode == "sum" else None)
                out.backward(torch.ones_like(out) / 3)
                grads.append(wg.grad)
    finally:
        torch.set_num_threads(threads)
    for i in range(2, len(grads)):
        assert torch.equal(grads[i], grads[i % 2]), "gradient bits changed between runs"


def _dense_grad(w, v, o, probes, gout, **kw):
    wg = w.detach().clone().requires_grad_()
    run(wg, v, o, probes, **kw).backward(gout)
    return wg.grad


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("mode", MODES)
def test_fused_update_equals_dense_grad_plus_textbook_step(device, optimizer, mode):
    probes = [1, 2]
    w, v, o, psw = make_bags(probes, 8, num_rows=11, dim=6, dtype=torch.float64, device=device, seed=6)
    kw = dict(combine="sum", mode=mode, seed=1)
    if mode == "sum":
        kw["per_sample_weights"] = psw
    gout = torch.randn(8, 12, dtype=torch.float64, device=device)
    lr, eps = 0.3, 1e-6
    state0 = torch.rand(11, dtype=torch.float64, device=device)
    # textbook: dense gradient, then the update on rows with a nonzero gradient
    g = _dense_grad(w, v, o, probes, gout, **kw)
    touched = (g != 0).any(1)
    want_w, want_s = w.clone(), state0.clone()
    if optimizer == "sgd":
        want_w -= lr * g
    else:
        want_s[touched] += (g[touched] ** 2).mean(1)
        want_w[touched] -= lr * g[touched] / (want_s[touched].sqrt() + eps)[:, None]
    got_w, got_s = w.clone(), state0.clone()
    _, argmax = OP(got_w, v, o, probes, kw["combine"], mode, kw.get("per_sample_weights"), 1, True)
    UPD(got_w, got_s, gout, v, o, argmax, probes, kw["combine"], mode, kw.get("per_sample_weights"), 1, optimizer,
        lr, eps)
    torch.testing.assert_close(got_w, want_w, **TOL[torch.float64])
    if optimizer == "rowwise_adagrad":
        torch.testing.assert_close(got_s, want_s, **TOL[torch.float64])


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_module_fused_matches_dense_module(device, optimizer):
    feats = {"user": 2, "item": 1, "ctx": 3}
    torch.manual_seed(0)
    dense = UnifiedEmbedding(64, 8, feats, combine="concat", mode="sum", seed=5, device=device)
    fused = UnifiedEmbedding(64, 8, feats, combine="concat", mode="sum", seed=5, optimizer=optimizer, lr=0.1,
                             eps=1e-8, device=device)
    fused.weight.data.copy_(dense.weight.data)
    opt = torch.optim.SGD(dense.parameters(), lr=0.1) if optimizer == "sgd" else None
    state = torch.zeros(64, device=device)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x = {}
        for name in feats:
            lengths = torch.randint(0, 4, (5,), generator=g)
            x[name] = (torch.randint(0, 40, (int(lengths.sum()),), generator=g).to(device),
                       torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device))
        target = torch.randn(5, fused.out_dim, generator=g).to(device)
        loss = ((dense(x) - target) ** 2).sum()
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            dense.weight.grad = None
            loss.backward()
            with torch.no_grad():
                gr = dense.weight.grad
                touched = (gr != 0).any(1)
                state[touched] += (gr[touched] ** 2).mean(1)
                dense.weight[touched] -= 0.1 * gr[touched] / (state[touched].sqrt() + 1e-8)[:, None]
        ((fused(x) - target) ** 2).sum().backward()
        assert fused.weight.grad is None
        torch.testing.assert_close(fused.weight.data, dense.weight.data, atol=1e-5, rtol=1e-5)
    if optimizer == "rowwise_adagrad":
        sd = fused.state_dict()
        assert "momentum" in sd and sd["momentum"].shape == (64,)
        torch.testing.assert_close(sd["momentum"], state, atol=1e-5, rtol=1e-5)
        clone = UnifiedEmbedding(64, 8, feats, optimizer=optimizer, seed=5, device=device)
        clone.load_state_dict(sd)
        assert torch.equal(clone.momentum, fused.momentum)


def test_module_input_forms(device):
    feats = {"a": 1, "b": 2}
    m = UnifiedEmbedding(100, 4, feats, combine="mean", mode="mean", device=device)
    va, oa = torch.tensor([1, 2, 3], device=device), torch.tensor([0, 2, 3], device=device)
    vb, ob = torch.tensor([7, -8], device=device, dtype=torch.int32), torch.tensor([0, 0, 2], device=device)
    out = m({"b": (vb, ob), "a": (va, oa)})
    assert out.shape == (2, 8)
    flat_v = torch.cat([va, vb.long()])
    flat_o = torch.tensor([0, 2, 3, 3, 5], device=device)
    assert torch.equal(out, m((flat_v, flat_o)))
    assert torch.equal(out, m({"a": {"values": va, "lengths": oa.diff()}, "b": {"values": vb, "offsets": ob}}))
    assert torch.equal(out, m({"values": flat_v, "lengths": flat_o.diff()}))
    want = ref(m.weight.detach().double().cpu(), flat_v.cpu(), flat_o.cpu(), [1, 2], combine="mean", mode="mean",
               seed=0)
    torch.testing.assert_close(out.double().cpu(), want, **TOL[torch.float32])
    with pytest.raises(ValueError, match="UnifiedEmbedding: input features must be exactly"):
        m({"a": (va, oa)})
    with pytest.raises(ValueError, match="UnifiedEmbedding: features\\['b'\\] has batch size 1"):
        m({"a": (va, oa), "b": (vb, ob[1:])})
    with pytest.raises(ValueError, match="offsets must start at 0"):
        m({"a": (va, oa + 1), "b": (vb, ob)})


def test_module_bad_config():
    with pytest.raises(ValueError, match="UnifiedEmbedding: num_rows must be > 0"):
        UnifiedEmbedding(0, 4, {"a": 1})
    with pytest.raises(ValueError, match="UnifiedEmbedding: dim must be > 0"):
        UnifiedEmbedding(10, -1, {"a": 1})
    with pytest.raises(ValueError, match="features\\['a'\\] \\(probe count\\) must be > 0"):
        UnifiedEmbedding(10, 4, {"a": 0})
    with pytest.raises(ValueError, match="optimizer must be"):
        UnifiedEmbedding(10, 4, {"a": 1}, optimizer="adam")


def test_bad_input(device):
    w = torch.randn(10, 4, device=device)
    v = torch.tensor([1, 2, 3], device=device)
    o = torch.tensor([0, 1, 3], device=device)
    cases = [
        (dict(offsets=torch.tensor([0, 1], device=device), num_probes=[1, 1]), ValueError,
         "offsets must have F\\*B \\+ 1 entries with F = len\\(num_probes\\) = 2"),
        (dict(offsets=torch.tensor([1, 1, 3], device=device)), ValueError, "offsets\\[0\\] must be 0, got 1"),
        (dict(offsets=torch.tensor([0, 2, 1, 3], device=device)), ValueError, "offsets must be non-decreasing"),
        (dict(offsets=torch.tensor([0, 1, 4], device=device)), IndexError, "offsets\\[-1\\] = 4 points past"),
        (dict(offsets=o.float()), TypeError, "offsets must be an integer tensor"),
        (dict(values=v.float()), TypeError, "values must be an integer tensor"),
        (dict(values=v.reshape(1, 3)), ValueError, "values must have 1 dims"),
        (dict(weight=w[0]), ValueError, "weight must have 2 dims"),
        (dict(weight=w.long()), TypeError, "weight must be float32"),
        (dict(weight=w[:0]), ValueError, "weight must have num_rows > 0"),
        (dict(weight=w[:, :0]), ValueError, "weight must have dim > 0"),
        (dict(num_probes=0), ValueError, "num_probes\\[0\\] .* must be > 0, got 0"),
        (dict(num_probes=[]), ValueError, "num_probes must not be empty"),
        (dict(mode="min"), ValueError, 'mode must be "sum", "mean" or "max", got "min"'),
        (dict(combine="stack"), ValueError, 'combine must be "concat", "sum" or "mean", got "stack"'),
        (dict(mode="mean", per_sample_weights=torch.ones(3, device=device)), ValueError,
         'per_sample_weights is only supported with mode="sum", got mode="mean"'),
        (dict(per_sample_weights=torch.ones(2, device=device)), ValueError,
         "per_sample_weights.size\\(0\\) must equal the number of values N \\(3\\), got 2"),
        (dict(per_sample_weights=torch.ones(3, device=device, dtype=torch.float64)), TypeError,
         "per_sample_weights must have the dtype of weight"),
        (dict(offsets=None, lengths=torch.tensor([1, -1, 3], device=device)), ValueError, "lengths must be >= 0"),
        (dict(offsets=None), ValueError, "give exactly one of offsets and lengths"),
    ]
    for kw, exc, msg in cases:
        args = dict(weight=w, values=v, offsets=o, num_probes=1)
        args.update(kw)
        with pytest.raises(exc, match="multiplexed_embedding_bag: " + msg):
            embedops.multiplexed_embedding_bag(args.pop("weight"), args.pop("values"), **args)
    # the op itself (no Python wrapper) checks too
    with pytest.raises(ValueError, match="multiplexed_embedding_bag: num_probes\\[1\\] .* must be > 0, got -2"):
        OP(w, v, o, [1, -2], "concat", "sum", None, 0, True)
    with pytest.raises(ValueError, match="multiplexed_embedding_bag: mode must be"):
        OP(w, v, o, [1], "concat", "median", None, 0, True)
    with pytest.raises(ValueError, match="multiplexed_embedding_bag: per_sample_weights is only supported"):
        OP(w, v, o, [1], "concat", "max", torch.ones(3, device=device), 0, True)
    with pytest.raises(ValueError, match="multiplexed_embedding_bag_update: optimizer must be"):
        UPD(w, torch.zeros(10, device=device), torch.ones(2, 4, device=device), v, o, torch.empty(0, dtype=torch.long),
            [1], "concat", "sum", None, 0, "adam", 0.1, 0.0)
    with pytest.raises(ValueError, match="multiplexed_embedding_bag_update: state must be a contiguous \\(num_rows,\\)"):
        UPD(w, torch.zeros(9, device=device), torch.ones(2, 4, device=device), v, o, torch.empty(0, dtype=torch.long),
            [1], "concat", "sum", None, 0, "rowwise_adagrad", 0.1, 0.0)
    with pytest.raises(ValueError, match="multiplexed_embedding_bag_backward: grad_out.size\\(1\\) must equal"):
        BWD(torch.ones(2, 5, device=device), w, v, o, torch.empty(0, dtype=torch.long), [1], "concat", "sum", None,
            0, True, False)


def _opcheck_args(device, mode, dtype=torch.float64):
    probes = [2, 1]
    w, v, o, psw = make_bags(probes, 4, num_rows=9, dim=3, dtype=dtype, device=device, seed=8, max_len=3)
    return w, v, o, probes, psw if mode == "sum" else None


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(device, mode):
    w, v, o, probes, psw = _opcheck_args(device, mode)
    w.requires_grad_()
    if psw is not None:
        psw.requires_grad_()
    opcheck(OP, (w, v, o, probes, "concat", mode, psw, 3, True))
    opcheck(OP, (w.detach().float(), v.int(), o, probes, "mean", mode, None, 0, False))
    out, argmax = OP(w, v, o, probes, "sum", mode, psw, 3, True)
    gout = torch.randn_like(out).detach()
    pd = None if psw is None else psw.detach()
    opcheck(BWD, (gout, w.detach(), v, o, argmax, probes, "sum", mode, pd, 3, True, pd is not None))
    for optimizer in ("sgd", "rowwise_adagrad"):
        opcheck(UPD, (w.detach().clone(), torch.zeros(9, dtype=torch.float64, device=device), gout, v, o, argmax,
                      probes, "sum", mode, pd, 3, optimizer, 0.1, 1e-8))


def test_torch_compile_fullgraph(device):
    probes = [2, 1]
    w, v, o, psw = make_bags(probes, 5, num_rows=20, dim=4, device=device, seed=9)

    def f(w_, p_):
        out = embedops.multiplexed_embedding_bag(w_, v, o, num_probes=probes, combine="sum", per_sample_weights=p_)
        return (out * 2).sum()

    compiled = torch.compile(f, fullgraph=True)
    w1, p1 = w.clone().requires_grad_(), psw.clone().requires_grad_()
    w2, p2 = w.clone().requires_grad_(), psw.clone().requires_grad_()
    a, b = compiled(w1, p1), f(w2, p2)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(w1.grad, w2.grad)
    torch.testing.assert_close(p1.grad, p2.grad)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason=_CUDA_SKIP)
def test_cuda_graph_capture_embedding_bag_forward():
    # validate=False: no error-flag read-back, and the layout's device copy is kept after the first
    # call, so the forward makes no host round trip and can be captured
    g = torch.Generator().manual_seed(9)
    w = torch.randn(500, 16, generator=g).cuda()
    values = torch.randint(-(2**40), 2**40, (40,), generator=g).cuda()
    offsets = torch.tensor([0, 3, 9, 9, 20, 31, 40]).cuda()
    kw = dict(num_probes=[2, 1], seed=5, validate=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        embedops.multiplexed_embedding_bag(w, values, offsets, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = embedops.multiplexed_embedding_bag(w, values, offsets, **kw)
    for seed in (1, 2):
        values.copy_(torch.randint(-(2**40), 2**40, (40,), generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        want = reference.multiplexed_embedding_bag(w.double().cpu(), values.cpu(), offsets.cpu(), [2, 1], seed=5)
        torch.testing.assert_close(out.double().cpu(), want, atol=1e-5, rtol=1e-5)
