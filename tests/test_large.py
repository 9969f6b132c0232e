"""Large sizes: the int64 index math of every family beyond 2^31 (and 2^32) elements, without the
memory such tensors would take.

How: the big tensors live in anonymous private mappings reserved with MAP_NORESERVE and never
committed (``_Lazy``): a page costs memory only once it is touched, and an untouched page reads
as zero. A (R, D) embedding table with R*D > 2^32 elements, a Matryoshka corpus with N*D > 2^32,
or an attention input whose token / batch stride puts rows past element 2^32, then costs only the
pages of the rows the test writes and the op reads: a few MB each. Every test asserts that RSS
stayed small, and the strided cases assert (with the profiler) that the op read the view in place
rather than a compact ``.contiguous()`` copy, which would not exercise the large offsets at all.

Results are compared with the float64 references of ``embedops.reference`` on compact copies of
the same data. Tests taking ``device`` run the same body on CUDA when a GPU is there; the big
tensors are then real (zero-filled) device memory, up to ~50 GB per test.
``test_embedding_offsets_beyond_2_31`` hashes 2^31 ids (10-25 s on 2 cores): it runs only with
EMBEDOPS_LARGE_TESTS=1 (the CI's plain pass sets it) and never under the sanitizers.
"""

from __future__ import annotations

import mmap
import os
import sys
import warnings

import numpy as np
import pytest
import torch

import embedops
from embedops import reference

from conftest import _CUDA_SKIP, CUDA_OK, FLOAT_DTYPES, TOL, seeded

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="lazily committed mappings (MAP_NORESERVE) and /proc RSS are Linux-specific")

_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Python < 3.13 lacks the constant
I32 = 2**31
RSS_BUDGET_MB = 512  # the most a test may add to the process' resident memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE / 2**20


