"""Turn OTR on for an existing Megatron-Core GPTModel, without forking the model.

Decision: per-instance binding of `compute_language_model_loss` (the primary hook)
-------------------------------------------------------------------------------
`enable_otr(model, cfg)` binds an OTR `compute_language_model_loss` on the model *instance*
(after unwrapping DDP / Float16Module / torch DDP). Why this and not the alternatives:

* It exists with the same signature on every megatron-core line we support (0.16 ... 0.19+), and
  `GPTModel._postprocess` (and 0.19's `process_mtp_loss`) look it up on the instance, so the model
  class, its forward signature, checkpoints and `state_dict` keys are untouched: any stock
  `forward_step` (Megatron-LM, Megatron-Bridge, ours) keeps working and keeps the standard
  `(loss_sum, num_tokens, report)` loss contract, because the model still returns a per-token loss.
* The LM head and its SP all-gather/TP layout stay Megatron's; OTR sees the same `[s, b, V/tp]`
  logits that cross entropy sees.
* It is the only hook that also reaches the MTP heads (they call the same method).

`output_processor` (0.18+) is the alternative: it receives the final hidden states and the output
layer, so it can chunk the LM head and never materialize the full `[s, b, V/tp]` logits. It needs
every forward call to pass the processor (i.e. a custom forward_step), it is absent on 0.16/0.17,
MTP still uses `compute_language_model_loss`, and hybrid (Mamba) models do not support it yet.
`make_output_processor` provides it for callers on 0.18+ who want that route; it delegates to the
same per-token OTR computation, so both routes give identical numbers.

The method only receives `(labels, logits)`, so the per-micro-batch context (iteration, loss mask,
global token keys) is stored on the hook by `set_otr_context` before the forward. It is not
consumed by the call: activation recompute re-runs transformer layers, not the loss, and repeated
forwards with the same context give the same samples.

MTP heads default to cross entropy: MTP is an auxiliary densification/speculative-decoding head
whose labels are shifted copies of the main labels; applying OTR there multiplies the sampling cost
per depth and changes a head the paper never studied. `mtp_loss="otr"` opts in (each depth gets its
own random stream: seed offset by depth).

Masked tokens: Megatron's labels are real ids even where `loss_mask == 0`. By default
(`mask_labels=True`) the hook replaces those labels with `ignore_index` before the loss, so the
core loss draws no samples for them and returns exactly 0 there (no NaN/Inf can leak through a
`0 * x` mask product). Megatron's loss function still multiplies by the mask, so the result is
identical to leaving them in.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch

_HOOK_ATTR = "_otr_hook"


def unwrap_model(model, max_depth: int = 16):
    """Strip DDP / Float16Module / torch DDP / NeMo wrappers down to the language module.

    Decides by type, not `hasattr`: NeMo's wrappers forward attribute lookups to `.module`, so the
    wrapper itself seems to have `compute_language_model_loss`.
    """
    start = type(model).__name__
    for _ in range(max_depth + 1):
        if getattr(type(model), "compute_language_model_loss", None) is not None:
            return model
        inner = getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"model: expected a megatron-core LanguageModule (e.g. GPTModel) or a wrapper of one, "
                            f"got {start} (no compute_language_model_loss below it)")
        model = inner
    raise RuntimeError(f"unwrap_model: {start} wraps more than {max_depth} levels without a LanguageModule")


@dataclass
class OTRBatchContext:
    """What the loss needs besides (labels, logits) for one micro-batch, shapes [b, s] like labels."""

    step: int
    token_keys: torch.Tensor
    loss_mask: Optional[torch.Tensor] = None
    # normalization="sequence" only (see training.sequence_weights): 1/length of each token's
    # sequence, and 1 at each sequence's first supervised token (counts it exactly once)
    loss_weights: Optional[torch.Tensor] = None
    sequence_starts: Optional[torch.Tensor] = None


def _default_loss_fn():
    import otr_megatron as otr

    fn = getattr(otr, "vocab_parallel_otr_loss", None)
    if fn is None:
        raise ImportError("otr_megatron.vocab_parallel_otr_loss is not available (core loss missing)")
    return fn


def _tp_group_of(model):
    pgc = getattr(model, "pg_collection", None)
    group = getattr(pgc, "tp", None) if pgc is not None else None
    if group is None:
        from megatron.core import parallel_state as ps

        group = ps.get_tensor_model_parallel_group()
    return group


class OTRLossHook:
    """State of OTR on one model chunk. Created by `enable_otr`; reach it with `get_otr_hook`."""

    def __init__(self, model, cfg, vocab_size: Optional[int], mtp_loss: str, mask_labels: bool,
                 ignore_index: int, loss_fn: Optional[Callable]):
        if mtp_loss not in ("ce", "otr"):
            raise ValueError(f"mtp_loss={mtp_loss!r}: expected 'ce' or 'otr'")
        self.cfg = cfg
        self.mtp_loss = mtp_loss
        self.mask_labels = bool(mask_labels)
        self.ignore_index = int(ignore_index)
        self.loss_fn = loss_fn
        self.padded_vocab_size = int(model.vocab_size)
        if vocab_size is None:
            vocab_size = getattr(model, "otr_real_vocab_size", None)
        if vocab_size is None:
            raise ValueError(
                "vocab_size: the real (unpadded) vocabulary size is required (padded ids must never be "
                "sampled); pass enable_otr(..., vocab_size=tokenizer_vocab_size)"
            )
        if not (0 < int(vocab_size) <= self.padded_vocab_size):
            raise ValueError(f"vocab_size={vocab_size}: expected 1 <= vocab_size <= padded model vocab "
                             f"{self.padded_vocab_size}")
        self.vocab_size = int(vocab_size)
        self.context: Optional[OTRBatchContext] = None
        self.iteration = 0
        self.microbatch = 0
        self.last_stats: Optional[dict] = None
        self._calls = 0
        self._original = type(model).compute_language_model_loss.__get__(model)
        self._handle = None

    # -- per-micro-batch state -------------------------------------------------------------
    def _reset_calls(self, module, args, kwargs=None):
        self._calls = 0

    def pop_stats(self) -> Optional[dict]:
        stats, self.last_stats = self.last_stats, None
        return stats

    def _cfg_for_mtp(self, depth: int):
        cfg = self.cfg
        seed = getattr(cfg, "seed", 0) + 1_000_003 * (depth + 1)
        if dataclasses.is_dataclass(cfg):
            return dataclasses.replace(cfg, seed=seed)
        cfg = copy.copy(cfg)
        cfg.seed = seed
        return cfg

    # -- the bound method ------------------------------------------------------------------
    def compute(self, model, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        n_mtp = int(getattr(model.config, "mtp_num_layers", None) or 0)
        call = self._calls
        self._calls += 1
        is_main = call % (n_mtp + 1) == n_mtp  # MTP depths are computed first, then the main head
        if not is_main and self.mtp_loss == "ce":
            return self._original(labels, logits)
        ctx = self.context
        if ctx is None:
            raise RuntimeError(
                "OTR is enabled on this model but no batch context was set: call "
                "otr_megatron.mcore.set_otr_context(model, step=..., token_keys=...) before the forward "
                "(otr_megatron.mcore.forward_step does it for you)"
            )
        return self.loss_from_logits(model, labels, logits, ctx, mtp_depth=None if is_main else call % (n_mtp + 1))

    def loss_from_logits(self, model, labels, logits, ctx: OTRBatchContext, mtp_depth=None):
        """Per-token OTR loss [b, s] from `labels` [b, s] and this TP rank's logits [s, b, V/tp]."""
        if logits.dim() != 3 or labels.dim() != 2 or tuple(labels.shape) != (logits.size(1), logits.size(0)):
            raise ValueError(f"labels {tuple(labels.shape)} / logits {tuple(logits.shape)}: expected "
                             "labels [b, s] and logits [s, b, V/tp]")
        group = _tp_group_of(model)
        tp = torch.distributed.get_world_size(group) if group is not None else 1
        if logits.size(-1) * tp != self.padded_vocab_size:
            raise ValueError(
                f"logits last dim {logits.size(-1)} x tp {tp} != padded vocab {self.padded_vocab_size}: "
                "the OTR loss needs this rank's vocab shard (parallel_output=True), not gathered logits"
            )
        if tuple(ctx.token_keys.shape) != tuple(labels.shape):
            raise ValueError(f"token_keys {tuple(ctx.token_keys.shape)} does not match labels "
                             f"{tuple(labels.shape)}: the batch context belongs to another micro-batch")
        eff = labels
        if self.mask_labels and ctx.loss_mask is not None and mtp_depth is None:
            if tuple(ctx.loss_mask.shape) != tuple(labels.shape):
                raise ValueError(f"loss_mask {tuple(ctx.loss_mask.shape)} does not match labels "
                                 f"{tuple(labels.shape)}")
            eff = labels.masked_fill(ctx.loss_mask == 0, self.ignore_index)
        cfg = self.cfg if mtp_depth is None else self._cfg_for_mtp(mtp_depth)
        fn = self.loss_fn or _default_loss_fn()
        loss, stats = fn(
            logits, eff.t(), cfg, tp_group=group if tp > 1 else None, step=int(ctx.step),
            vocab_size=self.vocab_size, token_keys=ctx.token_keys.t(), ignore_index=self.ignore_index,
            return_stats=True,
        )
        if mtp_depth is None:
            self.last_stats = {k: v.t().detach() for k, v in stats.items()
                               if torch.is_tensor(v) and v.shape == eff.t().shape}
        return loss.t().contiguous()


