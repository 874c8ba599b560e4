"""Check and time every backend on one random BinaryMoS layer.

Builds an N x K layer with E experts as the paper initialises one (latent W, experts from the rank-1 fit
of |W|, kaiming-uniform router), packs it and prints its size against dense fp32 and fp16. Then, for every
backend and batch size M, it checks the backend's float32 output against the float64 reference
(``mosbits.testing``'s per-element tolerance) and times it next to NumPy's dense float32 ``x @ W.T``. A
backend that disagrees is not timed, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

import numpy as np

from mosbits import __version__, arrays, dispatch, testing
from mosbits.cli.options import positive_int
from mosbits.experts import Experts
from mosbits.format import PackedSigns, pack
from mosbits.io import MoSLinearWeights
from mosbits.perf.tables import Progress, format_table
from mosbits.perf.timing import median_time, synchronized

SUMMARY = "check and time every backend on one random BinaryMoS layer"
PROGRESS = Progress()
EXPERT_SPREAD = 0.1
"""Relative spread given to each expert after the SVD init (where all E are equal), as training would, so that
the router's gates change the output and the check covers them."""

RESULTS_NOTES = """\
err/tol: max over the outputs of |y - y64| / tolerance (mosbits.testing.tolerance), y64 the float64
         reference; <= 1 passes.
dense:   NumPy float32 x @ W.T with W (N, K) dense, same x; dense/backend > 1: the backend is faster."""


