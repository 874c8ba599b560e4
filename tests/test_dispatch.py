"""The backend registry: lazy loading, explicit selection that never falls back, auto selection, and the
promise that import mosbits stays light."""

import dataclasses
import logging
import subprocess
import sys
import textwrap

import fake_backend
import numpy as np
import pytest

import mosbits
from mosbits import dispatch, testing


@pytest.fixture
def fake(monkeypatch):
    """Register the fake backend (one entry plus its module: nothing else changes) ahead of every other."""
    monkeypatch.setitem(dispatch.BACKENDS, "fake", dispatch.BackendSpec(
        "fake", "fake_backend", (), None, 0, ("numpy",), frozenset({"numpy"})))
    monkeypatch.setitem(fake_backend.ACCEPT, "ok", True)
    monkeypatch.setattr(dispatch, "_logged_choices", set())
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    return fake_backend


def numpy_args():
    return testing.random_case(np.random.default_rng(0), (2,), 9, 4, 2).arguments("numpy", "float32")


def assert_correct(y, args):
    ref = testing.truth(**args)
    testing.assert_within(y, ref, testing.tolerance(args["x"], args["experts"], args["router"], args["bias"], ref,
                                                    out_dtype="float32"))


def test_available_lists_installed_backends_best_first():
    names = mosbits.backends.available()
    assert names[-1] == "reference"
    assert set(names) <= set(dispatch.BACKENDS)


def test_auto_takes_the_best_supporting_backend_and_logs_once(fake, caplog):
    with caplog.at_level(logging.INFO, logger="mosbits"):
        y = mosbits.matmul(**numpy_args())
        mosbits.matmul(**numpy_args())
    assert not y.any()
    assert [r.getMessage() for r in caplog.records] == ["mosbits: backend='auto' chose 'fake' for numpy inputs"]


def test_auto_skips_a_backend_that_declines(fake):
    fake.ACCEPT["ok"] = False
    args = numpy_args()
    assert_correct(mosbits.matmul(**args), args)


def test_explicit_backend_never_falls_back(fake):
    fake.ACCEPT["ok"] = False
    with pytest.raises(ValueError, match="backend 'fake' cannot run this call: the fake backend is switched off"):
        mosbits.matmul(**numpy_args(), backend="fake")


def test_environment_variable_is_an_explicit_choice(fake, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "fake")
    fake.ACCEPT["ok"] = False
    with pytest.raises(ValueError, match="backend 'fake' cannot run"):
        mosbits.matmul(**numpy_args())
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    fake.ACCEPT["ok"] = True
    assert mosbits.matmul(**numpy_args()).any()


def test_precision_is_checked_and_never_falls_back(fake):
    args = numpy_args()
    with pytest.raises(ValueError, match="precision must be one of 'exact', 'fast', got 'medium'"):
        mosbits.matmul(**args, precision="medium")
    with pytest.raises(ValueError, match="backend 'fake' has no precision='fast'; backends with it: numba"):
        mosbits.matmul(**args, backend="fake", precision="fast")


def test_auto_takes_the_best_backend_that_has_the_precision(fake, monkeypatch):
    monkeypatch.setitem(dispatch.BACKENDS, "numba", dataclasses.replace(dispatch.BACKENDS["numba"],
                                                                        requires=("no_such_package",)))
    with pytest.raises(ValueError, match=r"fake: no precision='fast'; numba: not installed .*reference: no "):
        mosbits.matmul(**numpy_args(), precision="fast")


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(dispatch.BACKENDS, "ghost", dispatch.BackendSpec(
        "ghost", "mosbits_ghost", ("mosbits_no_such_package",), "ghost", 0, ("numpy",), frozenset({"numpy"})))
    assert "ghost" not in mosbits.backends.available()
    with pytest.raises(mosbits.BackendUnavailableError, match=r"mosbits_no_such_package.*mosbits\[ghost\]"):
        mosbits.matmul(**numpy_args(), backend="ghost")
    assert issubclass(mosbits.BackendUnavailableError, ImportError)
    assert_correct(mosbits.matmul(**numpy_args()), numpy_args())


def test_reference_refuses_torch_tensors():
    pytest.importorskip("torch")
    args = testing.random_case(np.random.default_rng(0), (2,), 9, 4, 2).arguments("torch", "float32")
    with pytest.raises(ValueError, match="reference takes numpy arrays"):
        mosbits.matmul(**args, backend="reference")


def test_auto_for_torch_picks_a_torch_backend():
    pytest.importorskip("torch")
    args = testing.random_case(np.random.default_rng(0), (2,), 9, 4, 2).arguments("torch", "float32")
    assert dispatch.select("auto", args["x"], args["packed"], args["experts"], args["router"], None).__name__ \
        in {dispatch.BACKENDS[n].module for n in mosbits.backends.available()}


def test_no_backend_for_an_array_kind_lists_reasons():
    pytest.importorskip("torch")
    cpu = testing.random_case(np.random.default_rng(0), (2,), 9, 4, 2).arguments("torch", "float32")
    args = {"x": cpu["x"].to("meta"), "packed": mosbits.PackedSigns(cpu["packed"].data.to("meta"), (4, 9)),
            "experts": mosbits.Experts(cpu["experts"].s_in.to("meta"), cpu["experts"].s_out.to("meta")),
            "router": cpu["router"].to("meta")}
    with pytest.raises(ValueError, match="no backend can run this call for torch-meta inputs"):
        mosbits.matmul(**args)


def test_import_mosbits_stays_light():
    code = textwrap.dedent("""
        import sys
        import numpy as np
        import mosbits
        from mosbits import testing
        args = testing.random_case(np.random.default_rng(0), (2,), 9, 4, 2).arguments("numpy", "float32")
        mosbits.matmul(**args, backend="reference")
        mosbits.backends.available()
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "numba", "triton", "transformers"})
        print(heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
