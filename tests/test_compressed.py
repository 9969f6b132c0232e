"""Compressed embeddings: quantize_embeddings (sentence-transformers' codes) and hamming_topk
(fused popcount top-k over a bit prefix) against numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import embedops
from conftest import opcheck


def ref_hamming(q: np.ndarray, x: np.ndarray, k: int, nbits: int):
    """Distances over the first nbits bits (MSB-first), nearest first, ties to the lower index."""
    qb = np.unpackbits(q.view(np.uint8), axis=1)[:, :nbits]
    xb = np.unpackbits(x.view(np.uint8), axis=1)[:, :nbits]
    d = (qb[:, None, :] != xb[None, :, :]).sum(-1).astype(np.int32)
    idx = np.stack([np.lexsort((np.arange(x.shape[0]), row))[:k] for row in d]) if len(d) else np.zeros((0, k), int)
    return np.take_along_axis(d, idx, 1) if len(d) else d[:, :k], idx


def codes(rng, n, nbytes, distinct=256):
    return rng.integers(0, distinct, (n, nbytes), dtype=np.uint8)


@pytest.mark.parametrize("nbytes,nbits,N,B,k", [
    (64, None, 3000, 7, 10),    # 512 bits: the whole-word fast path, several query blocks
    (16, None, 3000, 9, 10),    # 128-bit rows: two whole words
    (32, 128, 2000, 8, 30),     # a 128-bit prefix of 32-byte rows (the 16-rows-per-step path, 2 words)
    (32, 256, 5000, 1, 5),      # B = 1: the corpus split over the threads
    (128, 1024, 700, 5, 20),
    (48, 384, 1000, 4, 7),      # 6 words: the general path
    (64, 200, 900, 3, 9),       # a prefix inside a word
    (13, 100, 800, 5, 17),      # odd code length, partial last byte (4 of its bits)
    (8, 3, 60, 2, 60),          # k = N, 3 bits: many ties
    (5, 40, 9000, 9, 1),        # rows shorter than a word, chunks of the corpus
])
def test_hamming_topk_matches_reference(device, nbytes, nbits, N, B, k):
    rng = np.random.default_rng(nbytes * 1000 + N)
    q, x = codes(rng, B, nbytes), codes(rng, N, nbytes)
    d, i = embedops.hamming_topk(torch.from_numpy(q).to(device), torch.from_numpy(x).to(device), k, nbits=nbits)
    rd, ri = ref_hamming(q, x, k, nbits or 8 * nbytes)
    assert d.dtype == torch.int32 and i.dtype == torch.int64 and d.shape == (B, k)
    np.testing.assert_array_equal(d.cpu().numpy(), rd)
    np.testing.assert_array_equal(i.cpu().numpy(), ri)


def test_hamming_topk_ties_go_to_the_lower_index(device):
    # 4 distinct codes repeated: every distance is shared by many rows
    rng = np.random.default_rng(1)
    base = codes(rng, 4, 16)
    x = np.repeat(base, 500, axis=0)[rng.permutation(2000)]
    q = base[:2].copy()
    d, i = embedops.hamming_topk(torch.from_numpy(q).to(device), torch.from_numpy(x).to(device), 50)
    rd, ri = ref_hamming(q, x, 50, 128)
    np.testing.assert_array_equal(i.cpu().numpy(), ri)
    assert (d[:, 0] == 0).all()


def test_hamming_topk_int8_binary_codes_equal_ubinary(device):
    rng = np.random.default_rng(2)
    emb_q, emb_x = rng.standard_normal((6, 300)), rng.standard_normal((500, 300))
    ub_q, ub_x = (embedops.quantize_embeddings(e, "ubinary") for e in (emb_q, emb_x))
    b_q, b_x = (embedops.quantize_embeddings(e, "binary") for e in (emb_q, emb_x))
    du, iu = embedops.hamming_topk(torch.from_numpy(ub_q).to(device), torch.from_numpy(ub_x).to(device), 12)
    db, ib = embedops.hamming_topk(torch.from_numpy(b_q).to(device), torch.from_numpy(b_x).to(device), 12)
    torch.testing.assert_close(du, db)
    torch.testing.assert_close(iu, ib)
    # the distance over the 300 dims is the number of sign disagreements
    want = ((emb_q[:, None, :] > 0) != (emb_x[None, :, :] > 0)).sum(-1)
    np.testing.assert_array_equal(du.cpu().numpy(), np.take_along_axis(want, iu.cpu().numpy(), 1))


def test_hamming_topk_numpy_in_numpy_out_and_edges():
    rng = np.random.default_rng(3)
    q, x = codes(rng, 3, 8), codes(rng, 20, 8)
    d, i = embedops.hamming_topk(q, x, 20)
    assert isinstance(d, np.ndarray) and d.shape == (3, 20)
    assert embedops.hamming_topk(q, x, 0)[0].shape == (3, 0)
    d, i = embedops.hamming_topk(q, x[:0], 0)
    assert d.shape == (3, 0) and i.shape == (3, 0)
    d, i = embedops.hamming_topk(q[:0], x, 4)
    assert d.shape == (0, 4)


def blocked(x: np.ndarray, piece: int, spare_rows: int = 0) -> torch.Tensor:
    """x (N, nbytes) as hamming_topk's blocked layout (P, N, piece), a row slice of a larger store
    (spare_rows more rows of garbage: the kernels must follow the strides, not assume N rows)."""
    n, nb = x.shape
    p = nb // piece
    store = torch.full((p, n + spare_rows, piece), 0xA5, dtype=torch.uint8)
    store[:, :n] = torch.from_numpy(x).view(n, p, piece).transpose(0, 1)
    return store[:, :n]


@pytest.mark.parametrize("nbytes,piece,nbits,N,B,k", [
    (96, 32, 256, 3000, 1, 10),    # a 256-bit prefix of 768-bit codes: one piece (the funnel's first stage)
    (96, 32, 128, 2500, 9, 10),    # 128 bits: two words of a 32-byte piece (16 rows per step)
    (96, 32, 512, 2500, 9, 7),     # two pieces, a full query block + one
    (128, 32, 1024, 1500, 8, 5),   # four pieces
    (96, 32, None, 1000, 3, 12),   # 12 words over three pieces: the general path
    (96, 32, 300, 900, 2, 9),      # a prefix ending inside the second piece, partial byte
    (128, 64, 1024, 1700, 8, 6),   # 64-byte pieces: the 8-rows-per-step path
    (48, 16, 384, 800, 4, 8),      # 16-byte pieces: word by word
    (24, 8, 190, 600, 3, 600),     # 8-byte pieces, k = N
    (64, 32, 256, 6000, 16, 300),  # a funnel-sized shortlist over two full query blocks: many offers, compactions
    (64, 32, 128, 5000, 8, 400),   # the same on the 128-bit path
])
def test_hamming_topk_blocked_layout_matches_reference(device, nbytes, piece, nbits, N, B, k):
    rng = np.random.default_rng(nbytes * 31 + piece + N)
    q, x = codes(rng, B, nbytes), codes(rng, N, nbytes, distinct=4)  # few byte values: many ties
    xb = blocked(x, piece, spare_rows=37).to(device)
    d, i = embedops.hamming_topk(torch.from_numpy(q).to(device), xb, k, nbits=nbits)
    rd, ri = ref_hamming(q, x, k, nbits or 8 * nbytes)
    np.testing.assert_array_equal(d.cpu().numpy(), rd)
    np.testing.assert_array_equal(i.cpu().numpy(), ri)
    opcheck(torch.ops.embedops.hamming_topk.default, (torch.from_numpy(q[:2]).to(device), xb[:, :200], 3, -1))


def test_hamming_topk_blocked_layout_bad_input():
    rng = np.random.default_rng(6)
    q, x = torch.from_numpy(codes(rng, 3, 32)), codes(rng, 50, 32)
    with pytest.raises(ValueError,
                       match=r"hamming_topk: blocked corpus_codes \(P=2, N, piece_bytes=16\) hold 32"):
        embedops.hamming_topk(q[:, :24], blocked(x, 16), 3)
    with pytest.raises(ValueError, match="hamming_topk: blocked corpus_codes .* whole 64-bit words"):
        embedops.hamming_topk(q[:, :12], blocked(x[:, :12], 4), 3)
    with pytest.raises(ValueError, match=r"hamming_topk: corpus_codes must have 2 dims \(N, nbytes\) or 3"
                       ):
        embedops.hamming_topk(q, blocked(x, 16)[None], 3)
    # a non-contiguous piece layout is made contiguous, not misread
    t = blocked(x, 16).transpose(1, 2).contiguous().transpose(1, 2)
    np.testing.assert_array_equal(embedops.hamming_topk(q, t, 5)[1].numpy(), ref_hamming(q.numpy(), x, 5, 256)[1])


@pytest.mark.parametrize("call,exc,match", [
    (lambda q, x: embedops.hamming_topk(q, x, 21), ValueError, "hamming_topk: k must be <= the number of corpus rows"),
    (lambda q, x: embedops.hamming_topk(q, x, -1), ValueError, "hamming_topk: k must be >= 0"),
    (lambda q, x: embedops.hamming_topk(q, x, 3, nbits=65), ValueError, r"hamming_topk: nbits must be in \[1, 8 \* nbytes = 64\]"),
    (lambda q, x: embedops.hamming_topk(q, x, 3, nbits=0), ValueError, "hamming_topk: nbits must be in"),
    (lambda q, x: embedops.hamming_topk(q.float(), x.float(), 3), TypeError, "hamming_topk: query_codes must be packed bits"),
    (lambda q, x: embedops.hamming_topk(q, x.view(torch.int8), 3), TypeError, "hamming_topk: corpus_codes"),
    (lambda q, x: embedops.hamming_topk(q, x[:, :4], 3), ValueError, "hamming_topk: corpus_codes"),
    (lambda q, x: embedops.hamming_topk(q[0], x, 3), ValueError, "hamming_topk: query_codes must have 2 dims"),
    (lambda q, x: embedops.hamming_topk(q, x, 3, nbits=2.5), TypeError, "hamming_topk: nbits must be an int"),
])
def test_hamming_topk_bad_input(call, exc, match):
    rng = np.random.default_rng(4)
    q, x = torch.from_numpy(codes(rng, 3, 8)), torch.from_numpy(codes(rng, 20, 8))
    q0, x0 = q.clone(), x.clone()
    with pytest.raises(exc, match=match):
        call(q, x)
    assert torch.equal(q, q0) and torch.equal(x, x0)  # inputs untouched


def test_hamming_topk_opcheck_and_compile(device):
    rng = np.random.default_rng(5)
    q = torch.from_numpy(codes(rng, 4, 16)).to(device)
    x = torch.from_numpy(codes(rng, 300, 16)).to(device)
    opcheck(torch.ops.embedops.hamming_topk.default, (q, x, 7, 100))
    opcheck(torch.ops.embedops.hamming_topk.default, (q.view(torch.int8), x.view(torch.int8), 3))

    def f(q, x):
        d, i = torch.ops.embedops.hamming_topk(q, x, 5, -1)
        return d + 1, i

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, x)
    want = f(q, x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---- quantize_embeddings --------------------------------------------------------------------------

def test_quantize_binary_bit_order():
    x = np.array([[1.0, -1, 0, 2, -3, 4, 5, -6, 7, 0.5]], dtype=np.float32)  # 10 dims -> 2 bytes
    ub = embedops.quantize_embeddings(x, "ubinary")
    assert ub.dtype == np.uint8 and ub.shape == (1, 2)
    # bits (x > 0) = 1 0 0 1 0 1 1 0 | 1 1 (padded with 0s), MSB first
    assert ub[0, 0] == 0b10010110 and ub[0, 1] == 0b11000000
    b = embedops.quantize_embeddings(x, "binary")
    assert b.dtype == np.int8 and (b.astype(np.int16) == ub.astype(np.int16) - 128).all()


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_quantize_torch_in_torch_out(device, precision):
    x = torch.randn(50, 33, generator=torch.Generator().manual_seed(0)).to(device)
    out = embedops.quantize_embeddings(x, precision)
    assert isinstance(out, torch.Tensor) and out.device.type == device
    want = embedops.quantize_embeddings(x.cpu().numpy(), precision)
    np.testing.assert_array_equal(out.cpu().numpy(), want)


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantize_matches_sentence_transformers(precision, dtype):
    st = pytest.importorskip("sentence_transformers")
    try:  # sentence-transformers >= 6
        from sentence_transformers.util.quantization import quantize_embeddings as st_quantize
    except ImportError:
        from sentence_transformers.quantization import quantize_embeddings as st_quantize

    rng = np.random.default_rng(6)
    x = rng.standard_normal((200, 77)).astype(dtype)
    calib = rng.standard_normal((300, 77)).astype(dtype)
    ranges = np.stack([x.min(0) - 0.1, x.max(0) + 0.2]).astype(np.float32)
    for kw in ({}, {"calibration_embeddings": calib}, {"ranges": ranges}):
        if precision.endswith("binary") and kw:
            continue
        want = st_quantize(x, precision, **kw)
        got = embedops.quantize_embeddings(x, precision, **kw)
        assert got.dtype == want.dtype, (precision, kw)
        np.testing.assert_array_equal(got, want, err_msg=f"{precision} {kw} {st.__version__}")


def test_quantize_int8_constant_dimension_and_bad_input():
    x = np.ones((4, 3), np.float32)
    x[:, 1] = [0, 1, 2, 3]
    q = embedops.quantize_embeddings(x, "uint8")
    assert (q[:, 0] == 0).all() and list(q[:, 1]) == [0, 85, 170, 255]
    with pytest.raises(ValueError, match="quantize_embeddings: precision must be one of"):
        embedops.quantize_embeddings(x, "int4")
    with pytest.raises(ValueError, match="quantize_embeddings: x must have shape"):
        embedops.quantize_embeddings(x[0], "int8")
    with pytest.raises(TypeError, match="quantize_embeddings: x must be floating point"):
        embedops.quantize_embeddings(x.astype(np.int32), "int8")
    with pytest.raises(ValueError, match="quantize_embeddings: ranges must have shape"):
        embedops.quantize_embeddings(x, "int8", ranges=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="single embedding"):
        embedops.quantize_embeddings(x[:1], "int8")