def _huge_zero_page() -> bool:
    """Read faults in MADV_HUGEPAGE mappings map the shared huge zero page (else they would
    allocate a real 2 MiB page each)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/use_zero_page") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


class _Lazy:
    """Zero-filled tensors of any size: on the CPU, pages are committed only when touched."""

    def __init__(self):
        self._maps: list[mmap.mmap] = []

    def __call__(self, numel: int, dtype: torch.dtype, device: str = "cpu", *,
                 read_mostly: bool = False) -> torch.Tensor:
        """read_mostly: the op reads (nearly) all of it: map reads to the huge zero page when the
        kernel has one (512x fewer page faults); otherwise 4 KiB pages, so a touched row costs a
        page, not 2 MiB. On CUDA: plain zero-filled device memory."""
        if device != "cpu":
            return torch.zeros(numel, dtype=dtype, device=device)
        nbytes = max(1, numel * torch.empty((), dtype=dtype).element_size())
        try:
            m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE)
        except OSError as e:  # strict overcommit (vm.overcommit_memory=2) ignores MAP_NORESERVE
            pytest.skip(f"cannot reserve {nbytes / 2**30:.0f} GiB of address space: {e}")
        advice = "MADV_HUGEPAGE" if read_mostly and _huge_zero_page() else "MADV_NOHUGEPAGE"
        if hasattr(mmap, advice):
            m.madvise(getattr(mmap, advice))
        self._maps.append(m)
        return torch.frombuffer(m, dtype=dtype, count=numel)

    def strided(self, size, stride, dtype, device="cpu") -> torch.Tensor:
        numel = 1 + sum((n - 1) * s for n, s in zip(size, stride))
        return self(numel, dtype, device).as_strided(size, stride)

    def close(self):
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a tensor still views it (a failing test's traceback): unmapped when freed
                pass


@pytest.fixture
def lazy():
    rss0 = _rss_mb()
    alloc = _Lazy()
    yield alloc
    grown = _rss_mb() - rss0
    alloc.close()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the big device buffers back before the next test
    assert grown < RSS_BUDGET_MB, f"the test grew RSS by {grown:.0f} MB (budget {RSS_BUDGET_MB} MB)"


def _copies(fn, device: str = "cpu") -> list[str]:
    """The copy-making aten ops `fn` ran (inside the embedops kernels too). Checked on the CPU;
    on CUDA, ATen's cuBLAS operand preparation may copy small tiles by itself, so nothing is
    asserted there (the host code that decides whether to copy an input is shared)."""
    if device != "cpu":
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # profiler infrastructure notices, not the ops under test
        with torch.autograd.profiler.profile(use_kineto=False) as prof:  # CPU ops only; starts fast
            fn()
    return sorted({e.key for e in prof.key_averages()} & {"aten::contiguous", "aten::clone"})


def _assert_close(got, want, dtype, what=""):
    torch.testing.assert_close(got.cpu().double(), torch.as_tensor(want).cpu().double(), **TOL[dtype], msg=what)


def _np(t):
    return t.cpu().numpy()


# ---- matryoshka ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_matryoshka_strided_corpus_rows_beyond_2_32(lazy, device, dtype):
    """A corpus view whose row stride puts row n at element n * (2^20 + 37): the last rows start
    past element 2^32. Every matryoshka op reads it in place (no copy) and matches the reference."""
    N, D, ld = 4099, 48, 2**20 + 37
    x = lazy.strided((N, D), (ld, 1), dtype, device)
    assert (N - 1) * ld > 2**32
    g = seeded(1)
    compact = torch.randn(N, D, generator=g).to(dtype)
    x.copy_(compact)
    dims = [8, 20, 48]
    q2 = torch.randn(2, D, generator=g).to(dtype)   # B <= 4: the fused per-row kernel (CPU)
    q6 = torch.randn(6, D, generator=g).to(dtype)   # B > 4: packed micro kernel (float) / BLAS (float64) on row tiles
    for q in (q2, q6):
        qd = q.to(device)
        assert _copies(lambda: embedops.matryoshka_topk(qd, x, 5, dims), device) == []
        for metric in ("cosine", "dot"):
            v, i = embedops.matryoshka_topk(qd, x, 5, dims, metric=metric)
            rv, ri = reference.matryoshka_topk(q, compact, 5, dims, metric=metric)
            np.testing.assert_array_equal(_np(i), ri)
            _assert_close(v, rv, dtype, f"topk {metric} B={q.shape[0]}")
    q2d, q6d = q2.to(device), q6.to(device)
    assert _copies(lambda: embedops.matryoshka_similarity(q6d, x, dims), device) == []
    _assert_close(embedops.matryoshka_similarity(q6d, x, dims), reference.matryoshka_similarity(q6, compact, dims),
                  dtype, "similarity")
    inv = embedops.matryoshka_inv_norms(x, dims)
    _assert_close(inv, embedops.matryoshka_inv_norms(compact, dims), dtype, "inv_norms")
    v, i = embedops.matryoshka_topk(q6d, x, 5, dims, corpus_inv_norms=inv)  # given norms: BLAS + admission
    np.testing.assert_array_equal(_np(i), reference.matryoshka_topk(q6, compact, 5, dims)[1])
    # funnel: stage-0 top-k, then each survivor's row gathered at row * ld
    fv, fi = torch.ops.embedops.matryoshka_funnel(q2d, x, [8, 20, 48], [64, 16, 4], "cosine", None)
    rfv, rfi = reference.matryoshka_funnel(q2, compact, [8, 20, 48], [64, 16, 4])
    np.testing.assert_array_equal(_np(fi), rfi)
    _assert_close(fv, rfv, dtype, "funnel")
    if device == "cpu":  # column blocks (MatryoshkaIndex's CPU layout) as views of the same far-apart rows
        blocks = [x[:, :20], x[:, 20:]]
        bv, bi = torch.ops.embedops.matryoshka_topk_blocks(q2, blocks, 5, dims, "cosine", None)
        np.testing.assert_array_equal(_np(bi), reference.matryoshka_topk(q2, compact, 5, dims)[1])
        fv, fi = torch.ops.embedops.matryoshka_funnel_blocks(q2, blocks, [8, 20, 48], [64, 16, 4], "cosine", None)
        np.testing.assert_array_equal(_np(fi), rfi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_matryoshka_contiguous_corpus_beyond_2_32_elements(lazy, device, dtype):
    """A contiguous (N, D) corpus with N*D > 2^32 elements (D = 2^20 + 3): prefixes of every row
    hold data, the rest of each row is (untouched) zeros. Scores at dims <= 40 depend only on the
    prefixes, so the reference runs on the (N, 40) prefix block."""
    N, D = 2**12 + 5, 2**20 + 3
    x = lazy(N * D, dtype, device).view(N, D)
    assert N * D > 2**32 and x.is_contiguous()
    g = seeded(2)
    pre = torch.randn(N, 40, generator=g).to(dtype)
    pre[-3:] = pre[-3:].abs() * 4  # the best rows are the last ones (offsets past 2^32)
    x[:, :40] = pre.to(device)
    dims = [16, 40]
    for B in (1, 5):
        q = torch.zeros(B, D, dtype=dtype)
        q[:, :40] = torch.rand(B, 40, generator=g).to(dtype) + 0.1
        qd = q.to(device)
        assert _copies(lambda: embedops.matryoshka_topk(qd, x, 4, dims), device) == []
        v, i = embedops.matryoshka_topk(qd, x, 4, dims)
        rv, ri = reference.matryoshka_topk(q[:, :40], pre, 4, dims)
        np.testing.assert_array_equal(_np(i), ri)
        assert bool((i[-1, :, 0] >= N - 3).all())  # a planted row (offset past 2^32) won at dims[-1]
        _assert_close(v, rv, dtype, f"topk B={B}")
        _assert_close(embedops.matryoshka_similarity(qd, x, dims),
                      reference.matryoshka_similarity(q[:, :40], pre, dims), dtype, f"similarity B={B}")
        fv, fi = torch.ops.embedops.matryoshka_funnel(qd, x, dims, [32, 4], "cosine", None)
        rfv, rfi = reference.matryoshka_funnel(q[:, :40], pre, dims, [32, 4])
        np.testing.assert_array_equal(_np(fi), rfi)
        _assert_close(fv, rfv, dtype, f"funnel B={B}")
    _assert_close(embedops.matryoshka_inv_norms(x, dims), embedops.matryoshka_inv_norms(pre, dims), dtype, "inv_norms")


# ---- embedding -----------------------------------------------------------------------------------


def _ids_beyond(num_rows: int, dim: int, probes: list[int], count: int, seed: int = 0) -> list[torch.Tensor]:
    """Per feature, `count` ids whose rows for every probe start past element 2^32 of a (num_rows, dim)
    table (rows > 2^32 / dim: both a signed and an unsigned 32-bit offset would wrap), plus `count`
    ids with any rows."""
    first = 2**32 // dim + 1
    cand = torch.arange(-(2**40), -(2**40) + 20_000, dtype=torch.int64) * 7919
    out = []
    for f, P in enumerate(probes):
        far = torch.ones(cand.numel(), dtype=torch.bool)
        for p in range(P):
            far &= embedops.hash_ids(cand, feature=f, probe=p, num_rows=num_rows, seed=seed) >= first
        picked = cand[far][:count]
        assert picked.numel() == count, "not enough candidate ids hash past 2^32"
        out.append(torch.cat([picked, cand[~far][:count]]))
    return out


def _bags(ids_per_feature: list[torch.Tensor], batch: int, g: torch.Generator):
    """Feature-major values/offsets: feature f's ids shuffled into `batch` bags (one left empty)."""
    values, lengths = [], []
    for ids in ids_per_feature:
        ids = ids[torch.randperm(ids.numel(), generator=g)]
        cuts = torch.sort(torch.randint(0, ids.numel() + 1, (batch - 1,), generator=g)).values
        cuts[0] = 0  # bag 0 of every feature is empty
        bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([ids.numel()])])
        lengths.append(bounds.diff())
        values.append(ids)
    offsets = torch.cat([torch.tensor([0]), torch.cat(lengths).cumsum(0)])
    return torch.cat(values), offsets


