"""One call of every CPU op family, checked against the float64 reference (embedops.reference).

    python tools/cpu_level_smoke.py [--save PATH] [--small]

Run under each CPU level (EMBEDOPS_CPU_CAPABILITY=default|avx2|avx512) to check that level's
kernels, and under `qemu-x86_64 -cpu Nehalem` (no AVX) / `-cpu Haswell` (AVX2, no AVX-512) to check
that a portable build runs on CPUs the build machine is not (CI does both). The float32 shapes are
chosen so that every kernel path of a level runs: the short-key and tiled attention passes, the
short-query mixture pass, the packed prefix micro kernel (B > 4) and the fused direct top-k path
(B <= 4), the fixed-D and general embedding forwards. --save writes the outputs (torch.save) so
that tests/test_cpu_levels.py can compare the levels with each other. Exit code 0: every check
passed; it prints one line per check and the level it ran at.
"""

from __future__ import annotations

import argparse
import sys

import torch

import embedops
from embedops import reference as ref


def close(name: str, got, want, atol: float, rtol: float, out: dict) -> None:
    got_t = torch.as_tensor(got).detach()
    want_t = torch.as_tensor(want).detach().to(torch.float64)
    out[name] = got_t.clone()
    ok = got_t.shape == want_t.shape and torch.allclose(got_t.double(), want_t, atol=atol, rtol=rtol, equal_nan=True)
    err = (got_t.double() - want_t).abs().max().item() if got_t.shape == want_t.shape and got_t.numel() else 0.0
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max abs error {err:.3g}", flush=True)
    if not ok:
        raise SystemExit(f"cpu_level_smoke: {name} differs from the reference (max abs error {err:.3g})")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--save", help="torch.save the outputs here")
    p.add_argument("--small", action="store_true", help="fewer calls (for emulated CPUs)")
    args = p.parse_args()
    torch.manual_seed(0)
    out: dict = {}
    level = embedops.build_info()["cpu_capability"]
    print(f"embedops CPU level {level} (compiled {embedops.build_info()['cpu_capabilities']}), "
          f"torch {torch.backends.cpu.get_cpu_capability()}", flush=True)
    f64 = torch.float64

    # embedding: fixed-D sum (D = 64) and the general path (D = 24, max pooling), 2 features
    for D, mode in ((64, "sum"), (24, "max")):
        w = torch.randn(1000, D)
        values = torch.randint(-(2**40), 2**40, (60,))
        offsets = torch.tensor([0, 5, 17, 17, 30, 44, 60])
        got = embedops.multiplexed_embedding_bag(w, values, offsets, num_probes=[2, 1], mode=mode)
        want = ref.multiplexed_embedding_bag(w.double(), values, offsets, [2, 1], mode=mode)
        close(f"embedding_bag D={D} {mode}", got, want, 1e-5, 1e-5, out)

    # embedding over an int8 row-quantised table: fixed-D (D = 64, sum with weights), general (D = 24,
    # max), against the float64 reference of the exactly dequantised table
    for D, mode in ((64, "sum"), (24, "max")):
        table = embedops.quantize_table(torch.randn(1000, D), "int8")
        values = torch.randint(-(2**40), 2**40, (60,))
        offsets = torch.tensor([0, 5, 17, 17, 30, 44, 60])
        psw = torch.rand(60) if mode == "sum" else None
        got = embedops.multiplexed_embedding_bag(table, values, offsets, num_probes=[2, 1], mode=mode,
                                                 per_sample_weights=psw)
        want = ref.multiplexed_embedding_bag(embedops.dequantize_table(table, f64), values, offsets, [2, 1],
                                             mode=mode, per_sample_weights=None if psw is None else psw.double())
        close(f"embedding_bag int8 table D={D} {mode}", got, want, 1e-5, 1e-5, out)

    # matryoshka: similarity and top-k at B = 7 (packed micro kernel), B = 3 (direct path) and
    # B = 48 (the micro kernel at avx2 / avx512, BLAS at the default level: mat::use_prefix_micro)
    x = torch.nn.functional.normalize(torch.randn(300, 96), dim=1)
    dims = [16, 40, 96]
    for B in ((7, 3, 48) if not args.small else (7,)):
        q = torch.randn(B, 96)
        close(f"matryoshka_similarity B={B}", embedops.matryoshka_similarity(q, x, dims),
              ref.matryoshka_similarity(q.double(), x.double(), dims), 1e-5, 1e-5, out)
        vals, idx = embedops.matryoshka_topk(q, x, 10, dims)
        want_v, want_i = ref.matryoshka_topk(q.double(), x.double(), 10, dims)
        close(f"matryoshka_topk values B={B}", vals, want_v, 1e-5, 1e-5, out)
        out[f"matryoshka_topk indices B={B}"] = idx.clone()
    fv, fi = embedops.matryoshka_funnel(torch.randn(5, 96), x, 5, [(16, 40), (48, 20)])
    out["matryoshka_funnel indices"] = fi.clone()
    # hamming_topk: the vector paths (256 / 512 bits, a full query block of 8 and a partial one) and
    # the general path (100 bits), exact against the bit reference
    for nbytes, nbits, B in ((32, None, 11), (64, None, 9), (13, 100, 3)):
        qc = torch.randint(0, 256, (B, nbytes), dtype=torch.uint8)
        xc = torch.randint(0, 256, (3000, nbytes), dtype=torch.uint8)
        d, i = embedops.hamming_topk(qc, xc, 7, nbits=nbits)
        nb = nbits or 8 * nbytes
        bits = lambda c: ((c.long().unsqueeze(-1) >> torch.arange(7, -1, -1)) & 1).flatten(1)[:, :nb]
        full = (bits(qc)[:, None, :] != bits(xc)[None, :, :]).sum(-1)
        key = full * 4096 + torch.arange(3000)  # nearest first, ties to the lower index
        want_i = key.argsort(dim=1)[:, :7]
        ok = torch.equal(i, want_i) and torch.equal(d.long(), full.gather(1, want_i))
        out[f"hamming_topk {nb} bits"] = i.clone()
        print(f"{'ok  ' if ok else 'FAIL'} hamming_topk {nb} bits B={B}: exact", flush=True)
        if not ok:
            raise SystemExit(f"cpu_level_smoke: hamming_topk {nb} bits differs from the bit reference")

    # attention: short keys (Lk = 77, fused pass), long keys (tiled pass), fp32 backward, padding
    for Lq, Lk in ((50, 77), (40, 300)):
        q, k, v = torch.randn(2, Lq, 4, 32), torch.randn(2, Lk, 2, 32), torch.randn(2, Lk, 2, 32)
        kv_len = torch.tensor([Lk, Lk * 2 // 3])
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        o = embedops.cross_attention(qq, kk, vv, kv_lengths=kv_len)
        g = torch.randn_like(o)
        o.backward(g)
        qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
        ro, _ = ref.cross_attention(qd, kd, vd, kv_lengths=kv_len)
        ro.backward(g.double())
        close(f"cross_attention Lq={Lq} Lk={Lk}", o, ro, 2e-5, 2e-5, out)
        for name, a, b in (("dq", qq, qd), ("dk", kk, kd), ("dv", vv, vd)):
            close(f"cross_attention {name} Lq={Lq} Lk={Lk}", a.grad, b.grad, 1e-4, 1e-4, out)
    if not args.small:
        qx, ky = torch.randn(2, 30, 2, 16), torch.randn(2, 20, 2, 16)
        vx, vy = torch.randn(2, 30, 2, 16), torch.randn(2, 20, 2, 16)
        ox, oy = embedops.co_attention(qx, ky, vx, vy)
        rx, ry, _, _ = ref.co_attention(qx, ky, vx, vy)
        close("co_attention ox", ox, rx, 2e-5, 2e-5, out)
        close("co_attention oy", oy, ry, 2e-5, 2e-5, out)
    # (90 queries: one short-query tile of 12 vectors on avx2, two tiles on the other levels)
    q, k, v = torch.randn(2, 90, 4, 32), torch.randn(2, 90, 2, 32), torch.randn(2, 90, 2, 32)
    seg = torch.tensor([[30, 60], [50, 20]])
    wts = torch.softmax(torch.randn(2, 90, 2), -1)
    close("mixture_attention", embedops.mixture_attention(q, k, v, seg, wts),
          ref.mixture_attention(q.to(f64), k.to(f64), v.to(f64), seg, wts.to(f64))[0], 2e-5, 2e-5, out)
    if args.save:
        torch.save({"level": level, "outputs": out}, args.save)
    print(f"cpu_level_smoke: all checks passed at {level}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
