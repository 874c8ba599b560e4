"""The backend registry: which kernels exist, whether they can run here, and which one a call gets.

A backend is a module with three functions:

- ``supports(x, packed, experts, router, bias) -> (bool, str)``: whether it can run these (already validated)
  arguments, and if not, why;
- ``matmul(x, packed, experts, router, bias) -> y``: the layer;
- ``product_dtype(x_dtype: str) -> str``: the dtype in which ``x * s_in`` enters the binary product (it sets
  the test tolerance, see `mosbits.testing`);
- for each precision beyond "exact" its spec lists, the function `mosbits.precision.PRECISIONS` names
  (``matmul_fast`` for "fast"), with matmul's signature.

Adding a backend is one `BackendSpec` in `BACKENDS` plus its module. Modules are imported only when a call
needs them, so ``import mosbits`` stays free of numba, torch and triton.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
from types import ModuleType
from typing import Any

from mosbits import arrays

logger = logging.getLogger("mosbits")


class BackendUnavailableError(ImportError):
    """A requested backend cannot be imported here; the message names the extra to install."""


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """One registry entry.

    Attributes:
        name: what users pass as ``backend=``.
        module: dotted path of the backend module, imported lazily.
        requires: import names that must be installed for the backend to load.
        extra: the pip extra that installs them (``pip install 'mosbits[extra]'``), or None.
        priority: lower wins in automatic selection.
        libraries: array libraries it takes ("numpy", "torch"); the test harness runs each.
        auto_for: array kinds (`mosbits.arrays.array_kind`) for which ``backend="auto"`` considers it.
        precisions: the ``precision=`` settings it computes (`mosbits.precision`).
    """

    name: str
    module: str
    requires: tuple[str, ...]
    extra: str | None
    priority: int
    libraries: tuple[str, ...]
    auto_for: frozenset[str]
    precisions: tuple[str, ...] = ("exact",)

    def is_installed(self) -> bool:
        return not self.missing()

    def missing(self) -> list[str]:
        """Its requirements that are not installed (one already imported is; a lookup costs microseconds
        per call)."""
        return [req for req in self.requires if req not in sys.modules and importlib.util.find_spec(req) is None]


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("triton", "mosbits.backends.triton", ("torch", "triton"), "triton", 0, ("torch",),
                    frozenset({"torch-cuda"})),
        BackendSpec("numba", "mosbits.backends.numba", ("numba",), "numba", 10, ("numpy", "torch"),
                    frozenset({"numpy", "torch-cpu"}), ("exact", "fast")),
        BackendSpec("torch", "mosbits.backends.torch_ops", ("torch",), "torch", 20, ("torch",),
                    frozenset({"torch-cpu", "torch-cuda", "torch-mps", "torch-xpu"})),
        BackendSpec("reference", "mosbits.reference", (), None, 90, ("numpy",), frozenset({"numpy"})),
    )
}

ENV_VAR = "MOSBITS_BACKEND"
_logged_choices: set[tuple[str, str]] = set()


def available() -> list[str]:
    """Names of the backends whose packages are installed, best first."""
    return [s.name for s in sorted(BACKENDS.values(), key=lambda s: s.priority) if s.is_installed()]


def spec(name: str) -> BackendSpec:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}") from None


def load(name: str) -> ModuleType:
    """Import a backend's module.

    Raises:
        BackendUnavailableError: its packages are not installed (the message names the extra).
    """
    s = spec(name)
    missing = s.missing()
    if missing:
        raise BackendUnavailableError(
            f"backend {name!r} needs {', '.join(missing)}: pip install 'mosbits[{s.extra}]'"
        )
    return importlib.import_module(s.module)


def select(backend: str, x: Any, packed: Any, experts: Any, router: Any, bias: Any,
           precision: str = "exact") -> ModuleType:
    """The backend module for one call.

    An explicit name (the argument, or ``MOSBITS_BACKEND`` when the argument is ``"auto"``) never falls back:
    it loads that backend or raises. ``"auto"`` tries, best first, the installed backends registered for x's
    array kind that compute ``precision`` and takes the first whose ``supports`` accepts the call; it logs its
    choice once per kind.

    Raises:
        BackendUnavailableError: an explicit backend is not installed.
        ValueError: an explicit backend does not compute ``precision`` or does not support these arguments
            (with its reason), or no backend does (with every candidate's reason).
    """
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
    args = (x, packed, experts, router, bias)
    if backend != "auto":
        if precision not in spec(backend).precisions:
            having = [s.name for s in BACKENDS.values() if precision in s.precisions]
            raise ValueError(f"backend {backend!r} has no precision={precision!r}; "
                             f"backends with it: {', '.join(having)}")
        module = load(backend)
        ok, reason = module.supports(*args)
        if not ok:
            raise ValueError(f"backend {backend!r} cannot run this call: {reason}")
        return module
    kind = arrays.array_kind(x)
    reasons = []
    for s in sorted(BACKENDS.values(), key=lambda s: s.priority):
        if kind not in s.auto_for:
            continue
        if precision not in s.precisions:
            reasons.append(f"{s.name}: no precision={precision!r}")
            continue
        if not s.is_installed():
            reasons.append(f"{s.name}: not installed (pip install 'mosbits[{s.extra}]')")
            continue
        module = importlib.import_module(s.module)
        ok, reason = module.supports(*args)
        if ok:
            if (kind, s.name) not in _logged_choices:
                _logged_choices.add((kind, s.name))
                logger.info("mosbits: backend='auto' chose %r for %s inputs", s.name, kind)
            return module
        reasons.append(f"{s.name}: {reason}")
    raise ValueError(f"no backend can run this call for {kind} inputs: " + "; ".join(reasons or ["none registered"]))
