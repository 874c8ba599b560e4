"""Pack and unpack throughput, save and load of a LLaMA-7B-sized layer, and bytes per layer."""

import tempfile
from pathlib import Path

import numpy as np

import mosbits
from mosbits import dispatch
from mosbits.arrays import from_numpy
from mosbits.perf import workloads

SHAPES = ["4096x4096", "11008x4096"]


def libraries():
    return ["numpy", "torch"] if dispatch.spec("torch").is_installed() else ["numpy"]


class Pack:
    """pack() of a float32 latent weight and unpack() back to float32, on NumPy and torch (CPU)."""

    params = (["numpy", "torch"], SHAPES)
    param_names = ["library", "shape"]
    timeout = 120

    def setup(self, library, shape):
        if library not in libraries():
            raise NotImplementedError(f"{library} not installed")
        n, k = workloads.LLAMA_7B_SHAPES[shape]
        w = np.random.default_rng(0).standard_normal((n, k), dtype=np.float32)
        self.w = from_numpy(w, library)
        self.packed = mosbits.pack(self.w)

    def time_pack(self, *params):
        mosbits.pack(self.w)

    def time_unpack(self, *params):
        mosbits.unpack(self.packed)


class SaveLoad:
    """save() and load() of one 11008 x 4096 layer with E = 4 fp16 experts (about 5.8 MB)."""

    timeout = 120

    def setup(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "layer.safetensors"
        layer = workloads.random_layer(np.random.default_rng(0), 11008, 4096, 4, "numpy", "float16")
        self.layers = {"model.layers.0.mlp.up_proj": layer}
        mosbits.save(self.path, self.layers)

    def teardown(self):
        self.dir.cleanup()

    def time_save(self):
        mosbits.save(self.path, self.layers)

    def time_load(self):
        mosbits.load(self.path)


class Bytes:
    """Bytes of one layer: packed (signs + fp16 experts + fp16 router) and dense fp16."""

    params = (list(workloads.LLAMA_7B_SHAPES), [1, 4])
    param_names = ["shape", "E"]
    unit = "bytes"

    def setup(self, shape, e):
        n, k = workloads.LLAMA_7B_SHAPES[shape]
        self.dense = 2 * n * k
        self.packed = workloads.random_layer(np.random.default_rng(0), n, k, e, "numpy", "float16").nbytes

    def track_packed_bytes(self, *params):
        return self.packed

    def track_dense_fp16_bytes(self, *params):
        return self.dense

    def track_fp16_over_packed(self, *params):
        return self.dense / self.packed

    track_fp16_over_packed.unit = "ratio"
