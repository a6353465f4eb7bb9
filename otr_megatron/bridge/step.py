"""OTR forward step for Megatron-Bridge `finetune` / `pretrain`.

Bridge has no loss registry: a custom loss means a custom forward-step function. This one keeps
Bridge's own step (`megatron.bridge.training.gpt_step.forward_step`: batch fetching, CP slicing,
packed sequences, FLOPs accounting, NaN checks) and only adds what OTR needs:

1. on the first call, `otr_megatron.mcore.enable_otr` on the model chunk, so the stock GPTModel's
   `compute_language_model_loss` returns the per-token OTR loss instead of cross entropy;
2. before each micro-batch's forward, the OTR context (iteration, global token keys, loss mask) for
   exactly the tokens this rank holds, set by `prepare_batch` from the batch as it leaves the data
   iterator and sliced for context parallelism the way Megatron slices it (zigzag);
3. a loss function that returns Bridge's contract `(loss_sum, num_tokens, report)` from Bridge's
   own loss function, with the OTR reports (`otr_megatron.mcore.metrics.OTR_REPORTS`: "lm loss" the
   label cross entropy, "otr loss" Bridge's loss sum, hit rate, mean reward) as `[sum, count]`
   pairs, which Bridge's `train_step` sums over micro-batches, all-reduces over DP x CP and logs.

The signature `(state, data_iterator, model, return_schedule_plan=False)` is one of those Bridge
accepts; the first parameter is named `state` so Bridge injects its GlobalState.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch


class _PeekIterator:
    """Data iterator proxy: hands each batch to `on_batch` before Bridge's step consumes it."""

    def __init__(self, inner: Iterator, on_batch: Callable[[Any], None]):
        self._inner = inner
        self._on_batch = on_batch

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._inner)
        self._on_batch(batch)
        return batch


def _bridge_gpt_forward_step():
    try:
        from megatron.bridge.training.gpt_step import forward_step
    except ImportError as exc:
        raise ImportError(
            "the OTR Bridge step wraps megatron.bridge.training.gpt_step.forward_step, which could not be "
            f"imported ({exc}); run inside a NeMo Framework container with Bridge 0.6 (26.08) or, on any "
            "machine, `MCORE=0.19.2 BRIDGE=0.6.2 bash scripts/setup_env.sh` (then `otr-megatron bridge` applies "
            "its CPU mode without a GPU)"
        ) from exc
    return forward_step


def _iteration(state) -> int:
    ts = getattr(state, "train_state", None)
    step = getattr(ts, "step", None)
    if step is None:
        raise AttributeError("state.train_state.step: expected Megatron-Bridge's GlobalState as `state`")
    return int(step)


