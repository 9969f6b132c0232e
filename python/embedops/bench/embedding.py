"""Embedding family benchmarks."""

from __future__ import annotations

import torch

import embedops
from embedops import reference

from .core import Case, assert_close


def _hash_case(device: str, n: int, dtype: torch.dtype) -> Case:
    g = torch.Generator().manual_seed(0)
    values = torch.randint(-(2**62), 2**62, (n,), generator=g).to(dtype).to(device)
    kw = dict(feature=7, probe=1, num_rows=1 << 20, seed=3)

    def check(ours, theirs):
        if not torch.equal(ours, theirs):
            raise AssertionError(f"{int((ours != theirs).sum())} rows differ")

    return Case(
        name="hash_ids",
        shapes=f"N={n:,} {str(dtype).replace('torch.', '')}",
        fn=lambda: embedops.hash_ids(values, **kw),
        baselines={"torch int ops": lambda: reference.hash_ids_torch(values, **kw)},
        check=check,
        bytes=n * (values.element_size() + 8),
        default_targets={"torch int ops": 1.0},  # the default level: not slower than torch
    )


# ---- multiplexed_embedding_bag ---------------------------------------------------------------------
# Production-like traces: F=26 features, Zipf(1.15) raw ids, bag lengths uniform in [0, 2L]
# (mean L), one shared table of R = 2^20 rows. Baselines:
#   (a) "torch hash + F.embedding_bag": reference.hash_ids_torch per (feature, probe), one
#       F.embedding_bag per probe over all bags, then the concat layout (what users write today);
#   (b) "EmbeddingBag pre-hashed": one F.embedding_bag on rows hashed beforehand (not timed),
#       laid out so its output is ours: the lookup alone.
# Bytes (FBGEMM's convention): every looked-up row once (N * P * D * elem) + the output.


class _Bags:
    def __init__(self, device, batch, dim, mean_len, probes, nf=26, num_rows=1 << 20, seed=0,
                 dtype=torch.float32):
        import numpy as np

        rng = np.random.default_rng(seed)
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(0, 2 * mean_len + 1, (nf * batch,), generator=g)
        ids = np.minimum(rng.zipf(1.15, int(lengths.sum())), 2**62).astype(np.int64)
        self.device, self.batch, self.dim, self.nf, self.num_rows = device, batch, dim, nf, num_rows
        self.probes = [probes] * nf
        self.values = torch.from_numpy(ids).to(device)
        self.offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device)
        self.weight = torch.empty(num_rows, dim, dtype=dtype, device=device).uniform_(-0.05, 0.05)
        self.seed = 3
        self.n = int(lengths.sum())
        self.elem = self.weight.element_size()

    def shapes(self, extra=""):
        return (f"F={self.nf} B={self.batch} L~{(self.n / (self.nf * self.batch)):.0f} D={self.dim} "
                f"P={self.probes[0]} R=2^{self.num_rows.bit_length() - 1}{extra}")

    def bytes(self):
        return self.n * self.probes[0] * self.dim * self.elem + self.batch * sum(self.probes) * self.dim * self.elem

    def ours(self, weight=None, mode="sum"):
        return embedops.multiplexed_embedding_bag(self.weight if weight is None else weight, self.values,
                                                  self.offsets, num_probes=self.probes, mode=mode, seed=self.seed)

    def baseline_a(self, weight=None, mode="sum"):
        """hash with torch int ops per (feature, probe) + one F.embedding_bag per probe + concat."""
        w = self.weight if weight is None else weight
        nf, batch = self.nf, self.batch
        offs = self.offsets
        bounds = offs[:: batch].tolist()
        pooled = []
        for p in range(self.probes[0]):
            rows = torch.cat([reference.hash_ids_torch(self.values[bounds[f]:bounds[f + 1]], feature=f, probe=p,
                                                       num_rows=self.num_rows, seed=self.seed) for f in range(nf)])
            pooled.append(torch.nn.functional.embedding_bag(rows, w, offs, mode=mode, include_last_offset=True))
        out = torch.stack(pooled).view(len(pooled), nf, batch, self.dim)  # (P, F, B, D)
        return out.permute(2, 1, 0, 3).reshape(batch, -1)

    def prehashed(self):
        """Rows for (b) in bag order (b, f, p), so one embedding_bag gives our concat layout."""
        nf, batch, probes = self.nf, self.batch, self.probes[0]
        bounds = self.offsets[:: batch].tolist()
        bag = torch.repeat_interleave(torch.arange(nf * batch, device=self.device), self.offsets.diff())
        f_of, b_of = bag // batch, bag % batch
        rows, keys = [], []
        for p in range(probes):
            rows.append(torch.cat([embedops.hash_ids(self.values[bounds[f]:bounds[f + 1]], feature=f, probe=p,
                                                     num_rows=self.num_rows, seed=self.seed) for f in range(nf)]))
            keys.append(b_of * (nf * probes) + f_of * probes + p)
        keys = torch.cat(keys)
        order = torch.sort(keys, stable=True).indices
        counts = torch.bincount(keys, minlength=batch * nf * probes)
        return torch.cat(rows)[order], torch.nn.functional.pad(counts.cumsum(0), (1, 0))

    def baseline_b(self, rows, offs, mode="sum"):
        out = torch.nn.functional.embedding_bag(rows, self.weight, offs, mode=mode, include_last_offset=True)
        return out.view(self.batch, -1)


