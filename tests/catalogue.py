"""Bad-input catalogue and smoke calls for every public op (used by test_guarantees.py).

Kept importable without pytest so that the whole catalogue can also run in a subprocess: a
crash (segfault, abort) there fails the test instead of taking pytest down.

BAD_INPUTS: each entry calls an op with one bad argument and names the exception type and a
regex the message must match (the op name and the argument name).
SMOKE: small valid calls, each with a function computing the expected result independently;
used for the leak (RSS) and multi-thread tests.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import numpy as np
import torch

import embedops
from embedops import reference


@dataclasses.dataclass(frozen=True)
class BadInput:
    family: str
    name: str
    call: Callable[[], Any]
    exc: type[BaseException]
    match: str


BAD_INPUTS: list[BadInput] = []


def bad(family: str, name: str, exc: type[BaseException], match: str):
    def deco(fn):
        BAD_INPUTS.append(BadInput(family, name, fn, exc, match))
        return fn

    return deco


@dataclasses.dataclass(frozen=True)
class Smoke:
    name: str
    call: Callable[[], Any]
    expected: Callable[[], Any]
    equal: Callable[[Any, Any], bool]


SMOKE: list[Smoke] = []


def _eq(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return all(_eq(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return torch.equal(a, b)


def _close(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return all(_close(x, y) for x, y in zip(a, b))
    return torch.allclose(torch.as_tensor(a).double(), torch.as_tensor(b).double(), atol=1e-4, rtol=1e-4)


# ---- embedding: hash_ids -----------------------------------------------------------------------

_IDS = torch.arange(-50, 50)
_h = embedops.hash_ids

bad("embedding", "hash_ids num_rows=0", ValueError, "hash_ids: num_rows")(
    lambda: _h(_IDS, feature=0, probe=0, num_rows=0))
bad("embedding", "hash_ids num_rows<0", ValueError, "hash_ids: num_rows")(
    lambda: _h(_IDS, feature=0, probe=0, num_rows=-3))
bad("embedding", "hash_ids num_rows=2^63", ValueError, "hash_ids: num_rows")(
    lambda: _h(_IDS, feature=0, probe=0, num_rows=2**63))
bad("embedding", "hash_ids float ids", TypeError, "hash_ids: values.*int32 or int64")(
    lambda: _h(_IDS.float(), feature=0, probe=0, num_rows=10))
bad("embedding", "hash_ids bool ids", TypeError, "hash_ids: values.*int32 or int64")(
    lambda: _h(_IDS > 0, feature=0, probe=0, num_rows=10))
bad("embedding", "hash_ids uint8 ids", TypeError, "hash_ids: values.*int32 or int64")(
    lambda: _h(_IDS.to(torch.uint8), feature=0, probe=0, num_rows=10))
bad("embedding", "hash_ids numpy float ids", TypeError, "hash_ids: values.*int32 or int64")(
    lambda: _h(np.zeros(4), feature=0, probe=0, num_rows=10))
bad("embedding", "hash_ids list ids", TypeError, "hash_ids: values must be a torch.Tensor or a numpy.ndarray")(
    lambda: _h([1, 2, 3], feature=0, probe=0, num_rows=10))
bad("embedding", "hash_ids feature<0", ValueError, "hash_ids: feature")(
    lambda: _h(_IDS, feature=-1, probe=0, num_rows=10))
bad("embedding", "hash_ids feature>=2^32", ValueError, "hash_ids: feature")(
    lambda: _h(_IDS, feature=2**32, probe=0, num_rows=10))
bad("embedding", "hash_ids probe<0", ValueError, "hash_ids: probe")(
    lambda: _h(_IDS, feature=0, probe=-1, num_rows=10))
bad("embedding", "hash_ids float num_rows", TypeError, "hash_ids: num_rows must be an int")(
    lambda: _h(_IDS, feature=0, probe=0, num_rows=10.5))
bad("embedding", "hash_ids seed too big", ValueError, "hash_ids: seed")(
    lambda: _h(_IDS, feature=0, probe=0, num_rows=10, seed=2**64))
bad("embedding", "hash_ids op num_rows=0", ValueError, "hash_ids: num_rows must be > 0")(
    lambda: torch.ops.embedops.hash_ids(_IDS, 0, 0, 0, 0))
bad("embedding", "hash_ids op probe>=2^32", ValueError, "hash_ids: probe")(
    lambda: torch.ops.embedops.hash_ids(_IDS, 0, 2**32, 10, 0))

# ---- embedding: multiplexed_embedding_bag --------------------------------------------------------

_W = torch.randn(50, 8)
_V = torch.arange(-6, 6)
_O = torch.tensor([0, 2, 5, 5, 9, 12])  # F=1, B=5
_meb = embedops.multiplexed_embedding_bag

bad("embedding", "bag weight 1-D", ValueError, "multiplexed_embedding_bag: weight")(lambda: _meb(_W[0], _V, _O))
bad("embedding", "bag weight int", TypeError, "multiplexed_embedding_bag: weight")(lambda: _meb(_W.long(), _V, _O))
bad("embedding", "bag weight 0 rows", ValueError, "multiplexed_embedding_bag: weight must have num_rows > 0")(
    lambda: _meb(_W[:0], _V, _O))
bad("embedding", "bag float values", TypeError, "multiplexed_embedding_bag: values")(lambda: _meb(_W, _V.float(), _O))
bad("embedding", "bag values 2-D", ValueError, "multiplexed_embedding_bag: values")(
    lambda: _meb(_W, _V.reshape(3, 4), _O))
bad("embedding", "bag float offsets", TypeError, "multiplexed_embedding_bag: offsets")(
    lambda: _meb(_W, _V, _O.float()))
bad("embedding", "bag offsets not from 0", ValueError, "multiplexed_embedding_bag: offsets\\[0\\] must be 0")(
    lambda: _meb(_W, _V, torch.tensor([1, 2, 5, 5, 9, 12])))
bad("embedding", "bag offsets decreasing", ValueError, "multiplexed_embedding_bag: offsets must be non-decreasing")(
    lambda: _meb(_W, _V, torch.tensor([0, 5, 2, 5, 9, 12])))
bad("embedding", "bag offsets past N", IndexError, "multiplexed_embedding_bag: offsets\\[-1\\]")(
    lambda: _meb(_W, _V, torch.tensor([0, 2, 5, 5, 9, 13])))
bad("embedding", "bag offsets wrong length for F", ValueError, "multiplexed_embedding_bag: offsets")(
    lambda: _meb(_W, _V, _O, num_probes=[1, 1]))
bad("embedding", "bag offsets empty", ValueError, "multiplexed_embedding_bag: offsets")(
    lambda: _meb(_W, _V, torch.tensor([], dtype=torch.int64)))
bad("embedding", "bag negative lengths", ValueError, "multiplexed_embedding_bag: lengths must be >= 0")(
    lambda: _meb(_W, _V, lengths=torch.tensor([2, 3, -1, 4, 4])))
bad("embedding", "bag offsets and lengths", ValueError, "multiplexed_embedding_bag: give exactly one of offsets and lengths")(
    lambda: _meb(_W, _V, _O, lengths=torch.tensor([2, 3, 0, 4, 3])))
bad("embedding", "bag probes 0", ValueError, "multiplexed_embedding_bag: num_probes\\[0\\]")(
    lambda: _meb(_W, _V, _O, num_probes=0))
bad("embedding", "bag probes empty list", ValueError, "multiplexed_embedding_bag: num_probes must not be empty")(
    lambda: _meb(_W, _V, _O, num_probes=[]))
bad("embedding", "bag bad combine", ValueError, 'multiplexed_embedding_bag: combine must be "concat", "sum" or "mean", got "prod"')(
    lambda: _meb(_W, _V, _O, combine="prod"))
bad("embedding", "bag bad mode", ValueError, 'multiplexed_embedding_bag: mode must be "sum", "mean" or "max", got "min"')(
    lambda: _meb(_W, _V, _O, mode="min"))
bad("embedding", "bag psw with max", ValueError, 'multiplexed_embedding_bag: per_sample_weights is only supported with mode="sum", got mode="max"')(
    lambda: _meb(_W, _V, _O, mode="max", per_sample_weights=torch.ones(12)))
bad("embedding", "bag psw wrong shape", ValueError, "multiplexed_embedding_bag: per_sample_weights")(
    lambda: _meb(_W, _V, _O, per_sample_weights=torch.ones(11)))
bad("embedding", "bag psw wrong dtype", TypeError, "multiplexed_embedding_bag: per_sample_weights")(
    lambda: _meb(_W, _V, _O, per_sample_weights=torch.ones(12, dtype=torch.float64)))
bad("embedding", "bag op bad mode string", ValueError, "multiplexed_embedding_bag: mode must be")(
    lambda: torch.ops.embedops.multiplexed_embedding_bag(_W, _V, _O, [1], "concat", "median", None, 0, True))
_QTAB = embedops.quantize_table(_W, "int8")  # (50, 16) uint8 row-quantised table, D = 8
bad("embedding", "bag int8 table <= 8 columns", ValueError,
    "multiplexed_embedding_bag: weight is a uint8 row-quantised table .* more than 8 columns")(
    lambda: _meb(_QTAB[:, :8].contiguous(), _V, _O))
bad("embedding", "bag int8 table non-contiguous", ValueError,
    "multiplexed_embedding_bag: weight \\(a uint8 row-quantised table\\) must be contiguous")(
    lambda: _meb(torch.cat([_QTAB, _QTAB], 1)[:, :16], _V, _O))
bad("embedding", "bag int8 table float64 psw", TypeError, "multiplexed_embedding_bag: per_sample_weights must be float32")(
    lambda: _meb(_QTAB, _V, _O, per_sample_weights=torch.ones(12, dtype=torch.float64)))
bad("embedding", "bag int8 table backward", TypeError,
    "multiplexed_embedding_bag_backward: weight is a uint8 row-quantised table")(
    lambda: torch.ops.embedops.multiplexed_embedding_bag_backward(torch.ones(5, 8), _QTAB, _V, _O, torch.empty(0, dtype=torch.long),
                                                                  [1], "concat", "sum", None, 0, True, False))
bad("embedding", "quantize_table int weight", TypeError, "quantize_table: weight must be float32")(
    lambda: embedops.quantize_table(_W.long()))
bad("embedding", "dequantize_table float table", TypeError, "dequantize_table: table must be a uint8")(
    lambda: embedops.dequantize_table(_W))
bad("embedding", "UnifiedEmbedding bad optimizer", ValueError, "UnifiedEmbedding: optimizer")(
    lambda: embedops.nn.UnifiedEmbedding(100, 8, features={"a": 1}, optimizer="adam"))
bad("embedding", "UnifiedEmbedding num_rows 0", ValueError, "UnifiedEmbedding: num_rows")(
    lambda: embedops.nn.UnifiedEmbedding(0, 8, features={"a": 1}))

SMOKE.append(Smoke(
    "multiplexed_embedding_bag",
    lambda: _meb(_W, _V, _O, num_probes=2, mode="mean"),
    lambda: reference.multiplexed_embedding_bag(_W.double(), _V, _O, num_probes=[2], mode="mean").float(),
    _close,
))

SMOKE.append(Smoke(
    "multiplexed_embedding_bag int8 table",
    lambda: _meb(_QTAB, _V, _O, num_probes=2, per_sample_weights=torch.linspace(0, 1, 12)),
    lambda: reference.multiplexed_embedding_bag(embedops.dequantize_table(_QTAB, torch.float64), _V, _O, num_probes=[2],
                                                per_sample_weights=torch.linspace(0, 1, 12).double()).float(),
    _close,
))

SMOKE.append(Smoke(
    "hash_ids",
    lambda: _h(_IDS, feature=3, probe=1, num_rows=1000, seed=5),
    lambda: torch.from_numpy(reference.hash_ids(_IDS.numpy(), feature=3, probe=1, num_rows=1000, seed=5)),
    _eq,
))


# ---- attention: cross_attention / cross_attention_varlen -----------------------------------------

_q = torch.randn(2, 5, 4, 8)
_k = torch.randn(2, 7, 2, 8)
_v = torch.randn(2, 7, 2, 6)
_ca = embedops.cross_attention
_cav = embedops.cross_attention_varlen
_cu = torch.tensor([0, 3, 5])

bad("attention", "q rank 3", ValueError, "cross_attention: q must have 4 dims")(lambda: _ca(_q[0], _k, _v))
bad("attention", "k rank 5", ValueError, "cross_attention: k must have 4 dims")(lambda: _ca(_q, _k[None], _v))
bad("attention", "v rank 2", ValueError, "cross_attention: v must have 4 dims")(lambda: _ca(_q, _k, _v[0, 0]))
bad("attention", "batch mismatch", ValueError, "cross_attention: k.size\\(0\\) must equal the batch size")(
    lambda: _ca(_q, _k[:1], _v[:1]))
bad("attention", "Lk mismatch", ValueError, "cross_attention: v.size\\(1\\)")(lambda: _ca(_q, _k, _v[:, :6]))
bad("attention", "head dim mismatch", ValueError, "cross_attention: k's head dim")(lambda: _ca(_q, _k[..., :7], _v))
bad("attention", "Hq % Hkv", ValueError, "cross_attention: the number of query heads")(
    lambda: _ca(_q[:, :, :3], _k, _v))
bad("attention", "int q", TypeError, "cross_attention: q must be float")(lambda: _ca(_q.long(), _k.long(), _v.long()))
bad("attention", "dtype mismatch", TypeError, "cross_attention: k must have the dtype of q")(
    lambda: _ca(_q, _k.double(), _v))
bad("attention", "q not a tensor", TypeError, "cross_attention: q must be a torch.Tensor")(
    lambda: _ca(_q.numpy(), _k, _v))
bad("attention", "kv_lengths float", TypeError, "cross_attention: kv_lengths must be an integer tensor")(
    lambda: _ca(_q, _k, _v, kv_lengths=torch.tensor([1.0, 2.0])))
bad("attention", "kv_lengths too long", ValueError, "cross_attention: kv_lengths\\[1\\] must be in \\[0, 7\\]")(
    lambda: _ca(_q, _k, _v, kv_lengths=torch.tensor([3, 8])))
bad("attention", "kv_lengths negative", ValueError, "cross_attention: kv_lengths\\[0\\] must be in")(
    lambda: _ca(_q, _k, _v, kv_lengths=torch.tensor([-1, 2])))
bad("attention", "kv_lengths wrong size", ValueError, "cross_attention: kv_lengths")(
    lambda: _ca(_q, _k, _v, kv_lengths=torch.tensor([1, 2, 3])))
bad("attention", "q_lengths too long", ValueError, "cross_attention: q_lengths\\[0\\] must be in \\[0, 5\\]")(
    lambda: _ca(_q, _k, _v, q_lengths=torch.tensor([6, 1])))
bad("attention", "scale nan", ValueError, "cross_attention: scale must be a finite number")(
    lambda: _ca(_q, _k, _v, scale=float("nan")))
bad("attention", "scale string", TypeError, "cross_attention: scale must be a float")(
    lambda: _ca(_q, _k, _v, scale="0.1"))
bad("attention", "varlen cu_seqlens not starting at 0", ValueError, "cross_attention_varlen: cu_seqlens_q\\[0\\] must be 0")(
    lambda: _cav(_q[0], _k[0], _v[0], torch.tensor([1, 3, 5]), torch.tensor([0, 4, 7]), 5, 7))
bad("attention", "varlen cu_seqlens decreasing", ValueError, "cross_attention_varlen: cu_seqlens_k must be non-decreasing")(
    lambda: _cav(_q[0], _k[0], _v[0], _cu, torch.tensor([0, 5, 4]), 5, 7))
bad("attention", "varlen cu_seqlens wrong end", ValueError, "cross_attention_varlen: cu_seqlens_k must end at")(
    lambda: _cav(_q[0], _k[0], _v[0], _cu, torch.tensor([0, 3, 6]), 5, 7))
bad("attention", "varlen batch mismatch", ValueError, "cross_attention_varlen: .*cu_seqlens")(
    lambda: _cav(_q[0], _k[0], _v[0], _cu, torch.tensor([0, 7]), 5, 7))
bad("attention", "varlen max_seqlen too small", ValueError, "cross_attention_varlen: sequence 0 has length 3")(
    lambda: _cav(_q[0], _k[0], _v[0], _cu, torch.tensor([0, 4, 7]), 2, 7))
bad("attention", "varlen max_seqlen float", TypeError, "cross_attention_varlen: max_seqlen_q must be an int")(
    lambda: _cav(_q[0], _k[0], _v[0], _cu, torch.tensor([0, 4, 7]), 5.0, 7))

_qx, _ky, _vx, _vy = torch.randn(2, 5, 2, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 5, 2, 4), torch.randn(2, 7, 2, 6)
_mq, _mk, _mv = torch.randn(2, 5, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 6)
_seg, _mw = torch.tensor([[3, 4], [5, 2]]), torch.rand(2, 5, 2)
_co, _mix = embedops.co_attention, embedops.mixture_attention

bad("attention", "co_attention heads mismatch", ValueError, "co_attention: ky.size\\(2\\) must equal the number of heads")(
    lambda: _co(_qx, _ky[:, :, :1], _vx, _vy))
bad("attention", "co_attention x_lengths too long", ValueError, "co_attention: x_lengths\\[0\\] must be in \\[0, 5\\]")(
    lambda: _co(_qx, _ky, _vx, _vy, x_lengths=torch.tensor([6, 1])))
bad("attention", "co_attention vx length", ValueError, "co_attention: vx.size\\(1\\) must equal the length Lx")(
    lambda: _co(_qx, _ky, _vx[:, :4], _vy))
bad("attention", "mixture segments past Lk", ValueError, "mixture_attention: segment_lengths\\[0\\] must sum to at most Lk")(
    lambda: _mix(_mq, _mk, _mv, torch.tensor([[5, 5], [1, 1]]), _mw))
bad("attention", "mixture negative segment", ValueError, "mixture_attention: segment_lengths\\[0, 0\\] must be >= 0")(
    lambda: _mix(_mq, _mk, _mv, torch.tensor([[-1, 5], [1, 1]]), _mw))
bad("attention", "mixture weights shape", ValueError, "mixture_attention: weights must have shape")(
    lambda: _mix(_mq, _mk, _mv, _seg, _mw[..., :1]))
bad("attention", "mixture float segments", TypeError, "mixture_attention: segment_lengths must be an integer tensor")(
    lambda: _mix(_mq, _mk, _mv, _seg.float(), _mw))

SMOKE.append(Smoke(
    "co_attention",
    lambda: _co(_qx, _ky, _vx, _vy, y_lengths=torch.tensor([7, 2])),
    lambda: tuple(t.float() for t in reference.co_attention(_qx.double(), _ky.double(), _vx.double(), _vy.double(),
                                                            y_lengths=torch.tensor([7, 2]))[:2]),
    _close,
))
SMOKE.append(Smoke(
    "mixture_attention",
    lambda: _mix(_mq, _mk, _mv, _seg, _mw),
    lambda: reference.mixture_attention(_mq.double(), _mk.double(), _mv.double(), _seg, _mw.double())[0].float(),
    _close,
))
SMOKE.append(Smoke(
    "cross_attention",
    lambda: _ca(_q, _k, _v, kv_lengths=torch.tensor([7, 3])),
    lambda: reference.cross_attention(_q.double(), _k.double(), _v.double(), kv_lengths=torch.tensor([7, 3]))[0].float(),
    _close,
))


# ---- matryoshka ------------------------------------------------------------------------------------

_Q = torch.randn(3, 16)
_X = torch.randn(40, 16)
_ms = embedops.matryoshka_similarity
_mt = embedops.matryoshka_topk
_mf = embedops.matryoshka_funnel


def _bad_index_file():
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.idx")
        with open(path, "wb") as f:
            f.write(b"not an index at all, just some bytes" * 4)
        embedops.MatryoshkaIndex.load(path)


def _truncated_index_file():
    import os
    import tempfile

    index = embedops.MatryoshkaIndex(16, dims=[4, 16])
    index.add(_X)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.idx")
        index.save(path)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:-100])
        embedops.MatryoshkaIndex.load(path)


bad("matryoshka", "similarity queries 1-D", ValueError, "matryoshka_similarity: queries must have 2 dims")(
    lambda: _ms(_Q[0], _X, [4, 16]))
bad("matryoshka", "similarity corpus 3-D", ValueError, "matryoshka_similarity: corpus must have 2 dims")(
    lambda: _ms(_Q, _X[None], [4, 16]))
bad("matryoshka", "similarity D mismatch", ValueError, "matryoshka_similarity: .*D")(lambda: _ms(_Q, _X[:, :8], [4, 8]))
bad("matryoshka", "similarity dims empty", ValueError, "matryoshka_similarity: dims must be a non-empty")(
    lambda: _ms(_Q, _X, []))
bad("matryoshka", "similarity dims descending", ValueError, "matryoshka_similarity: dims must be strictly ascending")(
    lambda: _ms(_Q, _X, [8, 4]))
bad("matryoshka", "similarity dims repeated", ValueError, "matryoshka_similarity: dims must be strictly ascending")(
    lambda: _ms(_Q, _X, [4, 4]))
bad("matryoshka", "similarity dims > D", ValueError, "matryoshka_similarity: dims must be in \\[1, D=16\\]")(
    lambda: _ms(_Q, _X, [4, 17]))
bad("matryoshka", "similarity dims 0", ValueError, "matryoshka_similarity: dims must be in")(lambda: _ms(_Q, _X, [0, 4]))
bad("matryoshka", "similarity dims not a list", TypeError, "matryoshka_similarity: dims")(lambda: _ms(_Q, _X, [4.5]))
bad("matryoshka", "similarity bad metric", ValueError, "matryoshka_similarity: metric must be")(
    lambda: _ms(_Q, _X, [4], metric="l2"))
bad("matryoshka", "similarity int corpus", TypeError, "matryoshka_similarity: .*corpus")(
    lambda: _ms(_Q, _X.long(), [4]))
bad("matryoshka", "similarity dtype mismatch", TypeError, "matryoshka_similarity: corpus")(
    lambda: _ms(_Q, _X.double(), [4]))
bad("matryoshka", "similarity list input", TypeError, "matryoshka_similarity: queries must be a torch.Tensor or a numpy")(
    lambda: _ms([[1.0] * 16], _X, [4]))
bad("matryoshka", "topk k > N", ValueError, "matryoshka_topk: k must be in \\[0, N=40\\]")(
    lambda: _mt(_Q, _X, 41, [4, 16]))
bad("matryoshka", "topk k < 0", ValueError, "matryoshka_topk: k must be in")(lambda: _mt(_Q, _X, -1, [4]))
bad("matryoshka", "topk k float", TypeError, "matryoshka_topk: k must be an int")(lambda: _mt(_Q, _X, 2.0, [4]))
bad("matryoshka", "topk inv norms wrong shape", ValueError, "matryoshka_topk: corpus_inv_norms")(
    lambda: _mt(_Q, _X, 3, [4, 16], corpus_inv_norms=torch.ones(1, 40)))
bad("matryoshka", "funnel no stages", ValueError, "matryoshka_funnel: stages must hold at least one")(
    lambda: _mf(_Q, _X, 5, []))
bad("matryoshka", "funnel stage k > N", ValueError, "matryoshka_funnel: stages\\[0\\] keeps 50 rows")(
    lambda: _mf(_Q, _X, 5, [(4, 50)]))
bad("matryoshka", "funnel k increasing", ValueError, "matryoshka_funnel: the k of each stage must be non-increasing")(
    lambda: _mf(_Q, _X, 5, [(4, 10), (8, 20)]))
bad("matryoshka", "index dim 0", ValueError, "MatryoshkaIndex: dim must be >= 1")(lambda: embedops.MatryoshkaIndex(0))
bad("matryoshka", "index add wrong D", ValueError, "MatryoshkaIndex.add: vectors must have shape \\(n, D=16\\)")(
    lambda: embedops.MatryoshkaIndex(16, dims=[4, 16]).add(torch.randn(3, 8)))
bad("matryoshka", "index corrupt file", ValueError, "MatryoshkaIndex.load: .*not an embedops MatryoshkaIndex file")(
    _bad_index_file)
bad("matryoshka", "index truncated file", ValueError, "MatryoshkaIndex.load: .*(size mismatch|corrupt)")(
    _truncated_index_file)

SMOKE.append(Smoke(
    "matryoshka_topk",
    lambda: _mt(_Q, _X, 5, [4, 16])[1],
    lambda: torch.stack([reference.matryoshka_similarity(_Q.double(), _X.double(), [d])[0].topk(5, dim=1).indices
                         for d in (4, 16)]),
    _eq,
))


def run_all() -> int:
    """Runs every bad input; prints one line per failure; returns the number of failures."""
    failures = 0
    import re

    for entry in BAD_INPUTS:
        try:
            entry.call()
        except entry.exc as e:
            if not re.search(entry.match, str(e)):
                failures += 1
                print(f"WRONG MESSAGE {entry.family}/{entry.name}: {e}")
        except BaseException as e:  # noqa: BLE001 - report anything else
            failures += 1
            print(f"WRONG EXCEPTION {entry.family}/{entry.name}: {type(e).__name__}: {e}")
        else:
            failures += 1
            print(f"NO EXCEPTION {entry.family}/{entry.name}")
    print(f"catalogue: {len(BAD_INPUTS)} bad inputs, {failures} failures")
    return failures


if __name__ == "__main__":
    sys.exit(1 if run_all() else 0)
