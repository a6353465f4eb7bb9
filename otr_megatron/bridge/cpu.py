"""CPU mode for `otr-megatron bridge`: the real Megatron-Bridge loop on a machine without a GPU.

`enable_cpu_mode()` does nothing when `torch.cuda.is_available()` is True, so GPU runs are never altered.
Otherwise it applies what Bridge 0.6.2 with megatron-core 0.19.2 needs on CPU (gloo), each item
found by a real failure, without editing any installed file:

Import shims, each handed only to the one module that imports the name, only while Bridge's
training API is being imported, and only when the real name is missing. They never enter
`sys.modules`, so megatron-core's "is Transformer Engine installed" probes still see it absent:
  1. `megatron.bridge.peft.lora_layers` gets `transformer_engine.pytorch` with `ops.Sequential`:
     a return annotation evaluated when the module loads (LoRA's fused TE branch, never built here).
  2. `megatron.bridge.training.pretrain` gets `nvidia_resiliency_ext.inprocess.CallWrapper`: a
     type annotation (in-process restart, off by default). The real nvrx 0.4.1, the newest for
     CPython 3.11, lacks `__version__` and crashes megatron-core's version probe.
  3. `megatron.training.models.gpt` / `.hybrid` get `typing` with `override` from
     `typing_extensions` (Python < 3.12 only: `typing.override` is a 3.12 API).

Runtime patches, after `otr_megatron.mcore.enable_cpu_mode()`:
  4. `megatron.bridge.training.setup.initialize_megatron` is called with `allow_no_cuda=True`
     (otherwise it asserts CUDA).
  5. `megatron.bridge.training.initialize.compile_helpers` is a no-op: the wheel ships the prebuilt
     `helpers_cpp` but no Makefile, so `make` fails and the process calls `sys.exit(1)`.
  6. `megatron.bridge.training.initialize._set_random_seed` runs with `torch.cuda.device_count()`
     reporting 1: otherwise it never seeds Megatron's model-parallel RNG tracker and weight init
     fails with "model-parallel-rng is not added".

`enable_cpu_mode()` logs one line naming all of them (`describe()`). The same name exists in each
layer (`otr_megatron.mcore.enable_cpu_mode`, `otr_megatron.nemo.cpu.enable_cpu_mode`); `enable` is
the deprecated old name.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import importlib.util
import os
import sys
import types
import warnings
from typing import Callable, Optional

_STATE = {"enabled": False}


class _MissingTE:
    """Annotation target standing in for a Transformer Engine class; building one is an error."""

    def __init__(self, *args, **kwargs):
        raise ImportError("Transformer Engine is not installed: otr-megatron's CPU mode gave this module an "
                          "annotation-only stand-in (LoRA's fused TE branch needs a GPU with transformer_engine)")


def _te_stub() -> types.ModuleType:
    root = types.ModuleType("transformer_engine")
    root.pytorch = types.ModuleType("transformer_engine.pytorch")
    root.pytorch.ops = types.ModuleType("transformer_engine.pytorch.ops")
    root.pytorch.ops.Sequential = type("Sequential", (_MissingTE,), {})
    return root


def _nvrx_stub() -> types.ModuleType:
    mod = types.ModuleType("nvidia_resiliency_ext.inprocess")

    class CallWrapper:
        def __init__(self, *args, **kwargs):
            raise ImportError("nvidia_resiliency_ext is not installed: in-process restart is unavailable in "
                              "otr-megatron's CPU mode")

    mod.CallWrapper = CallWrapper
    return mod


def _typing_with_override() -> types.ModuleType:
    import typing

    import typing_extensions

    mod = types.ModuleType("typing")
    mod.__dict__.update(typing.__dict__)
    mod.override = typing_extensions.override
    return mod


def _missing(module: str) -> Callable[[], bool]:
    return lambda: importlib.util.find_spec(module) is None


# (importing module, imported name) -> (needed?, stub factory, short name for the log line)
IMPORT_SHIMS: dict[tuple[str, str], tuple[Callable[[], bool], Callable[[], types.ModuleType], str]] = {
    ("megatron.bridge.peft.lora_layers", "transformer_engine.pytorch"):
        (_missing("transformer_engine"), _te_stub, "lora_layers<-transformer_engine.pytorch.ops.Sequential"),
    ("megatron.bridge.training.pretrain", "nvidia_resiliency_ext.inprocess"):
        (_missing("nvidia_resiliency_ext"), _nvrx_stub, "pretrain<-nvidia_resiliency_ext.inprocess.CallWrapper"),
    ("megatron.training.models.gpt", "typing"):
        (lambda: sys.version_info < (3, 12), _typing_with_override, "training.models.gpt<-typing.override"),
    ("megatron.training.models.hybrid", "typing"):
        (lambda: sys.version_info < (3, 12), _typing_with_override, "training.models.hybrid<-typing.override"),
}

RUNTIME_PATCHES = (
    "setup.initialize_megatron(allow_no_cuda=True)",
    "initialize.compile_helpers=no-op",
    "initialize._set_random_seed with cuda.device_count()=1",
)


@contextlib.contextmanager
def import_shims():
    """Install the scoped `builtins.__import__` wrapper for the duration of the block; yields the
    list of shims handed out (short names)."""
    active = {key: (factory, name) for key, (needed, factory, name) in IMPORT_SHIMS.items() if needed()}
    used: list[str] = []
    real_import = builtins.__import__

    def scoped_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and globals is not None:
            hit = active.get((globals.get("__name__"), name))
            if hit is not None:
                used.append(hit[1])
                return hit[0]()
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = scoped_import
    try:
        yield used
    finally:
        builtins.__import__ = real_import


def _apply_runtime_patches() -> None:
    import megatron.bridge.training.initialize as binit
    import megatron.bridge.training.setup as bsetup

    from otr_megatron.mcore.cpu_backend import with_one_cuda_device

    # allow_no_cuda: Bridge's initialize_megatron asserts torch.cuda.is_available() otherwise.
    bsetup.initialize_megatron = functools.partial(bsetup.initialize_megatron, allow_no_cuda=True)
    # The wheel has the prebuilt helpers_cpp but no Makefile: `make` fails -> sys.exit(1).
    binit.compile_helpers = lambda *args, **kwargs: None
    # With device_count() == 0 the model-parallel RNG tracker is never seeded ("model-parallel-rng is not added").
    binit._set_random_seed = with_one_cuda_device(binit._set_random_seed)


def describe(shims: Optional[list[str]] = None) -> str:
    """The one log line naming what CPU mode applied."""
    names = sorted(set(shims)) if shims is not None else [n for _, _, n in IMPORT_SHIMS.values()]
    return (f"otr-megatron bridge: CPU mode (no CUDA device): scoped import shims [{', '.join(names) or 'none'}]; "
            f"mcore.enable_cpu_mode(); Bridge patches [{'; '.join(RUNTIME_PATCHES)}]")


def enable_cpu_mode(force: bool = False) -> Optional[str]:
    """Apply CPU mode if there is no CUDA device (or `force`, or OTR_FORCE_CPU=1); returns the log
    line, or None on a GPU machine.

    Imports Bridge's training API under the import shims (that import loads every module that
    needs one), then removes the wrapper and applies the runtime patches. Idempotent.
    """
    import torch

    if _STATE["enabled"]:
        return _STATE["line"]
    force = force or os.environ.get("OTR_FORCE_CPU", "") == "1"  # as mcore.enable_cpu_mode
    if torch.cuda.is_available() and not force:
        return None
    from otr_megatron.mcore.cpu_backend import enable_cpu_mode as enable_mcore_cpu_mode

    enable_mcore_cpu_mode(force=True)  # before Bridge loads, so nothing captures the CUDA functions first
    with import_shims() as used:
        import megatron.bridge.training.finetune  # noqa: F401  (pulls in pretrain, models, peft)
        import megatron.bridge.training.pretrain  # noqa: F401
    _apply_runtime_patches()
    line = describe(used)
    _STATE.update(enabled=True, line=line)
    if os.environ.get("RANK", "0") == "0":  # one line per job, not per rank
        print(line, flush=True)
    return line


def enable(force: bool = False) -> Optional[str]:
    """Deprecated name of `enable_cpu_mode` (used by scripts written before the CPU modes shared one name)."""
    warnings.warn("otr_megatron.bridge.cpu.enable is deprecated; use enable_cpu_mode", DeprecationWarning,
                  stacklevel=2)
    return enable_cpu_mode(force)