def _touched_rows(values, offsets, probes, num_rows, seed=0) -> torch.Tensor:
    B = (offsets.numel() - 1) // len(probes)
    rows = []
    for f, P in enumerate(probes):
        v = values[int(offsets[f * B]):int(offsets[(f + 1) * B])]
        rows += [embedops.hash_ids(v, feature=f, probe=p, num_rows=num_rows, seed=seed) for p in range(P)]
    return torch.unique(torch.cat(rows))


def _big_table(lazy, dim, dtype, device):
    R = I32 // dim * 5 // 2  # a fifth of the rows start past element 2^32
    assert R * dim > 2**32
    return lazy(R * dim, dtype, device).view(R, dim), R


def _fill_rows(weight, rows, g, *, also64=None):
    data = torch.randn(rows.numel(), weight.shape[1], generator=g).to(weight.dtype)
    weight[rows.to(weight.device)] = data.to(weight.device)
    if also64 is not None:
        also64[rows] = data.double()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("dim,mode,combine,psw", [
    (64, "sum", "concat", False),   # fixed-D kernel
    (64, "mean", "mean", False),
    (64, "sum", "sum", True),       # per-sample weights
    (24, "sum", "concat", False),   # generic-D kernel
    (24, "max", "sum", False),
], ids=lambda v: str(v))
def test_embedding_table_rows_beyond_2_32_elements(lazy, device, dtype, dim, mode, combine, psw):
    """A contiguous (R, D) table with R*D > 2^32 elements; half the looked-up rows are past element
    2^32. Forward vs the float64 reference (run on a float64 copy that is lazily zero too)."""
    probes = [2, 1]
    weight, R = _big_table(lazy, dim, dtype, device)
    ids = _ids_beyond(R, dim, probes, 12)
    g = seeded(3)
    values, offsets = _bags(ids, batch=5, g=g)
    rows = _touched_rows(values, offsets, probes, R)
    w64 = lazy(R * dim, torch.float64).view(R, dim)
    _fill_rows(weight, rows, g, also64=w64)
    sw = torch.rand(values.numel(), generator=g).to(dtype) if psw else None
    vd, od, swd = values.to(device), offsets.to(device), None if sw is None else sw.to(device)
    assert _copies(lambda: embedops.multiplexed_embedding_bag(
        weight, vd, od, num_probes=probes, combine=combine, mode=mode, per_sample_weights=swd), device) == []
    out = embedops.multiplexed_embedding_bag(weight, vd, od, num_probes=probes, combine=combine, mode=mode,
                                             per_sample_weights=swd)
    want = reference.multiplexed_embedding_bag(w64, values, offsets, probes, combine=combine, mode=mode,
                                               per_sample_weights=None if sw is None else sw.double())
    _assert_close(out, want, dtype, f"{mode}/{combine}")
    if mode == "max":  # the argmax holds the (large) row indices the gradient goes to
        _, argmax = torch.ops.embedops.multiplexed_embedding_bag(weight, vd, od, probes, combine, mode, None, 0, True)
        hit = argmax[argmax >= 0].cpu()
        assert hit.numel() > 0 and bool(torch.isin(hit, rows).all()) and int(hit.max()) * dim > 2**32


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_embedding_psw_gradient_rows_beyond_2_32_elements(lazy, device, dtype):
    """d out / d per_sample_weights reads weight rows past element 2^32 (no dense weight gradient)."""
    probes, dim = [2, 1], 64
    weight, R = _big_table(lazy, dim, dtype, device)
    g = seeded(4)
    values, offsets = _bags(_ids_beyond(R, dim, probes, 10), batch=4, g=g)
    rows = _touched_rows(values, offsets, probes, R)
    w64 = lazy(R * dim, torch.float64).view(R, dim)
    _fill_rows(weight, rows, g, also64=w64)
    sw = torch.rand(values.numel(), generator=g).to(dtype).to(device).requires_grad_()
    sw64 = sw.detach().cpu().double().requires_grad_()
    out = embedops.multiplexed_embedding_bag(weight, values.to(device), offsets.to(device), num_probes=probes,
                                             per_sample_weights=sw)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(grad.to(device))
    want = reference.multiplexed_embedding_bag(w64, values, offsets, probes, per_sample_weights=sw64)
    want.backward(grad.double())
    _assert_close(sw.grad, sw64.grad, dtype, "per_sample_weights gradient")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_embedding_fused_update_rows_beyond_2_32_elements(lazy, device, dtype, optimizer):
    """The fused optimizer updates rows past element 2^32 in place (and only the touched rows)."""
    probes, dim, lr, eps = [2, 1], 64, 0.5, 1e-8
    weight, R = _big_table(lazy, dim, dtype, device)
    g = seeded(5)
    values, offsets = _bags(_ids_beyond(R, dim, probes, 10), batch=4, g=g)
    rows = _touched_rows(values, offsets, probes, R)
    _fill_rows(weight, rows, g)
    rows_d = rows.to(device)
    before = weight[rows_d].cpu().double()
    state = lazy(R, torch.float32, device)
    B = (offsets.numel() - 1) // len(probes)
    grad_out = torch.randn(B, sum(probes) * dim, generator=g).to(dtype)
    torch.ops.embedops.multiplexed_embedding_bag_update(
        weight, state, grad_out.to(device), values.to(device), offsets.to(device),
        torch.empty(0, dtype=torch.long, device=device), probes, "concat", "sum", None, 0, optimizer, lr, eps)
    # expected: each touched row's summed gradient (float64), then the optimizer step
    gsum = torch.zeros(rows.numel(), dim, dtype=torch.float64)
    q0 = 0
    for f, P in enumerate(probes):
        for b in range(B):
            j = f * B + b
            v = values[int(offsets[j]):int(offsets[j + 1])]
            for p in range(P):
                r = embedops.hash_ids(v, feature=f, probe=p, num_rows=R)
                blk = grad_out[b, (q0 + p) * dim:(q0 + p + 1) * dim].double()
                gsum.index_add_(0, torch.searchsorted(rows, r), blk.expand(r.numel(), dim))
        q0 += P
    if optimizer == "sgd":
        want = before - lr * gsum
    else:
        st = gsum.pow(2).mean(1)
        _assert_close(state[rows_d], st, torch.float32, "adagrad state")
        want = before - (lr / (st.sqrt() + eps)).unsqueeze(1) * gsum
    _assert_close(weight[rows_d], want, dtype, optimizer)
    # untouched neighbours of the touched rows kept their zeros
    near = torch.unique(torch.cat([rows - 1, rows + 1]).clamp(0, R - 1))
    near = near[~torch.isin(near, rows)].to(device)
    assert bool((weight[near] == 0).all()) and bool((state[near] == 0).all())


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason=_CUDA_SKIP)
def test_embedding_backward_cuda_refuses_more_than_int_max_pairs():
    """The CUDA gradient reduction counts (row, k) pairs with cub's int: (2^21 + 1) ids x 1024
    probes = 2^31 + 1024 pairs is a clear error (before anything that size is allocated)."""
    n, probes = 2**21 + 1, [1024]
    weight = torch.zeros(10, 1, device="cuda")
    values = torch.zeros(n, dtype=torch.int32, device="cuda")
    offsets = torch.tensor([0, n], device="cuda")
    grad_out = torch.zeros(1, 1024, device="cuda")
    argmax = torch.empty(0, dtype=torch.long, device="cuda")
    with pytest.raises(ValueError, match=r"multiplexed_embedding_bag_backward: on CUDA the gradient reduction handles "
                                         r"at most 2147483647 \(id, probe\) pairs .* got 2147484672"):
        torch.ops.embedops.multiplexed_embedding_bag_backward(grad_out, weight, values, offsets, argmax, probes,
                                                              "concat", "sum", None, 0, True, False)
    state = torch.zeros(10, device="cuda")
    with pytest.raises(ValueError, match=r"multiplexed_embedding_bag_update: on CUDA the gradient reduction"):
        torch.ops.embedops.multiplexed_embedding_bag_update(weight, state, grad_out, values, offsets, argmax, probes,
                                                            "concat", "sum", None, 0, "sgd", 0.1, 1e-8)


