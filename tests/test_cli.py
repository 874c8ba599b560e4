"""The ``mosbits`` command line: ``mosbits demo`` checks every backend and fails on a wrong one."""

import subprocess
import sys

import pytest

from mosbits import dispatch
from mosbits.cli import main
from mosbits.perf.timing import median_time

SMALL = ["demo", "--n", "64", "--k", "100", "--batches", "1,3", "--repeats", "2"]


def test_demo_passes_and_names_every_backend(capsys):
    assert main(SMALL) == 0
    out = capsys.readouterr().out
    for name in dispatch.available():
        assert name in out
    assert "FAIL" not in out


def test_demo_fails_on_a_wrong_backend(capsys, monkeypatch):
    pytest.importorskip("torch")
    from mosbits.backends import torch_ops

    right = torch_ops.matmul
    monkeypatch.setattr(torch_ops, "matmul", lambda *args: right(*args) * 1.01)
    assert main([*SMALL, "--backends", "torch,reference"]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out
    assert "backend 'torch' disagrees" in captured.err
    assert "backend 'reference' disagrees" not in captured.err


def test_demo_rejects_an_unknown_backend(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--backends", "nope"])
    assert exit_info.value.code == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err


def test_python_dash_m_runs_the_demo_without_torch_for_reference():
    code = ("import runpy, sys; sys.argv = ['mosbits', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('mosbits', run_name='__main__')\n"
            "finally:\n    assert 'torch' not in sys.modules, 'the reference demo imported torch'\n")
    args = ["demo", "--n", "17", "--k", "33", "--batches", "2", "--repeats", "1", "--backends", "reference"]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "reference" in done.stdout


def test_median_time_calls_warmup_then_repeats():
    calls = []
    seconds = median_time(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5
    assert seconds >= 0
    with pytest.raises(ValueError, match="repeats"):
        median_time(lambda: None, repeats=0)


def test_median_time_budget_stops_early_but_not_before_three():
    calls = []
    median_time(lambda: calls.append(1), repeats=50, warmup=0, budget=0.0)
    assert len(calls) == 3
