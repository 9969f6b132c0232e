"""embedops: fast embedding kernels for PyTorch.

Three op families, each a ``torch.ops.embedops.*`` custom op with a CPU and a CUDA kernel:
cross-modal attention, multiplexed-hash embedding bags, and Matryoshka prefix search.
"""

from __future__ import annotations

import torch  # noqa: F401  (must be imported before the native extension)

from ._load import _C
from . import _ops  # noqa: F401  (fake kernels and autograd registrations)
from .embedding import dequantize_table, hash_ids, lengths_to_offsets, multiplexed_embedding_bag, quantize_table
from .attention import co_attention, cross_attention, cross_attention_varlen, mixture_attention
from .matryoshka import matryoshka_funnel, matryoshka_inv_norms, matryoshka_similarity, matryoshka_topk
from .search import MatryoshkaIndex
from .compressed import hamming_topk, int8_topk, quantize_embeddings
from . import nn  # noqa: F401  (embedops.nn.CrossAttention, CoAttention, UnifiedEmbedding, ...)

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """How the native extension was built.

    Returns a dict with: ``version``, ``torch_version`` (the torch it was built against),
    ``cuda`` (bool: CUDA kernels compiled in), ``cuda_archs`` (comma-separated SM list),
    ``cuda_compiler``, ``cxx_compiler``, ``cpu_arch`` (an extra -march for the highest CPU level,
    usually empty), ``cpu_capabilities`` (the CPU levels compiled in, e.g. ``["default", "avx2",
    "avx512"]``), ``cpu_capability`` (the level the kernels run at: the best one this CPU supports,
    or ``EMBEDOPS_CPU_CAPABILITY``), ``cpu_supports`` (the levels this CPU can run),
    ``cpu_avx512_emulated`` (True only in the test build whose avx512 level is AVX2 code with the
    avx512 vector width: CMake ``EMBEDOPS_EMULATE_AVX512``), ``openmp`` (bool),
    ``num_threads`` (ATen intra-op threads now), and ``cuda_available`` (a usable GPU right now).
    """
    info = dict(_C.build_info())
    info["num_threads"] = torch.get_num_threads()
    info["cuda_available"] = bool(info["cuda"] and torch.cuda.is_available())
    return info


__all__ = [
    "build_info", "__version__",
    "hash_ids", "lengths_to_offsets", "multiplexed_embedding_bag", "quantize_table", "dequantize_table",
    "cross_attention", "cross_attention_varlen", "co_attention", "mixture_attention",
    "MatryoshkaIndex", "matryoshka_funnel", "matryoshka_inv_norms", "matryoshka_similarity", "matryoshka_topk",
    "hamming_topk", "int8_topk", "quantize_embeddings",
]
