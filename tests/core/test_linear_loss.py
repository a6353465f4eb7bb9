"""The fused output layer + loss (`vocab_parallel_linear_otr_loss`) against the unfused path (the output
layer's matmul, then `vocab_parallel_otr_loss`) and an independent float64 full-vocabulary reference.
Real TP=2/TP=4 processes, with and without sequence parallelism: tests/core/test_tensor_parallel.py."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import otr_megatron as otr
from tests.core.reference import ref_loss, samples_matrix

ESTIMATORS = ["sample", "expected", "sft", "dft"]
V_REAL, V_PAD, D = 250, 256, 12


def inputs(s=9, b=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(s, b, D, generator=g)
    w = torch.randn(V_PAD, D, generator=g) * 0.7
    y = torch.randint(0, V_REAL, (s, b), generator=g)
    y[::4, 0] = -100
    return h.to(dtype), w.to(dtype), y


def fused(h, w, y, cfg, g_out, **kw):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, st = otr.vocab_parallel_linear_otr_loss(hh, ww, y, cfg, step=7, vocab_size=V_REAL, return_stats=True, **kw)
    loss.backward(g_out)
    return loss.detach(), st, hh.grad, ww.grad


def unfused(h, w, y, cfg, g_out, logits_fn=None):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    logits = logits_fn(hh, ww) if logits_fn else hh @ ww.t()
    loss, st = otr.vocab_parallel_otr_loss(logits, y, cfg, step=7, vocab_size=V_REAL, return_stats=True)
    loss.backward(g_out)
    return loss.detach(), st, hh.grad, ww.grad


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("chunk", [None, 7, 1000])
def test_fp32_equals_unfused_and_the_float64_reference(estimator, chunk):
    h, w, y = inputs()
    cfg = otr.OTRConfig(estimator=estimator, num_samples=16, fused_chunk_tokens=chunk, chunk_tokens=3)
    g_out = torch.rand(y.shape, generator=torch.Generator().manual_seed(1)) + 0.5  # any upstream gradient
    loss, st, gh, gw = fused(h, w, y, cfg, g_out)
    loss_u, st_u, gh_u, gw_u = unfused(h, w, y, cfg, g_out)
    torch.testing.assert_close(loss, loss_u, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gh, gh_u, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, gw_u, atol=1e-6, rtol=1e-5)
    # float64 reference on the full vocabulary, autograd through log_softmax
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    samples = samples_matrix(st["owned_samples"], y.numel(), 16) if estimator == "sample" else None
    if estimator == "sample":
        assert torch.equal(st["hits"], st_u["hits"])
        assert torch.equal(samples, samples_matrix(st_u["owned_samples"], y.numel(), 16))
        samples = samples.clamp(min=0)
    ref = ref_loss((h64 @ w64.t()).view(-1, V_PAD), y.view(-1), estimator, samples=samples, vocab_size=V_REAL)
    ref.backward(g_out.double().view(-1))
    torch.testing.assert_close(loss.double().view(-1), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh.double(), h64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw.double(), w64.grad, atol=1e-5, rtol=1e-4)


def test_samples_are_identical_where_the_chunk_logits_are_bitwise_equal():
    """With the unfused logits built from the same per-chunk matmuls, every output is bit-identical."""
    h, w, y = inputs(s=16, dtype=torch.bfloat16)
    cfg = otr.OTRConfig(num_samples=32, fused_chunk_tokens=9)
    g_out = torch.ones(y.shape)

    def chunked_logits(hh, ww):
        flat = hh.reshape(-1, D)
        return torch.cat([flat[lo:lo + 9] @ ww.t() for lo in range(0, flat.size(0), 9)]).view(*y.shape, V_PAD)

    loss, st, gh, gw = fused(h, w, y, cfg, g_out)
    loss_u, st_u, _, _ = unfused(h, w, y, cfg, g_out, chunked_logits)
    assert torch.equal(loss, loss_u)
    assert torch.equal(st["hits"], st_u["hits"])
    assert torch.equal(samples_matrix(st["owned_samples"], y.numel(), 32),
                       samples_matrix(st_u["owned_samples"], y.numel(), 32))


def test_bf16_against_float64_is_as_accurate_as_unfused():
    """bf16: where BLAS blocks a chunk's matmul differently from the whole one, logits differ in the last
    bit and a few samples move; the loss and gradients stay within bf16 rounding of the float64 values
    (errors measured against the float64 reference, fused at most twice the unfused path's)."""
    h, w, y = inputs(s=64, dtype=torch.bfloat16, seed=3)
    cfg = otr.OTRConfig(estimator="expected", fused_chunk_tokens=40)
    g_out = torch.ones(y.shape)
    loss, _, gh, gw = fused(h, w, y, cfg, g_out)
    loss_u, _, gh_u, gw_u = unfused(h, w, y, cfg, g_out)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = ref_loss((h64 @ w64.t()).view(-1, V_PAD), y.view(-1), "expected", vocab_size=V_REAL)
    ref.sum().backward()

    def err(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    for ours, theirs, exact in [(loss.view(-1), loss_u.view(-1), ref.detach()), (gh, gh_u, h64.grad), (gw, gw_u, w64.grad)]:
        assert err(ours, exact) <= 2 * err(theirs, exact) + 1e-3, (err(ours, exact), err(theirs, exact))


def test_sampled_bf16_fraction_of_moved_samples_is_small():
    h, w, y = inputs(s=64, dtype=torch.bfloat16, seed=5)
    cfg = otr.OTRConfig(num_samples=64, fused_chunk_tokens=24)
    g_out = torch.ones(y.shape)
    _, st, _, _ = fused(h, w, y, cfg, g_out)
    _, st_u, _, _ = unfused(h, w, y, cfg, g_out)
    a = samples_matrix(st["owned_samples"], y.numel(), 64)
    b = samples_matrix(st_u["owned_samples"], y.numel(), 64)
    assert (a != b).float().mean().item() <= 0.01


def test_two_dims_frozen_weight_and_no_tokens():
    h, w, y = inputs()
    cfg = otr.OTRConfig(estimator="sft", fused_chunk_tokens=5)
    flat_h, flat_y = h.reshape(-1, D), y.reshape(-1)
    hh = flat_h.clone().requires_grad_()
    loss = otr.vocab_parallel_linear_otr_loss(hh, w, flat_y, cfg, vocab_size=V_REAL)  # weight needs no grad
    loss.sum().backward()
    ref_h = flat_h.clone().requires_grad_()
    otr.vocab_parallel_otr_loss(ref_h @ w.t(), flat_y, cfg, vocab_size=V_REAL).sum().backward()
    torch.testing.assert_close(hh.grad, ref_h.grad)
    empty = otr.vocab_parallel_linear_otr_loss(flat_h[:0].requires_grad_(), w, flat_y[:0], cfg)
    assert empty.shape == (0,)
    empty.sum().backward()


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("estimator", ["sample", "expected"])
def test_at_most_one_chunk_of_logits_is_alive(estimator):
    """No op forward or backward returns more than one chunk of logits (N = 512 tokens, 32 rows)."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(512, 8, generator=g).requires_grad_()
    w = torch.randn(1024, 8, generator=g).requires_grad_()
    y = torch.randint(0, 1000, (512,), generator=g)
    cfg = otr.OTRConfig(estimator=estimator, num_samples=8, fused_chunk_tokens=32)
    with _LargestTensor() as seen:
        otr.vocab_parallel_linear_otr_loss(h, w, y, cfg, vocab_size=1000).sum().backward()
    assert seen.largest <= 32 * 1024, seen.largest  # the unfused path would hold 512 x 1024


def test_bad_inputs_name_the_argument():
    h, w, y = inputs()
    cfg = otr.OTRConfig()
    with pytest.raises(TypeError, match="hidden .* and weight .* must have one dtype"):
        otr.vocab_parallel_linear_otr_loss(h, w.double(), y, cfg)
    with pytest.raises(ValueError, match=r"hidden must have shape \[..., d\] with d = weight.size\(1\) = 12"):
        otr.vocab_parallel_linear_otr_loss(h[..., :5], w, y, cfg)
    with pytest.raises(ValueError, match=r"weight must be this rank's output-layer shard \[V/tp, d\]"):
        otr.vocab_parallel_linear_otr_loss(h, w[0], y, cfg)
    with pytest.raises(ValueError, match=r"labels shape \(9, 3\) must equal hidden shape without its last dimension"):
        otr.vocab_parallel_linear_otr_loss(h, w, y[:, :3], cfg)
    with pytest.raises(ValueError, match=r"weight rows 256 x tensor-parallel size 1 = 256 does not match "
                                         r"padded_vocab_size=512"):
        otr.vocab_parallel_linear_otr_loss(h, w, y, cfg, padded_vocab_size=512)
    with pytest.raises(TypeError, match="sequence_parallel must be a bool"):
        otr.vocab_parallel_linear_otr_loss(h, w, y, cfg, sequence_parallel="yes")
    with pytest.raises(TypeError, match="hidden must be a bf16, fp16, fp32 or fp64 tensor, got torch.int64"):
        otr.vocab_parallel_linear_otr_loss(y, w, y, cfg)


def test_autocast_does_not_change_the_recomputed_logits():
    """Under torch.autocast the fused matmuls run in the inputs' dtype forward and backward (the backward
    runs outside autocast): the result equals the call without autocast."""
    h, w, y = inputs()
    cfg = otr.OTRConfig(num_samples=16, fused_chunk_tokens=8)
    g_out = torch.ones(y.shape)
    plain = fused(h, w, y, cfg, g_out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, st = otr.vocab_parallel_linear_otr_loss(hh, ww, y, cfg, step=7, vocab_size=V_REAL, return_stats=True)
    loss.backward(g_out)
    assert torch.equal(loss, plain[0]) and torch.equal(st["hits"], plain[1]["hits"])
    assert torch.equal(hh.grad, plain[2]) and torch.equal(ww.grad, plain[3])
