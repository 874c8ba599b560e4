"""The paper's initialisation: every expert is the rank-1 SVD factorisation of |W|."""

import numpy as np
import pytest

import mosbits
from mosbits.experts import rank1_abs_factors


@pytest.mark.parametrize(("n", "k"), [(1, 1), (7, 3), (40, 64), (130, 33)])
def test_rank1_factors_match_the_svd(n, k):
    w = np.random.default_rng(n * k).standard_normal((n, k))
    u, s, vh = np.linalg.svd(np.abs(w))
    s_out, s_in = rank1_abs_factors(w)
    best = s[0] * np.outer(u[:, 0], vh[0])
    np.testing.assert_allclose(np.outer(s_out, s_in), np.abs(best), rtol=1e-8, atol=1e-12)
    assert (s_out > 0).all() and (s_in > 0).all()
    np.testing.assert_allclose(np.linalg.norm(s_out), np.linalg.norm(s_in), rtol=1e-8)


def test_every_expert_starts_equal():
    w = np.random.default_rng(0).standard_normal((9, 20)).astype(np.float32)
    experts = mosbits.Experts.from_weight(w, num_experts=4, dtype=np.float16)
    assert experts.s_in.shape == (4, 20) and experts.s_out.shape == (4, 9) and experts.s_in.dtype == np.float16
    assert (experts.s_in == experts.s_in[0]).all() and (experts.s_out == experts.s_out[0]).all()
    with pytest.raises(ValueError, match="num_experts must be >= 1, got 0"):
        mosbits.Experts.from_weight(w, num_experts=0)
