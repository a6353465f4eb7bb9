"""Turn OTR on for an existing Megatron-Core GPTModel, without forking the model.

Decision: per-instance binding of `compute_language_model_loss` (the primary hook)
-------------------------------------------------------------------------------
`enable_otr(model, cfg)` binds an OTR `compute_language_model_loss` on the model *instance*
(after unwrapping DDP / Float16Module / torch DDP). Why this and not the alternatives:

* It exists with the same signature on every megatron-core line we support (0.15 ... 0.19+), and
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

The method only receives `(labels, logits)`, so the per-micro-batch context (an `OTRBatchContext`:
iteration, global token keys, loss mask) goes in through one call, `set_otr_context(model, ctx)`,
before the forward, and the per-token stats come out through one call, `pop_otr_stats(model)`,
after it. The context is not consumed by the forward: activation recompute re-runs transformer
layers, not the loss, and repeated forwards with the same context give the same samples.

MTP heads default to cross entropy: MTP is an auxiliary densification/speculative-decoding head
whose labels are shifted copies of the main labels; applying OTR there multiplies the sampling cost
per depth and changes a head the paper never studied. `mtp_loss="otr"` opts in (each depth gets its
own random stream: seed offset by depth).

Fused output layer (`OTRConfig.fuse_output_layer=True`): the logits are never materialised. The
seam is the same on every line (0.15 ... 0.19+): the output layer's `forward` is bound per instance
(as `compute_language_model_loss` is) so that, in a forward that has labels, it returns a
`DeferredLogits` (its input hidden states, the weight it would use, and whether it would gather the
sequence) instead of logits; `compute_language_model_loss` then receives that object and computes
`vocab_parallel_linear_otr_loss`. This is what Megatron's own `LinearCrossEntropyModule` achieves by
replacing the output layer, without a new module (checkpoints and `state_dict` keys are untouched).
It reaches the MTP heads (they call the same output layer and the same loss method: with
`mtp_loss="ce"` they get Megatron's cross entropy through the fused path: the "sft" estimator over
the padded vocabulary, as `vocab_parallel_cross_entropy` computes it), except on megatron-core
0.19+, whose MTP code reads the heads' logits itself (an argmax for its acceptance metric): there
the MTP heads keep materialised logits and only the main head is fused; tied
embeddings (the weight passed in is `shared_embedding_or_output_weight()`, so the gradient reaches the
shared parameter), the last pipeline stage only (other stages have no output layer) and sequence
parallelism (the fused loss all-gathers the hidden states and reduce-scatters their gradient, as
`ColumnParallelLinear` does). A forward without labels (generation, logits for evaluation) gets real
logits from Megatron's own forward. On 0.18+ `make_output_processor` takes the fused route too.

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

from otr_megatron.core.linear_loss import vocab_parallel_linear_otr_loss
from otr_megatron.core.loss import vocab_parallel_otr_loss

_HOOK_ATTR = "_otr_hook"


@dataclass(frozen=True, eq=False)
class DeferredLogits:
    """What the fused output layer returns in place of logits: the loss computes them chunk by chunk.
    Not a tensor on purpose: code that would read the logits fails loudly instead of silently."""

    hidden: torch.Tensor  # the output layer's input [s or s/tp, b, d]
    weight: torch.Tensor  # this rank's [V/tp, d] (the shared embedding weight when tied)
    sequence_parallel: bool  # the output layer would all-gather the sequence first


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


@dataclass(frozen=True, eq=False)  # eq would compare tensors
class OTRBatchContext:
    """What the loss needs besides (labels, logits) for one micro-batch; tensors [b, s] like labels.

    Built per micro-batch (`training.prepare_batch` does it) and handed to the hook by
    `set_otr_context`, the only way in.
    """

    step: int
    token_keys: torch.Tensor  # int64 global keys (`keys.token_keys`)
    loss_mask: Optional[torch.Tensor] = None
    # normalization="sequence" only (see training.sequence_weights): 1/length of each token's
    # sequence, and 1 at each sequence's first supervised token (counts it exactly once)
    loss_weights: Optional[torch.Tensor] = None
    sequence_starts: Optional[torch.Tensor] = None

    def __post_init__(self):
        keys = self.token_keys
        if not torch.is_tensor(keys) or keys.dtype != torch.int64 or keys.dim() != 2:
            raise ValueError(f"token_keys: expected an int64 tensor [b, s], got "
                             f"{getattr(keys, 'dtype', type(keys).__name__)} {tuple(getattr(keys, 'shape', ()))}")
        if int(self.step) < 0:
            raise ValueError(f"step={self.step}: expected a non-negative iteration number")
        object.__setattr__(self, "step", int(self.step))
        if (self.loss_weights is None) != (self.sequence_starts is None):
            raise ValueError("loss_weights and sequence_starts go together (both from training.sequence_weights)")
        for name in ("loss_mask", "loss_weights", "sequence_starts"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != tuple(keys.shape):
                raise ValueError(f"{name} {tuple(t.shape)} must have the token_keys shape {tuple(keys.shape)}")

    def to(self, device) -> "OTRBatchContext":
        """The same context on `device` (a Bridge batch is prepared before `get_batch` moves it to the GPU)."""
        def move(t):
            return t.to(device, non_blocking=True) if t is not None else None

        return OTRBatchContext(self.step, move(self.token_keys), move(self.loss_mask), move(self.loss_weights),
                               move(self.sequence_starts))


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
        self.iteration = 0  # default `step` for batches that carry none (`set_iteration`)
        self.context: Optional[OTRBatchContext] = None  # set only by `set_context`
        self._context_step: Optional[int] = None
        self._contexts_at_step = 0  # micro-batches seen at `_context_step` (fallback sample ids)
        self._stats: Optional[dict] = None  # main head's per-token stats of the current context
        self._calls = 0
        self._original = type(model).compute_language_model_loss.__get__(model)
        self._handle = None
        self.fused = bool(getattr(cfg, "fuse_output_layer", False))
        self._with_labels = False  # the current forward has labels (the fused output layer defers)
        self._layer_calls = 0  # output-layer calls in the current forward (MTP depths first, then the main head)
        if self.fused:
            _check_fusable(model, loss_fn)

    def _forward_starts(self, module, args, kwargs):
        self._calls = 0
        self._layer_calls = 0
        # GPTModel.forward(input_ids, position_ids, attention_mask, decoder_input, labels, inference_context, ...)
        labels = kwargs.get("labels", args[4] if len(args) > 4 else None)
        inference = kwargs.get("inference_context", args[5] if len(args) > 5 else None)
        self._with_labels = labels is not None and inference is None and kwargs.get("inference_params") is None

    def output_layer_forward(self, layer, original):
        """The fused output layer's forward: deferred logits when a loss follows, else Megatron's.
        MTP heads (called first, one per depth) keep real logits where megatron-core reads them
        itself (0.19+: its MTP acceptance metric takes an argmax over them)."""
        n_mtp = int(getattr(getattr(layer, "config", None), "mtp_num_layers", None) or 0)
        mtp_reads_logits = _mtp_reads_logits()

        def forward(input_, weight=None, runtime_gather_output=None, **kwargs):
            call = self._layer_calls
            self._layer_calls += 1
            is_mtp = call % (n_mtp + 1) != n_mtp
            if not self._with_labels or runtime_gather_output or kwargs or (is_mtp and mtp_reads_logits):
                return original(input_, weight=weight, runtime_gather_output=runtime_gather_output, **kwargs)
            w = layer.weight if weight is None else weight
            return DeferredLogits(input_, w, bool(layer.sequence_parallel)), None

        return forward

    # -- per-micro-batch state: in through set_context, out through pop_stats -----------------
    def set_context(self, ctx: OTRBatchContext) -> None:
        """Use `ctx` for the following forwards (it is not consumed: recompute re-runs layers, not
        the loss, and repeated forwards with one context draw the same samples)."""
        if not isinstance(ctx, OTRBatchContext):
            raise TypeError(f"ctx: expected an OTRBatchContext, got {type(ctx).__name__}")
        self._contexts_at_step = self.microbatch_index(ctx.step) + 1
        self._context_step = ctx.step
        self.context = ctx
        self._stats = None

    def microbatch_index(self, step: int) -> int:
        """How many micro-batch contexts iteration `step` has had so far (the next one's index)."""
        return self._contexts_at_step if step == self._context_step else 0

    def pop_stats(self) -> Optional[dict]:
        """The main head's per-token stats [b, s] of the last forward under the current context."""
        stats, self._stats = self._stats, None
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
            if isinstance(logits, DeferredLogits):  # Megatron's cross entropy, through the fused path
                return self.loss_from_logits(model, labels, logits, mtp_depth=call % (n_mtp + 1), megatron_ce=True)
            return self._original(labels, logits)
        return self.loss_from_logits(model, labels, logits, mtp_depth=None if is_main else call % (n_mtp + 1))

    def loss_from_logits(self, model, labels, logits, mtp_depth=None, megatron_ce=False):
        """Per-token OTR loss [b, s] from `labels` [b, s] and this TP rank's logits [s, b, V/tp] (or the
        fused output layer's `DeferredLogits`). ``megatron_ce``: Megatron's cross entropy instead (the
        "sft" estimator over the padded vocabulary, as `vocab_parallel_cross_entropy` computes it)."""
        ctx = self.context
        if ctx is None:
            raise RuntimeError(
                "OTR is enabled on this model but no batch context was set: call "
                "otr_megatron.mcore.set_otr_context(model, OTRBatchContext(step=..., token_keys=...)) before "
                "the forward (otr_megatron.mcore.forward_step / prepare_batch do it for you)"
            )
        group = _tp_group_of(model)
        tp = torch.distributed.get_world_size(group) if group is not None else 1
        deferred = isinstance(logits, DeferredLogits)
        if deferred:
            seq = logits.hidden.size(0) * (tp if logits.sequence_parallel else 1) if logits.hidden.dim() == 3 else -1
            if labels.dim() != 2 or tuple(labels.shape) != (logits.hidden.size(1), seq):
                raise ValueError(f"labels {tuple(labels.shape)} / output-layer input {tuple(logits.hidden.shape)}"
                                 f"{' (sequence parallel, tp=%d)' % tp if logits.sequence_parallel else ''}: expected "
                                 "labels [b, s] and hidden states [s, b, d] ([s/tp, b, d] with sequence parallelism)")
            shard = logits.weight.size(0)
        else:
            if logits.dim() != 3 or labels.dim() != 2 or tuple(labels.shape) != (logits.size(1), logits.size(0)):
                raise ValueError(f"labels {tuple(labels.shape)} / logits {tuple(logits.shape)}: expected "
                                 "labels [b, s] and logits [s, b, V/tp]")
            shard = logits.size(-1)
        if shard * tp != self.padded_vocab_size:
            what = "output-layer weight rows" if deferred else "logits last dim"
            raise ValueError(
                f"{what} {shard} x tp {tp} != padded vocab {self.padded_vocab_size}: "
                "the OTR loss needs this rank's vocab shard (parallel_output=True), not gathered logits"
            )
        if tuple(ctx.token_keys.shape) != tuple(labels.shape):
            raise ValueError(f"token_keys {tuple(ctx.token_keys.shape)} does not match labels "
                             f"{tuple(labels.shape)}: the batch context belongs to another micro-batch")
        if ctx.token_keys.device != labels.device:
            ctx = ctx.to(labels.device)
        eff = labels
        if self.mask_labels and ctx.loss_mask is not None and mtp_depth is None:
            if tuple(ctx.loss_mask.shape) != tuple(labels.shape):
                raise ValueError(f"loss_mask {tuple(ctx.loss_mask.shape)} does not match labels "
                                 f"{tuple(labels.shape)}")
            eff = labels.masked_fill(ctx.loss_mask == 0, self.ignore_index)
        cfg = self.cfg if mtp_depth is None else self._cfg_for_mtp(mtp_depth)
        if megatron_ce:
            cfg = dataclasses.replace(cfg, estimator="sft")
        common = dict(tp_group=group if tp > 1 else None, step=int(ctx.step),
                      vocab_size=self.padded_vocab_size if megatron_ce else self.vocab_size,
                      token_keys=ctx.token_keys.t(), ignore_index=self.ignore_index, return_stats=True)
        if deferred:
            loss, stats = vocab_parallel_linear_otr_loss(
                logits.hidden, logits.weight, eff.t(), cfg, sequence_parallel=logits.sequence_parallel and tp > 1,
                **common)
        else:
            loss, stats = (self.loss_fn or vocab_parallel_otr_loss)(logits, eff.t(), cfg, **common)
        if mtp_depth is None:
            self._stats = {k: v.t().detach() for k, v in stats.items()
                               if torch.is_tensor(v) and v.shape == eff.t().shape}
        return loss.t().contiguous()


def _mtp_reads_logits() -> bool:
    """megatron-core computes an MTP metric from the MTP heads' logits (0.19+: acceptance counts)."""
    try:
        from megatron.core.transformer import multi_token_prediction as mtp
    except ImportError:
        return False
    return hasattr(mtp, "_compute_mtp_acceptance_counts")


def _check_fusable(model, loss_fn) -> None:
    """Refuse the output-layer settings the fused loss cannot reproduce (never a silently different loss)."""
    if loss_fn is not None:
        raise ValueError("fuse_output_layer=True computes the OTR loss itself; it cannot take loss_fn")
    if not getattr(model, "post_process", True):
        return  # not the last pipeline stage: no output layer, nothing to fuse
    layer = getattr(model, "output_layer", None)
    if layer is None or not hasattr(layer, "sequence_parallel"):
        raise ValueError(f"fuse_output_layer=True needs Megatron's ColumnParallelLinear output layer; "
                         f"{type(model).__name__}.output_layer is {type(layer).__name__}")
    if getattr(layer, "bias", None) is not None and not getattr(layer, "skip_bias_add", False):
        raise ValueError("fuse_output_layer=True: the output layer has a bias; the fused loss computes "
                         "hidden @ weight.T only (set otr.fuse_output_layer=false)")
    if getattr(layer, "gather_output", False):
        raise ValueError("fuse_output_layer=True: the output layer gathers its output (gather_output=True / "
                         "parallel_output=False); the OTR loss needs the vocab-parallel shard")
    config = getattr(model, "config", None)
    for name, why in (("use_mup", "MuP scales the logits after the output layer"),
                      ("defer_embedding_wgrad_compute", "the output layer's weight gradient is deferred")):
        if getattr(config, name, False):
            raise ValueError(f"fuse_output_layer=True is not supported with {name}=True ({why}); set "
                             "otr.fuse_output_layer=false")


def enable_otr(model, cfg, *, vocab_size: Optional[int] = None, mtp_loss: str = "ce",
               mask_labels: bool = True, ignore_index: int = -100,
               loss_fn: Optional[Callable] = None):
    """Make `model` (a GPTModel chunk, possibly wrapped, or a list of chunks) compute OTR.

    cfg: an `otr_megatron.OTRConfig`. vocab_size: the real vocabulary (default: the value the
    builder stored on the model). loss_fn: override of `otr_megatron.core.loss.vocab_parallel_otr_loss`
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
    hook._handle = inner.register_forward_pre_hook(hook._forward_starts, with_kwargs=True)
    layer = getattr(inner, "output_layer", None)
    if hook.fused and getattr(inner, "post_process", True) and layer is not None:
        layer.forward = hook.output_layer_forward(layer, type(layer).forward.__get__(layer))
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
    layer = getattr(inner, "output_layer", None)
    if layer is not None:
        layer.__dict__.pop("forward", None)


def get_otr_hook(model) -> Optional[OTRLossHook]:
    """The hook `enable_otr` put on `model` (wrappers allowed), or None."""
    return unwrap_model(model).__dict__.get(_HOOK_ATTR)


def set_otr_context(model, ctx: OTRBatchContext) -> None:
    """Hand the next forward's loss its micro-batch context (the hook's only way in)."""
    hook = get_otr_hook(model)
    if hook is None:
        raise RuntimeError("set_otr_context: OTR is not enabled on this model; call enable_otr first")
    hook.set_context(ctx)


def pop_otr_stats(model) -> Optional[dict]:
    """The per-token stats [b, s] of the last forward (main head), once; None without OTR."""
    hook = get_otr_hook(model)
    return hook.pop_stats() if hook is not None else None


def set_iteration(model, iteration: int) -> None:
    """Tell every chunk's hook the training iteration: the `step` of batches that carry none."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for m in chunks:
        hook = get_otr_hook(m)
        if hook is not None:
            hook.iteration = int(iteration)


def output_processor_supported() -> bool:
    """True when this megatron-core's GPTModel.forward takes `output_processor` (0.18+)."""
    import inspect

    from megatron.core.models.gpt import GPTModel

    return "output_processor" in inspect.signature(GPTModel.forward).parameters


def make_output_processor(model):
    """An `output_processor` (megatron-core 0.18+) computing the same OTR loss as the bound hook.

    Use: `model(tokens, pos, mask, labels=labels, output_processor=make_output_processor(model))`.
    It runs Megatron's output layer (and logit scaling) itself, then the OTR loss on the
    `[s, b, V/tp]` shard with the context set by `set_otr_context`; with `fuse_output_layer=True` it
    computes the output layer and the loss together (`vocab_parallel_linear_otr_loss`) instead.
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
        if hook.fused and labels is not None:
            weight = output_layer.weight if output_weight is None else output_weight
            return hook.loss_from_logits(inner, labels,
                                         DeferredLogits(hidden_states, weight, bool(output_layer.sequence_parallel)))
        logits, _ = output_layer(hidden_states, weight=output_weight,
                                 runtime_gather_output=runtime_gather_output)
        if scale_logits is not None:
            logits = scale_logits(logits)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return hook.loss_from_logits(inner, labels, logits)

    return processor