def _prehashed(d: _Bags):
    """The bags as FBGEMM TBE input over one shared table: every (feature, probe) a virtual feature
    f * P + p (our output's column order), its ids hashed with hash_ids; (indices, offsets) int64."""
    nf, batch, probes = d.nf, d.batch, d.probes[0]
    bounds = d.offsets[:: batch].tolist()
    lengths = d.offsets.diff().view(nf, batch)
    idx, lens = [], []
    for f in range(nf):
        for p in range(probes):  # virtual feature f * P + p: our columns (f * P + p) * D
            idx.append(embedops.hash_ids(d.values[bounds[f]:bounds[f + 1]], feature=f, probe=p,
                                         num_rows=d.num_rows, seed=d.seed))
            lens.append(lengths[f])
    return torch.cat(idx), torch.nn.functional.pad(torch.cat(lens).cumsum(0), (1, 0))


def _fbgemm_tbe(d: _Bags, optimizer: str | None):
    """FBGEMM's CPU TBE over ONE shared (R, D) table (feature_table_map: every (feature, probe) a
    virtual feature of table 0, in our output's column order), fed ids pre-hashed with hash_ids
    (not timed). Returns (module, indices, offsets), or (None, reason) when fbgemm_gpu is missing."""
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)
    except Exception as e:  # ImportError, or a build that does not load with this torch
        return None, f"fbgemm_gpu not importable ({type(e).__name__}: {str(e)[:80]})"
    if d.device != "cpu":
        return None, "the FBGEMM baseline here is its CPU TBE"
    indices, offsets = _prehashed(d)
    opt = EmbOptimType.EXACT_ROWWISE_ADAGRAD if optimizer == "rowwise_adagrad" else EmbOptimType.EXACT_SGD
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(d.num_rows, d.dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        feature_table_map=[0] * (d.nf * d.probes[0]), optimizer=opt, learning_rate=0.01, eps=1e-8,
        pooling_mode=PoolingMode.SUM)
    with torch.no_grad():
        tbe.split_embedding_weights()[0].copy_(d.weight)
    return tbe, indices, offsets


def _close(atol):
    return lambda ours, theirs: assert_close(ours, theirs, atol=atol, rtol=1e-4, what="out")


def _forward_case(device, batch, dim, mean_len, probes, mode="sum", fbgemm=False, targets=None):
    d = _Bags(device, batch, dim, mean_len, probes)
    rows, offs = d.prehashed()
    baselines = {"(a) torch hash + F.embedding_bag": lambda: d.baseline_a(mode=mode),
                 "(b) EmbeddingBag pre-hashed": lambda: d.baseline_b(rows, offs, mode=mode)}
    metrics = {}
    if fbgemm and mode == "sum":
        tbe = _fbgemm_tbe(d, None)
        if tbe[0] is None:
            metrics["fbgemm"] = "skipped: " + tbe[1]
        else:
            m, ind, off = tbe

            def fbgemm_forward():  # inference: no autograd graph (ours has none either)
                with torch.no_grad():
                    return m(ind, off)

            baselines["(c) FBGEMM TBE pre-hashed"] = fbgemm_forward
    return Case(
        name=f"embedding_bag fwd {mode}",
        shapes=d.shapes(),
        fn=lambda: d.ours(mode=mode),
        baselines=baselines,
        check=_close(1e-5),
        bytes=d.bytes(),
        metrics=metrics,
        targets=targets or {},
        default_targets={"(a)*": 1.0},
    )