def test_embedding_max_mode_refuses_more_than_int32_values(lazy):
    """mode="max" tracks positions in a bag as int32 on the CPU: more than 2^31 - 1 values is a
    clear error, not an overflow (checked before any id is read)."""
    values = lazy(I32 + 8, torch.int32)
    offsets = torch.tensor([0, I32 + 8], dtype=torch.int64)
    weight = torch.zeros(10, 4)
    with pytest.raises(ValueError, match=r"multiplexed_embedding_bag: mode=\"max\" supports at most 2\^31 - 1 values"):
        embedops.multiplexed_embedding_bag(weight, values, offsets, mode="max")


def test_lengths_to_offsets_int32_lengths_summing_past_2_32():
    """int32 bag lengths whose total passes 2^32 give exact int64 offsets (no int32 running sum)."""
    lengths = torch.tensor([2**31 - 1, 2**31 - 1, 7, 2**30, 0], dtype=torch.int32)
    offsets = embedops.lengths_to_offsets(lengths)
    assert offsets.dtype == torch.int64
    assert offsets.tolist() == [0, 2**31 - 1, 2**32 - 2, 2**32 + 5, 2**32 + 5 + 2**30, 2**32 + 5 + 2**30]


@pytest.mark.skipif(os.environ.get("EMBEDOPS_LARGE_TESTS") != "1" or bool(os.environ.get("EMBEDOPS_SANITIZER")),
                    reason="hashes 2^31 ids (10-25 s on 2 cores): set EMBEDOPS_LARGE_TESTS=1 (not under sanitizers)")
