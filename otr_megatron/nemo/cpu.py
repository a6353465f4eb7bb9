"""NeMo 2.x (nemo-toolkit 2.7, megatron-core 0.15) on a machine without a GPU: the real loop under gloo.

`enable_cpu_mode()` does nothing when torch sees a GPU. Otherwise it applies, once per process, the
patches below and names them in one log line. None edits an installed file, and each one
replaces only the named function in the named NeMo module:

1. `otr_megatron.mcore.enable_cpu_mode()`: megatron-core's CUDA-only buffers, streams and RNG
   tracker on the CPU (see that module).
2. `nemo.lightning.megatron_init._set_random_seed` runs with `torch.cuda.device_count()` reporting
   1. It seeds Megatron's model-parallel RNG tracker only when it counts a GPU; unseeded, weight
   init fails with "model-parallel-rng is not added".
3. `MockDataModule.setup` passes `create_attention_mask` by keyword. NeMo 2.7.3 passes it
   positionally into `_MockGPTDataset`'s `seed` parameter (a NeMo bug): no mask is built, and
   without Transformer Engine `gpt_forward_step` then asserts.
4. `torch.tensor(..., pin_memory=True)` in NeMo's MegatronStrategy and MegatronDataSampler (the
   values they log each step) drops `pin_memory`: a CPU-only torch cannot pin memory.
"""

from __future__ import annotations

import types
import warnings

import torch

_APPLIED: list = []


def _mock_setup_by_keyword(self, stage: str = "") -> None:
    from nemo.collections.llm.gpt.data import mock

    for attr, split, n in (("_train_ds", "train", self.num_train_samples),
                           ("_validation_ds", "valid", self.num_val_samples),
                           ("_test_ds", "test", self.num_test_samples)):
        setattr(self, attr, mock._MockGPTDataset(self.tokenizer, split, n, self.seq_length,
                                                 create_attention_mask=self.create_attention_mask))


class _TorchWithoutPinnedTensors(types.ModuleType):
    """`torch` for one NeMo module, except that `tensor(..., pin_memory=True)` is not pinned."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def tensor(*args, pin_memory: bool = False, **kwargs):
        return torch.tensor(*args, **kwargs)


def enable_cpu_mode(force: bool = False) -> list:
    """Apply the CPU patches (module docstring) when torch sees no GPU; return their names.

    The same name in each layer: `otr_megatron.mcore.enable_cpu_mode` (applied first, patch 1) and
    `otr_megatron.bridge.cpu.enable_cpu_mode`.

    Returns [] on a GPU machine (unless `force`). Idempotent: later calls return the same list.
    """
    from otr_megatron.mcore.cpu_backend import enable_cpu_mode as enable_mcore_cpu_mode
    from otr_megatron.mcore.cpu_backend import with_one_cuda_device

    if _APPLIED:
        enable_mcore_cpu_mode()  # re-applies megatron-side patches if megatron was imported since
        return list(_APPLIED)
    if torch.cuda.is_available() and not force:
        return []
    enable_mcore_cpu_mode(force=True)  # 1: megatron-core's CUDA-only calls
    names = ["otr_megatron.mcore.enable_cpu_mode"]

    from nemo.lightning import megatron_init

    # 2: else the model-parallel RNG tracker is never seeded and weight init fails
    megatron_init._set_random_seed = with_one_cuda_device(megatron_init._set_random_seed)
    names.append("nemo.lightning.megatron_init._set_random_seed(device_count=1)")

    from nemo.collections.llm.gpt.data.mock import MockDataModule

    # 3: NeMo 2.7.3 passes create_attention_mask into `seed`; the local attention needs the mask
    MockDataModule.setup = _mock_setup_by_keyword
    names.append("MockDataModule.setup(create_attention_mask=keyword)")

    from nemo.lightning.pytorch.plugins import data_sampler
    from nemo.lightning.pytorch.strategies import megatron_strategy

    # 4: only these two modules' logged scalars ask for pinned memory, which CPU-only torch lacks
    proxy = _TorchWithoutPinnedTensors()
    for module in (megatron_strategy, data_sampler):
        module.torch = proxy
    names.append("torch.tensor(pin_memory) in MegatronStrategy/MegatronDataSampler")

    from nemo.utils import logging

    logging.info("otr_megatron NeMo CPU mode (no GPU): " + "; ".join(names))
    _APPLIED.extend(names)
    return list(_APPLIED)


def enable_nemo_cpu(force: bool = False) -> list:
    """Deprecated name of `enable_cpu_mode` (the NeMo layer's name before the CPU modes shared one)."""
    warnings.warn("otr_megatron.nemo.cpu.enable_nemo_cpu is deprecated; use enable_cpu_mode", DeprecationWarning,
                  stacklevel=2)
    return enable_cpu_mode(force)
