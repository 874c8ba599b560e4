"""Thread-pool defaults (mosbits/threads.py) and one OpenMP runtime for numba and torch, each in a fresh
interpreter, since the libraries read their settings once, when they load."""

import json
import os
import subprocess
import sys

import pytest

from mosbits import dispatch

REPORT = "import json, os, mosbits; print(json.dumps([mosbits.threads.report(), " \
         "{k: os.environ.get(k) for k in mosbits.threads.DEFAULTS}]))"


def run(code, **env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "MOSBITS_THREAD_DEFAULTS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**clean, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_sets_the_defaults_where_nothing_else_has():
    report, env = run(REPORT)
    assert env == {"OPENBLAS_THREAD_TIMEOUT": "4", "GOMP_SPINCOUNT": "100000"}
    assert report == {"OPENBLAS_THREAD_TIMEOUT": "set to 4", "GOMP_SPINCOUNT": "set to 100000"}


def test_the_users_settings_win():
    report, env = run(REPORT, OPENBLAS_THREAD_TIMEOUT="8", OMP_WAIT_POLICY="active")
    assert env == {"OPENBLAS_THREAD_TIMEOUT": "8", "GOMP_SPINCOUNT": None}
    assert report["OPENBLAS_THREAD_TIMEOUT"] == "your environment sets OPENBLAS_THREAD_TIMEOUT=8"
    assert report["GOMP_SPINCOUNT"] == "your environment sets OMP_WAIT_POLICY=active"
    report, env = run(REPORT, MOSBITS_THREAD_DEFAULTS="0")
    assert env == {"OPENBLAS_THREAD_TIMEOUT": None, "GOMP_SPINCOUNT": None}


def test_a_library_loaded_first_is_left_alone():
    report, env = run("import numpy; " + REPORT)
    assert env["OPENBLAS_THREAD_TIMEOUT"] is None
    assert report["OPENBLAS_THREAD_TIMEOUT"].startswith("numpy was imported before mosbits")


@pytest.mark.parametrize("torch_first", [False, True], ids=["numba-first", "torch-first"])
def test_numba_and_torch_share_one_openmp_runtime(torch_first):
    if not (dispatch.spec("numba").is_installed() and dispatch.spec("torch").is_installed()):
        pytest.skip("needs numba and torch")
    code = ("import json, numpy as np, mosbits\n"
            + ("import torch\n" if torch_first else "")
            + "from mosbits import testing\n"
              "args = testing.random_case(np.random.default_rng(0), (1,), 64, 16, 4).arguments('numpy', 'float32')\n"
              "mosbits.matmul(**args, backend='numba')\n"
              "import torch\n"
              "torch.mm(torch.ones(256, 256), torch.ones(256, 256))\n"
              "from mosbits.backends import numba\n"
              "print(json.dumps(numba.threading_info()))\n")
    info = run(code)
    assert info["numba_layer"] == "omp"
    assert info["openmp_in_use"].endswith(os.path.join("torch", "lib", "libgomp.so.1")), info
