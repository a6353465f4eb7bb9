"""Counter-based uniforms for sampling: a pure function of (seed, step, token key, sample index).

Why not torch/Megatron generators: Megatron's default and data-parallel streams are identical on
every DP rank and its model-parallel stream drives dropout (see the reference notes). A hash of
global ids gives the same draws on every TP rank, independent draws across DP/CP ranks, the same
draws after a resume, and the same draws for any TP layout, with no generator state to save.

The mixer is SplitMix64 (Steele, Lea, Flood 2014) evaluated in int64 tensor arithmetic, which wraps
modulo 2**64 on CPU and CUDA; `tests/core/test_random.py` checks it bit for bit against Python ints.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def _as_i64(c: int) -> int:
    """Two's-complement view of an unsigned 64-bit constant, as torch int64 needs."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift on int64 (torch's >> is arithmetic)."""
    return (x >> s).bitwise_and_((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser of (x + golden), elementwise on int64 tensors."""
    z = x + _as_i64(_GOLDEN)  # a fresh tensor: the rest is in place
    z.bitwise_xor_(_shr(z, 30)).mul_(_as_i64(_MUL1))
    z.bitwise_xor_(_shr(z, 27)).mul_(_as_i64(_MUL2))
    return z.bitwise_xor_(_shr(z, 31))


def splitmix64_int(x: int) -> int:
    """Reference SplitMix64 on Python ints (unsigned 64-bit)."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK64
    return z ^ (z >> 31)


def stream_key(seed: int, step: int) -> int:
    """Mix seed and step into one 64-bit key (signed view) shared by all tokens of a call."""
    return _as_i64(splitmix64_int(splitmix64_int(seed & _MASK64) ^ (step & _MASK64)))


def stream_key_tensor(seed: int, step: torch.Tensor) -> torch.Tensor:
    """`stream_key` with the step a 0-dim integer tensor (e.g. on the GPU inside a captured CUDA graph):
    a 0-dim int64 tensor on ``step``'s device holding the same value, with no host sync or copy."""
    return splitmix64(step.to(torch.int64) ^ _as_i64(splitmix64_int(seed & _MASK64)))


def token_uniforms_from_key(token_keys: torch.Tensor, num_samples: int, key_mix) -> torch.Tensor:
    """float64 uniforms in [0, 1) of shape [*token_keys.shape, num_samples], 53 random bits each.

    ``key_mix`` is the call's stream key: a Python int (`stream_key`) or a 0-dim int64 tensor on the
    keys' device (`stream_key_tensor`); both give the same bits. Token bases are a bijection of the
    keys, so distinct keys never share a stream start; sample j of a token is the (j+1)-th element of
    a Weyl sequence from that base, as SplitMix64 intends.
    """
    base = splitmix64(token_keys.to(torch.int64) ^ key_mix)
    j = torch.arange(1, num_samples + 1, dtype=torch.int64, device=token_keys.device).mul_(_as_i64(_GOLDEN))
    bits = splitmix64(base.unsqueeze(-1) + j)
    return _shr(bits, 11).to(torch.float64).mul_(2.0**-53)


def token_uniforms(token_keys: torch.Tensor, num_samples: int, seed: int, step: int) -> torch.Tensor:
    """`token_uniforms_from_key` with the key of (seed, step)."""
    return token_uniforms_from_key(token_keys, num_samples, stream_key(seed, step))