def enable_otr(model, cfg, *, vocab_size: Optional[int] = None, mtp_loss: str = "ce",
               mask_labels: bool = True, ignore_index: int = -100,
               loss_fn: Optional[Callable] = None):
    """Make `model` (a GPTModel chunk, possibly wrapped, or a list of chunks) compute OTR.

    cfg: an `otr_megatron.OTRConfig`. vocab_size: the real vocabulary (default: the value the
    builder stored on the model). loss_fn: override of `otr_megatron.vocab_parallel_otr_loss`
    (same signature; the tests pass Megatron's cross entropy). Returns the hook (or list of hooks).
    """
    if isinstance(model, (list, tuple)):
        return [enable_otr(m, cfg, vocab_size=vocab_size, mtp_loss=mtp_loss, mask_labels=mask_labels,
                           ignore_index=ignore_index, loss_fn=loss_fn) for m in model]
    inner = unwrap_model(model)
    hook = OTRLossHook(inner, cfg, vocab_size, mtp_loss, mask_labels, ignore_index, loss_fn)  # validates
    if inner.__dict__.get(_HOOK_ATTR) is not None:
        disable_otr(inner)
    inner.__dict__[_HOOK_ATTR] = hook  # plain attribute: not a submodule, not in state_dict
    inner.compute_language_model_loss = types.MethodType(
        lambda self, labels, logits: hook.compute(self, labels, logits), inner
    )
    hook._handle = inner.register_forward_pre_hook(hook._reset_calls)
    return hook


