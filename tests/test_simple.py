"""moefy.routing.simple: the SIMPLE k-subset sampler, checked against brute-force enumeration."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from moefy.routing.simple import log_count_table, simple_marginals, simple_sample, simple_subset


def brute_log_weights(row, k):
    """All k-subsets of range(E) and their unnormalised log p(S), computed in log space (float64)."""
    subsets = list(itertools.combinations(range(row.numel()), k))
    lp, lq = F.logsigmoid(row), F.logsigmoid(-row)
    logw = torch.stack([sum(lp[i] if i in s else lq[i] for i in range(row.numel())) for s in subsets])
    return subsets, logw


def brute_marginals(row, k):
    """(log Z, exact inclusion marginals) of one row by enumeration in log space."""
    subsets, logw = brute_log_weights(row, k)
    log_z = torch.logsumexp(logw, 0)
    mu = torch.stack([torch.logsumexp(logw[[n for n, s in enumerate(subsets) if i in s]], 0)
                      for i in range(row.numel())]) - log_z
    return log_z, mu.exp()


def test_table_matches_enumeration_of_all_sums():
    row = torch.randn(5, dtype=torch.float64) * 2
    k = 3
    a = log_count_table(row[None], k)[0]
    assert a.shape == (6, 4)
    p = torch.sigmoid(row).tolist()
    for i in range(6):
        for j in range(k + 1):
            prob = sum(math.prod(p[l] if b else 1 - p[l] for l, b in enumerate(bits))
                       for bits in itertools.product((0, 1), repeat=i) if sum(bits) == j)
            if j > i:
                assert a[i, j] == float("-inf")
            else:
                assert a[i, j].item() == pytest.approx(math.log(prob), abs=1e-12)


@pytest.mark.parametrize("E", [3, 4, 5, 6])
def test_log_z_and_marginals_match_enumeration(E):
    logits = torch.randn(4, E, dtype=torch.float64) * 1.5
    for k in range(1, E + 1):
        a = log_count_table(logits, k)
        assert a.shape == (4, E + 1, k + 1)
        mu = simple_marginals(logits, k)
        assert mu.shape == (4, E) and mu.dtype == torch.float64
        for t in range(4):
            log_z, mu_ref = brute_marginals(logits[t], k)
            assert abs(a[t, E, k].item() - log_z.item()) < 1e-10
            torch.testing.assert_close(mu[t], mu_ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(mu.sum(1), torch.full((4,), float(k), dtype=torch.float64), rtol=0, atol=1e-10)


def test_k_equals_e_gives_all_ones():
    logits = torch.randn(3, 5) * 4
    torch.testing.assert_close(simple_marginals(logits, 5), torch.ones(3, 5), rtol=0, atol=1e-6)
    assert simple_sample(logits, 5).all()


@pytest.mark.parametrize("scale", [50.0, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_are_finite_and_exact(scale, dtype):
    logits = torch.tensor([[scale, -scale, scale, -scale, 0.5],
                           [-scale, -scale, -scale, -scale, -scale],
                           [scale, scale, scale, -scale, 3.0]], dtype=dtype)
    for k in (1, 2, 3):
        a = log_count_table(logits, k)
        assert not torch.isnan(a).any() and torch.isfinite(a[:, -1, :]).all()
        x = logits.clone().requires_grad_()
        mu = simple_marginals(x, k)
        assert torch.isfinite(mu).all()
        (g,) = torch.autograd.grad((mu * torch.arange(5.0, dtype=dtype)).sum(), x)
        assert torch.isfinite(g).all()
        mu = mu.detach()
        for t in range(3):
            log_z, mu_ref = brute_marginals(logits[t].double(), k)
            assert a[t, -1, k].item() == pytest.approx(log_z.item(), rel=1e-6 if dtype == torch.float32 else 1e-12)
            torch.testing.assert_close(mu[t].double(), mu_ref, rtol=0,
                                       atol=1e-5 if dtype == torch.float32 else 1e-10)
        s = simple_sample(logits, k)
        assert (s.sum(1) == k).all()


def test_extreme_logits_sample_the_obvious_subset():
    logits = torch.tensor([[100.0, -100.0, 100.0, -100.0]]).expand(50, 4)
    s = simple_sample(logits, 2, generator=torch.Generator().manual_seed(1))
    assert (s == torch.tensor([True, False, True, False])).all()


def test_sample_frequencies_match_exact_distribution():
    row = torch.tensor([1.2, -0.7, 0.3, -1.5], dtype=torch.float64)
    n, k = 20000, 2
    s = simple_sample(row.expand(n, 4), k, generator=torch.Generator().manual_seed(123))
    assert s.dtype == torch.bool and s.shape == (n, 4) and (s.sum(1) == k).all()
    subsets, logw = brute_log_weights(row, k)
    p = (logw - torch.logsumexp(logw, 0)).exp()
    codes = (s.long() * torch.tensor([1, 2, 4, 8])).sum(1)
    for subset, prob in zip(subsets, p.tolist()):
        freq = (codes == sum(2 ** i for i in subset)).double().mean().item()
        assert abs(freq - prob) < 4 * math.sqrt(prob * (1 - prob) / n), (subset, freq, prob)


def test_sample_is_seeded_and_gradient_free():
    logits = torch.randn(8, 6, requires_grad=True)
    a = simple_sample(logits, 3, generator=torch.Generator().manual_seed(7))
    b = simple_sample(logits, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not a.requires_grad


def test_gradcheck_and_gradgradcheck():
    logits = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    for k in (1, 2, 4, 5):
        assert torch.autograd.gradcheck(lambda x: simple_marginals(x, k), (logits,))
        assert torch.autograd.gradgradcheck(lambda x: simple_marginals(x, k), (logits,))
    assert torch.autograd.gradcheck(lambda x: log_count_table(x, 3)[:, -1], (logits,))
    small = torch.tensor([[0.3, -1.2, 0.0, 2.0]], dtype=torch.float64, requires_grad=True)  # 0.0: exact ties
    for k in (1, 2):
        assert torch.autograd.gradgradcheck(lambda x: simple_marginals(x, k), (small,))
    big = torch.tensor([[60.0, -60.0, 1.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: simple_marginals(x, 2), (big,))


def test_marginals_without_grad_are_detached():
    logits = torch.randn(3, 4)
    assert not simple_marginals(logits, 2).requires_grad
    with torch.no_grad():
        mu = simple_marginals(logits.requires_grad_(), 2)
    assert not mu.requires_grad
    torch.testing.assert_close(mu, simple_marginals(logits, 2).detach())


def test_subset_value_is_hard_sample_and_gradient_is_marginals():
    logits = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 7, dtype=torch.float64)
    z = simple_subset(logits, 3, generator=torch.Generator().manual_seed(0))
    s = simple_sample(logits, 3, generator=torch.Generator().manual_seed(0))
    assert z.dtype == torch.float64 and torch.equal(z.detach(), s.double())
    assert ((z == 0) | (z == 1)).all() and (z.sum(1) == 3).all()
    (gz,) = torch.autograd.grad((z * w).sum(), logits)
    (gm,) = torch.autograd.grad((simple_marginals(logits, 3) * w).sum(), logits)
    assert torch.equal(gz, gm)


def test_half_is_promoted_to_float32():
    logits = torch.randn(4, 5).half()
    assert log_count_table(logits, 2).dtype == torch.float32
    assert simple_marginals(logits, 2).dtype == torch.float32
    assert simple_subset(logits, 2).dtype == torch.float32


def test_empty_batch():
    logits = torch.zeros(0, 4, requires_grad=True)
    assert simple_marginals(logits, 2).shape == (0, 4)
    assert simple_sample(logits, 2).shape == (0, 4)


@pytest.mark.parametrize("fn", [log_count_table, simple_marginals, simple_sample, simple_subset])
def test_bad_inputs(fn):
    with pytest.raises(TypeError, match="logits must be a floating-point torch.Tensor"):
        fn([[0.0, 1.0]], 1)
    with pytest.raises(TypeError, match="logits must be a floating-point torch.Tensor, got dtype torch.int64"):
        fn(torch.zeros(2, 3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        fn(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        fn(torch.zeros(2, 3, 4), 1)
    with pytest.raises(ValueError, match="logits must have at least one column"):
        fn(torch.zeros(2, 0), 1)
    for k in (0, 4, -1, 2.0, True, "2", None):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\], got "):
            fn(torch.zeros(2, 3), k)


# ------------------------------------------------------------------------------------------ in a block
def simple_block(k, **options):
    from conftest import LinearMixture
    return LinearMixture(3, 2, 4, k=k, noise="simple", **options)


def test_noise_simple_samples_subsets_with_the_exact_distribution():
    """20,000 copies of one token in one training forward: the chosen expert pairs follow p(S) exactly."""
    torch.manual_seed(0)
    block = simple_block(k=2)
    x = torch.randn(1, 3).repeat(20000, 1)
    block(x)
    r = block.routing
    assert r.indices.shape == (20000, 2) and (r.indices[:, 0] != r.indices[:, 1]).all()
    assert r.counts == tuple(torch.bincount(r.indices.reshape(-1), minlength=4).tolist())
    assert sum(r.counts) + int(r.dropped) == 20000 * 2  # every slot processed or dropped
    theta = block.router(x[:1])[0][0].detach().double()  # the logits of the token (temperature 1)
    exact = {S: math.exp(sum(F.logsigmoid(theta[list(S)])) + sum(F.logsigmoid(-theta[[i for i in range(4)
             if i not in S]]))) for S in itertools.combinations(range(4), 2)}
    z = sum(exact.values())
    chosen = [tuple(sorted(row)) for row in r.indices.tolist()]
    for S, p in exact.items():
        p = p / z
        freq = chosen.count(S) / len(chosen)
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / len(chosen)) + 1e-9, S


def test_noise_simple_is_top_k_in_eval_and_weights_follow_normalize():
    torch.manual_seed(0)
    block = simple_block(k=2).eval()
    x = torch.randn(64, 3)
    block(x)
    probs = block.routing.probs
    assert torch.equal(block.routing.indices, probs.topk(2, dim=-1).indices)
    block.train()
    block(x)
    w = block.routing.weights
    torch.testing.assert_close(w.sum(-1), torch.ones(64))  # normalize: the sampled pair's scores renormalised
    raw = simple_block(k=2, normalize=False).train()
    raw(x)
    picked = raw.routing.probs.gather(-1, raw.routing.indices)
    torch.testing.assert_close(raw.routing.weights, picked, rtol=0, atol=0)  # value: the scores themselves


def test_noise_simple_weights_carry_the_marginals_gradient():
    """normalize=False: weight = p_i · z_i, value p_i, gradient ∂p_i + p_i ∂μ_i (z: SIMPLE's estimator)."""
    torch.manual_seed(0)
    block = simple_block(k=2, normalize=False).double().train()
    x = torch.randn(5, 3, dtype=torch.float64)
    block(x)
    r, coef = block.routing, torch.randn(5, 2, dtype=torch.float64)
    got = torch.autograd.grad((r.weights * coef).sum(), block.router.gate.weight)[0]
    logits = block.router(x)[0]
    probs, mu = logits.softmax(-1), simple_marginals(logits, 2)
    p, m = probs.gather(-1, r.indices), mu.gather(-1, r.indices)
    want = torch.autograd.grad(((p + p.detach() * (m - m.detach())) * coef).sum(), block.router.gate.weight)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert float(got.abs().sum()) > 0


def test_noise_simple_needs_token_choice():
    with pytest.raises(ValueError, match=r"noise='simple' samples k experts per token: it needs token choice"):
        simple_block(k=2, expert_choice=True)