def _backward_case(device, batch, dim, mean_len, probes, targets=None):
    d = _Bags(device, batch, dim, mean_len, probes)
    w1 = d.weight.clone().requires_grad_()
    w2 = d.weight.clone().requires_grad_()
    out1, out2 = d.ours(weight=w1), d.baseline_a(weight=w2)
    g = torch.randn_like(out1)

    def bwd(out, w):
        def fn():
            w.grad = None
            out.backward(g, retain_graph=True)
            return w.grad
        return fn

    return Case(
        name="embedding_bag bwd dense",
        shapes=d.shapes(),
        fn=bwd(out1, w1),
        baselines={"(a) autograd backward": bwd(out2, w2)},
        check=_close(1e-4),
        bytes=d.bytes(),
        targets=targets or {},
        default_targets={"(a)*": 1.0},
    )


def _adagrad_case(device, batch, dim, mean_len, probes):
    from embedops.nn import UnifiedEmbedding

    d = _Bags(device, batch, dim, mean_len, probes)
    feats = {f"f{i}": probes for i in range(d.nf)}
    fused = UnifiedEmbedding(d.num_rows, dim, feats, optimizer="rowwise_adagrad", lr=0.01, seed=d.seed,
                             device=device)
    dense = UnifiedEmbedding(d.num_rows, dim, feats, seed=d.seed, device=device)
    opt = torch.optim.Adagrad(dense.parameters(), lr=0.01)
    x = (d.values, d.offsets)
    g = torch.randn(batch, fused.out_dim, device=device)

    def step_fused():
        fused(x).backward(g)

    def step_dense():
        opt.zero_grad(set_to_none=True)
        dense(x).backward(g)
        opt.step()

    baselines = {"fwd + dense grad + optim.Adagrad": step_dense}
    metrics = {}
    tbe = _fbgemm_tbe(d, "rowwise_adagrad")
    if tbe[0] is None:
        metrics["fbgemm"] = "skipped: " + tbe[1]
    else:
        m, ind, off = tbe

        def step_fbgemm():  # forward + backward with FBGEMM's fused row-wise Adagrad
            m(ind, off).backward(g)

        baselines["FBGEMM TBE exact rowwise adagrad (pre-hashed)"] = step_fbgemm
    return Case(
        name="train step rowwise adagrad",
        shapes=d.shapes(),
        fn=step_fused,
        baselines=baselines,
        bytes=d.bytes(),
        metrics=metrics,
        targets={"fwd + dense grad + optim.Adagrad": 2.0, "FBGEMM TBE*": 1.5},
        default_targets={"fwd + dense grad + optim.Adagrad": 1.0},
    )


# ---- int8 row-quantised tables ----------------------------------------------------------------------
# The same trace over an int8 row-quantised copy of the table (embedops.quantize_table: D codes +
# float32 scale + float32 bias per row, 72 bytes at D = 64 instead of 256). Its scales and biases are
# rounded to float16 values first, so that FBGEMM's inference TBE (which keeps them as fp16, in front
# of the codes: 68-byte rows) holds exactly the same values. Baselines, ids pre-hashed (not timed):
#   (c) FBGEMM IntNBitTableBatchedEmbeddingBagsCodegen, SparseType.INT8, CPU, fp32 output;
#   (d) torch.ops.quantized.embedding_bag_byte_rowwise_offsets: PyTorch's 8-bit row-wise bag (FBGEMM's
#       EmbeddingSpMDM kernels) on exactly our bytes, rows in (b, f, p) order;
#   (e) our float op on the dequantised float32 table (what int8 saves: bandwidth).
# Bytes: every looked-up row once (N * P * (D + 8)) + the float32 output.


def _fp16_exact_int8_table(weight: torch.Tensor) -> torch.Tensor:
    """quantize_table(weight) with every scale and bias rounded to a float16 value (kept as float32)."""
    t = embedops.quantize_table(weight, "int8")
    d = t.shape[1] - 8
    sb = t[:, d:].contiguous().view(torch.float32).half().float()
    t[:, d:] = sb.contiguous().view(torch.uint8)
    return t


