"""OTR fused into the output layer: the ``[tokens, V/tp]`` logits exist one chunk at a time.

`vocab_parallel_linear_otr_loss(hidden, weight, labels, cfg)` equals the output layer's matmul
(Megatron's `ColumnParallelLinear` without bias) followed by `vocab_parallel_otr_loss`, but never
holds more than one ``[chunk, V/tp]`` block of logits, forward or backward. It is orchestration
around the same named steps (`core/loss.py`: `forward_rows`, `grad_rows`) and the same backends, so
every estimator, both backends and the layout-exact sampler come with it.

Design (docs/fused_output_layer.md has the reasoning and the measurements):

* Forward, per chunk of rows (``fused_chunk_tokens``): ``logits_c = hidden_c @ weight.T`` in the input dtype (the output
  layer's own matmul), then steps 1-5 on that chunk (its own statistics all-gather and, for the
  sampled estimator, its own all-reduce: the O(tp) numbers per token of the unfused path, in
  ceil(N / chunk) messages). Only per-token numbers and the ``[N, K]`` sampled columns are kept.
* Backward recomputes each chunk's logits (Apple's Cut Cross-Entropy way), writes their gradient in
  place of them, and adds ``grad_c @ weight`` to the hidden gradient and ``grad_c.T @ hidden_c`` to
  the weight gradient. Nothing in it depends on the upstream gradient being known early, so it is
  exact for any ``grad_output`` (Megatron's loss scaling, MTP weights, per-micro-batch token counts),
  needs no host sync (CUDA-graph capturable), and keeps nothing ``[V/tp, d]``-sized per micro-batch
  alive between forward and backward, which matters with pipeline schedules that hold several
  micro-batches in flight. The cost is one more matmul than the unfused path (4 instead of 3).
* The recomputed logits are the same matmul on the same inputs, so the backward sees the forward's
  logits bit for bit and the saved sample columns stay valid.
* Tensor parallelism as `ColumnParallelLinear`: without sequence parallelism ``hidden`` is
  replicated and its gradient all-reduced; with it each rank passes its sequence shard, all-gathered
  in the forward (and again in the backward, instead of keeping the gathered copy) and the gradient
  reduce-scattered. The weight gradient needs no collective (each rank owns its rows).
* Under `torch.autocast` the matmuls run with autocast off, in the inputs' dtype (Megatron casts the
  model itself and uses no autocast); otherwise the backward, where autocast is not active, would
  recompute different logits than the forward sampled from.
* The weight gradient accumulates chunk by chunk in the weight's dtype (``addmm_``, as Liger's fused
  linear cross entropy): no extra ``[V/tp, d]`` buffer; with bf16 weights that is one bf16 rounding
  of the running sum per chunk instead of one in total (measured in the docs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from otr_megatron.core.config import OTRConfig
from otr_megatron.core.contract import Backend, Prologue, Spec
from otr_megatron.core.loss import Rows, _default_chunk_tokens, _tp_layout, forward_rows, grad_rows, prepare_call

__all__ = ["vocab_parallel_linear_otr_loss", "default_linear_chunk", "default_loss_chunk"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def default_linear_chunk(shard: int, on_gpu: bool, one_pass: bool = False) -> int:
    """Rows of logits materialised at a time. CPU: at least 256 rows, where BLAS runs near full speed
    (the four matmuls of a fused call cost 1.26x the unfused three at 256 rows, 1.64x at 64), and at
    least 4M logits (8 MB of bf16), so a small vocabulary is not chunked at all (one chunk: the
    unfused numbers bit for bit); the loss's fp32 temporaries stay bounded separately by its own chunk
    (`OTRConfig.chunk_tokens`). GPU: about 16M logits with the torch backend, 64M with the Triton
    kernels (``one_pass``: no temporaries, the gradient written in place of the chunk's bf16 logits:
    128 MB), so a long sequence over a 150k vocabulary at TP=1 is ~20 chunks, not ~80: each chunk
    costs a fixed number of host launches."""
    if not on_gpu:
        return max(256, (1 << 22) // max(shard, 1))
    return max(16, (1 << 26 if one_pass else 1 << 24) // max(shard, 1))


def default_loss_chunk(shard: int, on_gpu: bool) -> int:
    """The loss's own chunk inside a fused chunk (torch backend): half the unfused loss's default on
    CPU (512K logits: three fp32 temporaries of 2 MB, still cache-sized), where the fused path is
    chosen for memory; the unfused default on a GPU."""
    return max(1, _default_chunk_tokens(shard, on_gpu) // (1 if on_gpu else 2))


def _check_linear(hidden, weight, sequence_parallel):
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a bf16, fp16, fp32 or fp64 tensor, got {got}")
    if weight.dim() != 2 or weight.size(0) < 1 or weight.size(1) < 1:
        raise ValueError(f"weight must be this rank's output-layer shard [V/tp, d], got {tuple(weight.shape)}")
    if hidden.dim() < 2 or hidden.size(-1) != weight.size(1):
        raise ValueError(f"hidden must have shape [..., d] with d = weight.size(1) = {weight.size(1)}, got "
                         f"{tuple(hidden.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have one dtype, as the output "
                        "layer's matmul")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight on {weight.device}")
    if not isinstance(sequence_parallel, bool):
        raise TypeError(f"sequence_parallel must be a bool, got {sequence_parallel!r}")


def _gather_rows(t: torch.Tensor, group, world: int) -> torch.Tensor:
    """All-gather along dim 0 (Megatron's sequence-parallel gather)."""
    if group is None or world == 1:
        return t
    out = torch.empty((world * t.size(0),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out


def _reduce_scatter_rows(t: torch.Tensor, group, world: int) -> torch.Tensor:
    """Sum over ranks, then this rank's slice along dim 0 (Megatron's sequence-parallel reduce-scatter)."""
    if group is None or world == 1:
        return t
    out = torch.empty((t.size(0) // world,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.reduce_scatter_tensor(out, t.contiguous(), group=group)
    return out


def _no_autocast(device):
    """The matmuls run in the inputs' dtype with autocast off, forward and backward alike (autocast is
    not active in a backward): the backward must recompute the forward's logits exactly."""
    return torch.autocast(device_type=device.type, enabled=False)


def _ranges(n: int, chunk: int):
    return [(lo, min(n, lo + chunk)) for lo in range(0, n, chunk)] or [(0, 0)]


def _take(pro: Prologue, lo: int, hi: int) -> Prologue:
    return Prologue(pro.valid[lo:hi], pro.owns_label[lo:hi], pro.label_col[lo:hi], pro.key_mix)


class _LinearOTR(torch.autograd.Function):
    """Outputs as `core.loss._VocabParallelOTR`; inputs hidden ``[N or N/tp, d]`` and weight."""

    @staticmethod
    def forward(ctx, hidden, weight, pro: Prologue, keys, spec: Spec, backend: Backend, group, sp: bool, chunk: int,
                sub: int, want_stats: bool):
        h = _gather_rows(hidden, group, spec.world) if sp else hidden
        n = h.size(0)
        wt = weight.t()
        scratch = backend.scratch(min(sub, chunk, n), spec.n_real, h.device)
        parts = []
        with _no_autocast(h.device):
            for lo, hi in _ranges(n, chunk):
                logits = torch.mm(h[lo:hi], wt)  # the output layer's matmul, one chunk
                parts.append(forward_rows(backend, spec, logits, _take(pro, lo, hi), keys[lo:hi], group,
                                          max(min(sub, hi - lo), 1), want_stats, scratch))
                del logits
        rows = Rows.cat(parts)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight)
        ctx.rows, ctx.spec, ctx.backend, ctx.group, ctx.sp = rows.saved(), spec, backend, group, sp
        ctx.chunk, ctx.sub = chunk, sub
        return rows.outputs(ctx, h.device, want_stats)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        nones = (None,) * 9
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_loss is None or not (want_h or want_w):
            return (None, None) + nones
        hidden, weight = ctx.saved_tensors
        spec, backend, group, chunk, sub = ctx.spec, ctx.backend, ctx.group, ctx.chunk, ctx.sub
        h = _gather_rows(hidden, group, spec.world) if ctx.sp else hidden  # re-gathered, as Megatron's SP backward
        n = h.size(0)
        g = grad_loss.reshape(-1)
        wt = weight.t()
        gh = torch.empty_like(h) if want_h else None
        gw = torch.zeros_like(weight) if want_w else None
        scratch = backend.scratch(min(sub, chunk, n), spec.n_real, h.device)
        with _no_autocast(h.device):
            for lo, hi in _ranges(n, chunk):
                if hi == lo:
                    continue
                logits = torch.mm(h[lo:hi], wt)  # recomputed: the forward's logits bit for bit
                grad_rows(backend, spec, logits, logits, g[lo:hi], ctx.rows.take(lo, hi), min(sub, hi - lo), scratch)
                if want_h:
                    torch.mm(logits, weight, out=gh[lo:hi])
                if want_w:
                    gw.addmm_(logits.t(), h[lo:hi])
                del logits
        if want_h and group is not None and spec.world > 1:
            if ctx.sp:
                gh = _reduce_scatter_rows(gh, group, spec.world)
            else:
                dist.all_reduce(gh, group=group)
        return (gh, gw) + nones


def vocab_parallel_linear_otr_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    cfg: OTRConfig,
    tp_group=None,
    sequence_parallel: bool = False,
    step: int | torch.Tensor = 0,
    vocab_size: int | None = None,
    token_keys: torch.Tensor | None = None,
    ignore_index: int = -100,
    return_stats: bool = False,
    padded_vocab_size: int | None = None,
):
    """Per-token OTR loss of ``hidden @ weight.T`` without materialising the logits.

    hidden: ``[..., d]`` (e.g. ``[s, b, d]`` or ``[N, d]``) in the weight's dtype. With
        ``sequence_parallel=True`` it is this rank's sequence shard (first dimension s/tp, as Megatron's
        sequence parallelism hands it to the output layer); it is all-gathered along dim 0.
    weight: this rank's output-layer shard ``[V/tp, d]`` (rows = global ids ``[r*V/tp, (r+1)*V/tp)``);
        a tied embedding's weight works the same way (the gradient reaches it through autograd).
    labels: the (gathered) token shape, ``hidden.shape[:-1]`` with the first dimension times tp under
        sequence parallelism; identical on every TP rank.
    cfg, tp_group, step, vocab_size, token_keys, ignore_index, return_stats, padded_vocab_size: as
        `otr_megatron.vocab_parallel_otr_loss`, with the same results (loss, stats, samples) as that
        function on ``hidden @ weight.T``. ``cfg.fused_chunk_tokens`` sets the rows of logits alive at
        a time (default: `default_linear_chunk`); ``cfg.chunk_tokens`` the loss's own chunk inside
        them, which bounds its fp32 temporaries as in the unfused loss.

    Gradients flow to ``hidden`` and ``weight``.
    """
    world = _tp_layout(tp_group)[0]
    _check_linear(hidden, weight, sequence_parallel)
    sp = sequence_parallel and world > 1
    lead = list(hidden.shape[:-1])
    if sp:
        lead[0] *= world
    call = prepare_call(cfg, labels, token_keys, tp_group, step, vocab_size, ignore_index, padded_vocab_size,
                        shard=weight.size(0), device=hidden.device, lead_shape=tuple(lead),
                        tokens_in=("hidden shape without its last dimension" +
                                   (f" (first dimension x tp = {world}: sequence parallel)" if sp else "")))
    d = hidden.size(-1)
    flat = hidden.reshape(-1, d) if hidden.dim() != 2 else hidden
    if not flat.is_contiguous():
        flat = flat.contiguous()
    on_gpu = hidden.device.type == "cuda"
    chunk = cfg.fused_chunk_tokens or default_linear_chunk(weight.size(0), on_gpu, call.backend.one_pass)
    # the loss's own chunk inside each bounds its fp32 temporaries (three [sub, V/tp] buffers)
    sub = cfg.chunk_tokens or (chunk if call.backend.one_pass else default_loss_chunk(weight.size(0), on_gpu))
    out = _LinearOTR.apply(flat, weight, call.pro, call.keys, call.spec, call.backend, tp_group, sp, chunk, sub,
                           return_stats)
    return call.results(out, return_stats)
