"""Test harness: multi-process gloo runs of real megatron-core on CPU (not shipped in the package).

`launch(fn, world_size, *args)` spawns `world_size` processes, sets up gloo and the CPU backend,
runs `fn(rank, world_size, *args)` in each and returns the per-rank return values (rank order).
Imports of megatron-core cost ~7 s per process, so put many checks into one launch.

`init_parallel(...)` (re)initializes `parallel_state` inside a launched process, so one launch can
run several layouts in sequence. `run_layout(...)` trains a tiny GPTModel for a few SGD steps with
Megatron DDP + `finalize_model_grads` + `get_forward_backward_func()`, and returns per-step losses,
metrics and gradients keyed by global checkpoint key so any two layouts can be compared.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch

from otr_megatron.distributed import free_port, teardown_parallel


def _worker(rank: int, world_size: int, port: int, outdir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from otr_megatron.mcore.cpu_backend import enable_cpu_mode

    enable_cpu_mode()
    import datetime

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size,
                                         timeout=datetime.timedelta(seconds=300))
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(outdir, f"rank{rank}.pt"))
        raise
    finally:
        teardown_parallel()


def launch(fn: Callable, world_size: int, *args, timeout_s: float = 600) -> List[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned gloo processes; return results.

    `fn` must be importable (module-level). Raises RuntimeError with the failing ranks' tracebacks.
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size={world_size}: expected >= 1")
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_worker, args=(world_size, free_port(), outdir, fn, args),
                                 nprocs=world_size, join=False, start_method="spawn")
        try:
            while not ctx.join(timeout=timeout_s):
                pass
        except Exception as exc:  # a rank raised: collect every rank's traceback
            errors = []
            for r in range(world_size):
                path = os.path.join(outdir, f"rank{r}.pt")
                if os.path.exists(path):
                    rec = torch.load(path, weights_only=False)
                    if not rec["ok"]:
                        errors.append(f"--- rank {r} ---\n{rec['error']}")
            raise RuntimeError("distributed test failed:\n" + ("\n".join(errors) or str(exc))) from None
        results = []
        for r in range(world_size):
            rec = torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
            results.append(rec["result"])
        return results


def init_parallel(tp: int = 1, pp: int = 1, cp: int = 1, vp: Optional[int] = None, seed: int = 1234) -> None:
    """(Re)initialize megatron parallel_state and its RNG streams in this process."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vp, context_parallel_size=cp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def causal_mask(seq_len: int) -> torch.Tensor:
    """Megatron's boolean attention mask [1, 1, s, s]: True = masked out."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)[None, None]


def synthetic_batch(step: int, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
    """Global batch for one step: random tokens, a loss mask with a masked prompt, global sample ids."""
    g = torch.Generator().manual_seed(seed * 7919 + step)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=g)
    loss_mask = torch.ones(batch_size, seq_len)
    prompt = torch.randint(1, seq_len // 2, (batch_size,), generator=g)
    for i in range(batch_size):
        loss_mask[i, : int(prompt[i])] = 0
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": loss_mask,
        "sample_ids": torch.arange(batch_size, dtype=torch.int64) + step * batch_size,
        "step": step,
    }


def split_batch(batch: dict, start: int, stop: int) -> dict:
    return {k: (v[start:stop] if torch.is_tensor(v) and v.dim() >= 1 else v) for k, v in batch.items()}


def _param_by_ptr(chunks) -> Dict[int, torch.nn.Parameter]:
    return {p.data_ptr(): p for c in chunks for p in c.parameters()}


def sharded_grads(chunks, grad_attr: str = "main_grad") -> Dict[tuple, torch.Tensor]:
    """{(key, global_offset): local grad slice} for every parameter (global checkpoint identity)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from otr_megatron.mcore.hook import unwrap_model

    out = {}
    ptrs = _param_by_ptr(chunks)
    for c in chunks:
        for name, st in unwrap_model(c).sharded_state_dict().items():
            if not isinstance(st, ShardedTensor):
                continue
            p = ptrs.get(st.data.data_ptr())
            if p is None:
                continue
            g = getattr(p, grad_attr, None)
            if g is None:
                g = p.grad
            if g is None:
                continue
            out[(st.key, tuple(st.global_offset), tuple(st.global_shape), st.prepend_axis_num)] = (
                g.detach().float().clone().reshape(st.data.shape))
    return out


