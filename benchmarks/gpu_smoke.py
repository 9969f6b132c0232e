"""Stage (a) of benchmarks/gpu_check.sh: the smallest inputs worth running first on a GPU
(shared/notes/cuda-review.md), one call per CUDA kernel family, each compared with the CPU result.

    python benchmarks/gpu_smoke.py [--device cuda|cpu] [--out PATH]

Prints one line per check as it goes (a crash still leaves the lines before it) and writes them to
--out. --device cpu runs the same calls against the CPU on the CPU: the CI check of this script.
Exit code: 0 when every check passed.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

import embedops

LINES: list[str] = []


def report(line: str, out: str | None) -> None:
    print(line, flush=True)
    LINES.append(line)
    if out:
        with open(out, "w") as f:
            f.write("\n".join(LINES) + "\n")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out")
    args = p.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        report("FAIL no CUDA device", args.out)
        return 1
    g = torch.Generator().manual_seed(0)
    failures = 0

    def check(name, fn, atol=1e-4, rtol=1e-4):
        """fn(device) -> tensor or tuple; the CUDA result against the CPU one."""
        nonlocal failures
        try:
            got = fn(dev)
            want = fn("cpu")
            got = got if isinstance(got, tuple) else (got,)
            want = want if isinstance(want, tuple) else (want,)
            for a, b in zip(got, want):
                a, b = a.detach().cpu(), b.detach().cpu()
                if a.dtype in (torch.int64, torch.int32):
                    assert torch.equal(a, b), "indices differ"
                else:
                    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)
            if dev == "cuda":
                torch.cuda.synchronize()
            report(f"ok   {name}", args.out)
        except Exception as e:  # report and go on: later checks may still run
            failures += 1
            report(f"FAIL {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", args.out)
            traceback.print_exc()

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    # 1. tensor-core forward (opt-in), fp16: one valid key -> the output is v
    q, k, v = rnd(1, 5, 2, 16, dtype=torch.float16), rnd(1, 1, 2, 16, dtype=torch.float16), rnd(1, 1, 2, 16, dtype=torch.float16)

    def tc(d):
        os.environ["EMBEDOPS_ATTN_TENSOR_CORES"] = "1"
        try:
            return embedops.cross_attention(q.to(d), k.to(d), v.to(d), kv_lengths=torch.tensor([1]).to(d))
        finally:
            del os.environ["EMBEDOPS_ATTN_TENSOR_CORES"]
    check("attention tensor-core fwd fp16 (1 key)", tc, atol=2e-3, rtol=2e-3)
    q2, k2, v2 = rnd(2, 77, 4, 64), rnd(2, 300, 2, 64), rnd(2, 300, 2, 64)
    check("attention fwd fp32 GQA", lambda d: embedops.cross_attention(q2.to(d), k2.to(d), v2.to(d)))
    # 2. split-KV (small Lq, long keys)
    q3, k3, v3 = rnd(1, 3, 2, 8), rnd(1, 2100, 1, 8), rnd(1, 2100, 1, 8)
    check("attention split-KV fwd", lambda d: embedops.cross_attention(q3.to(d), k3.to(d), v3.to(d)))

    # 3. large head dims, forward and backward
    q4, k4, v4 = rnd(1, 20, 2, 256), rnd(1, 33, 2, 256), rnd(1, 33, 2, 200)

    def big(d):
        qq, kk, vv = (t.to(d).requires_grad_() for t in (q4, k4, v4))
        o = embedops.cross_attention(qq, kk, vv)
        o.sum().backward()
        return o, qq.grad, kk.grad, vv.grad
    check("attention D=256 Dv=200 fwd+bwd", big, atol=5e-4, rtol=5e-4)

    # 4. embedding: all-empty max bags -> zero gradient; the fused row-wise Adagrad step
    def empty_max(d):
        w = rnd(50, 8).to(d).requires_grad_()
        out = embedops.multiplexed_embedding_bag(w, torch.empty(0, dtype=torch.int64).to(d),
                                                 torch.zeros(5, dtype=torch.int64).to(d), num_probes=[1, 3],
                                                 mode="max")
        out.sum().backward()
        return out, w.grad
    check("embedding empty max bags fwd+bwd", empty_max)

    def fused(d):
        m = embedops.nn.UnifiedEmbedding(1000, 16, {"a": 2, "b": 1}, optimizer="rowwise_adagrad", lr=0.1, seed=1)
        m = m.to(d)
        with torch.no_grad():
            m.weight.copy_(torch.arange(16000, dtype=torch.float32).view(1000, 16).sin().to(d))
        vals = torch.tensor([5, -3, 7, 7, 2**40, 11]).to(d)
        offs = torch.tensor([0, 1, 2, 4, 5, 6, 6]).to(d)  # 2 features x 3 bags, feature-major
        m((vals, offs)).pow(2).sum().backward()
        return m.weight.detach(), m.momentum.detach()
    check("embedding fused rowwise adagrad step", fused)

    # 5. top-k block flush (k = 300 over 4097 rows), NaN order, funnel in float64
    x = rnd(4097, 9)
    qm = rnd(1, 9)
    check("matryoshka topk k=300", lambda d: embedops.matryoshka_topk(qm.to(d), x.to(d), 300, [9]))
    xn = x.clone()
    xn[5, 3] = float("nan")
    xn[7] = float("inf")
    check("matryoshka topk NaN/inf", lambda d: embedops.matryoshka_topk(qm.to(d), xn.to(d), 20, [4, 9], metric="dot"))
    x64 = x.double()
    check("matryoshka funnel float64",
          lambda d: embedops.matryoshka_funnel(qm.double().to(d), x64.to(d), 10, [(3, 300), (6, 40)]))
    qs, xs = rnd(7, 96), rnd(300, 96)
    check("matryoshka similarity", lambda d: embedops.matryoshka_similarity(qs.to(d), xs.to(d), [16, 40, 96]))
    check("hash_ids", lambda d: embedops.hash_ids(torch.arange(-50, 50).to(d), feature=3, probe=1, num_rows=977))
    report(f"gpu_smoke: {failures} failed" if failures else "gpu_smoke: all checks passed", args.out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