def disable_otr(model) -> None:
    """Restore Megatron's own `compute_language_model_loss` on `model` (or each chunk)."""
    if isinstance(model, (list, tuple)):
        for m in model:
            disable_otr(m)
        return
    inner = unwrap_model(model)
    hook = inner.__dict__.pop(_HOOK_ATTR, None)
    if hook is not None and hook._handle is not None:
        hook._handle.remove()
    inner.__dict__.pop("compute_language_model_loss", None)


def get_otr_hook(model) -> Optional[OTRLossHook]:
    """The hook `enable_otr` put on `model` (wrappers allowed), or None."""
    return unwrap_model(model).__dict__.get(_HOOK_ATTR)


def set_otr_context(model, *, step: int, token_keys: torch.Tensor,
                    loss_mask: Optional[torch.Tensor] = None, loss_weights: Optional[torch.Tensor] = None,
                    sequence_starts: Optional[torch.Tensor] = None) -> None:
    """Store the micro-batch context the next forward's loss uses (all shapes [b, s] like labels)."""
    hook = get_otr_hook(model)
    if hook is None:
        raise RuntimeError("set_otr_context: OTR is not enabled on this model; call enable_otr first")
    if not torch.is_tensor(token_keys) or token_keys.dtype != torch.int64 or token_keys.dim() != 2:
        raise ValueError(f"token_keys: expected an int64 tensor [b, s], got "
                         f"{getattr(token_keys, 'dtype', type(token_keys))} "
                         f"{tuple(getattr(token_keys, 'shape', ()))}")
    if int(step) < 0:
        raise ValueError(f"step={step}: expected a non-negative iteration number")
    for name, t in (("loss_weights", loss_weights), ("sequence_starts", sequence_starts)):
        if t is not None and tuple(t.shape) != tuple(token_keys.shape):
            raise ValueError(f"{name} {tuple(t.shape)} must have the token_keys shape {tuple(token_keys.shape)}")
    hook.context = OTRBatchContext(step=int(step), token_keys=token_keys, loss_mask=loss_mask,
                                   loss_weights=loss_weights, sequence_starts=sequence_starts)