def test_embedding_offsets_beyond_2_31(lazy):
    """More than 2^31 values: bags whose offsets are past 2^31 read the right ids. The first 2^31
    ids are 0 (untouched zero pages) and hash to a zero row; the ids past 2^31 are distinct."""
    dim, R = 16, 1000
    n_tail = 64
    N = I32 + 2 * n_tail
    values = lazy(N, torch.int32, read_mostly=True)
    g = seeded(6)
    zero_row = int(embedops.hash_ids(torch.tensor([0]), feature=0, probe=0, num_rows=R))
    tail = torch.arange(1, 10_000, dtype=torch.int32)
    tail = tail[embedops.hash_ids(tail, feature=0, probe=0, num_rows=R) != zero_row][:n_tail]
    values[N - n_tail:] = tail
    weight = torch.randn(R, dim, generator=g)
    weight[zero_row] = 0
    # 8 bags over the zeros, then 4 bags over the tail (offsets > 2^31)
    head = torch.arange(9, dtype=torch.int64) * ((N - n_tail) // 8)
    head[8] = N - n_tail
    offsets = torch.cat([head, torch.tensor([N - 48, N - 40, N - 7, N])])
    out = embedops.multiplexed_embedding_bag(weight, values, offsets, num_probes=1)
    assert bool((out[:8] == 0).all())
    want = reference.multiplexed_embedding_bag(weight, tail.long(), offsets[8:] - offsets[8], [1])
    _assert_close(out[8:], want, torch.float32, "tail bags")


# ---- attention -----------------------------------------------------------------------------------


def _strided_input(lazy, shape, dtype, token_stride, g, device="cpu"):
    """A (B, L, H, X) view with the given token stride (batch stride L * token stride) over a lazy
    buffer, and a compact copy of its data."""
    B, L, H, X = shape
    t = lazy.strided(shape, (L * token_stride, token_stride, X, 1), dtype, device)
    data = torch.randn(shape, generator=g).to(dtype)
    t.copy_(data)
    return t, data


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_attention_strides_beyond_2_31(lazy, device, dtype):
    """q, k, v views whose token stride exceeds 2^31 elements on the CPU (so the last key of the
    second sequence sits past element 2^34): read in place (float32 gives BLAS a leading dimension
    above INT_MAX, so the kernels take their int64 GEMM path), forward and backward vs the
    reference. On CUDA the token stride is 2^29 + 64 (device memory is real): keys still past 2^32."""
    g = seeded(7)
    st = I32 + 64 if device == "cpu" else 2**29 + 64
    q, qd = _strided_input(lazy, (2, 3, 2, 16), dtype, st, g, device)
    k, kd = _strided_input(lazy, (2, 5, 1, 16), dtype, st, g, device)
    v, vd = _strided_input(lazy, (2, 5, 1, 8), dtype, st, g, device)
    assert k.storage_offset() + (2 * 5 - 1) * st > 2**32
    kv_lengths = torch.tensor([5, 3])
    kvl = kv_lengths.to(device)
    assert _copies(lambda: embedops.cross_attention(q, k, v, kv_lengths=kvl), device) == []
    qg, kg, vg = (t.requires_grad_() for t in (q, k, v))
    out, lse = embedops.cross_attention(qg, kg, vg, kv_lengths=kvl, return_lse=True)
    q64, k64, v64 = (t.double().requires_grad_() for t in (qd, kd, vd))
    want, want_lse = reference.cross_attention(q64, k64, v64, kv_lengths=kv_lengths)
    _assert_close(out, want, dtype, "out")
    _assert_close(lse, want_lse, torch.float32 if dtype != torch.float64 else dtype, "lse")
    dout = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(dout.to(device))
    want.backward(dout.double())
    tol = {torch.float32: torch.float32, torch.float16: torch.float16, torch.bfloat16: torch.bfloat16}[dtype]
    for name, got, ref64 in (("dq", qg.grad, q64.grad), ("dk", kg.grad, k64.grad), ("dv", vg.grad, v64.grad)):
        torch.testing.assert_close(got.cpu().double(), ref64, atol=4 * TOL[tol]["atol"], rtol=4 * TOL[tol]["rtol"], msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_varlen_co_mixture_strides_beyond_2_31(lazy, dtype):
    """Far-apart rows through cross_attention_varlen (token stride > 2^31), co_attention and
    mixture_attention (batch stride > 2^31, last rows past element 2^32). CPU only."""
    g = seeded(8)
    st = I32 + 32
    # varlen: (T, H, X) views
    q = lazy.strided((6, 2, 16), (st, 16, 1), dtype)
    k = lazy.strided((7, 2, 16), (st, 16, 1), dtype)
    v = lazy.strided((7, 2, 16), (st, 16, 1), dtype)
    data = [torch.randn(t.shape, generator=g).to(dtype) for t in (q, k, v)]
    for t, d in zip((q, k, v), data):
        t.copy_(d)
    cu_q, cu_k = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([0, 4, 7], dtype=torch.int32)
    assert _copies(lambda: embedops.cross_attention_varlen(q, k, v, cu_q, cu_k, 4, 4)) == []
    out = embedops.cross_attention_varlen(q, k, v, cu_q, cu_k, 4, 4)
    want, _ = reference.cross_attention_varlen(*(d.double() for d in data), cu_q, cu_k)
    _assert_close(out, want, dtype, "varlen")
    # co_attention / mixture_attention: batch stride > 2^31 elements
    qx, qxd = _strided_input(lazy, (2, 3, 1, 16), dtype, I32 // 2 + 16, g)
    ky, kyd = _strided_input(lazy, (2, 4, 1, 16), dtype, I32 // 2 + 16, g)
    vx, vxd = _strided_input(lazy, (2, 3, 1, 8), dtype, I32 // 2 + 16, g)
    vy, vyd = _strided_input(lazy, (2, 4, 1, 8), dtype, I32 // 2 + 16, g)
    assert (qx.shape[0] - 1) * qx.stride(0) + (qx.shape[1] - 1) * qx.stride(1) > 2**32
    ox, oy = embedops.co_attention(qx, ky, vx, vy)
    rox, roy, _, _ = reference.co_attention(qxd.double(), kyd.double(), vxd.double(), vyd.double())
    _assert_close(ox, rox, dtype, "co_attention ox")
    _assert_close(oy, roy, dtype, "co_attention oy")
    seg = torch.tensor([[1, 3], [2, 2]])
    w = torch.rand(2, 3, 2, generator=g).to(dtype)
    out = embedops.mixture_attention(qx, ky, vy, seg, w)
    want, _ = reference.mixture_attention(qxd.double(), kyd.double(), vyd.double(), seg, w.double())
    _assert_close(out, want, dtype, "mixture_attention")
