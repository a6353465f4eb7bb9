"""The Triton backend against the torch reference backend (and the float64 reference draw).

On CPU the kernels run in Triton's interpreter (tests/core/conftest.py sets TRITON_INTERPRET=1
before the kernel module is imported); on a GPU machine (scripts/gpu_check.sh) the same file runs
the compiled kernels on CUDA tensors. Sizes are small because the interpreter costs ~0.1 ms per
tl op per tile per row: few rows, large tiles.

Agreement asked of the kernels (docs/sampling.md): the same samples and hit counts, statistics
and losses within 1e-6 relative, gradients within 1 ulp of the output dtype. Exception, stated:
in the interpreter tl.exp is numpy's float32 exp, which differs from torch's CPU exp in the last bit
for ~40% of inputs, so a block mass can differ by ~1e-7 relative and a draw within ~1e-7 of a
block boundary can move (on a GPU both backends call libdevice's expf: bit-equal block sums).
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed; scripts/setup_env.sh installs it")

from otr_megatron.core import torch_backend as tb  # noqa: E402
from otr_megatron.core.contract import STAT_TMASS, Spec, block_size  # noqa: E402
from otr_megatron.core.random import stream_key, token_uniforms  # noqa: E402
from tests.core.reference import ref_loss as ref_loss_f64  # noqa: E402
from tests.core.reference import ref_samples  # noqa: E402

trb = pytest.importorskip("otr_megatron.core.triton_backend", reason="the Triton backend does not import")
if not trb.INTERPRET and not torch.cuda.is_available():
    pytest.skip("compiled Triton kernels need a GPU; set TRITON_INTERPRET=1 to run them on CPU",
                allow_module_level=True)

# the special rows compute inf - inf and 0 / 0 on purpose; numpy (the interpreter) says so
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DEV = torch.device("cpu") if trb.INTERPRET else torch.device("cuda")
VOCAB, V_PAD = 1000, 1024  # a padded vocabulary: ids >= 1000 are never real
KAPPA, BETA = 1.3, -0.1


def make_logits(n=8, v_pad=V_PAD, vocab=VOCAB, dtype=torch.bfloat16, seed=0, special=True):
    """Random logits with the rows that break kernels: NaN, +inf, every id -inf, some ids -inf;
    padded columns hold garbage that must be ignored."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v_pad, generator=g) * 3
    x[:, vocab:] = 30.0
    y = torch.randint(0, vocab, (n,), generator=g)
    y[1] = -100  # ignored
    if special:
        x[2, 17] = math.nan  # NaN row: NaN loss and gradient for this token only
        x[3, 5] = math.inf
        x[4, :vocab] = -math.inf  # a fully masked row: no mass anywhere
        x[5, : vocab // 2] = -math.inf  # partly masked: 0 * -inf must count as 0
        y[5] = vocab - 3
        x[6, 7] = math.nan
        y[6] = -100  # ignored NaN row: exactly zero gradient
    return x.to(dtype).to(DEV), y.to(DEV)


SEED, STEP = 7, 3


def spec_for(estimator, k=64, rank=0, world=1, shard=V_PAD, vocab=VOCAB, seed=SEED, step=STEP):
    """A Spec by field name (contract v2 drops `step`: passed only where the dataclass still has it)."""
    n_real = min(max(vocab - rank * shard, 0), shard)
    block = block_size(vocab, k, shard) if estimator == "sample" else 1
    fields = dict(estimator=estimator, kappa=KAPPA, beta=BETA, k=k, seed=seed, step=step, rank=rank, world=world,
                  shard=shard, n_real=n_real, block=block)
    names = {f.name for f in dataclasses.fields(Spec)}
    return Spec(**{n: v for n, v in fields.items() if n in names})


def _v2(fn) -> bool:
    """Whether a backend entry point has the contract-v2 signature (the torch reference may still be v1
    in a branch; the Triton backend is v2)."""
    return "key_mix" in inspect.signature(fn).parameters or "valid" in list(inspect.signature(fn).parameters)[:4]


def merge_duplicates(cols, weights):
    """Reference merge of a lane-order sample list: each column once, at its lowest lane, weights summed."""
    cols, weights = cols.cpu().long(), weights.cpu().double()
    out_c = torch.full_like(cols, -1)
    out_w = torch.zeros_like(weights)
    for r in range(cols.size(0)):
        for j in range(cols.size(1)):
            c = int(cols[r, j])
            if c < 0:
                continue
            first = int((cols[r] == c).nonzero()[0])
            out_c[r, first] = c
            out_w[r, first] += weights[r, j]
    return out_c, out_w.float()


def labels_on(spec, y):
    valid = y != -100
    local = y - spec.rank * spec.shard
    owns = valid & (local >= 0) & (local < spec.n_real)
    return valid, owns, torch.where(owns, local, torch.zeros_like(local))


def stats_of(backend, x, y, spec):
    valid, owns, col = labels_on(spec, y)
    n = x.size(0)
    stats = torch.full((n, spec.stat_columns), -7.0, dtype=torch.float64, device=DEV)
    prefix = (torch.full((n, spec.n_blocks), -7.0, dtype=torch.float64, device=DEV)
              if spec.estimator == "sample" else None)
    extra = (valid,) if _v2(backend.local_stats) else ()
    backend.local_stats(x, col, owns, *extra, spec, stats, prefix, backend.scratch(n, spec.n_real, DEV))
    return stats, prefix


def assert_close_nan(a, b, rtol, what):
    """Same NaN/inf pattern, finite values within rtol (float64 comparison)."""
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what}: NaN pattern differs\n{a}\n{b}"
    fin = torch.isfinite(b)
    assert torch.equal(a[~fin & ~torch.isnan(b)], b[~fin & ~torch.isnan(b)]), f"{what}: infinities differ"
    torch.testing.assert_close(a[fin], b[fin], rtol=rtol, atol=1e-30, msg=lambda m: f"{what}: {m}")


