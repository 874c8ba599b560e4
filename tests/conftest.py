"""Shared fixtures: which backends to test, on which device, with which Hypothesis profile.

``MOSBITS_TEST_BACKENDS=torch,reference`` restricts the harness to those backends and makes their absence a
failure (nox sets it per session). Unset, every registered backend is tested and the ones not installed are
skipped with the extra that would install them. ``MOSBITS_TEST_DEVICE`` (default ``cpu``) is the torch device.
"""

import os

import pytest
from hypothesis import settings

from mosbits import dispatch

settings.register_profile("dev", max_examples=30, deadline=None)
settings.register_profile("ci", settings.get_profile("ci"), max_examples=60, deadline=None)
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
elif not os.environ.get("CI"):
    settings.load_profile("dev")

REQUIRED = [b for b in os.environ.get("MOSBITS_TEST_BACKENDS", "").split(",") if b]
BACKENDS = REQUIRED or sorted(dispatch.BACKENDS)
DEVICE = os.environ.get("MOSBITS_TEST_DEVICE", "cpu")
DTYPES = {"numpy": ("float32", "float16"), "torch": ("float32", "float16", "bfloat16")}


def pytest_configure(config):
    unknown = [b for b in REQUIRED if b not in dispatch.BACKENDS]
    if unknown:
        raise pytest.UsageError(f"MOSBITS_TEST_BACKENDS names unregistered backends {unknown}")


def backend_params():
    """(backend, library, dtype) triples with ids like ``torch-torch-bfloat16``."""
    return [
        pytest.param(name, lib, dtype, id=f"{name}-{lib}-{dtype}")
        for name in BACKENDS
        for lib in dispatch.BACKENDS[name].libraries
        for dtype in DTYPES[lib]
    ]


def require_backend(name):
    """The backend's module; skips (or fails, when the backend is required) if it is not installed."""
    spec = dispatch.BACKENDS[name]
    if not spec.is_installed():
        message = f"backend {name!r} not installed: pip install 'mosbits[{spec.extra}]'"
        if name in REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    return dispatch.load(name)
