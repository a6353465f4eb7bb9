"""Single-process checks of every estimator against the independent float64 reference."""

import pytest
import torch

import otr_megatron as otr
from tests.core.reference import ref_loss, ref_samples, samples_matrix

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def make_inputs(n=40, v=97, dtype=torch.float32, seed=0, scale=3.0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=g) * scale).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = -100
    return x, y


def run(x, y, cfg, upstream=None, **kw):
    xx = x.clone().requires_grad_()
    loss, stats = otr.vocab_parallel_otr_loss(xx, y, cfg, return_stats=True, **kw)
    g = torch.ones_like(loss) if upstream is None else upstream
    loss.backward(g)
    return loss, stats, xx.grad


def reference(x, y, estimator, upstream=None, **kw):
    xd = x.double().requires_grad_()
    loss = ref_loss(xd, y, estimator, **kw)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream.double())
    return loss.detach(), xd.grad


@pytest.mark.parametrize("estimator", ["sft", "dft", "expected"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_closed_forms_match_reference(estimator, dtype):
    x, y = make_inputs(dtype=dtype)
    upstream = torch.rand(y.shape, generator=torch.Generator().manual_seed(1)) * 3  # per-token weights
    cfg = otr.OTRConfig(estimator=estimator, temperature=1.3, neg_reward=-0.1, chunk_tokens=7)
    loss, stats, grad = run(x, y, cfg, upstream)
    ref, ref_grad = reference(x, y, estimator, upstream, temperature=1.3, neg_reward=-0.1)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref, atol=2e-5, rtol=2e-5)
    # gradient computed in fp32 and rounded once to the input dtype
    atol = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]
    torch.testing.assert_close(grad.double(), ref_grad, atol=atol, rtol=1e-2 if dtype != torch.float32 else 1e-5)
    logp = torch.log_softmax(x.double(), -1).gather(1, y.clamp(min=0)[:, None]).squeeze(1)
    torch.testing.assert_close(stats["label_logprob"].double(), torch.where(y != -100, logp, 0.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 8, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_estimator_matches_reference_given_its_samples(k, dtype):
    x, y = make_inputs(n=33, v=300, dtype=dtype, scale=2.0)
    upstream = torch.rand(y.shape, generator=torch.Generator().manual_seed(2)) + 0.5
    cfg = otr.OTRConfig(estimator="sample", num_samples=k, temperature=1.3, neg_reward=-0.1, seed=7, chunk_tokens=5)
    loss, stats, grad = run(x, y, cfg, upstream, step=3)
    samples = samples_matrix(stats["owned_samples"], y.numel(), k)
    valid = y != -100
    assert bool((samples[~valid] == -1).all()), "ignored tokens must draw no samples"
    samples = torch.where(valid[:, None], samples, 0)
    ref, ref_grad = reference(x, y, "sample", upstream, samples=samples, neg_reward=-0.1)
    torch.testing.assert_close(loss.double(), ref, atol=3e-5, rtol=3e-5)
    atol = 1e-6 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(grad.double(), ref_grad, atol=atol, rtol=1e-5 if dtype == torch.float32 else 1e-2)
    hits = (samples == y[:, None]).sum(-1)
    assert torch.equal(stats["hits"], torch.where(valid, hits, 0))
    reward = (hits + (-0.1) * (k - hits)) / k
    torch.testing.assert_close(stats["reward_mean"].double(), torch.where(valid, reward, 0.0).double())


def test_samples_equal_single_device_float64_inverse_cdf():
    x, y = make_inputs(n=256, v=1000, scale=4.0, ignore_frac=0.0)
    keys = torch.arange(256) * 977 + 13
    cfg = otr.OTRConfig(estimator="sample", num_samples=64, temperature=1.3, seed=11)
    _, stats = otr.vocab_parallel_otr_loss(x, y, cfg, step=5, token_keys=keys, return_stats=True)
    ours = samples_matrix(stats["owned_samples"], 256, 64)
    ref = ref_samples(x, keys, 64, 1.3, seed=11, step=5).sort(-1).values
    mismatch = (ours != ref).float().mean().item()
    assert mismatch <= 1e-3, f"{mismatch:.2e} of samples differ from the float64 draw"


def test_padded_vocab_never_sampled_and_excluded_from_softmax():
    x, y = make_inputs(n=64, v=128, ignore_frac=0.0)
    y = y % 100
    x[:, 100:] = 50.0  # padded rows of a real LM head hold garbage: they must not matter
    for est in ["sample", "expected", "sft", "dft"]:
        cfg = otr.OTRConfig(estimator=est, num_samples=32)
        loss, stats, grad = run(x, y, cfg, vocab_size=100)
        assert bool((grad[:, 100:] == 0).all())
        kw = {}
        if est == "sample":
            ids = stats["owned_samples"][1]
            assert int(ids.max()) < 100
            kw["samples"] = samples_matrix(stats["owned_samples"], 64, 32)
        ref, ref_grad = reference(x, y, est, vocab_size=100, **kw)
        torch.testing.assert_close(loss.double(), ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)  # ref grad is 0 on padding


def test_duplicate_samples_accumulate():
    x = torch.zeros(4, 50)
    x[:, 3] = 6.0  # label 3 takes nearly all the mass: sampled many times per token
    y = torch.tensor([3, 3, 4, 3])
    cfg = otr.OTRConfig(estimator="sample", num_samples=256, neg_reward=-0.2)
    loss, stats, grad = run(x, y, cfg)
    assert int(stats["hits"][0]) > 100
    samples = samples_matrix(stats["owned_samples"], 4, 256)
    _, ref_grad = reference(x, y, "sample", samples=samples, neg_reward=-0.2)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)


def test_chunking_and_inplace_do_not_change_results():
    x, y = make_inputs(n=50, v=200, dtype=torch.bfloat16)
    base = None
    for chunk in [1, 7, 50, None]:
        for inplace in [False, True]:
            cfg = otr.OTRConfig(estimator="sample", num_samples=16, chunk_tokens=chunk, inplace_backward=inplace)
            xx = x.clone().requires_grad_()
            loss = otr.vocab_parallel_otr_loss(xx, y, cfg)
            loss.sum().backward()
            out = (loss.detach(), xx.grad.clone())
            if base is None:
                base = out
            torch.testing.assert_close(out[0], base[0], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(out[1].float(), base[1].float(), atol=1e-2, rtol=0)


def test_inplace_backward_writes_into_logits_and_default_leaves_them():
    x, y = make_inputs(n=8, v=40)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # non-leaf, as an LM head output
    cfg = otr.OTRConfig(estimator="sft", inplace_backward=True)
    otr.vocab_parallel_otr_loss(logits, y, cfg).sum().backward()
    assert logits.data_ptr() == leaf.grad.data_ptr() or torch.equal(logits.detach(), leaf.grad)
    leaf2 = x.clone().requires_grad_()
    logits2 = leaf2 * 1.0
    otr.vocab_parallel_otr_loss(logits2, y, otr.OTRConfig(estimator="sft")).sum().backward()
    assert torch.equal(logits2.detach(), x)
    torch.testing.assert_close(leaf.grad, leaf2.grad)


@pytest.mark.parametrize("beta", [0.0, -0.3, -1.0])
def test_expected_at_kappa_one_is_scaled_dft(beta):
    x, y = make_inputs(n=30, v=60)
    _, _, g_exp = run(x, y, otr.OTRConfig(estimator="expected", temperature=1.0, neg_reward=beta))
    _, _, g_dft = run(x, y, otr.OTRConfig(estimator="dft"))
    torch.testing.assert_close(g_exp, (1 - beta) * g_dft, atol=1e-6, rtol=1e-5)


def test_all_ignored_gives_zero_loss_and_gradient():
    x, _ = make_inputs(n=10, v=30)
    x[3, 4] = float("nan")  # even non-finite logits at ignored positions contribute nothing
    y = torch.full((10,), -100)
    for est in ["sample", "expected", "sft", "dft"]:
        loss, stats, grad = run(x, y, otr.OTRConfig(estimator=est))
        assert bool((loss == 0).all()) and bool((grad == 0).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_never_give_a_finite_loss(bad):
    x, y = make_inputs(n=6, v=20, ignore_frac=0.0)
    if bad == -float("inf"):
        x[2, :] = bad  # a row of -inf has no distribution at all
    else:
        x[2, 5] = bad
    for est in ["sample", "expected", "sft", "dft"]:
        loss, _, grad = run(x, y, otr.OTRConfig(estimator=est, num_samples=8))
        assert not torch.isfinite(loss[2]), est
        assert bool(torch.isfinite(loss[[0, 1, 3, 4, 5]]).all()), est
        assert not bool(torch.isfinite(grad[2]).all()), est


def test_masked_minus_inf_logits_are_fine():
    x, y = make_inputs(n=6, v=20, ignore_frac=0.0)
    x[:, 0] = -float("inf")
    y = y.clamp(min=1)
    for est in ["sample", "expected", "sft", "dft"]:
        loss, stats, grad = run(x, y, otr.OTRConfig(estimator=est, num_samples=64))
        assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())
        if est == "sample":
            assert int(stats["owned_samples"][1].min()) >= 1


def test_shapes_and_outputs_follow_labels():
    x = torch.randn(5, 3, 64, dtype=torch.bfloat16)  # [s, b, V/tp] as Megatron produces
    y = torch.randint(0, 64, (5, 3))
    loss, stats = otr.vocab_parallel_otr_loss(x, y, otr.OTRConfig(num_samples=4), return_stats=True)
    assert loss.shape == (5, 3) and loss.dtype == torch.float32
    assert stats["hits"].shape == (5, 3) and stats["hits"].dtype == torch.int64
    # default keys are flat indices: reshaping the batch keeps the draws
    loss2 = otr.vocab_parallel_otr_loss(x.reshape(15, 64), y.reshape(15), otr.OTRConfig(num_samples=4))
    assert torch.equal(loss.reshape(15), loss2)
