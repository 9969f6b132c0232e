"""embedops.distributed: sharded Unified Embedding and sharded Matryoshka index on gloo (2 and 3
processes spawned with torch.multiprocessing), compared with one UnifiedEmbedding / MatryoshkaIndex
holding the union. Each test spawns ONE world that runs a list of checks, with a timeout."""

from __future__ import annotations

import datetime
import importlib.util
import os
import tempfile
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import embedops
from embedops.nn import UnifiedEmbedding

HAS_TORCHREC = importlib.util.find_spec("torchrec") is not None
WORLD_TIMEOUT = 150  # seconds for a whole spawned world
FEATURES = {"a": 1, "b": 2, "c": 3}


# ---- harness -------------------------------------------------------------------------------------


def _entry(rank, world, fn, tmp, run, backend):
    torch.set_num_threads(1)
    out = os.path.join(run, f"result-{rank}")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"file://{run}/init", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        done = fn(rank, world, tmp)
        with open(out, "w") as f:
            f.write("ok")
        if done != "no-teardown":
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001  (reported to the parent)
        with open(out, "w") as f:
            f.write(traceback.format_exc())
    os._exit(0)


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def spawn(fn, world, tmp_path, backend="gloo"):
    """Runs fn(rank, world, tmp) on `world` spawned ranks; fails with every rank's traceback."""
    tmp = str(tmp_path)
    run = tempfile.mkdtemp(prefix="world-", dir=tmp)  # a fresh init file and result files per world
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(r, world, fn, tmp, run, backend)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + WORLD_TIMEOUT
    for p in procs:
        p.join(max(1.0, deadline - time.time()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = []
    for r in range(world):
        path = os.path.join(run, f"result-{r}")
        res = _read(path).decode() if os.path.exists(path) else "no result (crashed or hung)"
        if res != "ok":
            errors.append(f"rank {r}:\n{res}")
    assert not hung and not errors, f"hung ranks {hung}\n" + "\n".join(errors)


# ---- data ----------------------------------------------------------------------------------------


def _batches(world, seed, sizes=None, features=FEATURES, max_len=6, id_range=40, psw=False, dtype=torch.float64):
    """Per-rank dict batches {name: (values, offsets)} (+ per-sample weights), the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    sizes = sizes or [int(torch.randint(1, 6, (1,), generator=g)) for _ in range(world)]
    out = []
    for b in sizes:
        x, w = {}, {}
        for name in features:
            lengths = torch.randint(0, max_len + 1, (b,), generator=g)
            n = int(lengths.sum())
            vals = torch.randint(-id_range, id_range, (n,), generator=g)
            x[name] = (vals, torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)))
            w[name] = torch.rand(n, generator=g, dtype=dtype) + 0.5
        out.append((x, w if psw else None))
    return out


def _concat(batches):
    """The concatenated (rank-order) batch of per-rank dict batches."""
    x, w = {}, {}
    for name in batches[0][0]:
        vals = torch.cat([b[0][name][0] for b in batches])
        lengths = torch.cat([b[0][name][1].diff() for b in batches])
        x[name] = (vals, torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)))
        if batches[0][1] is not None:
            w[name] = torch.cat([b[1][name] for b in batches])
    return x, (w if batches[0][1] is not None else None)


def _row_slice(rank, batches):
    start = sum(next(iter(b[0].values()))[1].numel() - 1 for b in batches[:rank])
    return start, start + next(iter(batches[rank][0].values()))[1].numel() - 1


def _close(a, b, what, tol):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.numel():
        err = (a - b).abs().max().item()
        assert err <= tol, f"{what}: max abs error {err:.3g} > {tol}"


# ---- embedding equivalence -----------------------------------------------------------------------


def _equivalence(rank, world, sharding, mode, combine, optimizer, psw, sizes, dtype=torch.float64, steps=2,
                 seed=0, num_rows=37, dim=6, exchange="auto"):
    from embedops.distributed import ShardedUnifiedEmbedding, full_state_dict

    tag = f"{sharding}/{exchange}/{mode}/{combine}/{optimizer}/psw={psw}/sizes={sizes}/{dtype}"
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    kw = dict(combine=combine, mode=mode, optimizer=optimizer, lr=0.1, seed=seed + 3)
    torch.manual_seed(seed)
    ue = UnifiedEmbedding(num_rows, dim, FEATURES, dtype=dtype, **kw)
    sh = ShardedUnifiedEmbedding(num_rows, dim, FEATURES, sharding=sharding, dtype=dtype, timeout=30,
                                 row_exchange=exchange, **kw)
    sh.load_full_state_dict(ue.state_dict())
    for step in range(steps):
        batches = _batches(world, seed * 100 + step, sizes, psw=psw, dtype=dtype)
        gx, gw = _concat(batches)
        x, w = batches[rank]
        a, e = _row_slice(rank, batches)
        if gw is not None:
            gw = {k: v.clone().requires_grad_() for k, v in gw.items()}
            w = {k: v.clone().requires_grad_() for k, v in w.items()}
        ref = ue(gx, gw)
        out = sh(x, w)
        if sharding == "row" and exchange != "auto":
            assert sh.last_exchange == exchange, f"{tag}: used the {sh.last_exchange} exchange"
        _close(out, ref[a:e], f"{tag} step {step} output", tol)
        coef = torch.randn(ref.shape, generator=torch.Generator().manual_seed(step), dtype=dtype)
        (ref * coef).sum().backward()
        (out * coef[a:e]).sum().backward()
        if optimizer is None:
            (r0, r1), (c0, c1) = sh._rows, sh._cols
            _close(sh.weight.grad, ue.weight.grad[r0:r1, c0:c1], f"{tag} step {step} weight.grad", tol)
            with torch.no_grad():  # a plain torch SGD step on both
                ue.weight -= 0.1 * ue.weight.grad
                sh.weight -= 0.1 * sh.weight.grad
            ue.weight.grad = None
            sh.weight.grad = None
        else:
            assert sh.weight.grad is None, f"{tag}: a fused optimizer must leave weight.grad None"
        if gw is not None:
            for name in FEATURES:
                start = sum(b[0][name][0].numel() for b in batches[:rank])
                _close(w[name].grad, gw[name].grad[start:start + w[name].numel()], f"{tag} psw grad {name}", tol)
    full = full_state_dict(sh)
    ref_sd = ue.state_dict()
    assert set(full) == set(ref_sd), f"{tag}: full_state_dict keys {set(full)} != {set(ref_sd)}"
    for k in ref_sd:
        _close(full[k], ref_sd[k], f"{tag} final {k}", tol)


def _check_embedding_w2(rank, world, tmp):
    # every sharding (row with both exchanges) x pooling mode, concat; combine sum/mean; the three
    # optimizers; uneven and empty batches
    for sharding, exchange in (("row", "partials"), ("row", "rows"), ("column", "auto")):
        ex = dict(exchange=exchange)
        for mode in ("sum", "mean", "max"):
            for optimizer in (None, "sgd", "rowwise_adagrad"):
                _equivalence(rank, world, sharding, mode, "concat", optimizer, False, [3, 0] if mode == "max" else None,
                             **ex)
        _equivalence(rank, world, sharding, "sum", "sum", "rowwise_adagrad", True, [0, 4], **ex)
        _equivalence(rank, world, sharding, "max", "mean", "sgd", False, [2, 5], **ex)
        _equivalence(rank, world, sharding, "mean", "mean", None, False, [1, 3], **ex)
        _equivalence(rank, world, sharding, "sum", "concat", None, True, [2, 2], **ex)
        _equivalence(rank, world, sharding, "sum", "concat", "rowwise_adagrad", False, [3, 1], dtype=torch.float32,
                     **ex)
        # heavy row collisions (few rows, long bags): max-pool partials from both owners
        _equivalence(rank, world, sharding, "max", "concat", "rowwise_adagrad", False, [4, 4], num_rows=5, **ex)
        _equivalence(rank, world, sharding, "sum", "mean", "sgd", True, [4, 4], num_rows=5, **ex)
    # the automatic choice: few distinct rows -> rows; many distinct rows, long bags -> partial sums
    _equivalence(rank, world, "row", "sum", "concat", "rowwise_adagrad", False, [4, 4], num_rows=5)
    _auto_exchange(rank, world)


def _auto_exchange(rank, world):
    from embedops.distributed import ShardedUnifiedEmbedding

    m = ShardedUnifiedEmbedding(1 << 16, 8, {"a": 1}, optimizer="sgd", timeout=30)
    g = torch.Generator().manual_seed(rank)
    long_bags = {"a": (torch.randint(0, 2 ** 40, (4 * 200,), generator=g), torch.arange(0, 801, 200))}
    m(long_bags).sum().backward()
    assert m.last_exchange == "partials", m.last_exchange
    few = {"a": (torch.tensor([1, 2, 1, 2, 1, 2, 1, 2]), torch.arange(0, 9, 1))}  # 8 bags over 2 distinct ids
    m(few).sum().backward()
    assert m.last_exchange == "rows", m.last_exchange
    # a table much larger than the batch (distinct rows counted by a sort, not a bitmap): both
    # exchanges give the same output and update
    outs = []
    for exchange in ("partials", "rows"):
        big = ShardedUnifiedEmbedding(5_000_000, 2, {"a": 2}, optimizer="sgd", lr=0.5, seed=1, row_exchange=exchange,
                                      timeout=30)
        x = {"a": (torch.arange(10) * 7919 + rank, torch.tensor([0, 3, 3, 10]))}
        out = big(x)
        (out * out).sum().backward()
        outs.append((out.detach(), big(x).detach()))
        assert big.last_exchange == exchange
    _close(outs[0][0], outs[1][0], "big table: output, partials vs rows", 1e-6)
    _close(outs[0][1], outs[1][1], "big table: after one step, partials vs rows", 1e-6)


def test_embedding_equivalence_2_ranks(tmp_path):
    spawn(_check_embedding_w2, 2, tmp_path)


def _check_embedding_w3(rank, world, tmp):
    from embedops.distributed import ShardedUnifiedEmbedding, full_state_dict

    for sharding, exchange in (("row", "partials"), ("row", "rows"), ("column", "auto")):
        _equivalence(rank, world, sharding, "sum", "concat", "rowwise_adagrad", True, [2, 0, 3], exchange=exchange)
        _equivalence(rank, world, sharding, "max", "sum", None, False, [1, 4, 0], exchange=exchange)
        _equivalence(rank, world, sharding, "mean", "concat", "sgd", False, [0, 0, 2], exchange=exchange)
    # resharding: the W=2 checkpoint written by the 2-rank world, loaded at W=3 and W=1
    sd = torch.load(os.path.join(tmp, "w2_full.pt"))
    ue = UnifiedEmbedding(50, 8, FEATURES, optimizer="rowwise_adagrad", seed=5, dtype=torch.float64)
    ue.load_state_dict(sd)
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    batches = _batches(world, 77)
    gx, _ = _concat(batches)
    ref = ue(gx)
    a, e = _row_slice(rank, batches)
    for sharding in ("row", "column"):
        m3 = ShardedUnifiedEmbedding(50, 8, FEATURES, optimizer="rowwise_adagrad", seed=5, sharding=sharding,
                                     dtype=torch.float64, timeout=30)
        m3.load_full_state_dict(sd)
        _close(m3(batches[rank][0]), ref[a:e], f"resharded W=3 {sharding}", 1e-12)
        m1 = ShardedUnifiedEmbedding(50, 8, FEATURES, optimizer="rowwise_adagrad", seed=5, sharding=sharding,
                                     dtype=torch.float64, process_group=groups[rank], timeout=30)
        m1.load_full_state_dict(sd)
        _close(m1(gx), ref, f"resharded W=1 {sharding}", 1e-12)
        # the W=3 sharded state dict round-trips into the same placement, and refuses another one
        m3b = ShardedUnifiedEmbedding(50, 8, FEATURES, optimizer="rowwise_adagrad", seed=5, sharding=sharding,
                                      dtype=torch.float64, timeout=30)
        with torch.no_grad():
            m3b.weight.zero_()
        m3b.load_state_dict(m3.state_dict())
        _close(m3b.momentum, m3.momentum, f"sharded state_dict momentum {sharding}", 0)
        _close(m3b(batches[rank][0]), ref[a:e], f"sharded state_dict round trip {sharding}", 1e-12)
        with pytest.raises(ValueError, match="load_full_state_dict"):
            m1.load_state_dict(m3.state_dict())
        full = full_state_dict(m3)
        _close(full["weight"], sd["weight"], "full_state_dict at W=3", 0)


def _save_w2(rank, world, tmp):
    from embedops.distributed import ShardedUnifiedEmbedding, full_state_dict

    m = ShardedUnifiedEmbedding(50, 8, FEATURES, optimizer="rowwise_adagrad", seed=5, dtype=torch.float64,
                                timeout=30)
    for step in range(2):  # train a little so momentum is non-trivial
        x, _ = _batches(world, 10 + step)[rank]
        m(x).pow(2).sum().backward()
    sd = full_state_dict(m)
    assert float(sd["momentum"].abs().sum()) > 0
    if rank == 0:
        torch.save(sd, os.path.join(tmp, "w2_full.pt"))
    # the same initial table at any world size: chunked seeded init
    fresh = full_state_dict(ShardedUnifiedEmbedding(50, 8, FEATURES, seed=5, sharding="column", timeout=30))
    fresh1 = ShardedUnifiedEmbedding(50, 8, FEATURES, seed=5, process_group=dist.new_group([0]) if rank == 0
                                     else dist.new_group([1]), timeout=30)
    _close(fresh["weight"], fresh1.weight, "initial table independent of the world size", 0)


def test_embedding_3_ranks_and_resharding(tmp_path):
    spawn(_save_w2, 2, tmp_path)
    spawn(_check_embedding_w3, 3, tmp_path)


# ---- torchrec interop ----------------------------------------------------------------------------


def _check_kjt(rank, world, tmp):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

    from embedops.distributed import ShardedUnifiedEmbedding

    batches = _batches(world, 5, psw=True)
    gx, gw = _concat(batches)
    x, w = batches[rank]
    a, e = _row_slice(rank, batches)

    def kjt(xd, wd, keys, use_offsets):
        vals = torch.cat([xd[k][0] for k in keys])
        lengths = torch.cat([xd[k][1].diff() for k in keys])
        weights = torch.cat([wd[k] for k in keys]) if wd is not None else None
        if use_offsets:
            return KeyedJaggedTensor(keys=keys, values=vals, weights=weights,
                                     offsets=torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)))
        return KeyedJaggedTensor(keys=keys, values=vals, lengths=lengths, weights=weights)

    torch.manual_seed(0)  # the same reference table on every rank
    ue = UnifiedEmbedding(40, 4, FEATURES, dtype=torch.float64, seed=2)
    ref = ue(gx, gw)
    _close(ue(kjt(gx, gw, list(FEATURES), True)), ref, "UnifiedEmbedding KJT (offsets, weights)", 1e-12)
    _close(ue(kjt(gx, gw, ["c", "a", "b"], False)), ref, "UnifiedEmbedding KJT (lengths, other key order)", 1e-12)
    kt = ue(gx, gw, keyed_tensor=True)
    assert isinstance(kt, KeyedTensor) and kt.keys() == list(FEATURES)
    _close(kt["b"], ref[:, 4:12], "KeyedTensor['b']", 0)
    for sharding in ("row", "column"):
        sh = ShardedUnifiedEmbedding(40, 4, FEATURES, dtype=torch.float64, seed=2, sharding=sharding, timeout=30)
        sh.load_full_state_dict(ue.state_dict())
        out = sh(kjt(x, w, ["b", "c", "a"], rank % 2 == 0), keyed_tensor=True)
        assert isinstance(out, KeyedTensor)
        _close(out.values(), ref[a:e], f"sharded {sharding} KJT -> KeyedTensor", 1e-12)
    with pytest.raises(ValueError, match="keys must be exactly"):
        ue(KeyedJaggedTensor(keys=["a", "zz"], values=torch.arange(2), lengths=torch.tensor([1, 1])))


@pytest.mark.skipif(not HAS_TORCHREC and not os.environ.get("EMBEDOPS_REQUIRE_TORCHREC"),
                    reason="torchrec is not installed (optional: pip install 'embedops[torchrec]')")
def test_torchrec_interop(tmp_path):
    if not HAS_TORCHREC:  # CI sets EMBEDOPS_REQUIRE_TORCHREC=1: there this test must run, not skip
        pytest.fail("EMBEDOPS_REQUIRE_TORCHREC is set but torchrec cannot be imported")
    spawn(_check_kjt, 2, tmp_path)


def test_no_torchrec_import_without_kjt():
    """torchrec stays optional: a plain forward never imports it."""
    import subprocess
    import sys

    code = ("import sys, torch, embedops, embedops.distributed; from embedops.nn import UnifiedEmbedding; "
            "m = UnifiedEmbedding(10, 4, {'a': 1}); m({'a': (torch.arange(3), torch.tensor([0, 3]))}); "
            "assert 'torchrec' not in sys.modules, 'torchrec imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ), timeout=120)


# ---- failure behaviour ---------------------------------------------------------------------------


def _check_failures(rank, world, tmp):
    from embedops.distributed import ShardedMatryoshkaIndex, ShardedUnifiedEmbedding

    # mismatched configs are caught at construction, on every rank
    with pytest.raises(ValueError, match="num_rows"):
        ShardedUnifiedEmbedding(100 + rank, 8, FEATURES, timeout=20)
    with pytest.raises(ValueError, match="seed"):
        ShardedUnifiedEmbedding(100, 8, FEATURES, seed=rank, timeout=20)
    with pytest.raises(ValueError, match="features"):
        ShardedUnifiedEmbedding(100, 8, {"a": 1, "b": 1 + rank}, timeout=20)
    # a bad argument on one rank only: that rank's own error, the others a clear error of the same type
    with pytest.raises(ValueError, match="sharding" if rank == 1 else "rank\\(s\\) \\[1\\]"):
        ShardedUnifiedEmbedding(100, 8, FEATURES, sharding="diagonal" if rank == 1 else "row", timeout=20)
    for sharding in ("row", "column"):
        m = ShardedUnifiedEmbedding(100, 8, {"a": 1}, optimizer="sgd", sharding=sharding, timeout=20)
        good = {"a": {"values": torch.arange(4), "lengths": torch.tensor([2, 2])}}
        bad = {"a": {"values": torch.arange(4), "lengths": torch.tensor([3, -1])}}
        with pytest.raises(ValueError, match="lengths must be >= 0" if rank == 0 else "rank\\(s\\) \\[0\\]"):
            m(bad if rank == 0 else good)
        with pytest.raises(TypeError):
            m((torch.arange(4.0), torch.tensor([0, 4])) if rank == 1 else good)
        with pytest.raises(ValueError, match="input features must be exactly"):  # the others get rank 0's message
            m({"b": good["a"]} if rank == 0 else good)
        out = m(good)  # the group still works after the failed calls
        out.sum().backward()
    ix = ShardedMatryoshkaIndex(8, timeout=20)
    with pytest.raises(ValueError):
        ix.add(torch.randn(3, 8 if rank == 0 else 7))
    ix.add(torch.randn(3, 8))
    with pytest.raises(ValueError, match="k must be in" if rank == 1 else "rank"):
        ix.search(torch.randn(2, 8), 3 if rank == 0 else 99)
    with pytest.raises(ValueError, match="same k"):
        ix.search(torch.randn(2, 8), 1 + rank)
    with pytest.raises(ValueError, match="distinct across ranks"):
        ix2 = ShardedMatryoshkaIndex(8, timeout=20)
        ix2.add(torch.randn(2, 8), ids=torch.tensor([5, 6 + rank]))
    with pytest.raises(ValueError, match="distinct"):
        ix2 = ShardedMatryoshkaIndex(8, timeout=20)
        ix2.add(torch.randn(2, 8), ids=torch.tensor([5, 5]) if rank == 0 else torch.tensor([1, 2]))
    # a rank that never joins: the other rank's collective times out with a clear error (no hang)
    m = ShardedUnifiedEmbedding(100, 8, {"a": 1}, timeout=3)
    if rank == 0:
        t0 = time.time()
        with pytest.raises(RuntimeError, match="timed out"):
            m({"a": (torch.arange(2), torch.tensor([0, 2]))})
        assert time.time() - t0 < 20
    else:
        time.sleep(5)
    return "no-teardown"  # the group is unusable after a timeout


def test_failures_raise_on_every_rank(tmp_path):
    spawn(_check_failures, 2, tmp_path)


def test_single_process_errors():
    from embedops.distributed import ShardedUnifiedEmbedding, full_state_dict

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedUnifiedEmbedding(10, 4, {"a": 1})
    with pytest.raises(TypeError, match="full_state_dict"):
        full_state_dict(UnifiedEmbedding(10, 4, {"a": 1}))


# ---- sharded index -------------------------------------------------------------------------------


def _check_index(rank, world, tmp):
    from embedops.distributed import ShardedMatryoshkaIndex

    D = 32
    g = torch.Generator().manual_seed(0)
    sizes = [[50, 0, 31][:world], [7, 40, 3][:world]]  # two add calls, uneven, one rank empty
    chunks = [[torch.randn(n, D, generator=g) for n in s] for s in sizes]
    queries = [torch.randn(b, D, generator=g) for b in [5, 0, 3][:world]]
    for metric, dtype in (("cosine", torch.float32), ("dot", torch.float64)):
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        ix = ShardedMatryoshkaIndex(D, dims=[8, 16], metric=metric, dtype=dtype, timeout=30)
        single = embedops.MatryoshkaIndex(D, dims=[8, 16], metric=metric, dtype=dtype)
        for call in chunks:
            ix.add(call[rank])
            for c in call:
                single.add(c)
        assert len(ix) == len(single) == sum(map(sum, sizes))
        q_all = torch.cat(queries)
        qa = sum(q.shape[0] for q in queries[:rank])
        qe = qa + queries[rank].shape[0]
        for k, dim in ((1, None), (10, 16), (len(single), 8), (5, [8, 32])):
            v, i = ix.search(queries[rank], k, dim)
            rv, ri = single.search(q_all, k, dim)
            sl = (slice(None), slice(qa, qe)) if isinstance(dim, list) else (slice(qa, qe),)
            _close(v, rv[sl], f"search {metric} k={k} dim={dim} scores", tol)
            assert torch.equal(i, ri[sl]), f"search {metric} k={k} dim={dim} ids"
        for stages, k, dim in ((((8, 40), (16, 12)), 5, None), (((16, 30),), 30, 24)):
            v, i = ix.funnel_search(queries[rank], k, stages, dim)
            rv, ri = single.funnel_search(q_all, k, stages, dim)
            _close(v, rv[qa:qe], f"funnel {metric} {stages} scores", tol)
            assert torch.equal(i, ri[qa:qe]), f"funnel {metric} {stages} ids {i} != {ri[qa:qe]}"
        # batches past the query rows that travel with the status words (a second exchange), twice
        bq = [torch.randn(40 if r == 0 else 2, D, generator=torch.Generator().manual_seed(50 + r))
              for r in range(world)]
        bo = sum(b.shape[0] for b in bq[:rank])
        for _ in range(2):
            v, i = ix.search(bq[rank], 4)
            rv, ri = single.search(torch.cat(bq), 4)
            _close(v, rv[bo:bo + bq[rank].shape[0]], f"search {metric} big batch scores", tol)
            assert torch.equal(i, ri[bo:bo + bq[rank].shape[0]]), f"search {metric} big batch ids"
        # numpy in, numpy out
        v, i = ix.search(queries[rank].numpy(), 3)
        assert isinstance(v, np.ndarray) and i.dtype == np.int64
        # save at W, load at W (here) — the other sizes load it in test_index_resharding
        ix.save(os.path.join(tmp, f"index-{metric}"))
        back = ShardedMatryoshkaIndex.load(os.path.join(tmp, f"index-{metric}"), timeout=30)
        assert len(back) == len(ix)
        v2, i2 = back.search(queries[rank], 7)
        rv, ri = single.search(q_all, 7)
        _close(v2, rv[qa:qe], "loaded search", tol)
        assert torch.equal(i2, ri[qa:qe])
    # user ids: any distinct int64, returned as given
    ix = ShardedMatryoshkaIndex(D, timeout=30)
    single = embedops.MatryoshkaIndex(D)
    all_ids = torch.randperm(10 ** 6, generator=g)[: sum(sizes[0])] * 7919 - 2 ** 40
    ids = list(torch.split(all_ids, sizes[0]))
    ix.add(chunks[0][rank], ids=ids[rank])
    for c in chunks[0]:
        single.add(c)
    v, i = ix.search(queries[rank], 6)
    rv, ri = single.search(q_all, 6)
    _close(v, rv[qa:qe], "user-id search scores", 1e-6)
    assert torch.equal(i, all_ids[ri[qa:qe]]), "user ids must come back unchanged"
    with pytest.raises(ValueError, match="mixing"):
        ix.add(chunks[1][rank])
    with pytest.raises(ValueError, match="already in the index"):
        ix.add(torch.randn(1, D), ids=all_ids[:1] if rank == 0 else torch.tensor([2 ** 50 + rank]))
    ix.save(os.path.join(tmp, "index-user"))


def _check_index_reload(rank, world, tmp):
    from embedops.distributed import ShardedMatryoshkaIndex

    D = 32
    g = torch.Generator().manual_seed(0)
    sizes = [[50, 0, 31][:2], [7, 40, 3][:2]]
    chunks = [[torch.randn(n, D, generator=g) for n in s] for s in sizes]
    single = embedops.MatryoshkaIndex(D, dims=[8, 16])
    for call in chunks:
        for c in call:
            single.add(c)
    back = ShardedMatryoshkaIndex.load(os.path.join(tmp, "index-cosine"), timeout=30)
    assert len(back) == len(single) and back.local_size == [33, 32, 32][rank]
    q = torch.randn(4, D, generator=torch.Generator().manual_seed(rank))
    v, i = back.search(q, 9, 16)
    rv, ri = single.search(q, 9, 16)
    _close(v, rv, f"W=2 index loaded at W={world}", 1e-6)
    assert torch.equal(i, ri)
    v, i = back.funnel_search(q, 4, ((8, 20),))
    rv, ri = single.funnel_search(q, 4, ((8, 20),))
    assert torch.equal(i, ri)
    # and at W=1 (a one-rank group per rank)
    groups = [dist.new_group([r]) for r in range(world)]
    solo = ShardedMatryoshkaIndex.load(os.path.join(tmp, "index-cosine"), process_group=groups[rank], timeout=30)
    assert solo.local_size == len(single)
    v, i = solo.search(q, 9, 16)
    assert torch.equal(i, ri[:, :0].new_tensor(single.search(q, 9, 16)[1]))
    # the whole index at W=3 too
    _check_index(rank, world, os.path.join(tmp, "w3"))
    # a corrupt shard: every rank raises
    if rank == 0:
        path = os.path.join(tmp, "index-user", "shard-00000-of-00002.emix")
        data = bytearray(_read(path))
        data[-1] ^= 0xFF
        with open(path, "wb") as f:
            f.write(bytes(data))
    dist.barrier()
    with pytest.raises(ValueError, match="checksum|rank"):
        ShardedMatryoshkaIndex.load(os.path.join(tmp, "index-user"), timeout=30)


def test_index_2_and_3_ranks_and_resharding(tmp_path):
    os.makedirs(os.path.join(tmp_path, "w3"))
    spawn(_check_index, 2, tmp_path)
    spawn(_check_index_reload, 3, tmp_path)
