"""Write the format-v1 conformance vectors (docs/FORMAT.md, section 9): ``python tests/data/make_vectors.py``.

Each vector ``<id>`` is two files in this folder:

- ``<id>.layer.safetensors``: a mosbits v1 file (written by ``mosbits.save``) holding one layer, `LAYER_NAME`;
- ``<id>.io.safetensors``: plain safetensors with ``w`` (N, K) F32, the latent weight the signs were packed
  from; ``x`` (M, K) F32, inputs whose values the layer's dtype holds exactly; ``y`` (M, N) F64, the float64
  reference output (`mosbits.testing.truth`) for x cast to the layer's dtype.

Values come from fixed seeds and are rounded to the layer's dtype before anything is computed, so the float32
copies in the io file are exact. Writing the bfloat16 vectors needs torch.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import mosbits
from mosbits import testing

LAYER_NAME = "model.layers.0.mlp.up_proj"
TOKENS = 3
"""Rows of x; the last one is all zeros (equal logits, so uniform gates, and y = bias)."""
HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Vector:
    """One conformance vector: a layer (N, K) with E experts in ``dtype``, random from ``seed`` or, when seed
    is None, the hand-made `worked_arrays`."""

    id: str
    k: int
    n: int
    e: int
    dtype: str
    bias: bool
    seed: int | None

    def arrays(self) -> dict[str, np.ndarray]:
        """float32 arrays whose values ``dtype`` holds exactly: w (N, K), x (M, K), s_in (E, K), s_out (E, N),
        router (E, K) and, with a bias, bias (N,)."""
        if self.seed is None:
            return worked_arrays()
        rng = np.random.default_rng(self.seed)
        k, n, e = self.k, self.n, self.e
        w = rng.standard_normal((n, k))
        w.flat[::5] = 0.0
        w.flat[2::7] = -0.0
        x = rng.standard_normal((TOKENS, k))
        x[-1] = 0.0
        values = {
            "w": w,
            "x": x,
            "s_in": rng.uniform(0.5, 1.5, (e, k)),
            "s_out": rng.uniform(0.5, 1.5, (e, n)) / np.sqrt(k),
            "router": rng.standard_normal((e, k)) * (2 / np.sqrt(k)),
        }
        if self.bias:
            values["bias"] = rng.standard_normal(n)
        return {name: testing.round_to(a, self.dtype).astype(np.float32) for name, a in values.items()}


def worked_arrays() -> dict[str, np.ndarray]:
    """The hand-made layer whose bytes docs/FORMAT.md prints: N = 2, K = 3, E = 2, float32, with a bias."""
    def f32(rows):
        return np.array(rows, dtype=np.float32)

    return {
        "w": f32([[1.0, -2.0, 0.0], [-0.5, 3.0, -0.0]]),
        "x": f32([[1.0, 2.0, -1.0], [0.5, -1.0, 4.0], [0.0, 0.0, 0.0]]),
        "s_in": f32([[1.0, 2.0, 0.5], [0.25, 1.0, 4.0]]),
        "s_out": f32([[1.0, 0.5], [2.0, 1.0]]),
        "router": f32([[1.0, 0.0, 0.0], [0.0, 0.0, 0.5]]),
        "bias": f32([0.5, -1.0]),
    }


VECTORS = (
    Vector("worked-k3-n2-e2-f32-bias", 3, 2, 2, "float32", True, None),
    Vector("k1-n1-e4-f16", 1, 1, 4, "float16", False, 11),
    Vector("k1-n17-e1-f32-bias", 1, 17, 1, "float32", True, 12),
    Vector("k33-n1-e3-f16-bias", 33, 1, 3, "float16", True, 13),
    Vector("k33-n17-e4-bf16-bias", 33, 17, 4, "bfloat16", True, 14),
    Vector("k100-n1-e1-f16-bias", 100, 1, 1, "float16", True, 15),
    Vector("k100-n17-e3-bf16", 100, 17, 3, "bfloat16", False, 16),
    Vector("k100-n17-e4-f32", 100, 17, 4, "float32", False, 17),
)


def build(vector: Vector) -> tuple[mosbits.MoSLinearWeights, dict[str, np.ndarray]]:
    """The vector's layer (NumPy, or torch for bfloat16) and its io tensors {w, x, y}."""
    a = vector.arrays()
    if vector.dtype == "bfloat16":
        import torch

        def convert(v):
            return torch.from_numpy(v).to(torch.bfloat16)
    else:
        def convert(v):
            return v.astype(vector.dtype)

    layer = mosbits.MoSLinearWeights(
        mosbits.pack(convert(a["w"])),
        mosbits.Experts(convert(a["s_in"]), convert(a["s_out"])),
        convert(a["router"]),
        convert(a["bias"]) if "bias" in a else None,
    )
    experts = mosbits.Experts(a["s_in"], a["s_out"])
    y = testing.truth(a["x"], mosbits.pack(a["w"]), experts, a["router"], a.get("bias"))
    return layer, {"w": a["w"], "x": a["x"], "y": y}


def paths(vector: Vector, folder: Path = HERE) -> tuple[Path, Path]:
    """(layer file, io file) of a vector in ``folder``."""
    return folder / f"{vector.id}.layer.safetensors", folder / f"{vector.id}.io.safetensors"


def write(vector: Vector, folder: Path = HERE) -> None:
    """Write the vector's two files into ``folder``."""
    layer, io = build(vector)
    layer_path, io_path = paths(vector, folder)
    mosbits.save(layer_path, {LAYER_NAME: layer})
    save_file(io, io_path, metadata={"layer": LAYER_NAME, "dtype": vector.dtype})


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    for v in VECTORS:
        write(v, target)
        print(f"wrote {', '.join(str(p) for p in paths(v, target))}")
