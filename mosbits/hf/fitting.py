"""Data-aware starts for a BinaryMoS layer: scales fitted to the layer's real inputs, and experts that differ.

The paper's start fits ``s_out s_in^T`` to |W| alone, and gives every expert that same fit, so at step 0 the
gates change nothing and the router gets no gradient. The functions here use what the layer sees instead:

- `fit_scales`: rank-1 scales by alternating closed-form least squares on the layer's output error over its
  inputs X (T, K), which depends on X only through the Gram matrix H = X^T X / T (K, K) (of the tokens scaled
  to unit length, `gram`):

      L(s_out, s_in) = sum_n (W_n - s_out[n] B_n * s_in) H (W_n - s_out[n] B_n * s_in)^T,   B = sign(W)

  For fixed s_in each s_out[n] is a ratio of two quadratic forms; for fixed s_out, s_in solves the K x K system
  ``(H * C^T C) s_in = colsum((W H) * C)`` with C = B * s_out[:, None].
- `cluster_inputs`: spherical k-means of the input tokens into E groups, and a router whose rows point at the
  group centres, with one temperature chosen so the mean top gate on the tokens has a set value.
- `input_grams`, `data_start`: expert e fitted on the Gram of its group (shrunk towards the whole layer's), the
  Grams computed once per input for all the layers that read it; with the router from the centres, a token
  reaches the expert fitted to tokens like it from step 0.

`mosbits.hf.calibrate(start="data")` uses them. Measured on SmolLM2-135M (README, "Post-training calibration"):
a lower error per layer on held-out tokens and per block at the start, but after block reconstruction a higher
held-out perplexity than the paper's start; signs chosen with GPTQ-style error feedback were worse still (they
fit the few thousand calibration tokens), so they are not offered.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

DAMPING = 0.01
"""Added to H's diagonal, times its mean diagonal, before any solve (as GPTQ does): H from a few thousand tokens
is singular for wide layers."""

SHRINK = 0.25
"""Expert e's Gram is ``H_e + SHRINK * H`` (both per-token means): a small group must not yield wild scales."""

TOP_GATE = 0.7
"""The router's temperature is set so that, on the calibration tokens, the largest gate averages this value:
confident enough that experts specialise, soft enough that the router still learns."""


def gram(x: torch.Tensor) -> torch.Tensor:
    """H = U^T U / T in float64 for the tokens x (T, K) scaled to unit length (U), damped (`DAMPING`).

    Unit tokens weigh every token's relative error alike. With raw tokens, the few tokens that carry massive
    activations (norms 100x the rest, e.g. in SmolLM2's block 11 down_proj) own H: the fit then serves them alone
    (their error 0.95 -> 0.004) and the other tokens' error rises from 0.36 to 0.90."""
    u = x.float() / x.float().norm(dim=1, keepdim=True).clamp_min(1e-30)
    h = (u.T @ u).double() / max(x.shape[0], 1)
    return h + DAMPING * h.diagonal().mean().clamp_min(1e-30) * torch.eye(h.shape[0], dtype=h.dtype,
                                                                           device=h.device)


def output_error(weight: torch.Tensor, h: torch.Tensor, s_out: torch.Tensor, s_in: torch.Tensor) -> float:
    """The layer's relative output error on inputs of Gram ``h`` (`gram`): L(s_out, s_in) / sum_n W_n H W_n^T."""
    w = weight.double()
    delta = w - torch.sign(w) * s_out.double()[:, None] * s_in.double()[None, :]
    return float(((delta @ h) * delta).sum() / ((w @ h) * w).sum())


