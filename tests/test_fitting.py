"""mosbits.hf.fitting: least-squares scales on a layer's inputs, clustered experts and their router."""

import itertools

import pytest

torch = pytest.importorskip("torch")

from mosbits.experts import rank1_abs_factors  # noqa: E402
from mosbits.hf import fitting  # noqa: E402


def tokens(t, k, seed=0, rank=4):
    """(t, k) float64 tokens with unequal norms, most of their energy in a ``rank``-dimensional subspace (as a
    layer's inputs: strongly correlated channels) and a little in every channel."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, k, generator=g, dtype=torch.float64)
    x = torch.randn(t, rank, generator=g, dtype=torch.float64) @ basis
    x += 0.1 * torch.randn(t, k, generator=g, dtype=torch.float64)
    return x * torch.rand(t, 1, generator=g, dtype=torch.float64).add(0.1)


def unit_gram(x):
    u = x / x.norm(dim=1, keepdim=True)
    return u.T @ u / x.shape[0]


def test_the_s_in_step_is_the_least_squares_solution_over_the_tokens():
    """With s_out fixed, one alternation's s_in equals the least-squares fit computed from the tokens themselves
    (design matrix of every token x output), not through H: the closed form is the right one."""
    n, k, t = 5, 7, 40
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    x = tokens(t, k)
    u = x / x.norm(dim=1, keepdim=True)
    s_out, s_in = rank1_abs_factors(w)
    got_out, got_in = fitting.fit_scales(w, unit_gram(x), s_out, s_in, iterations=1)
    v = torch.sign(w) * s_in[None, :]
    expected_out = torch.stack([torch.linalg.lstsq((u @ v[i])[:, None], u @ w[i])[0][0] for i in range(n)])
    torch.testing.assert_close(got_out, expected_out, rtol=1e-10, atol=0)
    c = torch.sign(w) * got_out[:, None]
    design = torch.cat([u * c[i] for i in range(n)])                     # (n * t, k): row (i, tok) = u_tok * c_i
    target = torch.cat([u @ w[i] for i in range(n)])
    torch.testing.assert_close(got_in, torch.linalg.lstsq(design, target[:, None])[0][:, 0], rtol=1e-8, atol=0)


def test_alternations_never_raise_the_error_and_recover_an_exact_rank1_layer():
    g = torch.Generator().manual_seed(2)
    n, k = 24, 16
    signs = torch.where(torch.rand(n, k, generator=g) < 0.5, -1.0, 1.0).double()
    w = signs * torch.rand(n, 1, generator=g, dtype=torch.float64).add(0.5) \
        * torch.rand(1, k, generator=g, dtype=torch.float64).add(0.5)
    h = fitting.gram(tokens(200, k))
    s_out, s_in = torch.ones(n, dtype=torch.float64), torch.ones(k, dtype=torch.float64)
    errors = [fitting.output_error(w, h, s_out, s_in)]
    for _ in range(40):
        s_out, s_in = fitting.fit_scales(w, h, s_out, s_in, iterations=1)
        errors.append(fitting.output_error(w, h, s_out, s_in))
    rounding = 1e-13                                                # float64 sums of K products, relative
    assert all(b <= a + rounding for a, b in itertools.pairwise(errors)), errors
    assert errors[0] > 0.05 and errors[-1] < 1e-10, errors


def test_the_fit_beats_the_paper_start_on_the_tokens_it_serves():
    """On inputs with unequal channels the data-aware fit lowers the output error on held-out tokens of the same
    kind; the paper's fit of |W| ignores the inputs."""
    g = torch.Generator().manual_seed(3)
    n, k = 32, 48
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    x = tokens(2000, k)
    fit_h, test_h = fitting.gram(x[:1000]), fitting.gram(x[1000:])
    s_out, s_in = rank1_abs_factors(w)
    paper = fitting.output_error(w, test_h, s_out, s_in)
    fitted = fitting.output_error(w, test_h, *fitting.fit_scales(w, fit_h, s_out, s_in))
    assert fitted < 0.8 * paper, (fitted, paper)


