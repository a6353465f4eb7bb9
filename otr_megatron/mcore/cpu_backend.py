"""Run megatron-core (0.15 ... 0.19+) on a CPU-only machine with the gloo backend.

Megatron-Core assumes CUDA in a handful of places that have nothing to do with the math (device
placement of scratch buffers, stream bookkeeping, RNG state trackers). `enable_cpu_mode()`
redirects exactly those calls to the CPU so that the *unmodified* megatron-core code paths
(tensor/sequence/pipeline/data parallelism, DDP, schedules, distributed checkpoints) run under
gloo. Each patch below was found by a real failure; see `shared/reference/megatron.md`:

1. `torch.cuda.current_device()` is used as a device for buffers  -> returns "cpu".
2. `torch.cuda.synchronize` / `set_device`                          -> no-ops.
3. `Tensor.cuda()`                                                  -> identity.
4. factory calls with `device="cuda"` (and `.to("cuda")`)           -> CPU (wrapped factories).
5. RNG tracker reads/writes CUDA RNG states                         -> aliased to the CPU generator
   (seeded with `torch.default_generator.manual_seed`, never `torch.manual_seed`, which calls
   `torch.cuda.manual_seed_all` and would recurse into the patch).
6. CUDA streams / events (0.19 DDP grad sync)                       -> null objects.
7. Sequence parallelism with the local spec: the torch-norm wrapper refuses SP -> `SPTorchNorm`
   (used by `otr_megatron.mcore.model`), a plain torch norm whose parameters carry the
   `sequence_parallel` tag that `finalize_model_grads` uses to all-reduce their gradients.
8. The RNG tracker's warning "CPU RNG state changed within GPU RNG context", logged by every
   random op (dropout, init) inside `fork()`: with 5. the two generators are one, so it is always
   true and says nothing                                           -> filtered from that logger.

The patches are process-global and idempotent. They are applied only when CUDA is unavailable
or when explicitly forced (`force=True`), so the same code runs unchanged on a GPU machine.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import warnings

import torch

_LOCK = threading.Lock()
_STATE = {"enabled": False}


def cpu_mode_enabled() -> bool:
    """True once `enable_cpu_mode` has patched this process."""
    return bool(_STATE["enabled"])


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, str):
        return dev == "cuda" or dev.startswith("cuda:")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


_FACTORIES = (
    "empty", "zeros", "ones", "full", "arange", "tensor", "as_tensor", "rand", "randn", "randint",
    "randperm", "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
    "randint_like", "linspace", "logspace", "eye", "empty_strided", "tril_indices", "triu_indices",
)


def _cpu_device_kwarg(fn):
    def wrapper(*args, **kwargs):
        dev = kwargs.get("device")
        if dev is not None and (_is_cuda_device(dev) or isinstance(dev, int)):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    wrapper.__name__ = getattr(fn, "__name__", "factory")
    return wrapper


def _cpu_tensor_to(fn):
    def to(self, *args, **kwargs):
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs["device"] = "cpu"
        if args and _is_cuda_device(args[0]):
            args = ("cpu",) + args[1:]
        return fn(self, *args, **kwargs)

    to.__wrapped__ = fn
    return to


class _NullStream:
    """Stands in for `torch.cuda.Stream`: every operation is already synchronous on the CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event if event is not None else _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _cpu_get_rng_state(device="cuda"):
    return torch.default_generator.get_state()


def _cpu_set_rng_state(new_state, device="cuda"):
    torch.default_generator.set_state(new_state)


def _cpu_manual_seed(seed):
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all, i.e. back into this patch.
    torch.default_generator.manual_seed(int(seed))


def _patch_megatron_rng() -> None:
    """Point megatron's private CUDA RNG helpers at the CPU generator (if megatron is present)."""
    try:
        from megatron.core.tensor_parallel import random as mrandom
    except ImportError:  # megatron-core absent: nothing else to patch
        return

    def _get(device="cuda", clone=False, graph_safe=False):
        return torch.default_generator.get_state()

    def _set(new_state, device=-1, graph_safe=False):
        torch.default_generator.set_state(new_state)

    mrandom._get_cuda_rng_state = _get
    mrandom._set_cuda_rng_state = _set
    tracker_log = logging.getLogger(mrandom.__name__)
    if not any(isinstance(f, _SameGeneratorFilter) for f in tracker_log.filters):
        tracker_log.addFilter(_SameGeneratorFilter())


