"""`mosbits bench` and the shared benchmark workloads, on small shapes (speed itself is never asserted)."""

import json

import numpy as np
import pytest

from mosbits import dispatch
from mosbits.cli import main
from mosbits.format import row_bytes
from mosbits.perf import workloads

SMALL = ["bench", "--shapes", "40x70,17x33", "--batches", "1,9", "--repeats", "2", "--budget", "0",
         "--warmup", "0", "--backends", "reference"]


def test_bench_reports_every_implementation(tmp_path, capsys):
    out_json = tmp_path / "b.json"
    assert main([*SMALL, "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "40x70 (N x K)" in out and "17x33 (N x K)" in out
    assert "dense numpy-fp32" in out and "mosbits reference (cache)" in out and "mosbits reference (dram)" in out
    report = json.loads(out_json.read_text())
    assert report["machine"]["bandwidth_bytes_per_s"] > 0
    rows = [r for r in report["rows"] if r["impl"] == "mosbits reference (dram)"]
    assert len(rows) == 4 and all(r["check"] == "ok" and r["seconds"] > 0 for r in rows)


def test_bench_refuses_to_time_a_wrong_backend(capsys, monkeypatch):
    monkeypatch.setitem(dispatch.BACKENDS, "fake", dispatch.BackendSpec(
        "fake", "fake_backend", (), None, 0, ("numpy",), frozenset({"numpy"})))
    assert main([*SMALL, "--resident", "cache", "--backends", "fake,reference"]) == 1
    captured = capsys.readouterr()
    wrong = [line for line in captured.out.splitlines() if "WRONG" in line]
    assert len(wrong) == 4 and all("mosbits fake (cache)" in line and " - " in line for line in wrong)
    assert "mosbits fake (cache) is WRONG" in captured.err
    assert "reference (cache) is WRONG" not in captured.err


def test_bench_rejects_unknown_backend_and_shape(capsys):
    assert main(["bench", "--backends", "nope"]) == 2
    assert main(["bench", "--shapes", "4096by4096"]) == 2
    assert main(["bench", "--cuda-graphs"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "4096by4096" in err and "--cuda-graphs needs --device cuda" in err


def test_bench_refuses_cuda_without_a_gpu(capsys, monkeypatch):
    from mosbits.cli import bench

    monkeypatch.setattr(bench, "_cuda_available", lambda: False)
    assert main(["bench", "--device", "cuda"]) == 2
    assert main(["bench", "--device", "cuda", "--model", "smollm2-135m"]) == 2
    assert capsys.readouterr().err.count("--device cuda: no CUDA device here") == 2
    monkeypatch.setattr(bench, "_cuda_available", lambda: True)
    assert main(["bench", "--device", "cuda", "--cuda-graphs", "--model", "smollm2-135m"]) == 2
    assert main(["bench", "--plot", "p.png", "--model", "smollm2-135m"]) == 2
    err = capsys.readouterr().err
    assert "--cuda-graphs is for the layer tables" in err and "--plot is for the layer tables" in err


@pytest.mark.gpu
def test_cuda_graph_time_replays_the_captured_calls():
    """Every replay runs fn ``calls`` times: 3 warm-up calls, then one untimed and ``repeats`` timed replays."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mosbits.perf.timing import cuda_graph_time

    counter = torch.zeros((), device="cuda")
    seconds = cuda_graph_time(lambda: counter.add_(1), repeats=5, calls=4, flush_bytes=1 << 20)
    assert int(counter.item()) == 3 + 4 * (1 + 5)
    assert np.isfinite(seconds)


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    assert main([*SMALL, "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("k", [1, 8, 33, 100])
def test_random_layers_have_clean_padding(k):
    layer = workloads.random_layer(np.random.default_rng(k), 5, k, 2, "numpy", "float32")
    layer.packed.validate()


def test_dram_residency_exceeds_twice_the_l3():
    n, k = workloads.LLAMA_7B_SHAPES["4096x4096"]
    count = workloads.layers_for("dram", n, k)
    assert count * n * row_bytes(k) >= 2 * workloads.l3_bytes() >= 2 << 20
    assert workloads.layers_for("cache", n, k) == 1
    assert workloads.layers_for("dram", 1, 1) == workloads.MAX_DRAM_LAYERS
    with pytest.raises(ValueError, match="resident"):
        workloads.layers_for("disk", n, k)


def test_workload_rotates_and_skips_what_it_cannot_run():
    work = workloads.make_workload("reference", (9, 40), 3, 2, "float32", "dram")
    assert len(work.layers) >= 2
    first, second = work(), work()
    assert not np.array_equal(first, second)
    assert work.gate() <= 1
    with pytest.raises(NotImplementedError, match="bfloat16"):
        workloads.make_workload("reference", (9, 40), 3, 2, "bfloat16")


def test_baselines_compute_the_same_product():
    fns = workloads.dense_baselines((6, 10), 2, include=("numpy-fp32", "torch-fp32"))
    if "torch" in dispatch.available():
        np.testing.assert_allclose(np.asarray(fns["torch-fp32"]()), fns["numpy-fp32"](), rtol=1e-6, atol=1e-6)
    assert fns["numpy-fp32"]().shape == (2, 6)
