"""The counter-based generator: bit-exact against Python ints, uniform, independent across keys."""

import numpy as np
import torch
from scipy import stats as sps

from otr_megatron.core.random import splitmix64, splitmix64_int, token_uniforms

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
