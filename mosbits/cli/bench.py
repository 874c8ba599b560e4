"""Time every backend against the dense baselines a user would otherwise run, on LLaMA-7B layer shapes.

For each shape (N x K) and batch size M, in one process: NumPy float32 and torch float32 / bfloat16 dense
``x @ W.T``, the BinaryMoS authors' formulation (sign() of the fp latent weight every call, then a dense
matmul), and each mosbits backend, with its layers either cache-resident (one layer reused) or DRAM-resident
(rotating through enough layers to exceed twice the L3). A backend is timed only after its output passed the
correctness gate against the float64 reference; a wrong one is reported as WRONG, never as fast. A backend
with ``precision="fast"`` also runs in that mode ("fast" rows), gated by the fast mode's own error bound
(`mosbits.precision`), with its normalised mean squared error in the check column.

Columns: median ms per call; "vs dense": the fastest dense baseline's time at that M divided by this time (> 1:
faster than dense); "GB/s": packed bytes (signs + experts + router) per second; "floor ms": packed bytes over
the measured read bandwidth, the time a kernel that only reads its weights would take; "1st call ms": the
workload's first call, with the derivation of kernel layouts and, on a process's first workload of a backend,
JIT compilation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
from typing import Any

from mosbits import __version__, dispatch, precision
from mosbits.perf import workloads
from mosbits.perf.tables import Progress, format_table
from mosbits.perf.timing import cuda_graph_time, cuda_median_time, median_time

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SUMMARY = "time every backend against dense baselines on LLaMA-7B shapes"
DENSE = {"cpu": ("numpy-fp32", "torch-fp32", "torch-bf16"), "cuda": ("torch-fp16", "torch-bf16", "torch-fp32")}
"""Dense baselines per device type: what a user would run there instead (cuBLAS on CUDA)."""


@dataclasses.dataclass
class Row:
    """One timed implementation at one shape and batch size."""

    shape: str
    m: int
    impl: str
    kind: str
    dtype: str
    seconds: float | None
    packed_bytes: int | None = None
    check: str = ""
    err_ratio: float | None = None
    first_call_seconds: float | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default_backends = [b for b in dispatch.available() if b != "reference"]
    parser.add_argument("--shapes", default=",".join(workloads.LLAMA_7B_SHAPES),
                        help="comma-separated N x K shapes (default: LLaMA-7B's three)")
    parser.add_argument("--batches", default="1,16,512", help="comma-separated batch sizes M (default: 1,16,512)")
    parser.add_argument("--backends", default=",".join(default_backends),
                        help="comma-separated mosbits backends (default: every installed one but the slow "
                             f"reference: {','.join(default_backends)})")
    parser.add_argument("--precisions", default="exact,fast",
                        help="comma-separated precisions, each run on the backends that have it "
                             "(default: exact,fast)")
    parser.add_argument("--experts", type=int, default=4, help="experts E (default: 4)")
    parser.add_argument("--dtype", choices=("float32", "half"), default="float32",
                        help="activation dtype of the mosbits backends and the authors' formulation; 'half' is "
                             "each backend's preferred half type (default: float32)")
    parser.add_argument("--resident", choices=("cache", "dram", "both"), default="both",
                        help="layers reused (cache) or rotated beyond the L3 (dram) (default: both)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for torch, BLAS and numba (default: the libraries' own)")
    parser.add_argument("--repeats", type=int, default=50,
                        help="timed calls per median, at most (default: 50; --budget caps slow calls)")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds per median: fewer repeats (>= 3) for slow calls (default: 2)")
    parser.add_argument("--warmup", type=float, default=0.3,
                        help="seconds of untimed calls before each median (default: 0.3). NumPy's OpenBLAS and "
                             "torch's OpenMP threads spin for a while after their last call; on 2 cores a pool "
                             "still spinning slowed the next library's calls by up to 300x here")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where torch workloads run (default: cpu). On cuda, times come from CUDA events with "
                             "the L2 flushed before each call, and the baselines are cuBLAS fp16/bf16/fp32; in "
                             "model mode the models run there, timed by the clock after synchronising")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
                        help="with --device cuda: time each call inside a CUDA graph (the kernels alone, L2 flushed "
                             "before each call; `mosbits.perf.timing.cuda_graph_time`) instead of eagerly, where "
                             "the host's Python and launch work counts when it outlasts the flush (default: off)")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the numba decode call (first shape, M = 1) right after a torch op and a "
                             "NumPy BLAS call, and those after it: what thread pools do to each other "
                             "(default: on; needs numba)")
    parser.add_argument("--model", metavar="NAMES_OR_PATHS",
                        help="whole-model mode: comma-separated named shapes (smollm2-135m, llama-7b-width) or "
                             "folders with a config.json; random packed weights (E = --experts, bfloat16) per "
                             "--precisions, beside the same config dense in bfloat16 (--no-dense to skip); "
                             "batch-1 greedy decode and a --prefill-token forward")
    parser.add_argument("--new-tokens", type=int, default=32, help="model mode: tokens generated per run (32)")
    parser.add_argument("--prefill", type=int, default=512, help="model mode: tokens of the prefill forward (512)")
    parser.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                        help="model mode: also run the dense bfloat16 twin (default: on)")
    parser.add_argument("--json", metavar="PATH", help="also write every row and the machine info as JSON")
    parser.add_argument("--plot", metavar="PNG", help="also draw time vs batch size (needs matplotlib)")


def run(args: argparse.Namespace) -> int:
    """Run the comparison; 1 when a backend failed its correctness gate, 0 otherwise."""
    try:
        shapes = {s: workloads.parse_shape(s) for s in args.shapes.split(",")}
        batches = [int(b) for b in args.batches.split(",")]
        backends = [b for b in args.backends.split(",") if b]
        for name in backends:
            dispatch.load(name)
        args.precision_list = [precision.check(p) for p in args.precisions.split(",") if p]
        if args.cuda_graphs and not args.device.startswith("cuda"):
            raise ValueError(f"--cuda-graphs needs --device cuda, got --device {args.device}")
        if args.model and (args.cuda_graphs or args.plot):
            raise ValueError(f"{'--cuda-graphs' if args.cuda_graphs else '--plot'} is for the layer tables, not "
                             "model mode (--model)")
        if args.device.startswith("cuda") and not _cuda_available():
            raise ValueError("--device cuda: no CUDA device here (torch with CUDA and a GPU are needed)")
    except (ValueError, ImportError) as err:
        print(f"mosbits bench: {err}", file=sys.stderr)
        return 2
    threads = set_threads(args.threads)
    if args.model:
        return run_models(args, threads)
    progress = Progress()
    progress.show("bench: measuring memory read bandwidth ...")
    bandwidth, how = workloads.read_bandwidth(args.device)
    residents = ("cache", "dram") if args.resident == "both" else (args.resident,)
    runs = sum(p in dispatch.spec(b).precisions for b in backends for p in args.precision_list)
    impls_per_m = len(DENSE[args.device.split(":")[0]]) + 1 + runs * len(residents)
    progress = Progress(len(shapes) * len(batches) * impls_per_m)
    rows: list[Row] = []
    for label, shape in shapes.items():
        for m in batches:
            rows += measure(label, shape, m, backends, residents, args, progress)
    interleave = None
    if args.interleave and args.device == "cpu" and "numba" in backends:
        progress.show("bench: numba decode interleaved with torch and NumPy ...")
        interleave = workloads.interleaved(next(iter(shapes.values())), args.experts, args.repeats)
    progress.clear()
    info = machine_info(threads, bandwidth, how, args)
    print(info["header"])
    for label in shapes:
        print(f"\n{label} (N x K), E = {args.experts}")
        print(table([r for r in rows if r.shape == label], bandwidth))
    if interleave:
        info["interleaved_seconds"] = interleave
        print(f"\nthread pools: numba decode, {next(iter(shapes))}, M = 1, exact, interleaved "
              f"(median of {args.repeats} calls)")
        print(interleave_table(interleave))
    if args.json:
        write_json(args.json, rows, info, bandwidth)
    if args.plot:
        plot(args.plot, rows, shapes)
    wrong = [r for r in rows if r.check == "WRONG"]
    for r in wrong:
        print(f"mosbits bench: {r.impl} is WRONG at {r.shape}, M={r.m}: max |y - ref| / tolerance = "
              f"{r.err_ratio:.3g}", file=sys.stderr)
    return 1 if wrong else 0


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def run_models(args: argparse.Namespace, threads: dict[str, int]) -> int:
    """Whole-model mode (``--model``): one table row per model and implementation (`mosbits.hf.throughput`)."""
    try:
        import torch

        import mosbits.hf as mh
        from mosbits.hf import throughput
    except ImportError as err:
        print(f"mosbits bench --model needs the hf extra: pip install 'mosbits[hf,numba]' ({err})", file=sys.stderr)
        return 2
    try:
        configs = {name: throughput.model_config(name) for name in args.model.split(",") if name}
    except ValueError as err:
        print(f"mosbits bench: {err}", file=sys.stderr)
        return 2
    progress = Progress(len(configs) * (len(args.precision_list) + args.dense))
    progress.show("bench: measuring memory read bandwidth ...")
    bandwidth, how = workloads.read_bandwidth(args.device)
    records = []
    for name, config in configs.items():
        model = mh.random_packed(config, num_experts=args.experts, dtype=torch.bfloat16).to(args.device)
        for prec in args.precision_list:
            progress.step(f"{name}: packed {prec}")
            mh.set_precision(model, prec)
            try:
                speed = throughput.measure(model, new_tokens=args.new_tokens, prefill=args.prefill)
            except ValueError as err:  # e.g. precision="fast" on CUDA, which no CUDA backend computes
                print(f"mosbits bench: {name}, precision {prec}: skipped: {err}", file=sys.stderr)
                continue
            records.append((name, f"mosbits packed E={args.experts}, {prec}", speed))
        del model
        if args.dense:
            progress.step(f"{name}: dense bfloat16 (transformers)")
            records.append((name, "transformers dense bf16", throughput.measure(
                throughput.dense_twin(config).to(args.device), new_tokens=args.new_tokens, prefill=args.prefill)))
    progress.clear()
    info = machine_info(threads, bandwidth, how, args)
    print(info["header"])
    print(f"\nbatch 1, greedy, {args.new_tokens} new tokens after 8; prefill {args.prefill} tokens; random weights")
    print(model_table(records, bandwidth))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "models": [
                {"model": name, "impl": impl, **dataclasses.asdict(speed),
                 "floor_tokens_per_s": speed.floor_tokens_per_s(bandwidth)} for name, impl, speed in records]},
                f, indent=1)
    return 0


def model_table(records: list[tuple[str, str, Any]], bandwidth: float) -> str:
    """Decode tokens/s against the bytes-read floor, the parts of those bytes, prefill and peak RSS."""
    rows = []
    for name, impl, speed in records:
        parts = speed.bytes
        total = sum(parts.values())
        floor = speed.floor_tokens_per_s(bandwidth)
        weights = parts["packed"] + parts["dense linears"]
        rows.append([name, impl, f"{speed.decode_tokens_per_s:.1f}", f"{total / 1e6:.0f}",
                     f"{weights / total:.0%} / {parts['lm_head'] / total:.0%} / {parts['kv cache'] / total:.0%}",
                     f"{floor:.1f}", f"{speed.decode_tokens_per_s / floor:.0%}",
                     f"{speed.kernel_share:.0%} / {speed.call_share:.0%}"
                     if "packed" in impl and not math.isnan(speed.kernel_share) else "-",
                     f"{speed.prefill_tokens_per_s:.0f}", f"{speed.peak_rss / 2**30:.2f}"])
    headers = ["model", "implementation", "tok/s", "MB/token", "linears/lm_head/kv", "floor tok/s", "of floor",
               "in kernels / calls", "prefill tok/s", "peak GiB"]
    return format_table(headers, rows, "llrrrrrrrr")


def set_threads(threads: int | None) -> dict[str, int]:
    """Set (when given) and report the thread counts of torch, NumPy's BLAS and numba."""
    counts: dict[str, int] = {}
    if "torch" in dispatch.available():
        import torch

        if threads:
            torch.set_num_threads(threads)
        counts["torch"] = torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        if threads:
            threadpool_limits(threads, user_api="blas")
        counts["blas"] = max((p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"), default=0)
    except ImportError:
        pass
    if "numba" in sys.modules:
        numba = sys.modules["numba"]
        if threads:
            numba.set_num_threads(threads)
        counts["numba"] = numba.get_num_threads()
    return counts


def measure(label: str, shape: tuple[int, int], m: int, backends: list[str], residents: tuple[str, ...],
            args: argparse.Namespace, progress: Progress) -> list[Row]:
    """Every baseline and backend at one shape and batch size."""
    rows = []

    def timed(fn: Any) -> float:
        if args.device.startswith("cuda"):
            return cuda_graph_time(fn, args.repeats) if args.cuda_graphs else cuda_median_time(fn, args.repeats)
        return median_time(fn, args.repeats, budget=args.budget, warmup_time=args.warmup)

    dense = DENSE[args.device.split(":")[0]]
    for name, fn in workloads.dense_baselines(shape, m, args.device, include=dense).items():
        progress.step(f"{label} M={m}: dense {name}")
        rows.append(Row(label, m, f"dense {name}", "dense", DTYPE_NAMES[name.split("-")[1]], timed(fn)))
    half = workloads.half_dtype("torch", args.device)
    authors_dtype = "float32" if args.dtype == "float32" else half
    progress.step(f"{label} M={m}: authors' formulation")
    try:
        fn = workloads.authors_formulation(shape, m, args.experts, authors_dtype, args.device)
        rows.append(Row(label, m, "authors (sign every call)", "authors", authors_dtype, timed(fn)))
    except NotImplementedError as err:
        rows.append(Row(label, m, "authors (sign every call)", "authors", authors_dtype, None, check=str(err)))
    for backend in backends:
        library = workloads.half_library(backend)
        dtype = "float32" if args.dtype == "float32" else workloads.half_dtype(library, args.device)
        for prec in [p for p in args.precision_list if p in dispatch.spec(backend).precisions]:
            for resident in residents:
                progress.step(f"{label} M={m}: {backend} {prec} ({resident}), checking")
                rows.append(measure_backend(label, shape, m, backend, dtype, resident, prec, args, timed))
    return rows


def measure_backend(label: str, shape: tuple[int, int], m: int, backend: str, dtype: str, resident: str,
                    prec: str, args: argparse.Namespace, timed: Any) -> Row:
    """A backend's row: skipped, WRONG (not timed), or ok and timed (fast rows also report their NMSE)."""
    impl = f"mosbits {backend}{' fast' if prec == 'fast' else ''} ({resident})"
    try:
        work = workloads.make_workload(backend, shape, m, args.experts, dtype, resident, args.device,
                                          precision=prec)
    except NotImplementedError as err:
        return Row(label, m, impl, "mosbits", dtype, None, check=f"skipped: {err}")
    first = median_time(work, repeats=1, warmup=0)
    ratio = work.gate()
    if not ratio <= 1:
        return Row(label, m, impl, "mosbits", dtype, None, work.packed_bytes, "WRONG", ratio, first)
    work.prime()
    check = f"ok, nmse {work.nmse():.1e}" if prec == "fast" else "ok"
    return Row(label, m, impl, "mosbits", dtype, timed(work), work.packed_bytes, check, ratio, first)


def interleave_table(seconds: dict[str, float]) -> str:
    """`workloads.interleaved`'s medians, each against the call alone (and the copy, the cache baseline)."""
    rows = []
    for case, value in seconds.items():
        dense = case.split(" after ")[0].removesuffix(" alone") if not case.startswith(("alone", "after")) else ""
        base = seconds[f"{dense} alone"] if dense else seconds["alone"]
        copy = "" if dense or "after a copy" not in seconds else f"{value / seconds['after a copy']:.2f}x"
        label = case if dense else f"mosbits call {case}"
        rows.append([label, f"{value * 1e3:.3g}", f"{value / base:.2f}x", copy])
    return format_table(["timed", "ms", "vs alone", "vs after a copy"], rows, "lrrr")


def table(rows: list[Row], bandwidth: float) -> str:
    """One shape's rows as text, grouped by M."""
    out = []
    for r in rows:
        dense = [d.seconds for d in rows if d.m == r.m and d.kind == "dense" and d.seconds]
        timed = r.seconds is not None
        out.append([
            str(r.m), r.impl, r.dtype,
            f"{r.seconds * 1e3:.3g}" if timed else "-",
            f"{min(dense) / r.seconds:.3g}x" if timed and dense else "-",
            f"{r.packed_bytes / r.seconds / 1e9:.3g}" if timed and r.packed_bytes else "",
            f"{r.packed_bytes / bandwidth * 1e3:.3g}" if r.packed_bytes else "",
            f"{r.first_call_seconds * 1e3:.3g}" if r.first_call_seconds is not None else "",
            r.check,
        ])
    headers = ["M", "implementation", "dtype", "ms", "vs dense", "GB/s", "floor ms", "1st call ms", "check"]
    return format_table(headers, out, "rllrrrrrl")


def machine_info(threads: dict[str, int], bandwidth: float, how: str, args: argparse.Namespace) -> dict[str, Any]:
    """What the numbers were measured on, as a dict with a printable ``header``."""
    import numpy as np

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from mosbits import threads as thread_defaults

    versions = {"mosbits": __version__, "numpy": np.__version__, "python": platform.python_version()}
    if "torch" in sys.modules:
        versions["torch"] = sys.modules["torch"].__version__
    header = (f"mosbits bench on {cpu}, {os.cpu_count()} CPUs; threads: "
              f"{', '.join(f'{k} {v}' for k, v in threads.items()) or 'library defaults'}\n"
              f"read bandwidth {bandwidth / 1e9:.1f} GB/s ({how}); "
              f"{', '.join(f'{k} {v}' for k, v in versions.items())}; median of <= {args.repeats} calls"
              f"{' (kernels alone: CUDA graphs)' if getattr(args, 'cuda_graphs', False) else ''}")
    threading = _numba_threading()
    defaults = thread_defaults.report()
    header += "\nthread pools: " + "; ".join(f"{k} {v}" for k, v in defaults.items())
    if threading:
        header += (f"; numba layer {threading['numba_layer']}, OpenMP in use "
                   f"{threading['openmp_in_use'] or 'unknown'} ({threading['shared_runtime']})")
    return {"cpu": cpu, "cpus": os.cpu_count(), "threads": threads, "bandwidth_bytes_per_s": bandwidth,
            "bandwidth_method": how, "versions": versions, "experts": args.experts, "header": header,
            "thread_defaults": defaults, "threading": threading}


def _numba_threading() -> dict[str, Any]:
    """`mosbits.backends.numba.threading_info`, when numba is loaded."""
    if "mosbits.backends.numba" not in sys.modules:
        return {}
    return sys.modules["mosbits.backends.numba"].threading_info()


def write_json(path: str, rows: list[Row], info: dict[str, Any], bandwidth: float) -> None:
    records = []
    for r in rows:
        record = dataclasses.asdict(r)
        record["floor_seconds"] = r.packed_bytes / bandwidth if r.packed_bytes else None
        records.append(record)
    with open(path, "w") as f:
        json.dump({"machine": info, "rows": records}, f, indent=1)


def plot(path: str, rows: list[Row], shapes: dict[str, tuple[int, int]]) -> None:
    """Time vs batch size, log-log, one panel per shape and one line per implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("mosbits bench --plot needs matplotlib: pip install 'mosbits[bench]'") from None
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.5), squeeze=False)
    for ax, label in zip(axes[0], shapes, strict=True):
        impls = dict.fromkeys(r.impl for r in rows if r.shape == label)
        for impl in impls:
            points = [(r.m, r.seconds * 1e3) for r in rows if r.shape == label and r.impl == impl and r.seconds]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=impl,
                        linestyle="--" if impl.startswith(("dense", "authors")) else "-")
        ax.set(xscale="log", yscale="log", xlabel="batch size M", ylabel="ms per call", title=f"{label} (N x K)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