def set_iteration(model, iteration: int) -> None:
    """Tell every chunk's hook the training iteration (the `step` of the random stream)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for m in chunks:
        hook = get_otr_hook(m)
        if hook is not None:
            hook.iteration = int(iteration)
            hook.microbatch = 0


# ----------------------------------------------------------------------------------------------
# Global token keys
# ----------------------------------------------------------------------------------------------

def token_keys_from_sample_ids(sample_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """`key[i, t] = sample_ids[i] * seq_len + t` for the FULL (pre-CP-split) row of length seq_len.

    Keys then depend only on which sample and which row offset a token is, never on DP/CP/TP/PP
    layout or micro-batching. Packed rows: `t` is the flat offset in the packed row (position ids
    restart per packed sequence and would collide), which is what this uses.
    """
    if not torch.is_tensor(sample_ids) or sample_ids.dim() != 1:
        raise ValueError(f"sample_ids: expected a 1-D int64 tensor [b], got {getattr(sample_ids, 'shape', sample_ids)}")
    if int(seq_len) <= 0:
        raise ValueError(f"seq_len={seq_len}: expected a positive sequence length")
    sid = sample_ids.to(torch.int64)
    if sid.numel() and int(sid.min()) < 0:
        raise ValueError(f"sample_ids: expected non-negative ids, got min {int(sid.min())}")
    if sid.numel() and int(sid.max()) >= (2**62) // int(seq_len):
        raise ValueError(f"sample_ids: max id {int(sid.max())} x seq_len {seq_len} overflows int64 keys")
    return sid[:, None] * int(seq_len) + torch.arange(int(seq_len), dtype=torch.int64, device=sid.device)[None, :]


def fallback_sample_ids(batch_size: int, *, dp_rank: int, dp_size: int, microbatch: int) -> torch.Tensor:
    """Per-step-unique sample ids when the data carries none: (micro-batch, DP rank, row).

    Unique within an iteration (the iteration itself is the loss's `step`), distinct across DP
    replicas; NOT layout-invariant (they change with DP size / micro-batch size).
    """
    base = (int(microbatch) * int(dp_size) + int(dp_rank)) * int(batch_size)
    return base + torch.arange(int(batch_size), dtype=torch.int64)


def cp_zigzag_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions held by CP rank `cp_rank` under Megatron's zigzag split (chunks r, 2cp-1-r)."""
    if cp_size < 1 or not (0 <= cp_rank < cp_size):
        raise ValueError(f"cp_rank={cp_rank}, cp_size={cp_size}: expected 0 <= cp_rank < cp_size")
    if seq_len % (2 * cp_size):
        raise ValueError(f"seq_len={seq_len}: must be divisible by 2 * cp_size = {2 * cp_size}")
    if cp_size == 1:
        return torch.arange(seq_len, dtype=torch.int64)
    c = seq_len // (2 * cp_size)
    a = torch.arange(cp_rank * c, (cp_rank + 1) * c)
    j = 2 * cp_size - 1 - cp_rank
    b = torch.arange(j * c, (j + 1) * c)
    return torch.cat([a, b]).to(torch.int64)


def slice_batch_for_cp(batch: dict, cp_size: int, cp_rank: int, seq_len: Optional[int] = None) -> dict:
    """Zigzag-slice every [b, s] tensor (and a [b, 1, s, s] attention mask on dim 2) for one CP rank."""
    if cp_size == 1:
        return dict(batch)
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() >= 2 and (seq_len is None or v.size(1 if v.dim() == 2 else 2) == seq_len):
            dim = 2 if (k == "attention_mask" and v.dim() == 4) else 1
            idx = cp_zigzag_positions(v.size(dim), cp_size, cp_rank).to(v.device)
            out[k] = v.index_select(dim, idx)
        else:
            out[k] = v
    return out


def output_processor_supported() -> bool:
    """True when this megatron-core's GPTModel.forward takes `output_processor` (0.18+)."""
    import inspect

    from megatron.core.models.gpt import GPTModel

    return "output_processor" in inspect.signature(GPTModel.forward).parameters


def make_output_processor(model):
    """An `output_processor` (megatron-core 0.18+) computing the same OTR loss as the bound hook.

    Use: `model(tokens, pos, mask, labels=labels, output_processor=make_output_processor(model))`.
    It runs Megatron's output layer (and logit scaling) itself, then the OTR loss on the
    `[s, b, V/tp]` shard with the context set by `set_otr_context`. It is the starting point for a
    chunked LM head; today it only proves the route equivalent to `compute_language_model_loss`.
    """
    if not output_processor_supported():
        raise RuntimeError("output_processor needs megatron-core >= 0.18; use enable_otr's bound "
                           "compute_language_model_loss instead (works on 0.16+)")
    inner = unwrap_model(model)
    hook = get_otr_hook(inner)
    if hook is None:
        raise RuntimeError("make_output_processor: call enable_otr(model, cfg) first")

    def processor(*, hidden_states, output_layer, output_weight, labels, runtime_gather_output=None,
                  scale_logits=None, **unused):
        logits, _ = output_layer(hidden_states, weight=output_weight,
                                 runtime_gather_output=runtime_gather_output)
        if scale_logits is not None:
            logits = scale_logits(logits)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        if hook.context is None:
            raise RuntimeError("output_processor: no batch context; call set_otr_context first")
        return hook.loss_from_logits(inner, labels, logits, hook.context)

    return processor
