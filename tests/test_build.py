"""The package skeleton: build info, the CLI, the version guard."""

from __future__ import annotations

import subprocess
import sys

import torch

import embedops


def test_build_info_fields():
    info = embedops.build_info()
    for key in ("version", "torch_version", "cuda", "cuda_archs", "cxx_compiler", "openmp", "num_threads"):
        assert key in info, key
    assert info["version"] == embedops.__version__
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    assert info["openmp"] is True
    assert info["num_threads"] == torch.get_num_threads()
    if info["cuda"]:
        assert "90" in info["cuda_archs"].split(",") or info["cuda_archs"]


def test_cli_info_prints_build():
    out = subprocess.run([sys.executable, "-m", "embedops", "info"], capture_output=True, text=True, check=True)
    assert "torch_version" in out.stdout
    assert torch.__version__ in out.stdout


def test_every_op_has_fake_and_pt2_tag():
    names = sorted({n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                    if n.startswith("embedops::")})
    assert "hash_ids" in names, names
    for name in names:
        op = getattr(torch.ops.embedops, name).default
        assert torch.Tag.pt2_compliant_tag in op.tags, op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), op
        # a fake kernel is registered for every op
        assert torch._library.simple_registry.singleton.find(op.name()).fake_impl.kernel is not None, op


def test_version_mismatch_message(monkeypatch):
    import importlib

    from embedops import _build_config, _load

    monkeypatch.setattr(_build_config, "TORCH_VERSION", "0.0.0-not-this-torch")
    try:
        _load._load()
    except ImportError as e:
        msg = str(e)
    else:
        raise AssertionError("a torch version mismatch must raise ImportError")
    assert "0.0.0-not-this-torch" in msg and torch.__version__ in msg
    assert "pip install --no-build-isolation" in msg
    importlib.reload(_build_config)


def test_advise_huge_pages_is_advice_only():
    """Huge-page advice (used for index storage and large outputs) never changes data, and is a
    no-op for small ranges, a null pointer and unaligned ranges."""
    from embedops import _C

    t = torch.arange(5_000_000, dtype=torch.float32)  # 20 MB, already written
    before = t.clone()
    _C.advise_huge_pages(t.data_ptr(), t.nbytes)
    _C.advise_huge_pages(t.data_ptr() + 4, t.nbytes - 8)  # not 2 MB aligned at either end
    _C.advise_huge_pages(0, 1 << 30)
    _C.advise_huge_pages(t.data_ptr(), 16)
    assert torch.equal(t, before)
    fresh = torch.empty(5_000_000)
    _C.advise_huge_pages(fresh.data_ptr(), fresh.nbytes)
    fresh.copy_(before)  # first touch after the advice
    assert torch.equal(fresh, before)
