"""`mosbits convert-binarymos`: synthetic checkpoints in the BinaryMoS authors' layout, written here, converted,
loaded with mosbits.hf.load and checked against the authors' forward computed in torch from the original tensors."""

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest

import mosbits
from mosbits import dispatch, testing

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mh = pytest.importorskip("mosbits.hf")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from mosbits.cli import convert as command  # noqa: E402
from mosbits.hf.checkpoints import CheckpointError, convert_binarymos  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def authors_config(hidden=64, intermediate=96, layers=2, vocab=256, num_expert=4, attention_bias=False):
    """config.json as the authors' code saves it (transformers 4.x keys, ``num_expert``)."""
    return {"architectures": ["BinaryMoSForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": vocab, "max_position_embeddings": 128, "rope_theta": 10000.0,
            "rope_scaling": None, "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": attention_bias,
            "tie_word_embeddings": False, "pretraining_tp": 1, "torch_dtype": "float16", "bos_token_id": 1,
            "eos_token_id": 2, "transformers_version": "4.38.2", "num_expert": num_expert}


def llama_config(config):
    return transformers.LlamaConfig.from_dict({k: v for k, v in config.items() if k != "num_expert"})


def authors_tensors(config, dtype=torch.float16, seed=0):
    """Random tensors in the authors' layout: name -> tensor (``dtype``), no latent weight exactly 0.

    Scales are positive, of the size of the rank-1 fit of |W| for W ~ 0.02 N(0, 1); routers spread the gates.
    """
    gen = torch.Generator().manual_seed(seed)
    e = config["num_expert"]
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config(config))
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    tensors = {}
    for key, shape in shapes.items():
        module = key.rpartition(".")[0]
        if module.endswith(LINEARS) and key.endswith(".weight"):
            (n, k) = shape
            w = (0.02 * torch.randn(shape, generator=gen)).to(dtype)
            tensors[key] = torch.where(w == 0, torch.tensor(2.0**-14, dtype=dtype), w)
            tensors[f"{module}.in_channel_scale"] = (0.15 * (0.5 + torch.rand(e, k, generator=gen))).to(dtype)
            tensors[f"{module}.out_channel_scale"] = (0.15 * (0.5 + torch.rand(e, n, generator=gen))).to(dtype)
            tensors[f"{module}.gate_linear.weight"] = (0.3 * torch.randn(e, k, generator=gen)).to(dtype)
        elif key.endswith("norm.weight"):
            tensors[key] = (1 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
        else:
            tensors[key] = torch.randn(shape, generator=gen).to(dtype) * (1.0 if "embed" in key else 0.05)
    return tensors


def shard_of(key, layers, shards):
    """Shard index of a tensor: embeddings first, decoder layers spread evenly, final norm and lm_head last."""
    if key.startswith("model.layers."):
        return int(key.split(".")[2]) * shards // layers
    return 0 if "embed" in key else shards - 1


def write_checkpoint(path, config, tensors, shards=2, placement=None):
    """Write config.json and safetensors shards (with an index when shards > 1) as save_pretrained does.

    placement: key -> shard index overrides, to spread one module over two shards.
    """
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    if shards == 1:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return path
    place = {k: shard_of(k, config["num_hidden_layers"], shards) for k in tensors} | (placement or {})
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    for i, name in enumerate(names):
        save_file({k: t for k, t in tensors.items() if place[k] == i}, path / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {k: names[place[k]] for k in sorted(tensors)}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


class AuthorsLinear(torch.nn.Module):
    """The authors' BinaryMoS layer forward, from their tensors:
    ``g = softmax(x @ gate.T)`` in float32, cast to x's dtype; ``((x * (g @ in_scale)) @ sign(W).T) * (g @ out_scale)
    + bias``."""

    def __init__(self, tensors, module, dtype=torch.float32):
        super().__init__()
        self.weight = tensors[f"{module}.weight"].to(dtype)
        self.in_scale = tensors[f"{module}.in_channel_scale"].to(dtype)
        self.out_scale = tensors[f"{module}.out_channel_scale"].to(dtype)
        self.gate = tensors[f"{module}.gate_linear.weight"].to(dtype)
        bias = tensors.get(f"{module}.bias")
        self.bias = None if bias is None else bias.to(dtype)

    def forward(self, x):
        g = torch.softmax(x @ self.gate.T, dim=-1, dtype=torch.float32).to(x.dtype)
        y = ((x * (g @ self.in_scale)) @ torch.sign(self.weight).T) * (g @ self.out_scale)
        return y if self.bias is None else y + self.bias


def authors_model(config, tensors):
    """A float32 LlamaForCausalLM from the source config whose decoder linears are `AuthorsLinear`."""
    model = transformers.LlamaForCausalLM(llama_config(config)).float().eval()
    dense = {k: t.float() for k, t in tensors.items() if k in model.state_dict()}
    model.load_state_dict(dense, strict=False)
    for i in range(config["num_hidden_layers"]):
        for linear in LINEARS:
            module = f"model.layers.{i}.{linear}"
            mh.surgery.replace_module(model, module, AuthorsLinear(tensors, module))
    return model


def record_inputs(model, layer_type):
    records, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, layer_type):
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: records.__setitem__(name, args[0].detach())))
    return records, handles


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("num_expert", "dtype", "shards", "bias"), [
    (4, torch.float16, 2, False), (1, torch.float32, 1, True), (3, torch.bfloat16, 2, True)],
    ids=["E4-fp16-2shards", "E1-fp32-single-bias", "E3-bf16-2shards-bias"])
