"""Contract v2 on the torch backend (core/contract.py): skipped-row statistics for ignored rows, the
two forms of key_mix, int32 columns and lanes, exactly-zero ignored gradient rows; checked against
float64 references computed here, not against the backend's own helpers."""

import dataclasses
import math

import pytest
import torch

from otr_megatron.core import torch_backend as tb
from otr_megatron.core.contract import Spec, block_size
from otr_megatron.core.random import stream_key, stream_key_tensor
from tests.core.reference import ref_samples

VOCAB, PAD = 1000, 1024
KAPPA, BETA = 1.3, -0.1


def spec_for(est, k=64, vocab=VOCAB, shard=PAD):
    """A one-rank Spec by field name (contract v2 has no ``step`` field; v1 had one)."""
    fields = dict(estimator=est, kappa=KAPPA, beta=BETA, k=k, seed=7, step=0, rank=0, world=1, shard=shard,
                  n_real=vocab, block=block_size(vocab, k, shard) if est == "sample" else 1)
    return Spec(**{f.name: fields[f.name] for f in dataclasses.fields(Spec)})


def logits(n=12, dtype=torch.bfloat16, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, PAD, generator=g) * 3
    x[:, vocab:] = 50.0  # padding: must be ignored
    x[2, 17] = math.nan  # ignored NaN row
    x[3, :vocab] = -math.inf  # ignored, fully masked
    x[5, : vocab // 2] = -math.inf  # supervised, partly masked
    y = torch.randint(0, vocab, (n,), generator=g)
    valid = torch.ones(n, dtype=torch.bool)
    valid[[1, 2, 3]] = False
    return x.to(dtype), y, valid


def stats(x, y, valid, spec):
    owns = valid & (y < spec.n_real)
    col = torch.where(owns, y, 0)
    out = torch.full((x.size(0), spec.stat_columns), 7.0, dtype=torch.float64)
    pre = torch.full((x.size(0), spec.n_blocks), 7.0, dtype=torch.float64) if spec.estimator == "sample" else None
    tb.local_stats(x, col, owns, valid, spec, out, pre, tb.scratch(x.size(0), spec.n_real, x.device))
    return out, pre, owns, col


@pytest.mark.parametrize("est", ["sample", "expected", "sft"])
@pytest.mark.parametrize("dtype,vocab", [(torch.bfloat16, VOCAB), (torch.float32, VOCAB), (torch.bfloat16, 1001)])
def test_statistics_against_float64_and_skipped_rows(est, dtype, vocab):
    """vocab 1001: the last sampling block ends in padding (the ragged copy)."""
    x, y, valid = logits(dtype=dtype, vocab=vocab)
    spec = spec_for(est, vocab=vocab)
    out, pre, owns, _ = stats(x, y, valid, spec)
    inv = ~valid
    assert torch.all(out[inv, 0] == -math.inf) and torch.all(out[inv, 1:] == 0)
    if pre is not None:
        assert torch.all(pre[inv] == 0) and torch.equal(out[:, 3], pre[:, -1])
    xd = x[:, :vocab].double()
    m = xd.amax(-1)
    rows = valid.nonzero().flatten().tolist()
    torch.testing.assert_close(out[rows, 0], m[rows], rtol=0, atol=0)
    torch.testing.assert_close(out[rows, 1], torch.exp(xd - m[:, None]).sum(-1)[rows], rtol=2e-6, atol=0)
    torch.testing.assert_close(out[rows, 2], torch.where(owns, xd.gather(1, y[:, None]).squeeze(1), 0.0)[rows])
    if spec.tempered:
        mass = torch.exp((xd - m[:, None]) / KAPPA).sum(-1)
        torch.testing.assert_close(out[rows, 3], mass[rows], rtol=2e-6, atol=0)
    if est == "expected":
        q = torch.softmax(xd / KAPPA, -1)
        mean = torch.where(q > 0, q * xd, 0.0).sum(-1)
        torch.testing.assert_close(out[rows, 4], mean[rows], rtol=1e-6, atol=1e-6)
    # a skipped row never changes a supervised row's numbers
    out_all, pre_all, _, _ = stats(x, y, torch.ones_like(valid), spec)
    assert torch.equal(out_all[rows], out[rows])
    if pre is not None:
        assert torch.equal(pre_all[rows], pre[rows])


def draw(x, y, valid, spec, key_mix, with_lanes=True):
    st, pre, owns, col = stats(x, y, valid, spec)
    ok = valid & torch.isfinite(st[:, 0]) & (st[:, 3] > 0)
    n = x.size(0)
    total = st[:, 3].clone()
    part = torch.empty(n, 2, dtype=torch.float64)
    cols = torch.full((n, spec.k), -7, dtype=torch.int32)
    weights = torch.empty(n, spec.k)
    lanes = torch.full((n, spec.k), -7, dtype=torch.int32) if with_lanes else None
    tb.sample(x, torch.arange(n) * 3 + 1, key_mix, col, owns, ok, total, total[:, None].contiguous(),
              torch.ones(n, dtype=torch.float64), pre, spec, part, cols, weights, lanes)
    return part, cols, weights, lanes, ok


def test_key_mix_int_and_tensor_draw_the_float64_reference_samples():
    x, y, valid = logits(dtype=torch.float32, seed=1)
    spec = spec_for("sample", k=128)
    a = draw(x, y, valid, spec, stream_key(7, 11))
    b = draw(x, y, valid, spec, stream_key_tensor(7, torch.tensor(11, dtype=torch.int64)))
    for t, u in zip(a[:4], b[:4]):
        assert torch.equal(t, u)
    part, cols, weights, lanes, ok = a
    assert cols.dtype == torch.int32 and torch.equal(lanes, cols)  # duplicates kept: lanes are the columns
    assert torch.all(cols[~ok] == -1) and torch.all(weights[~ok] == 0) and torch.all(part[~ok] == 0)
    keys = torch.arange(x.size(0)) * 3 + 1
    ref = ref_samples(x, keys, spec.k, KAPPA, 7, 11, vocab_size=VOCAB)
    rows = ok.nonzero().flatten()
    assert int((cols[rows].long() != ref[rows]).sum()) == 0
    hits = (ref[rows] == y[rows, None])
    assert torch.equal(part[rows, 0], hits.sum(-1).double())
    expect_w = torch.where(hits, 1.0, torch.tensor(BETA, dtype=torch.float32).item()) / -spec.k
    torch.testing.assert_close(weights[rows], expect_w.float(), rtol=0, atol=0)
    # no lanes asked for: nothing else changes
    c = draw(x, y, valid, spec, stream_key(7, 11), with_lanes=False)
    assert torch.equal(c[1], cols) and c[3] is None


@pytest.mark.parametrize("est", ["sample", "expected", "sft"])
def test_grad_against_float64_with_ignored_rows_exactly_zero(est):
    x, y, valid = logits(dtype=torch.bfloat16, seed=2)
    n = x.size(0)
    spec = spec_for(est, k=16)
    g = torch.Generator().manual_seed(3)
    up = torch.rand(n, generator=g) + 0.5
    up[1] = math.nan  # an ignored row's upstream value never leaks
    coef_pi = torch.rand(n, generator=g) + 0.2
    finite = torch.isfinite(x[:, :VOCAB].float()).all(1)
    coef_pi = torch.where(valid, torch.where(finite, coef_pi, math.nan), 0.0)  # as the loss passes them
    coef_q = torch.where(valid, torch.rand(n, generator=g), 0.0) if est == "expected" else None
    s = spec.k if est == "sample" else 1
    cols = torch.randint(0, VOCAB, (n, s), generator=g, dtype=torch.int32)
    if s > 1:
        cols[:, 1::3] = cols[:, :1]  # duplicates accumulate
        cols[:, 2::5] = -1
    weights = torch.where(cols >= 0, torch.rand(n, s, generator=g) - 0.5, 0.0)
    out = torch.full_like(x, 9.0)
    tb.grad(x, out, up, coef_pi, coef_q, cols, weights, valid, spec, tb.scratch(n, VOCAB, x.device))
    assert torch.all(out[~valid] == 0) and torch.all(out[:, VOCAB:] == 0)
    assert torch.all(out[5, :VOCAB].float().isnan())  # a supervised row with -inf logits: coefficient NaN, as the loss
    xd = x[:, :VOCAB].double()
    ref = up.double()[:, None] * coef_pi.double()[:, None] * torch.softmax(xd, -1)
    if coef_q is not None:
        ref += up.double()[:, None] * coef_q.double()[:, None] * torch.softmax(xd / KAPPA, -1)
    sparse = torch.zeros_like(ref)
    sparse.scatter_add_(1, cols.long().clamp(min=0), weights.double() * up.double()[:, None])
    ref += sparse
    rows = (valid & finite).nonzero().flatten()
    torch.testing.assert_close(out[rows, :VOCAB].double(), ref[rows], rtol=2.0**-7, atol=1e-7)