class _SameGeneratorFilter(logging.Filter):
    """Drops the tracker's CPU-vs-GPU RNG warning (patch 8)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "CPU RNG state changed within GPU RNG context"


def _patch_megatron_grad_clip() -> None:
    """megatron-core's `clip_grad_by_total_norm_fp32` asserts CUDA tensors: same math without it
    (scale every grad by max_norm / (total_norm + 1e-6) when that is below 1)."""
    try:
        from megatron.core.optimizer import optimizer as mopt
    except ImportError:  # megatron-core absent: nothing else to patch
        return
    if getattr(mopt.clip_grad_by_total_norm_fp32, "_otr_cpu", False):
        return

    def clip_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0:
            for p in parameters:
                g = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
                if g is not None:
                    g.detach().mul_(coeff)

    clip_cpu._otr_cpu = True
    mopt.clip_grad_by_total_norm_fp32 = clip_cpu


def _patch_megatron() -> None:
    """Megatron-side patches; re-applied on every call since megatron may be imported later."""
    _patch_megatron_rng()
    _patch_megatron_grad_clip()


def enable_cpu_mode(force: bool = False) -> bool:
    """Patch torch/megatron so that megatron-core runs on the CPU.

    The same name in each layer: `otr_megatron.bridge.cpu.enable_cpu_mode` and
    `otr_megatron.nemo.cpu.enable_cpu_mode` call this one first, then patch their framework.
    Returns True when CPU mode is active after the call. Does nothing (returns False) when
    CUDA is available and `force` is False, so GPU runs are never altered. Safe to call many times.
    Also honoured: environment variable `OTR_FORCE_CPU=1` acts like `force=True`.
    """
    force = force or os.environ.get("OTR_FORCE_CPU", "") == "1"
    with _LOCK:
        if _STATE["enabled"]:
            _patch_megatron()  # megatron may have been imported after the first call
            return True
        if torch.cuda.is_available() and not force:
            return False

        cuda = torch.cuda
        cuda.is_available = lambda: False
        cuda.current_device = lambda: "cpu"
        cuda.synchronize = lambda *a, **k: None
        cuda.set_device = lambda *a, **k: None
        cuda.empty_cache = lambda *a, **k: None
        cuda.device_count = lambda: 0
        torch.Tensor.cuda = lambda self, *a, **k: self

        cuda.get_rng_state = _cpu_get_rng_state
        cuda.set_rng_state = _cpu_set_rng_state
        cuda.manual_seed = _cpu_manual_seed
        cuda.manual_seed_all = _cpu_manual_seed
        cuda.random.get_rng_state = _cpu_get_rng_state
        cuda.random.set_rng_state = _cpu_set_rng_state
        cuda.random.manual_seed = _cpu_manual_seed
        cuda.random.manual_seed_all = _cpu_manual_seed

        cuda.Stream = _NullStream
        cuda.Event = _NullEvent
        cuda.current_stream = lambda *a, **k: _NullStream()
        cuda.default_stream = lambda *a, **k: _NullStream()
        cuda.stream = lambda *a, **k: contextlib.nullcontext()
        cuda.set_stream = lambda *a, **k: None

        # Module-level wrappers rather than a TorchFunctionMode: a mode is not active inside the
        # autograd engine, where activation recompute re-runs forward code (found by a failure).
        # torch caches its list of factory functions for `with torch.device(...)` on first use; build
        # it from the originals first, or `with torch.device("meta")` (transformers' from_pretrained)
        # no longer recognises the wrapped factories and fills buffers such as RoPE's inv_freq wrongly.
        try:
            from torch.utils._device import _device_constructors
        except ImportError:  # private API: without it nothing is cached and nothing goes wrong
            _device_constructors = None
        if _device_constructors is not None:
            _device_constructors()
        for name in _FACTORIES:
            if hasattr(torch, name):
                setattr(torch, name, _cpu_device_kwarg(getattr(torch, name)))
        torch.Tensor.to = _cpu_tensor_to(torch.Tensor.to)
        _STATE["enabled"] = True
        _patch_megatron()
        return True


def enable_cpu_backend(force: bool = False) -> bool:
    """Deprecated name of `enable_cpu_mode` (the public name before the three CPU modes shared one)."""
    warnings.warn("otr_megatron.mcore.enable_cpu_backend is deprecated; use enable_cpu_mode",
                  DeprecationWarning, stacklevel=2)
    return enable_cpu_mode(force)


def cpu_backend_enabled() -> bool:
    """Deprecated name of `cpu_mode_enabled`."""
    warnings.warn("otr_megatron.mcore.cpu_backend_enabled is deprecated; use cpu_mode_enabled",
                  DeprecationWarning, stacklevel=2)
    return cpu_mode_enabled()


def with_one_cuda_device(fn):
    """`fn` run with `torch.cuda.device_count()` reporting 1 (patch 2 reports 0).

    For the `_set_random_seed` copies in Megatron-Bridge and NeMo: they seed the model-parallel RNG
    tracker only when they count a GPU; unseeded, weight init fails ("model-parallel-rng is not added").
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        saved = torch.cuda.device_count
        torch.cuda.device_count = lambda: 1
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.device_count = saved

    return wrapper


class SPTorchNorm:
    """Torch LayerNorm/RMSNorm for the local spec that also works with sequence parallelism.

    Megatron's `WrappedTorchNorm` refuses `sequence_parallel`; the math does not need anything
    special, only that the norm parameters are tagged `sequence_parallel=True` so that
    `finalize_model_grads` all-reduces their gradients over the TP group (each TP rank sees a
    different slice of the sequence).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        norm = getattr(config, "normalization", "LayerNorm")
        if norm == "LayerNorm":
            module = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif norm == "RMSNorm":
            module = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(
                f"SPTorchNorm: config.normalization={norm!r} is not supported; "
                "expected 'LayerNorm' or 'RMSNorm'"
            )
        if getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("SPTorchNorm: layernorm_zero_centered_gamma=True is not supported")
        for p in module.parameters():
            p.sequence_parallel = bool(getattr(config, "sequence_parallel", False))
        return module