def test_converted_model_matches_the_authors_forward(tmp_path, num_expert, dtype, shards, bias):
    """Every converted layer, on the inputs it sees in the authors' model, is within mosbits.testing's per-element
    bound of the authors' layer in float64. The logits of both float32 models then differ by summation order
    only: measured about 7e-8 in relative norm. The bound 1e-4 leaves room for the two decoder layers and the
    attention to amplify per-layer errors of a few 1e-7, and stays well below the error of a computation that
    rounds to fp16 anywhere (unit roundoff 2^-11, about 5e-4)."""
    config = authors_config(num_expert=num_expert, attention_bias=bias)
    tensors = authors_tensors(config, dtype)
    src = write_checkpoint(tmp_path / "src", config, tensors, shards=shards)
    result = convert_binarymos(src, tmp_path / "out")
    assert result.num_experts == num_expert and result.shards == shards and len(result.modules) == 14
    assert result.output_bytes < result.source_bytes and result.zero_weights == 0

    reference = authors_model(config, tensors)
    records, handles = record_inputs(reference, AuthorsLinear)
    want = logits(reference, IDS)
    for h in handles:
        h.remove()
    model = mh.load(tmp_path / "out", dtype=torch.float32)
    assert [n for n, m in model.named_modules() if isinstance(m, mh.PackedMoSLinear)] == result.modules
    for name, x in records.items():
        layer = model.get_submodule(name)
        assert (layer.router is None) == (num_expert == 1)
        assert (layer.bias is not None) == (bias and ".self_attn." in name)
        with torch.no_grad():
            assert_layer_is_authors(name, x, layer(x), tensors)
    got = logits(model, IDS)
    relative = float((got - want).norm() / want.norm())
    assert relative <= 1e-4, f"logits differ from the authors' forward by {relative:.2e} (relative norm)"


def assert_layer_is_authors(name, x, y, tensors):
    """y = the converted layer on x (T, K) float32, against the authors' layer in float64 from the original tensors,
    within mosbits.testing's per-element bound for a float32 product (the signs have no zero, so sign(W) is exact)."""
    f64 = {s: tensors[f"{name}.{s}"].double() for s in ("weight", "in_channel_scale", "out_channel_scale",
                                                          "gate_linear.weight")}
    bias = tensors.get(f"{name}.bias")
    g = torch.softmax(x.double() @ f64["gate_linear.weight"].T, dim=-1)
    ref = ((x.double() * (g @ f64["in_channel_scale"])) @ torch.sign(f64["weight"]).T) * (g @ f64["out_channel_scale"])
    ref = (ref if bias is None else ref + bias.double()).numpy()
    experts = mosbits.Experts(tensors[f"{name}.in_channel_scale"].float(), tensors[f"{name}.out_channel_scale"].float())
    router = tensors[f"{name}.gate_linear.weight"].float()
    args = (x, mosbits.pack(tensors[f"{name}.weight"]), experts, router, None if bias is None else bias.float())
    product = dispatch.select("auto", *args).product_dtype("float32")
    tol = testing.tolerance(x, experts, router, args[4], ref, out_dtype="float32", product_dtype=product)
    testing.assert_within(y, ref, tol, f"{name} converted vs the authors' layer")


