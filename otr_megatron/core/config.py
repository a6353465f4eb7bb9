"""OTR hyper-parameters, validated once at construction so a bad value never reaches the kernels."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, fields
from typing import Any, Mapping

ESTIMATORS = ("sample", "expected", "sft", "dft")
BACKENDS = ("auto", "torch", "triton")
NORMALIZATIONS = ("token", "sequence")
CHECK_INPUTS = ("deferred", "eager", "off")
# K's upper bound: the loss keeps [tokens, K] sample columns (int32) and weights (fp32) for the
# backward, 8 bytes per sample per token, plus [rows, K, block] sampling temporaries; at 2**20
# (4096x the paper's 256) that is already 8 MiB per token.
MAX_NUM_SAMPLES = 2**20
SEED_LIMIT = 2**64  # the sampling stream keys on seed mod 2**64; larger (or negative) seeds would alias


def _float32(x: float) -> float:
    """x rounded to float32 (inf when it overflows), as the kernels see it."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class OTRConfig:
    """One-Token Rollout settings (arXiv 2509.26313).

    num_samples: K, samples per supervised token (paper: 256).
    temperature: kappa, temperature of the sampling policy softmax(logits / kappa), > 0.
    neg_reward: beta, reward of a sampled token that is not the label, in [-1, 0]. The paper uses a
        slightly negative beta (e.g. -0.1); beta > 0 would reward wrong tokens, and beta < -1 makes
        the push away from wrong tokens outweigh the pull toward the label (a label hit has reward 1).
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
    backend: "auto" (Triton kernels when the logits are on CUDA and `otr_megatron.core.triton_backend`
        imports, else the torch path), "torch" or "triton" (raises if unavailable). Both implement
        the same steps and the same sampling (docs/sampling.md).
    check_inputs: "deferred" (default: the input checks, TP-rank agreement and label range, raise
        at the next call or at `otr_megatron.check_pending()`, naming the step, with no blocking host
        sync; on CPU at the end of the call itself), "eager" (raise in the call: one blocking sync per
        call, for debugging) or "off" (no check, no fingerprint collective). See `core/checks.py`.
    fuse_output_layer: the Megatron-Core integration computes the output layer's matmul and the loss
        together (`vocab_parallel_linear_otr_loss`): the ``[s, b, V/tp]`` logits and their gradient
        exist one chunk (`fused_chunk_tokens` rows) at a time. Same numbers as unfused, one more matmul
        in the backward (docs/fused_output_layer.md). The loss functions themselves ignore it.
    fused_chunk_tokens: rows of logits the fused output layer materialises at a time (None: 256 on
        CPU; on a GPU about 16M (torch backend) or 64M (Triton) logits' worth); `chunk_tokens` still
        bounds the loss's fp32 temporaries inside each.
    """

    num_samples: int = 256
    temperature: float = 1.3
    neg_reward: float = -0.1
    estimator: str = "sample"
    seed: int = 1234
    chunk_tokens: int | None = None
    inplace_backward: bool = False
    normalization: str = "token"
    backend: str = "auto"
    check_inputs: str = "deferred"
    fuse_output_layer: bool = False
    fused_chunk_tokens: int | None = None

    def __post_init__(self):
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"OTRConfig.num_samples must be an integer >= 1, got {self.num_samples!r}")
        if self.num_samples > MAX_NUM_SAMPLES:
            raise ValueError(f"OTRConfig.num_samples={self.num_samples} exceeds {MAX_NUM_SAMPLES} (2**20, 4096x the "
                             "paper's 256): the loss keeps 8 bytes per sample per supervised token for the backward")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"OTRConfig.temperature (kappa) must be a finite number > 0 (paper: about 1.3), "
                             f"got {t!r}")
        inv = _float32(1.0 / t)
        if not (math.isfinite(_float32(t)) and math.isfinite(inv) and inv > 0):
            # the kernels scale the logits by float32(1 / kappa): it must be a finite non-zero float32
            raise ValueError(f"OTRConfig.temperature (kappa)={t!r}: float32(1 / kappa) = {inv!r} is not a finite "
                             "number > 0; expected kappa in about [3e-39, 3e38] (paper: about 1.3)")
        b = self.neg_reward
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -1 <= b <= 0:  # NaN fails too
            raise ValueError(f"OTRConfig.neg_reward (beta) must be a number in [-1, 0] (the paper's beta is "
                             f"slightly negative, e.g. -0.1), got {b!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"OTRConfig.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"OTRConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.check_inputs not in CHECK_INPUTS:
            raise ValueError(f"OTRConfig.check_inputs must be one of {CHECK_INPUTS}, got {self.check_inputs!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"OTRConfig.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"OTRConfig.seed must be an integer in [0, 2**64) (the sampling stream is keyed on 64 "
                             f"bits), got {self.seed!r}")
        if not isinstance(self.fuse_output_layer, bool):
            raise ValueError(f"OTRConfig.fuse_output_layer must be true or false, got {self.fuse_output_layer!r}")
        for name in ("chunk_tokens", "fused_chunk_tokens"):
            c = getattr(self, name)
            if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
                raise ValueError(f"OTRConfig.{name} must be None or an integer >= 1, got {c!r}")

    @classmethod
    def check_keys(cls, values: Mapping[str, Any]) -> None:
        """Raise `UnknownOTRKeyError` if `values` names a key that is not a field: the one unknown-key
        check for OTR settings (YAML files, `otr.KEY=VALUE` overrides, recipe keyword arguments), so a
        typo such as `otr.num_sample` fails instead of silently training with the default."""
        known = [f.name for f in fields(cls)]
        unknown = {str(k): v for k, v in values.items() if k not in known}
        if unknown:
            raise UnknownOTRKeyError(unknown, known)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "OTRConfig":
        """Build from a mapping of settings (YAML, `otr.KEY=VALUE` overrides with the `otr.` removed).

        Unknown keys raise `UnknownOTRKeyError`, bad values the `ValueError` of `__post_init__`; both are
        ValueErrors. An integer is taken for a float field (YAML reads `otr.temperature=2` as 2).
        """
        cls.check_keys(values)
        floats = {f.name for f in fields(cls) if f.type == "float"}
        return cls(**{k: float(v) if k in floats and type(v) is int else v for k, v in values.items()})


class UnknownOTRKeyError(ValueError):
    """OTR settings that name a key `OTRConfig` does not have; the message names each as `otr.KEY`, its
    value, and the known keys."""

    def __init__(self, unknown: Mapping[str, Any], known: list[str]):
        self.unknown = dict(unknown)
        self.known = list(known)
        given = ", ".join(f"otr.{k}={v!r}" for k, v in self.unknown.items())
        super().__init__(f"unknown OTR setting{'s' if len(self.unknown) > 1 else ''} {given}; "
                         f"known: {', '.join('otr.' + k for k in self.known)}")
