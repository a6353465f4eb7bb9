"""Benchmark: the output layer + loss, forward + backward, fused and unfused.

    python -m otr_megatron.bench_linear [--tokens 4096] [--hidden 1024] [--vocab 32768] [--tp 1 2]
        [--num-samples 8 256] [--chunk-tokens 32 64 128 256] [--repeats 3] [--json out.json]

Per TP layout (TP > 1 runs real processes with megatron-core's parallel_state, gloo on CPU, as
`otr_megatron.bench`), in one process and on the same inputs: hidden ``[N, d]`` replicated, each
rank's output-layer shard ``[V/tp, d]`` held by a real Megatron `ColumnParallelLinear` (no bias,
``gather_output=False``; its backward all-reduces the hidden gradient), per-token upstream weights:

* ``megatron CE``: `ColumnParallelLinear` + `vocab_parallel_cross_entropy` (the baseline);
* ``OTR K=k unfused``: `ColumnParallelLinear` + `vocab_parallel_otr_loss` (sample estimator);
* ``OTR K=k fused c=C``: `vocab_parallel_linear_otr_loss` on the same weight, ``fused_chunk_tokens=C``
  for each ``--chunk-tokens`` value and `default_linear_chunk` (marked ``*``).

Time: median of ``--repeats`` round-robin runs after a warm-up. Memory: peak live bytes beyond the
inputs, the weight and the two gradients (hidden and weight), measured exactly on CPU by
`bench.LiveBytes` (`bench._measure`). The targets (the fused output layer's issue): fused extra
memory <= 10% of unfused OTR's, fused time <= 1.3x unfused OTR's, each at the same K.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

import otr_megatron as otr
from otr_megatron.bench import _measure, init_rank, run_on_ranks
from otr_megatron.core.linear_loss import default_linear_chunk

MEM_TARGET = 0.10  # fused extra peak memory / unfused OTR's
TIME_TARGET = 1.3  # fused time / unfused OTR's


def _layer(d, v, dtype, device):
    """A Megatron ColumnParallelLinear [d -> V/tp] (no bias, logits left vocab-parallel)."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.parallel_state import get_tensor_model_parallel_world_size
    from megatron.core.tensor_parallel import ColumnParallelLinear

    cfg = ModelParallelConfig(tensor_model_parallel_size=get_tensor_model_parallel_world_size(),
                              params_dtype=dtype, bf16=dtype == torch.bfloat16,
                              use_cpu_initialization=device.type == "cpu", perform_initialization=False,
                              gradient_accumulation_fusion=False)
    return ColumnParallelLinear(d, v, config=cfg, init_method=torch.nn.init.zeros_, bias=False, gather_output=False,
                                skip_bias_add=True)