def test_layout_config_index_and_copied_files(tmp_path):
    config = authors_config()
    tensors = authors_tensors(config)
    src = write_checkpoint(tmp_path / "src", config, tensors, shards=2)
    result = convert_binarymos(src, tmp_path / "out")
    out = tmp_path / "out"
    written = json.loads((out / "config.json").read_text())
    assert "num_expert" not in written and written["architectures"] == ["LlamaForCausalLM"]
    assert written["dtype"] == "float16" and written["model_type"] == "mosbits"
    assert written["mosbits_base_model_type"] == "llama" and (out / "mosbits_remote.py").is_file()
    assert written["auto_map"]["AutoModelForCausalLM"] == "mosbits_remote.MosbitsForCausalLM"
    assert written["quantization_config"] == {"quant_method": "mosbits", "format_version": "1", "num_experts": 4,
                                              "modules": result.modules, "packed": True}
    assert result.modules[:7] == [f"model.layers.0.{linear}" for linear in LINEARS]
    assert (out / "tokenizer_config.json").read_text() == (src / "tokenizer_config.json").read_text()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    source_index = json.loads((src / "model.safetensors.index.json").read_text())
    q = "model.layers.0.self_attn.q_proj"
    packed_keys = (f"{q}.signs", f"{q}.s_in", f"{q}.s_out", f"{q}.router")
    assert {index["weight_map"][k] for k in packed_keys} == {source_index["weight_map"][f"{q}.weight"]}
    assert result.output_bytes > index["metadata"]["total_size"] > 0
    stored = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(out / shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            stored.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    assert set(stored) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert stored[f"{q}.signs"].dtype == torch.uint8 and stored[f"{q}.signs"].shape == (64, 8)
    assert torch.equal(stored[f"{q}.signs"], mosbits.pack(tensors[f"{q}.weight"]).data)
    assert torch.equal(stored[f"{q}.router"], tensors[f"{q}.gate_linear.weight"])
    assert torch.equal(stored[f"{q}.s_in"], tensors[f"{q}.in_channel_scale"])
    dense = {k for k in tensors if not k.rpartition(".")[0].endswith(LINEARS) and ".gate_linear." not in k
             and not k.endswith(("channel_scale",))}
    assert all(torch.equal(stored[k], tensors[k]) for k in dense) and len(dense) == 7


def test_zero_latent_weight_packs_as_plus_one(tmp_path):
    """torch.sign(0) = 0 in the authors' forward; one bit holds +1 or -1, and mosbits packs +0.0 and -0.0 as +1, so
    output n of the converted layer gains x_k * s_in_k * s_out_n for each zero weight (n, k)."""
    config = authors_config()
    tensors = authors_tensors(config, torch.float32)
    name = "model.layers.1.mlp.up_proj"
    w = tensors[f"{name}.weight"]
    w[3, 5], w[7, 0], w[0, 63] = 0.0, -0.0, 0.0
    result = convert_binarymos(write_checkpoint(tmp_path / "src", config, tensors, shards=1), tmp_path / "out")
    assert result.zero_weights == 3
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        signs = f.get_tensor(f"{name}.signs")
    unpacked = mosbits.unpack(mosbits.PackedSigns(signs, tuple(w.shape)), torch.float32)
    assert torch.equal(unpacked, torch.where(w >= 0, 1.0, -1.0))
    assert [float(unpacked[3, 5]), float(unpacked[7, 0]), float(unpacked[0, 63])] == [1.0, 1.0, 1.0]

    layer = mh.load(tmp_path / "out", dtype=torch.float32).get_submodule(name)
    x = torch.zeros(1, 64)
    x[0, 5] = 1.0
    with torch.no_grad():
        authors, packed = AuthorsLinear(tensors, name)(x), layer(x)
        g = torch.softmax(x @ tensors[f"{name}.gate_linear.weight"].T, dim=-1)
    term = float((g @ tensors[f"{name}.in_channel_scale"])[0, 5] * (g @ tensors[f"{name}.out_channel_scale"])[0, 3])
    assert float(authors[0, 3]) == 0.0 and float(packed[0, 3]) == pytest.approx(term, rel=1e-6)
    others = torch.arange(96) != 3
    torch.testing.assert_close(packed[:, others], authors[:, others], rtol=1e-6, atol=1e-7)


def test_module_spread_over_two_shards(tmp_path):
    """A module whose scales and router sit in another shard than its latent weight converts as if they did not:
    its packed tensors go to the weight's shard."""
    config = authors_config()
    tensors = authors_tensors(config)
    name = "model.layers.0.mlp.down_proj"
    moved = {f"{name}.in_channel_scale": 1, f"{name}.gate_linear.weight": 1}
    write_checkpoint(tmp_path / "spread", config, tensors, shards=2, placement=moved)
    write_checkpoint(tmp_path / "plain", config, tensors, shards=2)
    convert_binarymos(tmp_path / "spread", tmp_path / "a")
    convert_binarymos(tmp_path / "plain", tmp_path / "b")
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())["weight_map"]
    first = "model-00001-of-00002.safetensors"
    assert index[f"{name}.s_in"] == index[f"{name}.router"] == index[f"{name}.signs"] == first
    assert torch.equal(logits(mh.load(tmp_path / "a"), IDS), logits(mh.load(tmp_path / "b"), IDS))


