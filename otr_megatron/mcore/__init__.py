"""Megatron-Core integration: OTR on a stock GPTModel, the training contract, a CPU backend.

Importing this package does not import megatron-core; the submodules import it when used.

- `enable_otr(model, cfg, vocab_size=...)` / `disable_otr` / `get_otr_hook` / `unwrap_model`  (hook.py)
- per micro-batch: `set_otr_context(model, OTRBatchContext(...))` in, `pop_otr_stats(model)` out;
  `set_iteration` (the step of batches that carry none)                           (hook.py)
- `token_keys`, the one token-key formula, and `cp_zigzag_positions`              (keys.py)
- `OTR_REPORTS`, the one table of reports; `reduce_reports`                       (metrics.py)
- `forward_step`, `loss_func`, `prepare_batch`, `slice_batch_for_cp`              (training.py)
- `build_gpt_model`, `build_model_chunks`, `GPTBuildConfig`, `layout_invariant_init_` (model.py)
- `enable_cpu_mode` / `cpu_mode_enabled` (deprecated old names: `enable_cpu_backend`,
  `cpu_backend_enabled`)                                                          (cpu_backend.py)
"""

from otr_megatron.mcore.cpu_backend import (
    SPTorchNorm,
    cpu_backend_enabled,
    cpu_mode_enabled,
    enable_cpu_backend,
    enable_cpu_mode,
)
from otr_megatron.mcore.hook import (
    OTRBatchContext,
    OTRLossHook,
    disable_otr,
    enable_otr,
    get_otr_hook,
    make_output_processor,
    output_processor_supported,
    pop_otr_stats,
    set_iteration,
    set_otr_context,
    unwrap_model,
)
from otr_megatron.mcore.keys import batch_token_keys, cp_zigzag_positions, fallback_sample_ids, token_keys
from otr_megatron.mcore.metrics import (
    NEGATIVE_REPORTS,
    OTR_REPORTS,
    REPORT_NAMES,
    Report,
    otr_report,
    reduce_reports,
    report_means,
)
from otr_megatron.mcore.model import (
    GPTBuildConfig,
    build_gpt_model,
    build_model_chunks,
    layout_invariant_init_,
    make_transformer_config,
    te_available,
)
from otr_megatron.mcore.training import forward_step, loss_func, prepare_batch, slice_batch_for_cp

__all__ = [
    "GPTBuildConfig", "NEGATIVE_REPORTS", "OTRBatchContext", "OTRLossHook", "OTR_REPORTS", "REPORT_NAMES",
    "Report", "SPTorchNorm", "batch_token_keys", "build_gpt_model", "build_model_chunks", "cp_zigzag_positions",
    "cpu_backend_enabled", "cpu_mode_enabled", "disable_otr", "enable_cpu_backend", "enable_cpu_mode",
    "enable_otr", "fallback_sample_ids",
    "forward_step", "get_otr_hook", "layout_invariant_init_", "loss_func", "make_output_processor",
    "make_transformer_config", "otr_report", "output_processor_supported", "pop_otr_stats", "prepare_batch",
    "reduce_reports", "report_means", "set_iteration", "set_otr_context", "slice_batch_for_cp", "te_available",
    "token_keys", "unwrap_model",
]