def fit_scales(weight: torch.Tensor, h: torch.Tensor, s_out: torch.Tensor, s_in: torch.Tensor,
               iterations: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-1 scales of ``sign(W) * s_out s_in^T`` that minimise the output error on inputs of Gram ``h``.

    Args:
        weight: (N, K) dense weight W.
        h: (K, K) float64 Gram matrix of the inputs (`gram`).
        s_out, s_in: (N,), (K,) the start (e.g. the paper's fit of |W|).
        iterations: alternations (each: the s_out step, then the s_in step); the error never rises.

    Returns:
        (s_out (N,), s_in (K,)) float64, on weight's device.
    """
    w = weight.double()
    b = torch.sign(w)
    wh = w @ h
    s_out, s_in = s_out.double().clone(), s_in.double().clone()
    for _ in range(iterations):
        v = b * s_in[None, :]
        s_out = (wh * v).sum(1) / ((v @ h) * v).sum(1).clamp_min(1e-30)
        c = b * s_out[:, None]
        s_in = torch.linalg.solve(h * (c.T @ c), (wh * c).sum(0))
    return s_out, s_in


def cluster_inputs(x: torch.Tensor, num_experts: int, generator: torch.Generator,
                   iterations: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means of the tokens x (T, K) into ``num_experts`` groups and a router pointing at them.

    Returns:
        (labels (T,) int64, router (E, K) in x's dtype): ``softmax(x @ router.T)`` puts its largest gate on a
        token's own group for most tokens, with mean largest gate `TOP_GATE` (tokens that no temperature up to
        1e6 separates, e.g. all alike, get that temperature). Groups may be empty (fewer than E distinct tokens).
    """
    unit = x.float() / x.float().norm(dim=1, keepdim=True).clamp_min(1e-30)
    picks = torch.randperm(unit.shape[0], generator=generator)[torch.arange(num_experts) % unit.shape[0]]
    centres = unit[picks].clone()
    for _ in range(iterations):
        labels = (unit @ centres.T).argmax(1)
        for e in range(num_experts):
            members = unit[labels == e]
            if members.shape[0]:
                centres[e] = members.sum(0) / members.sum(0).norm().clamp_min(1e-30)
    labels = (unit @ centres.T).argmax(1)
    logits = x.float() @ centres.T
    low, high = 0.0, 1.0
    while torch.softmax(logits * high, 1).max(1).values.mean() < TOP_GATE and high < 1e6:
        low, high = high, high * 2
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if torch.softmax(logits * mid, 1).max(1).values.mean() < TOP_GATE else (low, mid)
    return labels, (centres * high).to(x.dtype)


class InputGrams(NamedTuple):
    """The Grams (`gram`) one input gives every layer that reads it: computed once, shared by q/k/v or gate/up.

    Attributes:
        whole: (K, K) float64 Gram of all the tokens.
        experts: E entries: (K, K) float64 Gram of expert e's group shrunk towards ``whole`` (``H_e + SHRINK * H``),
            or None for an empty group; empty when E = 1 (the whole fit is the only one).
    """

    whole: torch.Tensor
    experts: tuple[torch.Tensor | None, ...]


def input_grams(x: torch.Tensor, num_experts: int = 1, labels: torch.Tensor | None = None) -> InputGrams:
    """The Grams of the tokens x (T, K) for `data_start`.

    Args:
        x: (T, K) the layer's input tokens (a few thousand suffice).
        num_experts: E.
        labels: (T,) the tokens' groups in [0, E) from `cluster_inputs`; needed when E > 1.

    Raises:
        ValueError: E > 1 without labels, or labels that do not match x.
    """
    h = gram(x)
    if num_experts == 1:
        return InputGrams(h, ())
    if labels is None or labels.shape != (x.shape[0],):
        raise ValueError(f"labels: expected shape ({x.shape[0]},) for E = {num_experts}, got "
                         f"{None if labels is None else tuple(labels.shape)}")
    return InputGrams(h, tuple(gram(x[labels == e]) + SHRINK * h if bool((labels == e).any()) else None
                               for e in range(num_experts)))


def data_start(weight: torch.Tensor, grams: InputGrams, s_out: torch.Tensor,
               s_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert scales of a BinaryMoS layer fitted to its inputs, for the signs of W.

    Args:
        weight: (N, K) dense weight.
        grams: the Grams of the layer's inputs (`input_grams`), on weight's device; E = max(1, len(experts)).
        s_out, s_in: (N,), (K,) the paper's start, where the fits begin.

    Returns:
        (S_out (E, N), S_in (E, K)) float64: expert e fitted on group e's Gram (an empty group keeps the fit on
        all tokens, the only fit when E = 1).
    """
    s_out, s_in = fit_scales(weight, grams.whole, s_out, s_in, iterations=3)
    if not grams.experts:
        return s_out[None], s_in[None]
    fits = [fit_scales(weight, h, s_out, s_in, iterations=2) if h is not None else (s_out, s_in)
            for h in grams.experts]
    return torch.stack([f[0] for f in fits]), torch.stack([f[1] for f in fits])
