"""Megatron-Core integration: OTR on a stock GPTModel, the training contract, a CPU backend.

Importing this package does not import megatron-core; the submodules import it when used.

- `enable_otr(model, cfg, vocab_size=...)` / `disable_otr` / `get_otr_hook`   (hook.py)
- `set_otr_context`, `set_iteration`, token-key and CP zigzag helpers          (hook.py)
- `forward_step`, `loss_func`, `prepare_batch`                                 (training.py)
- `build_gpt_model`, `build_model_chunks`, `GPTBuildConfig`, `layout_invariant_init_` (model.py)
- `enable_cpu_backend`                                                         (cpu_backend.py)
"""

from otr_megatron.mcore.cpu_backend import SPTorchNorm, cpu_backend_enabled, enable_cpu_backend
from otr_megatron.mcore.hook import (
    OTRBatchContext,
    OTRLossHook,
    cp_zigzag_positions,
    disable_otr,
    enable_otr,
    fallback_sample_ids,
    get_otr_hook,
    make_output_processor,
    output_processor_supported,
    set_iteration,
    set_otr_context,
    slice_batch_for_cp,
    token_keys_from_sample_ids,
    unwrap_model,
)
from otr_megatron.mcore.model import (
    GPTBuildConfig,
    build_gpt_model,
    build_model_chunks,
    layout_invariant_init_,
    make_transformer_config,
    te_available,
)
from otr_megatron.mcore.training import forward_step, loss_func, prepare_batch

__all__ = [
    "GPTBuildConfig", "OTRBatchContext", "OTRLossHook", "SPTorchNorm", "build_gpt_model",
    "build_model_chunks", "cp_zigzag_positions", "cpu_backend_enabled", "disable_otr", "enable_cpu_backend",
    "enable_otr", "fallback_sample_ids", "forward_step", "get_otr_hook", "layout_invariant_init_",
    "loss_func", "make_output_processor", "make_transformer_config", "output_processor_supported", "prepare_batch", "set_iteration",
    "set_otr_context", "slice_batch_for_cp", "te_available", "token_keys_from_sample_ids", "unwrap_model",
]