def _drop(key):
    return lambda config, tensors: tensors.pop(key)


def _set_config(key, value):
    return lambda config, tensors: config.__setitem__(key, value) if value is not None else config.pop(key)


def _reshape(key, shape):
    return lambda config, tensors: tensors.__setitem__(key, torch.zeros(shape, dtype=torch.float16))


Q = "model.layers.1.self_attn.q_proj"
BROKEN = {
    "no-num-expert": (_set_config("num_expert", None), "has no 'num_expert'"),
    "bad-num-expert": (_set_config("num_expert", 0), "num_expert must be an integer >= 1"),
    "not-llama": (_set_config("model_type", "opt"), "model_type is 'opt'.*Llama checkpoints only"),
    "experts-disagree": (_set_config("num_expert", 3),
                         r"layers\.0\.self_attn\.q_proj\.in_channel_scale has shape \[4, 64\], expected \[3, 64\]"),
    "out-scale-shape": (_reshape(f"{Q}.out_channel_scale", (4, 63)), rf"{Q}.out_channel_scale has shape \[4, 63\]"),
    "weight-shape": (_reshape(f"{Q}.weight", (64, 65)), rf"{Q}.weight has shape \[64, 65\], expected \[64, 64\]"),
    "no-router": (_drop(f"{Q}.gate_linear.weight"), rf"{Q} lacks {Q}.gate_linear.weight"),
    "no-scale": (_drop(f"{Q}.in_channel_scale"), rf"{Q}.gate_linear.weight has no {Q}.in_channel_scale"),
    "dense-shape": (_reshape("model.norm.weight", (65,)), r"model.norm.weight has shape \[65\], the config implies"),
    "missing-dense": (_drop("model.layers.0.input_layernorm.weight"), "lacks model.layers.0.input_layernorm.weight"),
    "unexpected-bias": (lambda c, t: t.__setitem__(f"{Q}.bias", torch.zeros(64)), f"{Q} has a bias, but the config"),
    "extra-tensor": (lambda c, t: t.__setitem__(f"{Q}.gate_linear.bias", torch.zeros(4)),
                     f"{Q}.gate_linear.bias is not a tensor of a BinaryMoS layer"),
    "integer-scale": (lambda c, t: t.__setitem__(f"{Q}.in_channel_scale", torch.ones(4, 64, dtype=torch.int32)),
                      f"{Q}.in_channel_scale has dtype I32; expected F16, BF16 or F32"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoints_are_refused_before_writing(tmp_path, case):
    config, mutate_and_message = authors_config(), BROKEN[case]
    tensors = authors_tensors(config)
    mutate, message = mutate_and_message
    mutate(config, tensors)
    src = write_checkpoint(tmp_path / "src", config, tensors, shards=2)
    with pytest.raises(CheckpointError, match=message):
        convert_binarymos(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_shard_and_wrong_index_are_refused(tmp_path):
    config = authors_config()
    src = write_checkpoint(tmp_path / "src", config, authors_tensors(config), shards=2)
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"places 'model\.norm\.weight' in model-00001-of-00002\.safetensors"):
        convert_binarymos(src, tmp_path / "out")
    (src / "model-00002-of-00002.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors is not a valid safetensors file"):
        convert_binarymos(src, tmp_path / "out")


def test_missing_files_and_occupied_output_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        convert_binarymos(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps(authors_config()))
    with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors\.index\.json nor"):
        convert_binarymos(tmp_path, tmp_path / "out")
    config = authors_config()
    src = write_checkpoint(tmp_path / "src", config, authors_tensors(config), shards=1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is not empty"):
        convert_binarymos(src, tmp_path / "busy")


def test_non_finite_latent_weight_names_the_module(tmp_path):
    config = authors_config()
    tensors = authors_tensors(config)
    tensors[f"{Q}.weight"][2, 2] = float("nan")
    with pytest.raises(ValueError, match=rf"{Q}.weight: pack: w holds 1 NaN"):
        convert_binarymos(write_checkpoint(tmp_path / "src", config, tensors, shards=1), tmp_path / "out")


def parse(argv):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def test_command(tmp_path, capsys):
    config = authors_config()
    src = write_checkpoint(tmp_path / "src", config, authors_tensors(config), shards=2)
    assert command.run(parse([str(src), str(tmp_path / "out")])) == 0
    out = capsys.readouterr().out
    assert "14 layers" in out and "E = 4" in out and str(tmp_path / "out") in out
    assert isinstance(mh.load(tmp_path / "out").model.layers[0].mlp.up_proj, mh.PackedMoSLinear)
    assert command.run(parse([str(src), str(tmp_path / "out")])) == 1
    assert "is not empty" in capsys.readouterr().err
    config["model_type"] = "mistral"
    bad = write_checkpoint(tmp_path / "bad", config, authors_tensors(authors_config()), shards=1)
    assert command.run(parse([str(bad), str(tmp_path / "out2")])) == 1
    assert "model_type is 'mistral'" in capsys.readouterr().err


PEAK_SCRIPT = textwrap.dedent("""
    import json, re, sys
    from mosbits.hf.checkpoints import convert_binarymos

    def status(key):
        with open("/proc/self/status") as f:
            return 1024 * int(re.search(key + r":\\s+(\\d+) kB", f.read()).group(1))

    convert_binarymos(sys.argv[1], sys.argv[2])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    convert_binarymos(sys.argv[3], sys.argv[4])
    print(json.dumps({"before": before, "peak": status("VmHWM")}))
""")


def converter_peak(tmp_path, config, shards):
    """(peak RSS growth of a converter run, largest source shard, whole checkpoint), in bytes.

    Measured in a fresh process: a first conversion of a tiny checkpoint loads every library, then the kernel's
    peak-RSS mark is reset (``5`` written to /proc/self/clear_refs, Linux) and read again after the real conversion.
    """
    tiny = authors_config()
    write_checkpoint(tmp_path / "tiny", tiny, authors_tensors(tiny), shards=2)
    src = write_checkpoint(tmp_path / "src", config, authors_tensors(config), shards=shards)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "tiny"), str(tmp_path / "tiny-out"),
                          str(src), str(tmp_path / "out")], capture_output=True, text=True, check=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    sizes = [p.stat().st_size for p in src.glob("*.safetensors")]
    return rss["peak"] - rss["before"], max(sizes), sum(sizes)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_is_bounded_by_about_one_shard(tmp_path):
    """8 decoder layers of hidden 512 in 4 shards (12 MiB each, 47 MiB in all): the converter's peak memory grows
    by less than about one shard (it holds one module at a time; measured 6-10 MiB), far less than the checkpoint."""
    growth, shard, total = converter_peak(tmp_path, authors_config(hidden=512, intermediate=1376, layers=8,
                                                                    vocab=1024), shards=4)
    print(f"peak RSS growth {growth / 2**20:.1f} MiB; largest shard {shard / 2**20:.1f} MiB; "
          f"checkpoint {total / 2**20:.1f} MiB")
    assert growth <= 1.5 * shard and total > 3.5 * shard
