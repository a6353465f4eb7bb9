"""The counter-based generator: bit-exact against Python ints, uniform, independent across keys."""

import numpy as np
import torch
from scipy import stats as sps

from otr_megatron.core.random import (
    splitmix64,
    splitmix64_int,
    stream_key,
    stream_key_tensor,
    token_uniforms,
    token_uniforms_from_key,
)

MASK = (1 << 64) - 1


def test_int64_tensor_arithmetic_matches_unsigned_reference():
    vals = [0, 1, 2, 12345, (1 << 63) - 1, 1 << 63, MASK, 0xDEADBEEFCAFEBABE]
    signed = [v - (1 << 64) if v >= 1 << 63 else v for v in vals]
    got = splitmix64(torch.tensor(signed, dtype=torch.int64)).tolist()
    assert [g & MASK for g in got] == [splitmix64_int(v) for v in vals]


def test_uniforms_are_uniform_and_in_range():
    u = token_uniforms(torch.arange(2000), 256, seed=1, step=0)
    assert u.dtype == torch.float64 and float(u.min()) >= 0 and float(u.max()) < 1
    p = sps.kstest(u.flatten().numpy()[:200000], "uniform").pvalue
    assert p > 1e-3


def test_streams_of_neighbouring_keys_and_steps_are_uncorrelated():
    u = token_uniforms(torch.arange(4000), 64, seed=1, step=7).numpy()
    # adjacent keys, and the same key at adjacent steps: |corr| < 5 / sqrt(n)
    r_keys = np.corrcoef(u[:-1].ravel(), u[1:].ravel())[0, 1]
    u_next = token_uniforms(torch.arange(4000), 64, seed=1, step=8).numpy()
    r_steps = np.corrcoef(u.ravel(), u_next.ravel())[0, 1]
    bound = 5 / np.sqrt(u.size)
    assert abs(r_keys) < bound and abs(r_steps) < bound


def _uniform_int(key: int, j: int, key_mix: int) -> float:
    """Python-int reference of sample j's uniform for one token key (unsigned 64-bit arithmetic)."""
    base = splitmix64_int((key ^ key_mix) & MASK)
    bits = splitmix64_int((base + (j + 1) * 0x9E3779B97F4A7C15) & MASK)
    return (bits >> 11) * 2.0**-53


SEEDS_STEPS = [(0, 0), (1234, 7), (2**63 - 1, 2**40 + 3), (-5, 1), (2**62, 2**63 - 1), (7, 123456789)]


def test_stream_key_tensor_equals_the_int_version():
    for seed, step in SEEDS_STEPS:
        got = stream_key_tensor(seed, torch.tensor(step, dtype=torch.int64))
        assert got.dtype == torch.int64 and got.dim() == 0
        assert int(got) == stream_key(seed, step), (seed, step)
    # an int32 step tensor is read as the same integer
    assert int(stream_key_tensor(3, torch.tensor(11, dtype=torch.int32))) == stream_key(3, 11)


def test_uniforms_from_key_equal_the_python_int_reference_for_int_and_tensor_keys():
    keys = torch.tensor([0, 1, 5, -1, 2**63 - 1, -(2**63), 0x123456789ABCDEF], dtype=torch.int64)
    k = 5
    for seed, step in SEEDS_STEPS:
        mix = stream_key(seed, step)
        ref = torch.tensor([[_uniform_int(int(t) & MASK, j, mix & MASK) for j in range(k)] for t in keys],
                           dtype=torch.float64)
        from_int = token_uniforms_from_key(keys, k, mix)
        from_tensor = token_uniforms_from_key(keys, k, stream_key_tensor(seed, torch.tensor(step)))
        assert torch.equal(from_int, ref) and torch.equal(from_tensor, ref), (seed, step)
        assert torch.equal(token_uniforms(keys, k, seed, step), ref)


def test_splitmix64_leaves_its_input_alone():
    x = torch.arange(10, dtype=torch.int64)
    splitmix64(x)
    assert torch.equal(x, torch.arange(10))
