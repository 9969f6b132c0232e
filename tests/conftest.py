"""Shared test helpers: device parametrisation, dtype tolerances, opcheck."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings


import embedops

# Property tests: 200 generated inputs per test by default; EMBEDOPS_HYPOTHESIS_PROFILE=quick
# for a faster local loop. No deadline: the machines are shared and timings are noisy.
settings.register_profile("default", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("quick", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("EMBEDOPS_HYPOTHESIS_PROFILE", "default"))

_INFO = embedops.build_info()
CUDA_OK = bool(_INFO["cuda"]) and torch.cuda.is_available()
if not _INFO["cuda"]:
    _CUDA_SKIP = "embedops was built without CUDA kernels"
elif not torch.cuda.is_available():
    _CUDA_SKIP = "no CUDA device on this machine (the kernels are compiled but cannot run here)"
else:
    _CUDA_SKIP = ""

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA_OK, reason=_CUDA_SKIP)]),
]

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Absolute/relative tolerances against a float64 reference for results accumulated in float32
# from inputs of the given dtype (the rounding of the inputs and of the output dominates).
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def opcheck(op, args, kwargs=None, **kw):
    """torch.library.opcheck with every test it knows; fails the test on any problem.

    torch 2.14's aot_dispatch test fakeifies the non-leaf copies opcheck makes of inputs that
    require grad and reads their .grad (torch-internal), which warns; that one warning is ignored.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf Tensor")
        result = torch.library.opcheck(op, args, kwargs or {}, **kw)
    bad = {k: v for k, v in result.items() if v != "SUCCESS"}
    assert not bad, f"opcheck failed for {op}: {bad}"


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
