"""Benchmark: Megatron's vocab_parallel_cross_entropy and the OTR estimators side by side.

    python -m otr_megatron.bench [--tokens 4096] [--vocab 32768] [--tp 1 2] [--repeats 5]

Same process, same shapes, same bf16 logits as an LM head produces them (a leaf that receives the
gradient). Prints the median forward+backward time and the peak extra memory (live bytes beyond
the inputs and the returned gradient) as ratios to the cross entropy. TP > 1 runs real processes
(gloo on CPU, NCCL on GPU) with megatron-core's parallel_state. Also counts the TP > 1 samples that
differ from the TP = 1 draw, on the benchmark's logits and on near-uniform ones (the worst case);
sampling is layout-exact (docs/sampling.md), so both should be 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import weakref

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import otr_megatron as otr
from otr_megatron.distributed import free_port


class LiveBytes(TorchDispatchMode):
    """Peak of live tensor-storage bytes created inside the block (CPU; exact, allocator-free)."""

    def __init__(self, *existing: torch.Tensor):
        super().__init__()
        self.live = self.peak = 0
        # storages that exist before the block (inputs) are not new memory, even seen through views
        self.seen: set[int] = {t.untyped_storage().data_ptr() for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if n and key not in self.seen:
                    self.seen.add(key)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, n)
        return out

    def _free(self, key, n):
        self.live -= n
        self.seen.discard(key)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(fns, leaf, device, repeats, inputs=()):
    """Median fwd+bwd seconds per method, timed round-robin so machine noise hits all methods alike,
    and the peak extra bytes of one run of each. ``leaf`` is the tensor receiving the gradient, or a
    tuple of them (e.g. hidden and weight): their gradients are not counted as extra memory."""
    leaves = tuple(leaf) if isinstance(leaf, (tuple, list)) else (leaf,)

    def clear():
        for t in leaves:
            t.grad = None

    times = [[] for _ in fns]
    for fn in fns:  # warm-up
        fn()
        clear()
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[i].append(time.perf_counter() - t0)
            clear()
    grad_bytes = sum(t.numel() * t.element_size() for t in leaves)
    peaks = []
    for fn in fns:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            with LiveBytes(*leaves, *inputs) as tracker:
                fn()
            peak = tracker.peak
        clear()
        peaks.append(max(peak - grad_bytes, 0))
    return [statistics.median(t) for t in times], peaks


def _methods(args):
    methods = [("megatron CE", None)]
    for k in args.num_samples:
        methods.append((f"OTR sample K={k}", otr.OTRConfig(estimator="sample", num_samples=k)))
    for est in ("expected", "sft", "dft"):
        methods.append((f"OTR {est}", otr.OTRConfig(estimator=est)))
    return methods


def init_rank(rank: int, world: int, port: int, dtype: str):
    """This benchmark rank's process group and megatron-core TP group of ``world`` ranks (NCCL on
    CUDA, gloo on CPU); returns (device, TP group, torch dtype of ``dtype``)."""
    from megatron.core import parallel_state as ps

    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    return device, ps.get_tensor_model_parallel_group(), {"bf16": torch.bfloat16, "fp16": torch.float16,
                                                          "fp32": torch.float32}[dtype]


def run_layout(rank: int, world: int, args, port: int) -> list[str]:
    """Runs on every TP rank; returns the printable table on rank 0."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    device, group, dtype = init_rank(rank, world, port, args.dtype)

    n, v = args.tokens, args.vocab
    shard = v // world
    gen = torch.Generator().manual_seed(0)
    full = (torch.randn(n, v, generator=gen) * 2.0).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen).to(device)
    mask = (torch.rand(n, generator=gen) > 0.1).float().to(device)  # per-token upstream weights
    leaf = full[:, rank * shard : (rank + 1) * shard].contiguous().to(device).requires_grad_()

    names, fns = [], []
    for name, cfg in _methods(args):
        if cfg is None:
            def fn():
                # Megatron's CE overwrites fp32 input in place; bf16 input is upcast first, so no clone needed
                loss = vocab_parallel_cross_entropy(leaf, labels)
                (loss * mask).sum().backward()
        else:
            cfg = otr.OTRConfig(**{**cfg.__dict__, "chunk_tokens": args.chunk_tokens})

            def fn(cfg=cfg):
                loss = otr.vocab_parallel_otr_loss(leaf, labels, cfg, tp_group=group if world > 1 else None)
                (loss * mask).sum().backward()
        names.append(name)
        fns.append(fn)
    times, peaks = _measure(fns, leaf, device, args.repeats, (labels, mask))
    rows = list(zip(names, times, peaks))
    base_time, base_mem = times[0], peaks[0]

    lines = [f"TP={world}  tokens={n}  vocab={v} (V/tp={shard})  {args.dtype} logits  device={device.type}  "
             f"threads/rank={torch.get_num_threads()}  repeats={args.repeats}",
             f"{'method':<20} {'median ms':>10} {'x CE':>6} {'peak extra MiB':>15} {'x CE':>6}"]
    for name, t, mem in rows:
        lines.append(f"{name:<20} {t * 1e3:>10.1f} {t / base_time:>6.2f} {mem / 2**20:>15.1f} "
                     f"{mem / base_mem if base_mem else float('nan'):>6.2f}")

    if world > 1:  # does this layout draw the single-device samples? (docs/sampling.md: it should, exactly)
        k = max(args.num_samples)
        cfg = otr.OTRConfig(estimator="sample", num_samples=k)
        # the benchmark's logits, and near-uniform ones: the worst case, 32k CDF boundaries ~3e-5 apart
        for what, logits in [("benchmark logits", full), ("near-uniform logits", (full.float() * 0.005).to(dtype))]:
            part = logits[:, rank * shard : (rank + 1) * shard].contiguous().to(device)
            with torch.no_grad():
                _, st = otr.vocab_parallel_otr_loss(part, labels, cfg, tp_group=group, return_stats=True)
                tok, ids = st["owned_samples"]
                counts = torch.zeros(n, v, dtype=torch.int32, device=device)
                counts.view(-1).index_add_(0, tok * v + ids, torch.ones_like(ids, dtype=torch.int32))
                dist.all_reduce(counts, group=group)
                _, ref = otr.vocab_parallel_otr_loss(logits.to(device), labels, cfg, return_stats=True)
                ref_counts = torch.zeros_like(counts)
                ref_counts.view(-1).index_add_(0, ref["owned_samples"][0] * v + ref["owned_samples"][1],
                                               torch.ones_like(ref["owned_samples"][1], dtype=torch.int32))
                moved = int((counts - ref_counts).clamp(min=0).sum())
            lines.append(f"samples differing from the TP=1 draw ({what}): {moved} of {n * k}")
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return lines


def _worker(rank, world, args, port, out, run):
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    result = run(rank, world, args, port)
    if rank == 0:
        out.put(result)


def run_on_ranks(run, world: int, args):
    """``run(rank, world, args, port)`` in ``world`` spawned processes (gloo on CPU; ``args.threads``
    torch threads each, default cores / world); returns rank 0's result. ``run`` must be importable."""
    import torch.multiprocessing as mp

    if args.vocab % world:
        raise SystemExit(f"--vocab {args.vocab} must be divisible by every --tp value (got {world})")
    out = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(world, args, free_port(), out, run), nprocs=world, join=True,
                       start_method="spawn")
    return out.get()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m otr_megatron.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--num-samples", type=int, nargs="+", default=[8, 256])
    p.add_argument("--chunk-tokens", type=int, default=None)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: CPU cores / TP); 1 is robust on a shared machine")
    args = p.parse_args(argv)
    for world in args.tp:
        print("\n".join(run_on_ranks(run_layout, world, args)), "\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
