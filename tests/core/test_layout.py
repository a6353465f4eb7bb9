"""Layout-exact sampling (docs/sampling.md): every TP layout and chunking draws the TP=1 samples.

Simulated ranks run the loss's own steps (tests/core/simulated_tp.py); the real gloo processes are
in test_tensor_parallel.py. Near-uniform logits are the worst case: 32k CDF boundaries ~3e-5 apart.
"""

import pytest
import torch

import otr_megatron as otr
from otr_megatron.core.contract import base_block_size, block_size
from tests.core.simulated_tp import simulated_draw


def near_uniform(n, padded, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, padded, generator=g) * 0.01).bfloat16(), torch.randint(0, vocab, (n,), generator=g)


def test_block_size_is_a_function_of_vocabulary_and_k():
    # 2**round(0.5 * log2(V / K)): V/K = 125 -> 8, 593.5 -> 32
    assert base_block_size(32000, 256) == 8 and base_block_size(151936, 256) == 32
    assert base_block_size(100, 256) == 4 and base_block_size(10**7, 1) == 64
    for tp in (1, 2, 4, 8):  # Megatron pads to a multiple of 128 * tp: every shard holds whole blocks
        assert block_size(32000, 256, 32768 // tp) == 8
    assert block_size(1000, 8, 100) == 4  # B0 = 8 does not divide 100: largest power of two that does


def test_api_draws_equal_the_simulated_layouts():
    """The public function and the simulated TP=1 run the same steps: same draws."""
    x, y = near_uniform(64, 1024, 1000)
    cfg = otr.OTRConfig(num_samples=32, chunk_tokens=9)
    _, st = otr.vocab_parallel_otr_loss(x, y, cfg, step=2, vocab_size=1000, return_stats=True)
    tok, ids = st["owned_samples"]
    drawn = simulated_draw(x, y, cfg, 1, step=2, vocab_size=1000)
    ok = drawn >= 0
    assert torch.equal(tok, ok.nonzero()[:, 0]) and torch.equal(ids, drawn[ok])


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_small_layouts_draw_the_tp1_samples(tp):
    x, y = near_uniform(128, 4096, 4000, seed=tp)
    cfg = otr.OTRConfig(num_samples=64)
    ref = simulated_draw(x, y, cfg, 1, vocab_size=4000)
    got = simulated_draw(x, y, cfg, tp, vocab_size=4000, chunk=7)  # chunking differs too
    assert int((got != ref).sum()) == 0


@pytest.mark.slow
def test_a_million_samples_over_32k_ids_are_layout_exact():
    """4096 tokens x K=256 = 1,048,576 draws over near-uniform logits of a 32000-id vocabulary
    padded to 32768: TP=2 and TP=4 (and another chunking) differ from TP=1 in 0 samples."""
    x, y = near_uniform(4096, 32768, 32000, seed=1)
    cfg = otr.OTRConfig(num_samples=256, seed=5)
    keys = torch.arange(4096) * 7919 + 3
    ref = simulated_draw(x, y, cfg, 1, step=9, keys=keys, vocab_size=32000, chunk=32)
    assert int((ref < 0).sum()) == 0 and int(ref.max()) < 32000
    for tp, chunk in [(2, 64), (4, 4096)]:
        got = simulated_draw(x, y, cfg, tp, step=9, keys=keys, vocab_size=32000, chunk=chunk)
        assert int((got != ref).sum()) == 0, f"TP={tp}: {int((got != ref).sum())} of {got.numel()} differ"
