"""Test set-up: interpreter on CPU-only machines, hypothesis profiles, the device fixture.

On a machine without CUDA the Triton kernels run in Triton's interpreter, so CI tests the
real kernels. ``TRITON_INTERPRET`` must be set before ``torch_flashops`` (and so any
``@triton.jit``) is imported, which is why it happens here at module import.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile(
    "gpu",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile(  # long local fuzzing runs: HYPOTHESIS_PROFILE=soak pytest -k fuzz
    "soak",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if HAS_CUDA else "ci"))

DEVICE = "cuda" if HAS_CUDA else "cpu"

if not HAS_CUDA and os.environ.get("FLASHOPS_INTERP_MEMCHECK", "1") != "0":
    # every interpreted load/store/atomic must stay inside its launch's argument tensors
    # (FLASHOPS_INTERP_MEMCHECK=storage: inside their storages; =0: off)
    from .interp_memcheck import install  # noqa: E402

    install()


@pytest.fixture
def device():
    """The device the suite runs on: CUDA on the GPU machine, else CPU (interpreter)."""
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["kernel", "reference"])
def backend(request, device):
    """Run an op through the Triton kernels (GPU, or the CPU interpreter) and, on CPU, also
    through the plain-PyTorch CPU backend (``_config.set_cpu_backend``)."""
    from torch_flashops import _config

    if request.param == "reference":
        if device != "cpu":
            pytest.skip("the reference backend serves CPU tensors only")
        old = _config._cpu_backend
        _config.set_cpu_backend("reference")
        try:
            yield "reference"
        finally:
            _config.set_cpu_backend(old)
    else:
        if device == "cpu" and not _config.interpreting():
            pytest.skip("CPU kernels need TRITON_INTERPRET=1")
        yield "kernel"


@pytest.fixture
def nan_empty():
    """Poison every fresh allocation (``torch.empty`` returns NaN / integer max under
    deterministic mode) so outputs an op forgets to write show up."""
    old, old_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(old, warn_only=old_warn)


@pytest.fixture
def checked():
    """Checked mode on (data-reading argument checks) for the test's duration."""
    from torch_flashops import _config

    old = _config._checks
    _config.set_checks(True)
    yield
    _config.set_checks(old)
