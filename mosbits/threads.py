"""Thread-pool defaults that let mosbits' kernels, NumPy's BLAS and torch share two cores without spinning at
each other.

What each pool does after a parallel region (measured on this project's 2-core machine, README "Thread pools"):

- OpenBLAS (NumPy's BLAS) keeps its worker threads spinning for 2^28 cycles (about 0.1 s) after every call. A
  mosbits decode call right after ``x @ W.T`` then waited for a core: 2.7 ms instead of 0.18 ms; torch's small
  matmuls after NumPy ones ran 5x slower for the same reason.
- GNU OpenMP (torch's pool, and numba's, which binds to torch's libgomp when torch is loaded first) spins for
  300,000 iterations (about 3 ms here) before its workers sleep; a NumPy matmul right after a mosbits call ran
  3.2x slower.

So before NumPy and torch load their libraries, `apply_defaults` (run by ``import mosbits``) sets

    OPENBLAS_THREAD_TIMEOUT=4     OpenBLAS workers sleep after 2^4 cycles instead of spinning for 2^28
    GOMP_SPINCOUNT=100000         OpenMP workers spin about 1 ms, not 3 ms, before they sleep

The spin count is a trade-off, measured on packed SmolLM2-135M decode (4 processes each): 10,000 (about 0.1 ms)
made a NumPy matmul right after a mosbits call only 1.09-1.14x slower, but model decode lost about 10% (workers
asleep between two layers' kernels wake up late); 100,000 keeps decode at the default's speed and cuts that NumPy
slowdown from 3.5x to 1.15-1.7x.

each only when the environment does not set it already (nor ``OMP_WAIT_POLICY``, for the second), and only when
the library that reads it has not been loaded yet (a library reads these variables once, when it loads: after
``import numpy`` the first has no effect, after ``import torch`` the second). ``MOSBITS_THREAD_DEFAULTS=0``
turns both off. `report` says what was applied and why anything was not; ``mosbits bench`` prints it.
"""

from __future__ import annotations

import os
import sys

DEFAULTS = {"OPENBLAS_THREAD_TIMEOUT": "4", "GOMP_SPINCOUNT": "100000"}
"""Variable -> the value mosbits sets where nothing else has."""
SWITCH = "MOSBITS_THREAD_DEFAULTS"
_LOADED_BY = {"OPENBLAS_THREAD_TIMEOUT": ("numpy", "scipy"), "GOMP_SPINCOUNT": ("torch",)}
"""The modules whose import loads the library that reads each variable. numba loads libgomp only when its first
parallel kernel runs, and mosbits' numba backend loads torch's libgomp then (`mosbits.backends.numba`)."""
_APPLIED: dict[str, str] = {}
_SKIPPED: dict[str, str] = {}


def apply_defaults() -> None:
    """Set `DEFAULTS` where the environment and the already loaded libraries allow (see the module docstring);
    idempotent. Child processes inherit what is set."""
    if _APPLIED or _SKIPPED:
        return
    if os.environ.get(SWITCH, "1") == "0":
        _SKIPPED.update(dict.fromkeys(DEFAULTS, f"{SWITCH}=0"))
        return
    for name, value in DEFAULTS.items():
        users = [v for v in ((name,) if name != "GOMP_SPINCOUNT" else (name, "OMP_WAIT_POLICY")) if v in os.environ]
        loaded = [m for m in _LOADED_BY[name] if m in sys.modules]
        if users:
            _SKIPPED[name] = f"your environment sets {users[0]}={os.environ[users[0]]}"
        elif loaded:
            _SKIPPED[name] = f"{loaded[0]} was imported before mosbits and has read its environment already"
        else:
            os.environ[name] = value
            _APPLIED[name] = value


def report() -> dict[str, str]:
    """Variable -> what mosbits did: ``"set to V"``, or why it did not set it."""
    return {name: f"set to {_APPLIED[name]}" if name in _APPLIED else _SKIPPED.get(name, "not applied yet")
            for name in DEFAULTS}