def test_a_few_massive_tokens_do_not_own_the_fit():
    """Unit tokens in H: one token 1000x larger than the others weighs as one token, so the fit with it equals
    the fit without it (up to its one share)."""
    n, k = 16, 12
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = tokens(400, k)
    heavy = torch.cat([x, 1000 * x[:1]])
    s_out, s_in = rank1_abs_factors(w)
    plain = fitting.fit_scales(w, fitting.gram(x), s_out, s_in)
    with_heavy = fitting.fit_scales(w, fitting.gram(heavy), s_out, s_in)
    torch.testing.assert_close(with_heavy[1], plain[1], rtol=0.05, atol=0)


def test_clusters_and_router_find_separated_groups():
    """Tokens around four separated directions: k-means finds the groups, and the router gives each token its own
    group's largest gate, with the mean largest gate at TOP_GATE."""
    g = torch.Generator().manual_seed(5)
    k, per = 32, 100
    directions = torch.linalg.qr(torch.randn(k, 4, generator=g))[0].T * 5
    group = torch.arange(4).repeat_interleave(per)
    x = directions[group] + 0.5 * torch.randn(4 * per, k, generator=g)
    labels, router = fitting.cluster_inputs(x, 4, torch.Generator().manual_seed(0))
    mapping = {int(labels[group == e].mode().values): e for e in range(4)}
    assert sorted(mapping.values()) == [0, 1, 2, 3]
    assert bool((torch.tensor([mapping[int(i)] for i in labels]) == group).all())
    gates = torch.softmax(x @ router.T, dim=1)
    assert bool((gates.argmax(1) == labels).all())
    assert float(gates.max(1).values.mean()) == pytest.approx(fitting.TOP_GATE, abs=1e-3)


def test_each_expert_serves_its_own_group_better_than_the_shared_fit():
    """Two groups of tokens in different subspaces: expert e's error on group e is below the one shared fit's."""
    n, k = 32, 40
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x = torch.cat([tokens(400, k, seed=7), tokens(400, k, seed=8)])
    labels = torch.arange(2).repeat_interleave(400)
    s_out, s_in = rank1_abs_factors(w)
    s_outs, s_ins = fitting.data_start(w, fitting.input_grams(x, 2, labels), s_out, s_in)
    shared_out, shared_in = fitting.data_start(w, fitting.input_grams(x), s_out, s_in)
    for e in range(2):
        h = fitting.gram(x[labels == e])
        own = fitting.output_error(w, h, s_outs[e], s_ins[e])
        shared = fitting.output_error(w, h, shared_out[0], shared_in[0])
        assert own < 0.9 * shared, (e, own, shared)


@pytest.mark.parametrize("x", [torch.randn(2, 8, generator=torch.Generator().manual_seed(9)),
                               torch.ones(50, 8), torch.zeros(10, 8)],
                         ids=["fewer-tokens-than-experts", "all-alike", "all-zero"])
def test_degenerate_tokens_give_finite_experts_and_router(x):
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(10))
    labels, router = fitting.cluster_inputs(x, 4, torch.Generator().manual_seed(0))
    assert labels.shape == (x.shape[0],) and router.shape == (4, 8) and bool(torch.isfinite(router).all())
    s_out, s_in = rank1_abs_factors(w)
    s_outs, s_ins = fitting.data_start(w, fitting.input_grams(x, 4, labels), s_out, s_in)
    assert s_outs.shape == (4, 6) and s_ins.shape == (4, 8)
    assert bool(torch.isfinite(s_outs).all() and torch.isfinite(s_ins).all())


def test_expert_grams_need_labels_that_match_the_tokens():
    x = tokens(10, 4)
    with pytest.raises(ValueError, match=r"labels: expected shape \(10,\) for E = 2, got None"):
        fitting.input_grams(x, 2)
    with pytest.raises(ValueError, match=r"labels: expected shape \(10,\) for E = 2, got \(9,\)"):
        fitting.input_grams(x, 2, torch.zeros(9, dtype=torch.long))