def run_layout(rank: int, world: int, args, port: int) -> dict:
    """Runs on every TP rank; returns {"header", "rows"} (identical on every rank)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    device, group, dtype = init_rank(rank, world, port, args.dtype)
    group = group if world > 1 else None

    n, d, v = args.tokens, args.hidden, args.vocab
    shard = v // world
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).to(dtype).to(device).requires_grad_()
    # logits ~ N(0, 2^2), as bench.py's: weight entries N(0, (2 / sqrt(d))^2); each rank its rows
    w_full = torch.randn(v, d, generator=gen) * (2.0 / d**0.5)
    labels = torch.randint(0, v, (n,), generator=gen).to(device)
    mask = (torch.rand(n, generator=gen) > 0.1).float().to(device)  # per-token upstream weights
    layer = _layer(d, v, dtype, device)
    with torch.no_grad():
        layer.weight.copy_(w_full[rank * shard : (rank + 1) * shard])
    weight = layer.weight
    del w_full
    default_chunk = default_linear_chunk(shard, device.type == "cuda")
    chunks = sorted(set(args.chunk_tokens) | {default_chunk})

    def logits():  # [N, 1, V/tp], the layout Megatron's output layer hands to the loss
        return layer(hidden.unsqueeze(1))[0]

    def ce():
        loss = vocab_parallel_cross_entropy(logits(), labels.unsqueeze(1))
        (loss.squeeze(1) * mask).sum().backward()

    methods = [dict(method="megatron CE", k=None, chunk=None, fn=ce)]
    for k in args.num_samples:
        cfg = otr.OTRConfig(estimator="sample", num_samples=k)

        def unfused(cfg=cfg):
            loss = otr.vocab_parallel_otr_loss(logits(), labels.unsqueeze(1), cfg, tp_group=group)
            (loss.squeeze(1) * mask).sum().backward()

        methods.append(dict(method=f"OTR K={k} unfused", k=k, chunk=None, fn=unfused))
        for c in chunks:
            ccfg = otr.OTRConfig(estimator="sample", num_samples=k, fused_chunk_tokens=c)

            def fused(cfg=ccfg):
                loss = otr.vocab_parallel_linear_otr_loss(hidden, weight, labels, cfg, tp_group=group)
                (loss * mask).sum().backward()

            star = "*" if c == default_chunk else ""
            methods.append(dict(method=f"OTR K={k} fused c={c}{star}", k=k, chunk=c, fn=fused))

    times, peaks = _measure([m["fn"] for m in methods], (hidden, weight), device, args.repeats, (labels, mask))
    if world > 1:  # the slowest rank's time and the largest rank's memory
        t = torch.tensor(times, dtype=torch.float64)
        p = torch.tensor(peaks, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        dist.all_reduce(p, op=dist.ReduceOp.MAX)
        times, peaks = t.tolist(), p.tolist()
    rows = []
    for m, t, mem in zip(methods, times, peaks):
        rows.append(dict(method=m["method"], k=m["k"], chunk=m["chunk"], default_chunk=m["chunk"] == default_chunk,
                         ms=t * 1e3, peak_extra_mib=mem / 2**20))
    base = rows[0]
    for r in rows:
        r["time_vs_ce"] = r["ms"] / base["ms"]
        r["mem_vs_ce"] = r["peak_extra_mib"] / base["peak_extra_mib"] if base["peak_extra_mib"] else None
        if r["chunk"] is not None:
            ref = next(u for u in rows if u["k"] == r["k"] and u["chunk"] is None)
            r["time_vs_unfused"] = r["ms"] / ref["ms"]
            r["mem_vs_unfused"] = r["peak_extra_mib"] / ref["peak_extra_mib"] if ref["peak_extra_mib"] else None
            r["meets_time_target"] = r["time_vs_unfused"] <= TIME_TARGET
            r["meets_memory_target"] = r["mem_vs_unfused"] is not None and r["mem_vs_unfused"] <= MEM_TARGET
    header = dict(tp=world, tokens=n, hidden=d, vocab=v, shard=shard, dtype=args.dtype, device=device.type,
                  threads_per_rank=torch.get_num_threads(), repeats=args.repeats, default_chunk=default_chunk)
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return dict(header=header, rows=rows)


def format_layout(result: dict) -> list[str]:
    h = result["header"]
    lines = [f"TP={h['tp']}  tokens={h['tokens']}  d={h['hidden']}  vocab={h['vocab']} (V/tp={h['shard']})  "
             f"{h['dtype']}  device={h['device']}  threads/rank={h['threads_per_rank']}  repeats={h['repeats']}  "
             f"(* = default_linear_chunk = {h['default_chunk']})",
             f"{'method':<26}{'median ms':>11}{'x CE':>7}{'x unfused':>10}{'peak extra MiB':>16}{'x CE':>7}"
             f"{'x unfused':>10}  targets (mem <= {MEM_TARGET:.2f}, time <= {TIME_TARGET:.2f} x unfused)"]

    def f(x, spec):
        return format("-", ">" + spec.split(".")[0]) if x is None else format(x, spec)

    for r in result["rows"]:
        tgt = ""
        if r["chunk"] is not None:
            tgt = (f"mem {'PASS' if r['meets_memory_target'] else 'FAIL'}, "
                   f"time {'PASS' if r['meets_time_target'] else 'FAIL'}")
        lines.append(f"{r['method']:<26}{r['ms']:>11.1f}{r['time_vs_ce']:>7.2f}{f(r.get('time_vs_unfused'), '10.2f')}"
                     f"{r['peak_extra_mib']:>16.1f}{f(r['mem_vs_ce'], '7.3f')}{f(r.get('mem_vs_unfused'), '10.3f')}"
                     f"  {tgt}")
    for k in sorted({r["k"] for r in result["rows"] if r["k"] is not None}):
        ok = [r for r in result["rows"] if r["k"] == k and r["chunk"] is not None
              and r["meets_time_target"] and r["meets_memory_target"]]
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        lines.append(f"K={k}: chunks meeting both targets: {[r['chunk'] for r in ok] or 'none'}"
                     + (f"; fastest of them c={best['chunk']}" if best else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m otr_megatron.bench_linear", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-samples", type=int, nargs="+", default=[8, 256])
    p.add_argument("--chunk-tokens", type=int, nargs="+", default=[32, 64, 128, 256],
                   help="fused chunk sizes (rows per chunk); default_linear_chunk is always added")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: CPU cores / TP); 1 is robust on a shared machine")
    p.add_argument("--json", default=None, help="also write the results (one entry per TP layout) here")
    args = p.parse_args(argv)
    if min(args.chunk_tokens) < 1 or args.repeats < 1:
        p.error("--chunk-tokens and --repeats must be >= 1")
    results = []
    for world in args.tp:
        result = run_on_ranks(run_layout, world, args)
        results.append(result)
        print("\n".join(format_layout(result)), "\n", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
