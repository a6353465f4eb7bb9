"""Backend factory: picks the modules that implement `core/contract.py` for a call's device."""

from __future__ import annotations

import importlib

import torch

from otr_megatron.core.config import BACKENDS
from otr_megatron.core.contract import Backend

def _torch() -> Backend:
    from otr_megatron.core import torch_backend, torch_combine

    return Backend("torch", torch_backend.local_stats, torch_backend.sample, torch_backend.grad,
                   torch_backend.scratch, torch_combine)


def _triton() -> Backend:
    module = importlib.import_module("otr_megatron.core.triton_backend")
    combine = importlib.import_module("otr_megatron.core.triton_combine")
    # one program per row and no workspace: every row in one launch; the grad reads the forward's
    # own local statistics instead of recomputing them (one read of the logits)
    return Backend("triton", module.local_stats, module.sample, module.grad, module.scratch, combine,
                   grad_reads_local=True, one_pass=True)


def get_backend(name: str, device: torch.device) -> Backend:
    """"torch", "triton", or "auto" (Triton when the logits are on CUDA and it imports, else torch)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    kind = "torch" if name == "torch" or (name == "auto" and device.type != "cuda") else "triton"
    if kind == "torch":
        return _torch()
    try:
        return _triton()
    except ImportError as e:
        if name != "auto":
            raise RuntimeError(f"OTRConfig.backend='triton' but otr_megatron.core.triton_backend does not "
                               f"import: {e}; install triton or use backend='torch' (or 'auto')") from e
        return _torch()