def _fbgemm_int8_tbe(d: _Bags, table: torch.Tensor):
    """FBGEMM's CPU inference TBE over one INT8 table holding table's values; (module, indices,
    offsets) with ids pre-hashed, or (None, reason)."""
    try:
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
    except Exception as e:  # ImportError, or a build that does not load with this torch
        return None, f"fbgemm_gpu not importable ({type(e).__name__}: {str(e)[:80]})"
    if d.device != "cpu":
        return None, "the FBGEMM baseline here is its CPU TBE"
    indices, offsets = (t.int() for t in _prehashed(d))
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[("table", d.num_rows, d.dim, SparseType.INT8, EmbeddingLocation.HOST)],
        feature_table_map=[0] * (d.nf * d.probes[0]), pooling_mode=PoolingMode.SUM, device="cpu",
        output_dtype=SparseType.FP32)
    tbe.initialize_weights()
    codes, qparams = tbe.split_embedding_weights()[0]  # views of its (R, 4 + D) rows: fp16 scale, bias, codes
    sb = table[:, d.dim:].contiguous().view(torch.float32).half()
    codes.copy_(table[:, :d.dim])
    qparams.copy_(sb.contiguous().view(torch.uint8))
    return tbe, indices, offsets


def _int8_forward_case(device, batch, dim, mean_len, probes):
    d = _Bags(device, batch, dim, mean_len, probes)
    table = _fp16_exact_int8_table(d.weight)
    dequantised = embedops.dequantize_table(table)
    rows, offs = d.prehashed()
    baselines, metrics = {}, {}
    tbe = _fbgemm_int8_tbe(d, table)
    if tbe[0] is None:
        metrics["fbgemm"] = "skipped: " + tbe[1]
    else:
        m, ind, off = tbe

        def fbgemm_forward():
            with torch.no_grad():
                return m(ind, off)

        baselines["(c) FBGEMM IntNBit TBE INT8 pre-hashed"] = fbgemm_forward
    if hasattr(torch.ops.quantized, "embedding_bag_byte_rowwise_offsets") and device == "cpu":
        def torch_byte_rowwise():
            out = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(table, rows, offs, False, 0, False, None,
                                                                         None, True)
            return out.view(batch, -1)

        baselines["(d) torch quantized byte_rowwise pre-hashed"] = torch_byte_rowwise
    baselines["(e) our float op, dequantised fp32 table"] = lambda: d.ours(weight=dequantised)
    elem = d.elem
    nbytes = d.n * probes * (dim + 8) + batch * sum(d.probes) * dim * elem
    return Case(
        name="int8 table fwd sum",
        shapes=d.shapes(),
        fn=lambda: d.ours(weight=table),
        baselines=baselines,
        check=_close(1e-5),
        bytes=nbytes,
        metrics=metrics,
        targets={"(c) FBGEMM IntNBit*": 1.0},
    )


def cases(device: str, quick: bool):
    n = 1 << (20 if quick else 23)
    out = [lambda dtype=dtype: _hash_case(device, n, dtype) for dtype in (torch.int64, torch.int32)]
    out += [
        lambda: _forward_case(device, 4096, 64, 5, 2, fbgemm=True, targets={"(a)*": 2.0, "(c)*": 1.2}),
        lambda: _forward_case(device, 4096, 64, 5, 1, fbgemm=True, targets={"(b)*": 0.9, "(c)*": 1.2}),
        lambda: _backward_case(device, 4096, 64, 5, 2, targets={"(a)*": 1.5}),
        lambda: _adagrad_case(device, 4096, 64, 5, 2),  # >= 2x dense + optim.Adagrad, >= 1.5x FBGEMM
        lambda: _int8_forward_case(device, 4096, 64, 5, 2),  # >= 1x FBGEMM IntNBit
        lambda: _int8_forward_case(device, 4096, 64, 5, 1),
    ]
    if not quick:
        out += [
            lambda: _forward_case(device, 4096, 64, 5, 3),
            lambda: _forward_case(device, 512, 128, 20, 2),
            lambda: _forward_case(device, 4096, 16, 20, 2),
            lambda: _forward_case(device, 4096, 128, 5, 2),
            lambda: _forward_case(device, 4096, 64, 5, 2, mode="mean"),
            lambda: _forward_case(device, 4096, 64, 5, 2, mode="max"),
            lambda: _backward_case(device, 512, 128, 20, 2),
            lambda: _backward_case(device, 4096, 16, 20, 1),
        ]
    return out
