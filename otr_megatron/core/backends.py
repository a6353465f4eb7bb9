"""Backend factory: picks the module that implements `core/contract.py` for a call's device."""

from __future__ import annotations

import importlib

import torch

from otr_megatron.core.config import BACKENDS
from otr_megatron.core.contract import Backend


def _from_module(name: str, module) -> Backend:
    return Backend(name, module.local_stats, module.sample, module.grad, module.scratch)


def get_backend(name: str, device: torch.device) -> Backend:
    """"torch", "triton", or "auto" (Triton when the logits are on CUDA and it imports, else torch)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        from otr_megatron.core import torch_backend

        return _from_module("torch", torch_backend)
    try:
        module = importlib.import_module("otr_megatron.core.triton_backend")
    except ImportError as e:
        if name == "auto":
            from otr_megatron.core import torch_backend

            return _from_module("torch", torch_backend)
        raise RuntimeError(f"OTRConfig.backend='triton' but otr_megatron.core.triton_backend does not import: {e}; "
                           "install triton or use backend='torch' (or 'auto')") from e
    return _from_module("triton", module)