class OTRForwardStep:
    """Forward-step functor for `megatron.bridge.training.finetune/pretrain` with OTR as the loss.

    otr_config: an `otr_megatron.OTRConfig`.
    vocab_size: the real (unpadded) vocabulary size; default `state.cfg.model.vocab_size`.
    base_forward_step: the wrapped step (default Bridge's `gpt_step.forward_step`); any callable
        `(state, data_iterator, model, return_schedule_plan)` returning `(output, loss_fn)` where
        `loss_fn(output)` follows the 3-tuple contract.
    """

    def __init__(self, otr_config, vocab_size: Optional[int] = None, base_forward_step: Optional[Callable] = None,
                 **enable_kwargs: Any):
        self.otr_config = otr_config
        self.vocab_size = vocab_size
        self._base = base_forward_step
        self._enable_kwargs = enable_kwargs
        self._enabled: set[int] = set()

    def _ensure_enabled(self, state, model) -> None:
        from otr_megatron.mcore import enable_otr, get_otr_hook, unwrap_model

        inner = unwrap_model(model)
        if id(inner) in self._enabled and get_otr_hook(inner) is not None:
            return
        vocab = self.vocab_size
        if vocab is None:
            vocab = getattr(getattr(getattr(state, "cfg", None), "model", None), "vocab_size", None)
        if vocab is None:
            raise ValueError(
                "OTRForwardStep: the real vocabulary size is unknown; set state.cfg.model.vocab_size or pass "
                "OTRForwardStep(..., vocab_size=N) (`otr-megatron bridge --vocab-size N`)"
            )
        enable_otr(inner, self.otr_config, vocab_size=int(vocab), **self._enable_kwargs)
        self._enabled.add(id(inner))

    def __call__(self, state, data_iterator, model, return_schedule_plan: bool = False):
        from otr_megatron.mcore import get_otr_hook, pop_otr_stats
        from otr_megatron.mcore.training import prepare_batch

        if return_schedule_plan:
            raise NotImplementedError(
                "OTRForwardStep: return_schedule_plan=True (MoE expert-parallel comm overlap) runs the forward "
                "later, outside this step, so the per-micro-batch OTR context cannot be attached; set "
                "model.overlap_moe_expert_parallel_comm=false"
            )
        self._ensure_enabled(state, model)
        it = _iteration(state)
        prepared: list = []

        def on_batch(batch):
            if not isinstance(batch, dict):
                raise TypeError(f"OTRForwardStep: expected dict batches from the data iterator, got {type(batch).__name__}")
            if ("cu_seqlens" in batch or "cu_seqlens_q" in batch) and _cp_size() > 1:
                raise NotImplementedError(
                    "OTRForwardStep: packed sequences (THD) with context parallelism slice tokens differently from "
                    "the zigzag split; use context_parallel_size=1 or unpacked data"
                )
            prepared.append(prepare_batch(batch, model, step=it))

        base = self._base or _bridge_gpt_forward_step()
        wrapped = _PeekIterator(data_iterator, on_batch) if data_iterator is not None else None
        if getattr(self.otr_config, "normalization", "token") == "sequence":
            from otr_megatron.mcore.training import check_sequence_normalization

            check_sequence_normalization(model)
        output, bridge_loss_fn = base(state, wrapped, model, return_schedule_plan)
        stats = pop_otr_stats(model)
        b = prepared[-1] if prepared else {}
        num_samples = int(getattr(get_otr_hook(model).cfg, "num_samples", 0)) or None
        return output, partial(_otr_loss, bridge_loss_fn, b.get("loss_mask"), stats, num_samples,
                               (b.get("otr_loss_weights"), b.get("otr_sequence_starts")))


def _cp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_world_size()


def _otr_loss(bridge_loss_fn, loss_mask, stats, num_samples, sequence, output_tensor):
    """Bridge's loss contract with the OTR reports (`mcore.metrics.OTR_REPORTS`) as [sum, count] entries.

    Bridge's loss sum and count are kept and reported as "otr loss"; "lm loss" becomes the label
    cross entropy. sequence: (loss_weights, sequence_starts) for normalization="sequence", else
    (None, None); then the loss sum and count are per sequence instead of Bridge's per token.
    """
    from otr_megatron.mcore.metrics import otr_report
    from otr_megatron.mcore.training import loss_func

    result = bridge_loss_fn(output_tensor)
    if not (isinstance(result, tuple) and len(result) == 3):
        raise TypeError(
            "OTRForwardStep: the wrapped Bridge loss function must return (loss_sum, num_tokens, report); got "
            f"{type(result).__name__} of length {len(result) if isinstance(result, tuple) else '?'}"
        )
    loss_sum, num_tokens, report = result
    weights, starts = (t.to(output_tensor.device) if t is not None else None for t in sequence)
    if loss_mask is not None:  # prepared before Bridge's get_batch moved the batch to the GPU
        loss_mask = loss_mask.to(output_tensor.device)
    if loss_mask is None or tuple(loss_mask.shape) != tuple(output_tensor.shape):
        if weights is not None:
            raise ValueError(
                f"OTRForwardStep: normalization='sequence' needs the micro-batch loss mask shaped like the output "
                f"{tuple(output_tensor.shape)}, got {None if loss_mask is None else tuple(loss_mask.shape)}")
        return loss_sum, num_tokens, report
    if weights is not None:
        loss_sum, num_tokens, ours = loss_func(loss_mask, output_tensor, stats=stats, num_samples=num_samples,
                                               check_finite=False, loss_weights=weights, sequence_starts=starts)
    else:
        ours = otr_report(loss_mask, loss_sum, num_tokens, stats, num_samples)
    device = report["lm loss"].device if "lm loss" in report else output_tensor.device
    if torch.is_tensor(num_tokens):
        num_tokens = num_tokens.to(device)
    return loss_sum, num_tokens, {**report, **{k: v.to(device) for k, v in ours.items()}}