def assert_within_ulp(a, b, dtype, what, ulps=1):
    """|a - b| <= `ulps` units in the last place of `dtype` (same NaN pattern); the interpreter
    truncates fp32 -> bf16 where a GPU rounds to nearest, hence 1 ulp rather than 0."""
    a, b = a.float().cpu(), b.float().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what}: NaN pattern differs"
    a, b = torch.nan_to_num(a), torch.nan_to_num(b)
    mant_bits = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    _, e = torch.frexp(torch.maximum(a.abs(), b.abs()))
    ulp = torch.ldexp(torch.ones_like(a), e - 1 - mant_bits)
    tiny = {torch.bfloat16: 1e-38, torch.float16: 6e-8, torch.float32: 1e-44}[dtype]
    bad = (a - b).abs() > ulps * ulp + tiny
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {a.numel()} elements differ by more than {ulps} ulp, "
                                 f"e.g. {a[bad][:5].tolist()} vs {b[bad][:5].tolist()}")


# --------------------------------------------------------------------------------------------
# kernel 2's random numbers
# --------------------------------------------------------------------------------------------


def test_uniforms_equal_core_random_bit_for_bit():
    keys = torch.tensor([0, 1, 2, 12345, -1, -(2**63), 2**63 - 1, 987654321012345], device=DEV)
    for seed, step in ((1234, 0), (-5, 2**40)):
        want = token_uniforms(keys.cpu(), 37, seed, step)
        assert torch.equal(trb.uniforms(keys, 37, seed, step).cpu(), want)
        # contract v2: key_mix as a 0-dim int64 device tensor (a captured call) draws the same
        mix = torch.tensor(stream_key(seed, step), dtype=torch.int64, device=DEV)
        assert torch.equal(trb.uniforms_from_key(keys, 37, mix).cpu(), want)


def test_bad_key_mix_is_a_clear_error():
    keys = torch.zeros(2, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="key_mix must be a Python int or a 0-dim int64 tensor"):
        trb.uniforms_from_key(keys, 4, torch.zeros(1, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match="key_mix must be a signed 64-bit int"):
        trb.uniforms_from_key(keys, 4, 2**64)


# --------------------------------------------------------------------------------------------
# kernel 1: statistics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator,dtype", [("sft", torch.bfloat16), ("expected", torch.bfloat16),
                                             ("expected", torch.float16), ("sample", torch.bfloat16),
                                             ("sample", torch.float32)])
def test_local_stats_match_torch_backend(estimator, dtype):
    x, y = make_logits(dtype=dtype)
    spec = spec_for(estimator)
    got, got_prefix = stats_of(trb, x, y, spec)
    ref, ref_prefix = stats_of(tb, x, y, spec)
    valid = (y != -100).cpu()
    # contract v2: ignored rows (1 and 6, a NaN row) are not read: -inf, 0, 0, 0, 0; their prefix row is
    # unspecified and the Triton backend does not write it (stats_of fills it with -7)
    want = torch.zeros(spec.stat_columns, dtype=torch.float64)
    want[0] = -math.inf
    assert torch.equal(got[~valid].cpu(), want.expand(int((~valid).sum()), -1))
    assert torch.equal(got[:, 0].isnan().cpu(), torch.tensor([r == 2 for r in range(x.size(0))]))
    assert_close_nan(got[valid], ref[valid], 1e-6, f"{estimator} statistics")
    if estimator == "sample":
        assert bool((got_prefix[~valid] == -7.0).all()), "the prefix rows of ignored rows are not written"
        # rows with NaN/inf are not sampled; on finite rows the block prefix sums agree to fp32
        # exp rounding in the interpreter (bit-equal exps on a GPU)
        assert_close_nan(got_prefix[valid], ref_prefix[valid], 1e-6 if trb.INTERPRET else 1e-12, "block prefix sums")
        torch.testing.assert_close(got[valid, STAT_TMASS], got_prefix[valid, -1], rtol=0, atol=0, equal_nan=True,
                                   msg="the rank's mass is the last prefix value")