@dataclasses.dataclass(frozen=True)
class Result:
    """One backend at one batch size.

    Attributes:
        m: batch size M (rows of x).
        backend: backend name.
        kind: array kind it ran on (``"numpy"``, ``"torch-cpu"``...), or None when it supports none.
        ratio: max |y - y64| / tolerance over the (M, N) outputs; <= 1 passes (NaN when skipped).
        seconds: median seconds per call, or None when not timed (skipped or wrong).
        dense_seconds: median seconds of NumPy's dense float32 ``x @ W.T`` at the same M.
        note: why the backend was skipped.
    """

    m: int
    backend: str
    kind: str | None
    ratio: float
    seconds: float | None
    dense_seconds: float
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.ratio > 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options; with none, the default layer (4096 x 4096, E = 4) at M = 1 and 64."""
    parser.add_argument("--n", type=positive_int, default=4096, help="output features N (default: 4096)")
    parser.add_argument("--k", type=positive_int, default=4096, help="input features K (default: 4096)")
    parser.add_argument("--experts", type=positive_int, default=4, help="experts E (default: 4)")
    parser.add_argument("--batches", type=_int_list, default="1,64",
                        help="comma-separated batch sizes M (default: 1,64)")
    parser.add_argument("--repeats", type=positive_int, default=10,
                        help="timed calls per median, after one warm-up call (default: 10)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random layer and inputs (default: 0)")
    parser.add_argument("--backends", type=_backend_list, default=None,
                        help="comma-separated backends (default: all installed: "
                             f"{','.join(dispatch.available())})")


def _int_list(text: str) -> list[int]:
    """"1,64" -> [1, 64]."""
    try:
        return list(dict.fromkeys(positive_int(part) for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}") from None


def _backend_list(text: str) -> list[str]:
    """"torch,reference" -> ["torch", "reference"], each registered and installed."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",")))
    for name in names:
        if name not in dispatch.BACKENDS:
            raise argparse.ArgumentTypeError(
                f"unknown backend {name!r}; registered: {', '.join(sorted(dispatch.BACKENDS))}")
        spec = dispatch.spec(name)
        if not spec.is_installed():
            raise argparse.ArgumentTypeError(
                f"backend {name!r} is not installed: pip install 'mosbits[{spec.extra}]'")
    return names


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every backend agrees with the float64 reference, 1 otherwise."""
    backends = args.backends or dispatch.available()
    rng = np.random.default_rng(args.seed)
    PROGRESS.show(f"demo: building a {args.n} x {args.k} layer with {args.experts} experts ...")
    w, layer = build_layer(args.n, args.k, args.experts, rng)
    layers = {kind: on_kind(layer, kind) for kind in _array_kinds(backends)}
    PROGRESS.clear()
    print(_header(args, backends))
    print()
    print(size_table(w, layer))
    print(flush=True)
    results = []
    for m in args.batches:
        x = rng.standard_normal((m, args.k), dtype=np.float32)
        results += measure_batch(x, w, layers, backends, args.repeats)
    PROGRESS.clear()
    print(results_table(results))
    for r in results:
        if r.failed:
            print(f"mosbits demo: backend {r.backend!r} disagrees with the float64 reference at M={r.m} "
                  f"({r.kind}): max |y - y64| / tolerance = {r.ratio:.3g} > 1", file=sys.stderr)
    return 1 if any(r.failed for r in results) else 0


def build_layer(n: int, k: int, num_experts: int,
                rng: np.random.Generator) -> tuple[np.ndarray, MoSLinearWeights]:
    """A random BinaryMoS layer, float32 NumPy.

    Returns:
        w: the latent weight (N, K), ~ N(0, 0.02^2).
        layer: pack(w); experts s_in (E, K) and s_out (E, N) from `Experts.from_weight` (the paper's init),
            each spread by EXPERT_SPREAD; a router (E, K) ~ U(-1/sqrt(K), 1/sqrt(K)) (nn.Linear's init);
            no bias.
    """
    w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.02)
    init = Experts.from_weight(w, num_experts)
    experts = Experts(_spread(init.s_in, rng), _spread(init.s_out, rng))
    bound = 1 / np.sqrt(k)
    router = rng.uniform(-bound, bound, (num_experts, k)).astype(np.float32)
    return w, MoSLinearWeights(pack(w), experts, router)


def _spread(scales: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """scales (E, D) times 1 + EXPERT_SPREAD * N(0, 1), elementwise, same dtype."""
    noise = 1 + EXPERT_SPREAD * rng.standard_normal(scales.shape)
    return (scales * noise).astype(scales.dtype)


def _array_kinds(backends: list[str]) -> list[str]:
    """Array kinds the demo can offer, best first: numpy, then torch's CPU and CUDA when one of the backends
    needs torch (only then is torch imported)."""
    if not any("torch" in dispatch.spec(name).requires for name in backends):
        return ["numpy"]
    import torch

    return ["numpy", "torch-cpu"] + (["torch-cuda"] if torch.cuda.is_available() else [])


def on_kind(layer: MoSLinearWeights, kind: str) -> MoSLinearWeights:
    """The NumPy ``layer`` as arrays of ``kind`` (``"numpy"``, ``"torch-cpu"``, ``"torch-cuda"``)."""
    if kind == "numpy":
        return layer
    packed, experts = layer.packed, layer.experts
    return MoSLinearWeights(
        PackedSigns(to_kind(packed.data, kind), packed.shape),
        Experts(to_kind(experts.s_in, kind), to_kind(experts.s_out, kind)),
        to_kind(layer.router, kind),
    )


def to_kind(a: np.ndarray, kind: str) -> Any:
    """A NumPy array as ``kind``: itself for ``"numpy"``, else a torch tensor on the kind's device."""
    library, _, device = kind.partition("-")
    return arrays.from_numpy(a, library, device=device or "cpu")


def measure_batch(x: np.ndarray, w: np.ndarray, layers: dict[str, MoSLinearWeights], backends: list[str],
                  repeats: int) -> list[Result]:
    """Check and time every backend on x (M, K) float32; ``layers`` maps array kind -> the same layer."""
    m = x.shape[0]
    PROGRESS.show(f"demo: timing dense numpy x @ W.T at M={m} ...")
    dense_seconds = median_time(lambda: x @ w.T, repeats)
    PROGRESS.show(f"demo: float64 reference output at M={m} ...")
    layer = layers["numpy"]
    y64 = testing.truth(x, layer.packed, layer.experts, layer.router)
    return [measure(name, x, y64, layers, repeats, dense_seconds) for name in backends]


def measure(name: str, x: np.ndarray, y64: np.ndarray, layers: dict[str, MoSLinearWeights], repeats: int,
            dense_seconds: float) -> Result:
    """One backend on x (M, K) float32 against y64 (M, N), on the first array kind it supports, through the
    layer prepared once (`mosbits.prepare`, as a model calls its layers); timed only when its output is within
    tolerance."""
    m = x.shape[0]
    module = dispatch.load(name)
    kind, reasons = None, []
    for candidate, layer in layers.items():
        ok, reason = module.supports(to_kind(x, candidate), layer.packed, layer.experts, layer.router, None)
        if ok:
            kind = candidate
            break
        reasons.append(f"{candidate}: {reason}")
    if kind is None:
        return Result(m, name, None, float("nan"), None, dense_seconds, note="; ".join(reasons))
    layer, xk = layers[kind], to_kind(x, kind)
    PROGRESS.show(f"demo: checking {name} at M={m} ...")
    ref = layers["numpy"]
    tol = testing.tolerance(x, ref.experts, ref.router, None, y64, out_dtype="float32",
                            product_dtype=module.product_dtype("float32"))
    prepared = layer.prepare(name)
    ratio = testing.error_ratio(prepared(xk), y64, tol)
    if ratio > 1:
        return Result(m, name, kind, ratio, None, dense_seconds)
    PROGRESS.show(f"demo: timing {name} at M={m} ...")
    seconds = median_time(synchronized(lambda: prepared(xk)), repeats)
    return Result(m, name, kind, ratio, seconds, dense_seconds)


def _header(args: argparse.Namespace, backends: list[str]) -> str:
    """Two lines: the layer, then the software and machine it runs on."""
    libs = [f"numpy {np.__version__}"]
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        libs.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    return (f"mosbits {__version__} demo: one BinaryMoS layer, N={args.n} K={args.k} E={args.experts}, "
            f"float32, seed {args.seed}\n"
            f"{', '.join(libs)}, {os.cpu_count()} CPUs; backends: {', '.join(backends)}; "
            f"median of {args.repeats} calls")


def size_table(w: np.ndarray, layer: MoSLinearWeights) -> str:
    """Bytes and bits per weight of W (N, K) dense in fp32 and fp16 against the packed layer and its parts."""
    weights = w.size
    fp16 = weights * 2
    experts_dtype = layer.experts.s_in.dtype.name
    parts = [
        ("W dense fp32", weights * 4, True),
        ("W dense fp16", fp16, True),
        ("packed layer", layer.nbytes, True),
        ("  signs, 1 bit", layer.packed.nbytes, False),
        (f"  experts, {experts_dtype}", layer.experts.nbytes, False),
        (f"  router, {layer.router.dtype.name}", layer.router.nbytes, False),
    ]
    rows = [[name, f"{size:,}", f"{8 * size / weights:.3f}", f"{fp16 / size:.2f}x" if ratio else ""]
            for name, size, ratio in parts]
    return format_table(["weights", "bytes", "bits/weight", "vs fp16"], rows, "lrrr")


def results_table(results: list[Result]) -> str:
    """One row per (M, backend): where it ran, its error ratio and its time next to dense NumPy."""
    rows = []
    for r in results:
        if r.kind is None:
            rows.append([str(r.m), r.backend, "-", "-", "-", _ms(r.dense_seconds), "-", "skipped"])
            continue
        timed = r.seconds is not None
        rows.append([
            str(r.m), r.backend, r.kind, f"{r.ratio:.2e}",
            _ms(r.seconds) if timed else "-",
            _ms(r.dense_seconds),
            f"{r.dense_seconds / r.seconds:.3g}x" if timed else "-",
            "FAIL" if r.failed else "ok",
        ])
    headers = ["M", "backend", "arrays", "err/tol", "backend ms", "dense ms", "dense/backend", "check"]
    skipped = {r.backend: r.note for r in results if r.kind is None}
    notes = "".join(f"\nskipped: {name}: {note}" for name, note in skipped.items())
    return f"{format_table(headers, rows, 'rllrrrrl')}\n\n{RESULTS_NOTES}{notes}"


def _ms(seconds: float) -> str:
    """Milliseconds to three significant digits."""
    return f"{1e3 * seconds:.3g}"