def assemble_global(grads: Dict[tuple, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Glue {(key, offset, shape, prepend): slice} into {key: global tensor}."""
    full: Dict[str, torch.Tensor] = {}
    for (key, off, shape, pre), g in grads.items():
        t = full.setdefault(key, torch.zeros(shape))
        idx = tuple(slice(o, o + (1 if d < pre else g.shape[d - pre])) for d, o in enumerate(off))
        t[idx] = g.reshape(t[idx].shape)
    return full


def compare_to_global(local: Dict[tuple, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Max abs difference of each local slice against the reference global tensors."""
    errs = {}
    for (key, off, shape, pre), g in local.items():
        if key not in ref:
            raise KeyError(f"gradient key {key!r} missing from the reference")
        t = ref[key]
        idx = tuple(slice(o, o + (1 if d < pre else g.shape[d - pre])) for d, o in enumerate(off))
        e = float((t[idx].reshape(g.shape) - g).abs().max())
        errs[key] = max(errs.get(key, 0.0), e)
    return errs


def megatron_ce_loss_fn(logits, labels, cfg=None, tp_group=None, step=0, vocab_size=None,
                        token_keys=None, ignore_index=-100, return_stats=False):
    """Megatron's vocab-parallel cross entropy behind the OTR loss signature (oracle for the tests)."""
    from megatron.core import tensor_parallel

    ignored = labels == ignore_index
    safe = labels.masked_fill(ignored, 0)
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float().clone(), safe)
    loss = loss.masked_fill(ignored, 0.0)
    if return_stats:
        return loss, {"label_logprob": (-loss).detach()}
    return loss


def reduce_report(losses_reduced: List[dict]) -> Dict[str, float]:
    """Means of the OTR reports over micro-batches and DP x CP, as Megatron's logging computes them."""
    from megatron.core import parallel_state as ps

    from otr_megatron.mcore.metrics import reduce_reports, report_means

    return report_means(reduce_reports(losses_reduced, group=ps.get_data_parallel_group(with_context_parallel=True)))


# ----------------------------------------------------------------------------------------------
# Training runs for layout-equivalence checks (also reusable for resume checks)
# ----------------------------------------------------------------------------------------------

def _sgd_(params, lr: float, grad_attr: str) -> None:
    with torch.no_grad():
        for p in params:
            g = getattr(p, grad_attr, None)
            if g is None:
                g = p.grad
            if g is not None:
                p.add_(g.to(p.dtype), alpha=-lr)


def reference_run(build_cfg, otr_cfg, *, steps: int, batch_size: int, lr: float = 0.5, seed: int = 1234,
                  loss_fn=None, start_step: int = 0, model_chunks=None) -> dict:
    """Single-model run over the whole global batch (no DDP, no schedule): the oracle.

    Needs `init_parallel(1, 1)`. Returns per-step loss, metrics and global gradients by key.
    """
    from otr_megatron.mcore.hook import enable_otr, pop_otr_stats, set_iteration
    from otr_megatron.mcore.model import GPTBuildConfig, build_model_chunks, layout_invariant_init_
    from otr_megatron.mcore.training import loss_func, prepare_batch

    cfg = GPTBuildConfig.from_any(build_cfg)
    chunks = model_chunks
    if chunks is None:
        chunks = build_model_chunks(cfg)
        layout_invariant_init_(chunks, seed)
        enable_otr(chunks, otr_cfg, loss_fn=loss_fn)
    (m,) = chunks
    out = {"loss": [], "metrics": [], "grads": []}
    for step in range(start_step, start_step + steps):
        batch = synthetic_batch(step, batch_size, cfg.seq_length, cfg.vocab_size, seed)
        m.zero_grad(set_to_none=True)
        set_iteration(chunks, step)
        b = prepare_batch(batch, m)
        logits_loss = m(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"])
        loss_sum, n, report = loss_func(b["loss_mask"], logits_loss, pop_otr_stats(m),
                                        getattr(otr_cfg, "num_samples", None),
                                        loss_weights=b.get("otr_loss_weights"),
                                        sequence_starts=b.get("otr_sequence_starts"))
        (loss_sum / n).backward()
        out["loss"].append(float(report["otr loss"][0] / report["otr loss"][1]))
        out["metrics"].append({k: float(v[0] / v[1]) for k, v in report.items()})
        out["grads"].append(assemble_global(sharded_grads(chunks, "grad")))
        _sgd_(m.parameters(), lr, "grad")
    out["model_chunks"] = chunks
    return out


def cp_simulated_forward_step(data_iterator, model):
    """forward_step for CP simulated by zigzag slicing of logits/labels (local attention can't run CP).

    Runs the full sequence, then keeps only this CP rank's zigzag positions for the loss, keyed by
    their global positions, exactly as a real CP rank would see them.
    """
    from functools import partial

    from megatron.core import parallel_state as ps

    from otr_megatron.mcore.hook import (OTRBatchContext, get_otr_hook, pop_otr_stats, set_otr_context,
                                         unwrap_model)
    from otr_megatron.mcore.keys import cp_zigzag_positions
    from otr_megatron.mcore.training import loss_func, prepare_batch, slice_batch_for_cp

    batch = next(data_iterator)
    cp, cpr = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    b = prepare_batch(batch, model, cp_slice=False)
    logits = model(b["tokens"], b["position_ids"], None)  # [b, s, V/tp]
    loc = slice_batch_for_cp(b, cp, cpr)
    idx = cp_zigzag_positions(logits.size(1), cp, cpr)
    logits_loc = logits.index_select(1, idx).transpose(0, 1).contiguous()
    hook = get_otr_hook(model)
    set_otr_context(model, OTRBatchContext(step=batch["step"], token_keys=loc["token_keys"], loss_mask=loc["loss_mask"]))
    loss = hook.loss_from_logits(unwrap_model(model), loc["labels"], logits_loc)
    return loss, partial(loss_func, loc["loss_mask"], stats=pop_otr_stats(model),
                         num_samples=getattr(hook.cfg, "num_samples", None),
                         loss_weights=loc.get("otr_loss_weights"), sequence_starts=loc.get("otr_sequence_starts"))


def run_layout(build_cfg, otr_cfg, *, tp: int = 1, pp: int = 1, vp: Optional[int] = None, cp: int = 1,
               sp: bool = False, micro_batch_size: int = 1, steps: int = 3, batch_size: int = 4,
               lr: float = 0.5, seed: int = 1234, loss_fn=None, forward_step_func=None) -> dict:
    """Train a few SGD steps in a parallel layout with Megatron DDP + finalize_model_grads + schedules.

    `cp > 1` uses `cp_simulated_forward_step`. Returns per-step losses/metrics (on last-stage ranks,
    reduced over DP x CP like Megatron's logging) and local gradient slices by global key.
    """
    import dataclasses

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from otr_megatron.mcore.hook import enable_otr, set_iteration
    from otr_megatron.mcore.model import GPTBuildConfig, build_model_chunks, layout_invariant_init_
    from otr_megatron.mcore.training import forward_step

    cfg = dataclasses.replace(GPTBuildConfig.from_any(build_cfg), tensor_model_parallel_size=tp,
                              pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp,
                              sequence_parallel=sp, context_parallel_size=cp)
    init_parallel(tp, pp, cp=cp, vp=vp, seed=seed)
    chunks = build_model_chunks(cfg)
    layout_invariant_init_(chunks, seed)
    enable_otr(chunks, otr_cfg, loss_fn=loss_fn)
    config = chunks[0].config
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=False)
    model = [DistributedDataParallel(config, ddp_cfg, c, disable_bucketing=i > 0) for i, c in enumerate(chunks)]
    config.finalize_model_grads_func = finalize_model_grads
    fs = forward_step_func or (cp_simulated_forward_step if cp > 1 else forward_step)

    dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if batch_size % (dp * micro_batch_size):
        raise ValueError(f"batch_size={batch_size} not divisible by dp {dp} x micro_batch_size {micro_batch_size}")
    per_dp = batch_size // dp
    n_mb = per_dp // micro_batch_size
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    out = {"loss": [], "metrics": [], "grads": [], "last_stage": last}
    for step in range(steps):
        batch = synthetic_batch(step, batch_size, cfg.seq_length, cfg.vocab_size, seed)
        mine = split_batch(batch, dpr * per_dp, (dpr + 1) * per_dp)
        mbs = [split_batch(mine, i * micro_batch_size, (i + 1) * micro_batch_size) for i in range(n_mb)]
        for m in model:
            m.zero_grad_buffer()
        set_iteration(model, step)
        iters = [iter(list(mbs)) for _ in model]
        losses = get_forward_backward_func()(
            forward_step_func=fs, data_iterator=iters, model=model, num_microbatches=n_mb,
            seq_length=cfg.seq_length, micro_batch_size=micro_batch_size, forward_only=False)
        if last:
            red = reduce_report(losses)
            out["loss"].append(red["otr loss"])
            out["metrics"].append(red)
        out["grads"].append(sharded_grads(model, "main_grad"))
        _sgd_([p for m in model for p in m.parameters()], lr, "main_grad")
    out["model"] = model
    return out
