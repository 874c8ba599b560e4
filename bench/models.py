"""Whole-model batch-1 decode and prefill (`mosbits.hf.throughput`, as ``mosbits bench --model``): packed models
with random weights beside their dense bfloat16 twins. Each ``track_`` method reports one measured figure."""

from mosbits import dispatch


class ModelDecode:
    """Greedy decode of 32 tokens after 8, and a 512-token prefill; medians of 3 runs."""

    params = (["smollm2-135m", "llama-7b-width"], ["packed-exact", "packed-fast", "dense-bf16"])
    param_names = ["model", "impl"]
    timeout = 900
    unit = "tokens/s"

    def setup(self, model, impl):
        if not (dispatch.spec("torch").is_installed() and dispatch.spec("numba").is_installed()):
            raise NotImplementedError("needs the hf and numba extras")
        import torch

        import mosbits.hf as mh
        from mosbits.hf import throughput

        torch.set_num_threads(2)
        config = throughput.model_config(model)
        if impl == "dense-bf16":
            net = throughput.dense_twin(config)
        else:
            net = mh.random_packed(config, num_experts=4, dtype=torch.bfloat16)
            mh.set_precision(net, impl.removeprefix("packed-"))
        self.speed = throughput.measure(net)

    def track_decode(self, model, impl):
        return self.speed.decode_tokens_per_s

    def track_prefill(self, model, impl):
        return self.speed.prefill_tokens_per_s

    def track_kernel_share_percent(self, model, impl):
        return 100 * self.speed.kernel_share

    track_kernel_share_percent.unit = "%"

    def track_megabytes_per_token(self, model, impl):
        return sum(self.speed.bytes.values()) / 1e6

    track_megabytes_per_token.unit = "MB"


class DenseHead:
    """A packed model's dense lm_head at batch 1 (49152-token vocabulary): torch's ``F.linear`` against the numba
    backend's dense kernel (`mosbits.hf.DecodeLinear`), bfloat16 and float32."""

    params = (["49152x576", "49152x4096"], ["bfloat16", "float32"], ["torch", "mosbits"])
    param_names = ["shape", "dtype", "impl"]

    def setup(self, shape, dtype, impl):
        if not (dispatch.spec("torch").is_installed() and dispatch.spec("numba").is_installed()):
            raise NotImplementedError("needs the torch and numba extras")
        import torch

        from mosbits.backends import numba as backend

        torch.set_num_threads(2)
        v, k = map(int, shape.split("x"))
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.randn(v, k, generator=generator).to(getattr(torch, dtype))
        self.x = torch.randn(1, k, generator=generator).to(self.weight.dtype)
        self.run = backend.dense if impl == "mosbits" else torch.nn.functional.linear
        self.run(self.x, self.weight)

    def time_head(self, shape, dtype, impl):
        self.run(self.x, self.weight)
