"""OTR hyper-parameters, validated once at construction so a bad value never reaches the kernels."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

ESTIMATORS = ("sample", "expected", "sft", "dft")
NORMALIZATIONS = ("token", "sequence")


@dataclass(frozen=True)
class OTRConfig:
    """One-Token Rollout settings (arXiv 2509.26313).

    num_samples: K, samples per supervised token (paper: 256).
    temperature: kappa, temperature of the sampling policy softmax(logits / kappa), > 0.
    neg_reward: beta, reward of a sampled token that is not the label, < 1 (paper: slightly negative).
    estimator: "sample" (the paper's Monte Carlo estimator), "expected" (closed form, K -> infinity),
        "sft" (cross entropy) or "dft" (cross entropy weighted by stopgrad p(label)).
    seed: key of the counter-based random stream; samples depend only on (seed, step, token key, j).
    chunk_tokens: tokens processed per chunk; bounds the fp32 temporaries to a few
        [chunk_tokens, V/tp] buffers. None picks a size from the vocabulary shard.
    inplace_backward: write the gradient into the logits buffer (saves one [tokens, V/tp] tensor,
        as Megatron's cross entropy does). Only safe when nothing else reads the logits afterwards.
    normalization: how the integrations (megatron-core `loss_func`, Bridge, NeMo, the train job)
        reduce the per-token loss: "token" (Megatron's global token mean) or "sequence" (the
        paper's: each sequence's supervised tokens weighted 1/length, then the mean over
        sequences). The loss function itself always returns per-token values.
    """

    num_samples: int = 256
    temperature: float = 1.3
    neg_reward: float = -0.1
    estimator: str = "sample"
    seed: int = 1234
    chunk_tokens: int | None = None
    inplace_backward: bool = False
    normalization: str = "token"

    def __post_init__(self):
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"OTRConfig.num_samples must be an integer >= 1, got {self.num_samples!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"OTRConfig.temperature must be a finite number > 0, got {t!r}")
        b = self.neg_reward
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b >= 1:
            raise ValueError(f"OTRConfig.neg_reward must be a finite number < 1, got {b!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"OTRConfig.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"OTRConfig.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"OTRConfig.seed must be an integer, got {self.seed!r}")
        c = self.chunk_tokens
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"OTRConfig.chunk_tokens must be None or an integer >= 1, got {c!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "OTRConfig":
        """Build from a mapping (YAML, CLI overrides), rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"unknown OTR option(s) {unknown}; known options: {sorted(known)}")
        return cls(**values)