@pytest.mark.parametrize("ragged", [False, True])
def test_sample_stats_pairs_in_registers_or_parked_agree(monkeypatch, ragged):
    """Short rows keep every block's (bmax, bsum) in registers over unrolled tiles; long rows park them
    in the prefix buffer. Both give the same bits, over several tiles per row (small tiles here)."""
    vocab = 997 if ragged else VOCAB
    x, y = make_logits(vocab=vocab, seed=4)
    spec = spec_for("sample", vocab=vocab, k=1)
    assert spec.block == 32 and spec.n_blocks == 32  # 16 ids per lane, aligned prefix rows
    monkeypatch.setattr(trb, "_MAX_TILE", 8 * spec.block)  # 8 blocks per tile: 4 tiles
    monkeypatch.setattr(trb, "NT_MAX", 8)
    assert trb.stats_params(spec, x.element_size())["NT"] == 4
    # parked whatever NT_MAX: B < 16 (8 ids per lane), prefix rows not 16-byte aligned (29 blocks)
    assert trb.stats_params(spec_for("sample", vocab=vocab, k=8), x.element_size())["NT"] == 0
    assert trb.stats_params(spec_for("sample", vocab=900, k=1), x.element_size())["NT"] == 0
    kept = stats_of(trb, x, y, spec)
    monkeypatch.setattr(trb, "NT_MAX", 0)
    assert trb.stats_params(spec, x.element_size())["NT"] == 0
    parked = stats_of(trb, x, y, spec)
    for a, b in zip(kept, parked):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    # a launch sweep overriding NB (bench_gpu) after NT was chosen: the wrapper parks the pairs instead
    monkeypatch.setattr(trb, "NT_MAX", 8)
    params = trb.stats_params
    monkeypatch.setattr(trb, "stats_params", lambda *a, **k: {**params(*a, **k), "NB": params(*a, **k)["NB"] // 2})
    swept = stats_of(trb, x, y, spec)  # the same prefix bits; the sum of exps over other slots
    assert torch.equal(swept[1].isnan(), parked[1].isnan())
    assert torch.equal(swept[1].nan_to_num(), parked[1].nan_to_num())
    assert_close_nan(swept[0], parked[0], 1e-6, "statistics with half the blocks per tile (fp32 slots)")
    ref, ref_prefix = stats_of(tb, x, y, spec)
    valid = (y != -100).cpu()
    assert_close_nan(kept[1][valid], ref_prefix[valid], 1e-6 if trb.INTERPRET else 1e-12, "block prefix sums")
    assert_close_nan(kept[0][valid], ref[valid], 1e-6, "statistics")


def _exp32(t):
    """The float32 exp the kernels use: numpy's in the interpreter, libdevice's (torch's CUDA exp) on a GPU."""
    if trb.INTERPRET:
        import numpy as np
        return torch.from_numpy(np.exp(t.cpu().numpy()))
    return torch.exp(t)


@pytest.mark.parametrize("tiles", ["one", "several, parked", "several, in registers"])
@pytest.mark.parametrize("dtype,vocab,v_pad", [(torch.bfloat16, VOCAB, V_PAD), (torch.float32, VOCAB, V_PAD),
                                               (torch.bfloat16, 997, V_PAD), (torch.bfloat16, 3072, 3072)])
def test_sample_block_sums_are_the_pairwise_tree_bit_for_bit(monkeypatch, dtype, vocab, v_pad, tiles):
    """Blocks of B = 32 or 64 ids (K = 1) spread over R = B / 16 lanes of L = 16 ids (the ids
    i = j * R + c of lane c), so the tree's in-lane levels and its cross-lane levels both run; with
    several tiles per row either the loop runs (whole tiles unmasked, the row's last one masked; ragged:
    997) with the pairs parked in the prefix buffer, or the tiles are unrolled with the pairs in
    registers. The prefix sums equal, bit for bit, an independent computation of docs/sampling.md
    sections 2-3 with the kernels' own float32 exp: e[i] + e[i + B/2], ... down to one value, then
    float64 weights and a sequential cumsum."""
    x, y = make_logits(v_pad=v_pad, vocab=vocab, dtype=dtype, seed=12, special=False)
    x[3, 64:80] = -math.inf  # half a block masked
    x[5, 96:128] = -math.inf  # a whole block masked
    spec = spec_for("sample", vocab=vocab, k=1, shard=v_pad)
    if tiles != "one":
        monkeypatch.setattr(trb, "_MAX_TILE", 8 * spec.block)  # 8 blocks per tile: 4 to 6 tiles
        monkeypatch.setattr(trb, "NT_MAX", 0 if tiles == "several, parked" else 8)
    params = trb.stats_params(spec, x.element_size())
    assert spec.block in (32, 64) and params["R"] > 1 and params["L"] > 1, params
    assert (params["NB"] < spec.n_blocks) == (tiles != "one"), params
    assert (params["NT"] > 1) == (tiles == "several, in registers"), params
    _, got = stats_of(trb, x, y, spec)
    n, bsz, nb = x.size(0), spec.block, spec.n_blocks
    xb = torch.full((n, nb * bsz), -math.inf, dtype=torch.float32, device=x.device)
    xb[:, : spec.n_real] = x[:, : spec.n_real].float()
    xb = xb.view(n, nb, bsz)
    bmax = xb.amax(-1)
    bsafe = torch.where(bmax == -math.inf, 0.0, bmax)
    e = _exp32((xb - bsafe[..., None]) * trb._inv_kappa(spec)).to(x.device)
    width = bsz
    while width > 1:
        width //= 2
        e = e[..., :width] + e[..., width: 2 * width]
    m = bmax.amax(-1, keepdim=True).double()
    m = torch.where(m == -math.inf, 0.0, m)
    w = torch.exp((bmax.double() - m) / KAPPA) * e[..., 0].double()
    if trb.INTERPRET:
        import numpy as np
        w = torch.from_numpy(np.exp(((bmax.double() - m) / KAPPA).cpu().numpy())) * e[..., 0].double().cpu()
    want = torch.cumsum(w.cpu(), dim=1)
    valid = (y != -100).cpu()
    if trb.INTERPRET:  # a sequential scan, as numpy's cumsum
        assert torch.equal(got.cpu()[valid], want[valid]), "block prefix sums differ from the pairwise tree"
    else:  # the GPU scan is parallel: float64 rounding only
        torch.testing.assert_close(got.cpu()[valid], want[valid], rtol=1e-13, atol=0)


@pytest.mark.parametrize("estimator", ["sft", "expected", "sample"])
def test_local_stats_ragged_vocabulary(estimator):
    """A real vocabulary that is not a multiple of 16 on a 16-aligned shard (e.g. 50257): the loads are
    masked on the shard and the real ids applied in registers; padding (here huge logits) is ignored."""
    x, y = make_logits(n=4, vocab=997, special=False, seed=9)
    spec = spec_for(estimator, vocab=997, k=8)
    got, got_prefix = stats_of(trb, x, y, spec)
    ref, ref_prefix = stats_of(tb, x, y, spec)
    valid = (y != -100).cpu()
    assert_close_nan(got[valid], ref[valid], 1e-6, f"ragged {estimator} statistics")
    if estimator == "sample":
        assert_close_nan(got_prefix[valid], ref_prefix[valid], 1e-6 if trb.INTERPRET else 1e-12, "ragged prefix")


def test_local_stats_rank_without_real_ids():
    """A rank whose whole shard is padding: max -inf, no mass, no label."""
    x, y = make_logits(n=4, special=False)
    spec = spec_for("sample", rank=1, world=2, shard=V_PAD // 2, vocab=V_PAD // 2)
    got, _ = stats_of(trb, x[:, : V_PAD // 2].contiguous(), y, spec)
    assert spec.n_real == 0 and torch.equal(got[:, 0].cpu(), torch.full((4,), -math.inf, dtype=torch.float64))
    assert float(got[:, 1:].abs().sum()) == 0.0


# --------------------------------------------------------------------------------------------
# kernel 2: the sampler, on identical inputs
# --------------------------------------------------------------------------------------------


def sampler_inputs(x, y, spec):
    """The torch backend's statistics as the one input of both samplers (tp = 1)."""
    stats, prefix = stats_of(tb, x, y, spec)
    valid, owns, col = labels_on(spec, y)
    total = stats[:, STAT_TMASS].clone()
    ok = valid & torch.isfinite(stats[:, 0]) & torch.isfinite(torch.log(total)) & torch.isfinite(stats[:, 1])
    keys = torch.arange(x.size(0), device=DEV) * 3 + 11
    return keys, col, owns, ok, total, total[:, None].clone(), torch.ones_like(total), prefix


def run_sampler(backend, x, spec, inputs, key_mix=None):
    """(partial, cols, weights, lanes) of one backend: lanes = every lane's owned column in lane order
    (duplicates kept); cols/weights as the backend writes them (Triton: duplicates merged)."""
    n = x.size(0)
    partial = torch.full((n, 2), -7.0, dtype=torch.float64, device=DEV)
    keys, col, owns, ok, total, cum, scale, prefix = inputs
    mix = stream_key(SEED, STEP) if key_mix is None else key_mix
    if _v2(backend.sample):
        cols = torch.full((n, spec.k), -7, dtype=torch.int32, device=DEV)
        weights = torch.full((n, spec.k), -7.0, dtype=torch.float32, device=DEV)
        lanes = torch.full((n, spec.k), -7, dtype=torch.int32, device=DEV)
        backend.sample(x, keys, mix, col, owns, ok, total, cum, scale, prefix, spec, partial, cols, weights, lanes)
        if backend is tb:  # the torch path may leave duplicates in cols; its lanes are the draws
            return partial, lanes.long(), weights, lanes.long()
        return partial, cols.long(), weights, lanes.long()
    cols = torch.full((n, spec.k), -7, dtype=torch.int64, device=DEV)  # the v1 torch reference
    weights = torch.full((n, spec.k), -7.0, dtype=torch.float32, device=DEV)
    backend.sample(x, keys, col, owns, ok, total, cum, scale, prefix, spec, partial, cols, weights, None)
    return partial, cols, weights, cols


@pytest.mark.parametrize("k,vocab", [(1, VOCAB), (8, VOCAB), (64, VOCAB), (256, VOCAB), (8, V_PAD), (256, V_PAD)])
def test_sampler_matches_torch_backend_and_float64_draw(k, vocab):
    """vocab = V_PAD: n_blocks a multiple of 16 (aligned prefix rows), so the block search ends with
    one 4-wide load instead of its last two levels (as K = 1 at VOCAB: 32 blocks)."""
    x, y = make_logits(n=8, seed=k, vocab=vocab)
    x[0, 3] = 40.0  # one dominant id: duplicates
    y[0] = 3
    spec = spec_for("sample", k=k, vocab=vocab)
    assert (trb.sample_params(spec)["TAIL"] > 0) == (spec.n_blocks % 16 == 0), spec
    inputs = sampler_inputs(x, y, spec)
    ok = inputs[3]
    got = run_sampler(trb, x, spec, inputs)
    ref = run_sampler(tb, x, spec, inputs)
    assert torch.equal(got[3], ref[3]), f"samples differ in {(got[3] != ref[3]).sum().item()} of {got[3].numel()}"
    assert torch.equal(got[0][:, 0], ref[0][:, 0]), "hit counts"
    # the torch backend rounds beta to fp32 in its reward (torch.where of two Python floats): 1e-8
    torch.testing.assert_close(got[0][:, 1], ref[0][:, 1], rtol=1e-7, atol=1e-9)
    # contract v2: the Triton list holds each column once, at its lowest lane, with the summed weight
    want_c, want_w = merge_duplicates(ref[3], ref[2])
    assert torch.equal(got[1].cpu(), want_c), "merged columns"
    torch.testing.assert_close(got[2].cpu(), want_w, rtol=1e-6, atol=0)
    assert bool((got[1][~ok] == -1).all()) and float(got[2][~ok].abs().sum()) == 0.0, "skipped rows draw nothing"
    assert int(got[0][0, 0]) > 0, "the dominant label is hit"
    if k > 1:
        assert int((got[1][0] >= 0).sum()) < int((got[3][0] >= 0).sum()), "the dominant row's duplicates merge"
    # key_mix as a 0-dim device tensor: identical samples
    mix = torch.tensor(stream_key(SEED, STEP), dtype=torch.int64, device=DEV)
    again = run_sampler(trb, x, spec, inputs, key_mix=mix)
    assert all(torch.equal(a, b) for a, b in zip(got, again)), "key_mix tensor and int draw differently"
    # against the independent float64 single-device inverse-CDF draw (sorted: order within a
    # token is not part of the contract)
    draw = ref_samples(x.double().cpu(), inputs[0].cpu(), k, KAPPA, SEED, STEP, vocab_size=vocab)
    okc = ok.cpu()
    moved = (got[3].cpu()[okc].sort(-1).values != draw[okc].sort(-1).values).sum().item()
    assert moved <= max(1, int(1e-3 * okc.sum() * k)), f"{moved} samples differ from the float64 draw"


@pytest.mark.parametrize("vocab", [VOCAB, V_PAD])
def test_sampler_block_search_edges_match_torch_backend(vocab):
    """The block search on plateaus of equal prefix sums (zero-mass blocks: runs of equal candidates,
    the first and last blocks masked) against the torch backend, with (vocab = V_PAD: aligned prefix
    rows) and without the search's 4-wide tail."""
    k = 256
    x, y = make_logits(n=6, seed=21, vocab=vocab, special=False)
    x[0, : vocab // 2] = -math.inf  # a plateau over the first half
    x[2, 64:512] = -math.inf  # a plateau in the middle
    x[3, 1::2] = -math.inf  # every other id
    spec = spec_for("sample", k=k, vocab=vocab)
    assert (trb.sample_params(spec)["TAIL"] > 0) == (vocab == V_PAD)
    x[4, vocab - 40:] = -math.inf  # the last blocks masked: C_last is reached before the end
    inputs = sampler_inputs(x, y, spec)
    ok = inputs[3]
    got = run_sampler(trb, x, spec, inputs)
    ref = run_sampler(tb, x, spec, inputs)
    assert torch.equal(got[3], ref[3]), f"samples differ in {(got[3] != ref[3]).sum().item()} of {got[3].numel()}"
    assert torch.equal(got[0][:, 0], ref[0][:, 0]), "hit counts"
    want_c, want_w = merge_duplicates(ref[3], ref[2])
    assert torch.equal(got[1].cpu(), want_c), "merged columns"
    assert bool((got[3][ok] >= 0).all()), "every lane of a supervised row draws"


def test_sampler_search_tail_equals_the_full_binary_search(monkeypatch):
    """The 4-wide tail is the binary search's last two levels, for any inputs: on plateaus, and on
    draws past the rank's last prefix value (a rank scale of 1/2, inconsistent on purpose, maps the
    upper half of the draws to t_r >= C_last, where the search takes the last block with C_b < C_last),
    the Triton sampler gives the same samples with and without it."""
    k = 256
    x, y = make_logits(n=6, seed=22, vocab=V_PAD, special=False)
    x[0, : V_PAD // 2] = -math.inf
    x[3, 1::2] = -math.inf
    x[4, V_PAD - 40:] = -math.inf
    spec = spec_for("sample", k=k, vocab=V_PAD)
    keys, col, owns, ok, total, cum, scale, prefix = sampler_inputs(x, y, spec)
    inputs = (keys, col, owns, ok, total, cum, scale * 0.5, prefix)
    assert trb.sample_params(spec)["TAIL"] == 4
    tail = run_sampler(trb, x, spec, inputs)
    monkeypatch.setattr(trb, "SEARCH_TAIL", 0)
    assert trb.sample_params(spec)["TAIL"] == 0
    full = run_sampler(trb, x, spec, inputs)
    for a, b in zip(tail, full):
        assert torch.equal(a, b)
    assert bool((tail[3][ok] == spec.n_real - 1).any()), "some draws are past C_last"


# --------------------------------------------------------------------------------------------
# simulated tensor parallelism: per-rank kernels, statistics combined exactly as the loss does
# --------------------------------------------------------------------------------------------


def simulate_tp(backend, x, y, estimator, tp, k=64):
    """The loss's forward steps on `tp` shards in one process: the backend's statistics per rank, the
    all-gather as a stack, `global_normalisers`, the backend's sampler per rank, the all-reduce as a
    sum, `estimator_terms`. Returns (per-token loss, [N, K] global sample ids or None, hits)."""
    from otr_megatron.core import loss as L

    shard = x.size(1) // tp
    specs = [spec_for(estimator, k=k, rank=r, world=tp, shard=shard) for r in range(tp)]
    shards = [x[:, r * shard:(r + 1) * shard].contiguous() for r in range(tp)]
    per_rank = []
    for spec, xs in zip(specs, shards):
        valid, owns, col = labels_on(spec, y)
        per_rank.append((valid, owns, col) + stats_of(backend, xs, y, spec))
    allstats = torch.stack([p[3] for p in per_rank])
    valid = per_rank[0][0]
    norms = [L.global_normalisers(allstats, spec, valid) for spec in specs]
    if estimator != "sample":
        terms = L.estimator_terms(specs[0], norms[0])
        return torch.where(norms[0].ok, terms.loss, math.nan), None, None
    partial = torch.zeros(x.size(0), 2, dtype=torch.float64, device=DEV)
    samples = torch.full((x.size(0), k), -1, dtype=torch.int64, device=DEV)
    keys = torch.arange(x.size(0), device=DEV)
    for spec, xs, (_, owns, col, _, prefix), nm in zip(specs, shards, per_rank, norms):
        inputs = (keys, col, owns, nm.ok, nm.total, nm.rank_cum, nm.rank_scale, prefix)
        part, _, _, lanes = run_sampler(backend, xs, spec, inputs)
        partial += part
        assert bool(((samples < 0) | (lanes < 0)).all()), "two ranks own the same sample"
        samples = torch.where(lanes >= 0, lanes + spec.rank * shard, samples)
    terms = L.estimator_terms(specs[0], norms[0], partial)
    return torch.where(norms[0].ok, terms.loss, math.nan), samples, partial[:, 0]


_TP1: dict = {}


@pytest.mark.parametrize("tp,closed_form", [(2, "expected"), (4, "dft")])
def test_tensor_parallel_layouts_match_torch_backend_and_tp1(tp, closed_form):
    x, y = make_logits(n=8, seed=5)
    loss, samples, hits = simulate_tp(trb, x, y, "sample", tp)
    ref_loss, ref_samples_, ref_hits = simulate_tp(tb, x, y, "sample", tp)
    assert torch.equal(samples, ref_samples_) and torch.equal(hits, ref_hits)
    assert_close_nan(loss, ref_loss, 1e-6, f"sample loss at tp={tp}")
    if "sample" not in _TP1:
        _TP1["sample"] = simulate_tp(trb, x, y, "sample", 1)
    one_loss, one_samples, _ = _TP1["sample"]
    assert torch.equal(samples, one_samples), "the draw depends on the TP layout"
    assert_close_nan(loss, one_loss, 1e-6, f"sample loss tp={tp} vs tp=1")
    ok = ~torch.isnan(one_loss)
    assert bool((samples[ok] >= 0).all() and (samples[ok] < VOCAB).all()), "padded ids are never sampled"
    assert bool((samples[~ok] == -1).all())
    got = simulate_tp(trb, x, y, closed_form, tp)[0]
    assert_close_nan(got, simulate_tp(tb, x, y, closed_form, tp)[0], 1e-6, f"{closed_form} loss at tp={tp}")


def test_sampler_chunks_the_owned_lanes_when_one_rank_owns_most_samples():
    """At tp > 1 the sampler's heavy part runs KC < K owned lanes at a time: rows whose mass sits on
    one rank (a dominant id on rank 0, another on rank 3) make that rank own most of the K lanes,
    i.e. several chunks; samples, hits and losses still equal the torch backend and TP=1."""
    tp, k = 4, 256
    spec = spec_for("sample", k=k, rank=0, world=tp, shard=V_PAD // tp)
    assert trb.sample_params(spec)["KC"] < k, "the test must run several chunks"
    x, y = make_logits(n=4, seed=9, special=False)  # row 1 is ignored
    x[0, 3] = 12.0  # rank 0 holds about all of the mass
    x[2, 40] = 6.0  # rank 0, a large share
    x[3, 2 * (V_PAD // tp) + 5] = 12.0  # rank 2
    loss, samples, hits = simulate_tp(trb, x, y, "sample", tp, k=k)
    ref_loss, ref_samples_, ref_hits = simulate_tp(tb, x, y, "sample", tp, k=k)
    assert torch.equal(samples, ref_samples_) and torch.equal(hits, ref_hits)
    assert_close_nan(loss, ref_loss, 1e-6, "sample loss")
    one_loss, one_samples, _ = simulate_tp(trb, x, y, "sample", 1, k=k)
    assert torch.equal(samples, one_samples), "the draw depends on the TP layout"
    owned0 = ((samples[0] >= 0) & (samples[0] < V_PAD // tp)).sum()
    assert int(owned0) > trb.sample_params(spec)["KC"], "rank 0 owns several chunks of row 0"


# --------------------------------------------------------------------------------------------
# kernel 3: the gradient
# --------------------------------------------------------------------------------------------


def grad_inputs(x, spec, s, with_q, seed=0):
    n = x.size(0)
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(n, dtype=torch.bool)
    valid[1] = valid[6] = False
    coef_pi = torch.rand(n, generator=g) + 0.2
    upstream = torch.rand(n, generator=g) * 3
    upstream[7] = 0.0
    coef_q = torch.rand(n, generator=g) * 0.3 if with_q else None
    cols = torch.randint(0, spec.n_real, (n, s), generator=g)
    if s > 4:
        cols[:, 1::3] = cols[:, :1]  # duplicates must accumulate
        cols[:, 2::5] = -1  # other ranks' samples
    weights = torch.where(cols >= 0, torch.where(torch.rand(n, s, generator=g) < 0.3, -1.0, 0.1) / s, 0.0)
    cols[~valid] = -1
    weights[~valid] = 0.0
    coef_pi[~valid] = 0.0  # as the loss passes them for ignored tokens
    if coef_q is not None:
        coef_q[~valid] = 0.0
    dev = [t.to(DEV) if t is not None else None for t in (upstream, coef_pi, coef_q, cols, weights, valid)]
    return dev


@pytest.mark.parametrize("case", ["sample-bf16", "sample-bf16-inplace", "expected-bf16", "sft-fp16",
                                  "expected-fp32-local", "dft-bf16-local-inplace", "sample-bf16-tiles",
                                  "sample-bf16-tiles-inplace-local"])
def test_grad_matches_torch_backend(monkeypatch, case):
    """"tiles": 8 tiles per row, so the sampled columns' logits are picked from the tile they fall in
    (in place: before that tile is overwritten)."""
    if "tiles" in case:
        monkeypatch.setattr(trb, "_MAX_TILE", V_PAD // 8)
    est, dt = case.split("-")[:2]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
    inplace, use_local = "inplace" in case, "local" in case
    x, y = make_logits(n=8, dtype=dtype, seed=3)
    spec = spec_for(est)
    s = spec.k if est == "sample" else 1
    g, coef_pi, coef_q, cols, weights, valid = grad_inputs(x, spec, s, with_q=est == "expected")
    ok_rows = torch.isfinite(x[:, : spec.n_real].float()).all(1) | ~valid
    coef_pi = torch.where(ok_rows, coef_pi, math.nan)  # as the loss: non-finite logits, NaN gradient
    ref = torch.full_like(x, 7.0)
    tb.grad(x, ref, g, coef_pi, coef_q, cols, weights, valid, spec, tb.scratch(x.size(0), spec.n_real, DEV))
    local = stats_of(trb, x, y, spec)[0] if use_local else None
    if use_local:  # the forward's statistics of ignored rows are -inf/0 (not read): the kernel skips them too
        local = torch.where(valid[:, None], local, torch.nan_to_num(local, neginf=0.0))
    out = x.clone() if inplace else torch.full_like(x, 7.0)
    # contract v2: the Triton gradient gets int32 columns without duplicates (its sampler merged them)
    mcols, mweights = merge_duplicates(cols, weights)
    mcols, mweights = mcols.to(torch.int32).to(DEV), mweights.to(DEV)
    if "tiles" in case:
        params = trb.grad_params(spec, x.element_size(), s)
        assert params["GATHER"] and params["TILE"] == V_PAD // 8, params
    trb.grad(out if inplace else x, out, g, coef_pi, coef_q, mcols, mweights, valid, spec, None, local=local)
    # fp32 output: the two backends' softmax formulas (exp((x - m) / kappa) vs exp(x / kappa - m / kappa))
    # differ by ~|x| * 2**-24 in the exponent, a few fp32 ulps; bf16/fp16 hide that
    assert_within_ulp(out, ref, dtype, case, ulps=32 if dtype == torch.float32 else 1)
    assert float(out[~valid].float().abs().sum()) == 0.0, "ignored rows are exactly 0, NaN logits included"
    assert float(out[:, spec.n_real:].float().abs().sum()) == 0.0, "padded columns are exactly 0"


def test_grad_of_a_rank_without_real_ids_is_zero():
    x, _ = make_logits(n=8, special=False)
    spec = spec_for("sft", rank=1, world=2, shard=V_PAD // 2, vocab=V_PAD // 2)
    xs = x[:, : V_PAD // 2].contiguous()
    g, coef_pi, _, cols, weights, valid = grad_inputs(xs, spec_for("sft"), 1, False)
    out = torch.full_like(xs, 7.0)
    trb.grad(xs, out, g, coef_pi, None, torch.full_like(cols, -1, dtype=torch.int32), torch.zeros_like(weights),
             valid, spec, None)
    assert float(out.float().abs().sum()) == 0.0


# --------------------------------------------------------------------------------------------
# through the loss: OTRConfig.backend = "triton" against "torch", forward + backward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator,inplace", [("sample", False), ("sample", True), ("expected", False),
                                               ("sft", True), ("dft", False)])
def test_vocab_parallel_otr_loss_with_triton_backend(estimator, inplace):
    import otr_megatron as otr

    x, y = make_logits(n=8, seed=11)
    upstream = (torch.rand(8, generator=torch.Generator().manual_seed(4)) + 0.5).to(DEV)
    got = {}
    for backend in ("torch", "triton"):
        cfg = otr.OTRConfig(estimator=estimator, num_samples=16, temperature=KAPPA, neg_reward=BETA, seed=3,
                            backend=backend, inplace_backward=inplace)
        leaf = x.clone().requires_grad_()
        inp = leaf * 1 if inplace else leaf  # in place needs a buffer autograd lets us overwrite
        loss, stats = otr.vocab_parallel_otr_loss(inp, y, cfg, step=2, vocab_size=VOCAB, return_stats=True)
        loss.backward(upstream)
        got[backend] = (loss.detach(), stats, leaf.grad)
    (loss, stats, grad), (ref_loss, ref_stats, ref_grad) = got["triton"], got["torch"]
    # the torch path's fp32 tempered mean (one matmul) is ~2e-6 off float64, the kernel's ~1e-7:
    # "expected" is held to 1e-6 against the float64 reference, 5e-6 against the torch path
    assert_close_nan(loss, ref_loss, 5e-6 if estimator == "expected" else 1e-6, f"{estimator} loss")
    valid = y != -100
    if estimator != "sample":
        exact = ref_loss_f64(x.double().cpu(), y.cpu(), estimator, temperature=KAPPA, neg_reward=BETA,
                             vocab_size=VOCAB)
        fin = torch.isfinite(exact)
        torch.testing.assert_close(loss.double().cpu()[fin], exact[fin], rtol=1e-6, atol=1e-7)
    xr = x.float()[:, :VOCAB]
    broken = xr.isnan().any(1) | xr.isposinf().any(1) | xr.isneginf().all(1)  # rows 2, 3, 4 (and ignored 6)
    assert bool(torch.isnan(loss[valid & broken]).all()) and bool(torch.isfinite(loss[valid & ~broken]).all())
    assert float(loss[~valid].abs().sum()) == 0.0
    assert_within_ulp(grad, ref_grad, torch.bfloat16, f"{estimator} gradient")
    assert float(grad[~valid].float().abs().sum()) == 0.0 and float(grad[:, VOCAB:].float().abs().sum()) == 0.0
    assert_close_nan(stats["label_logprob"], ref_stats["label_logprob"], 1e-6, "label_logprob")
    if estimator == "sample":
        assert torch.equal(stats["hits"], ref_stats["hits"])
        for a, b in zip(stats["owned_samples"], ref_stats["owned_samples"]):
            assert torch.equal(a, b)


def test_cpu_logits_without_the_interpreter_raise_a_clear_error(monkeypatch):
    monkeypatch.setattr(trb, "INTERPRET", False)
    x = torch.zeros(2, 8)
    spec = spec_for("sft", shard=8, vocab=8)
    with pytest.raises(RuntimeError, match="needs CUDA logits, got logits on cpu.*backend='torch'"):
        trb.local_stats(x, torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.bool),
                        torch.ones(2, dtype=torch.bool), spec, torch.empty(2, 3, dtype=torch.float64), None)


@pytest.mark.slow
def test_real_gloo_tp2_with_triton_backend_matches_tp1_torch(tmp_path):
    """Two gloo processes run the loss with backend='triton' on their shards; losses, gradients and
    the drawn samples equal the single-process torch path on the full vocabulary."""
    if not trb.INTERPRET:
        pytest.skip("the gloo check runs the interpreter on CPU; the GPU run covers one device")
    import torch.multiprocessing as mp

    import otr_megatron as otr
    from otr_megatron.distributed import free_port
    from tests.core import _triton_tp_worker
    from tests.core.reference import samples_matrix

    estimators, k, world = ["sample", "expected"], 16, 2
    mp.start_processes(_triton_tp_worker.main, args=(world, free_port(), str(tmp_path), estimators, k),
                       nprocs=world, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    x, y = make_logits(n=8, seed=21)
    upstream = torch.linspace(0.5, 2.0, x.size(0))
    for est in estimators:
        cfg = otr.OTRConfig(estimator=est, num_samples=k, temperature=KAPPA, neg_reward=BETA, seed=9, backend="torch")
        leaf = x.clone().requires_grad_()
        loss, stats = otr.vocab_parallel_otr_loss(leaf, y, cfg, step=5, vocab_size=VOCAB, return_stats=True)
        loss.backward(upstream)
        for r, res in enumerate(ranks):
            tp_loss, tp_grad, _, tp_hits = res[est]
            assert_close_nan(tp_loss, loss.detach(), 5e-6 if est == "expected" else 1e-6, f"{est} loss, rank {r}")
            assert_within_ulp(tp_grad, leaf.grad[:, r * (V_PAD // world):(r + 1) * (V_PAD // world)],
                              torch.bfloat16, f"{est} gradient, rank {r}")
            if est == "sample":
                assert torch.equal(tp_hits, stats["hits"])
        if est == "sample":
            tok = torch.cat([res[est][2][0] for res in ranks])
            ids = torch.cat([res[est][2][1] for res in ranks])
            assert torch.equal(samples_matrix((tok, ids), 8, k), samples_matrix(stats["owned_samples"], 8, k))


@pytest.mark.parametrize("estimator", ["sample", "expected"])
def test_fused_output_layer_on_the_triton_kernels(estimator):
    """`vocab_parallel_linear_otr_loss` drives the Triton kernels chunk by chunk (the grad reads each
    chunk's forward statistics): the same loss, samples and gradients as on the torch backend."""
    import otr_megatron as otr

    g = torch.Generator().manual_seed(4)
    h = torch.randn(20, 16, generator=g).to(DEV)
    w = (torch.randn(V_PAD, 16, generator=g) * 0.5).to(DEV)
    y = torch.randint(0, VOCAB, (20,), generator=g).to(DEV)
    y[3] = -100
    out = {}
    for backend in ("torch", "triton"):
        cfg = otr.OTRConfig(estimator=estimator, num_samples=8, fused_chunk_tokens=7, chunk_tokens=3, backend=backend)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, st = otr.vocab_parallel_linear_otr_loss(hh, ww, y, cfg, step=2, vocab_size=VOCAB, return_stats=True)
        loss.backward(torch.linspace(0.5, 1.5, 20, device=DEV))
        out[backend] = (loss.detach(), st.get("hits"), hh.grad, ww.grad)
    (l0, h0, gh0, gw0), (l1, h1, gh1, gw1) = out["torch"], out["triton"]
    torch.testing.assert_close(l1, l0, atol=2e-5, rtol=2e-5)
    if estimator == "sample":
        assert torch.equal(h0, h1)
    torch.testing.assert_close(gh1, gh0, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(gw1, gw0, atol=2e-5, rtol=2e-4)
