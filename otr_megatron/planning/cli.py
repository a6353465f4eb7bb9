"""`otr-megatron plan --config configs/X.yaml [KEY=VALUE ...]`: print the per-GPU budget table of a layout.

The file goes through the cluster-job schema and preflight (`otr_megatron/config/cluster_job.py`): an
unknown key, a layout Megatron would refuse, or one that does not fit in `cluster.gpu_memory_gib` is
one line and exit 2 (`--force` prints the table of a layout that does not fit). Overrides use the
grammar of every `otr-megatron` command, e.g. `parallel.tensor_model_parallel_size=4
train.micro_batch_size=2`; the same file and overrides given to `otr-megatron slurm --config` run that
layout.
"""

from __future__ import annotations

import argparse
import json
import sys

from otr_megatron.config.cluster_job import JobConfigError, load_cluster_job, preflight
from otr_megatron.planning.budget import GIB, Budget


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f} GiB"


def format_table(b: Budget) -> str:
    lay, dims = b.layout, b.dims
    rows = [
        f"plan: {b.name}",
        f"  model      {dims.name or '?'}: {b.params_total / 1e9:.2f}e9 params, {dims.num_layers} layers, "
        f"h={dims.hidden_size}, vocab {dims.vocab_size} (padded {dims.padded_vocab_size(lay.tp)} for tp={lay.tp})",
        f"  layout     {lay.nodes} nodes x {lay.gpus_per_node} GPUs: tp={lay.tp} pp={lay.pp} cp={lay.cp} "
        f"dp={lay.dp} vpp={lay.vpp} sp={lay.sequence_parallel} dist-opt={lay.use_distributed_optimizer} "
        f"fp8={lay.fp8} recompute={lay.recompute}",
        f"  batch      seq {lay.seq_length}, micro {lay.micro_batch_size}, global {lay.global_batch_size}, "
        f"{lay.num_microbatches} micro-batches per step",
        "",
        "  memory per GPU (worst pipeline stage)",
        f"    params on this GPU       {b.params_per_gpu / 1e9:8.3f}e9",
    ]
    for key in ("weights_bf16", "grads", "optimizer", "fp8_weight_copies", "activations"):
        if key in b.memory:
            rows.append(f"    {key:<24} {_gib(b.memory[key])}")
    ls = b.loss
    fused = ls["otr_total"] == ls["otr_fused_total"] and ls["otr_fused_total"] != ls["otr_unfused_total"]
    rows += [
        f"    logits [s/cp,b,V/tp]     {_gib(ls['logits_bf16'])}  ({int(ls['tokens'])} tokens x {int(ls['vocab_per_rank'])} bf16)"
        + ("  (CE only: otr.fuse_output_layer)" if fused else ""),
        f"    Megatron CE fp32 softmax {_gib(ls['ce_fp32_softmax'])}",
        f"    OTR saved (stats+ids)    {_gib(ls['otr_saved'])}",
    ]
    if fused:
        rows.append(f"    OTR fused chunk          {_gib(ls['otr_fused_chunk'])}  (logits, gradient and temporaries "
                    f"of one chunk; unfused OTR: {_gib(ls['otr_unfused_total'])})")
    else:
        rows.append(f"    OTR chunk temporaries    {_gib(ls['otr_chunk_temporaries'])}")
    rows += [
        f"    total with CE            {_gib(b.memory['total_ce'])}",
        f"    total with OTR           {_gib(b.memory['total_otr'])}  of {lay.gpu_memory_gib:.0f} GiB: "
        + ("fits" if b.fits() else "DOES NOT FIT"),
        "",
        "  communication per GPU per step (bytes sent)",
    ]
    for key in ("tp", "pp", "dp", "cp", "total"):
        rows.append(f"    {key:<24} {_gib(b.comm[key])}")
    rows.append("  (estimates from closed-form formulas in otr_megatron/planning/budget.py, not measurements)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="otr-megatron plan", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: otr-megatron plan --config configs/llama3_8b.yaml "
                                        "parallel.tensor_model_parallel_size=4 train.micro_batch_size=2")
    ap.add_argument("--config", required=True, action="append", help="configs/*.yaml (repeatable)")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    ap.add_argument("--force", action="store_true", help="print the budget of a layout that does not fit")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every --config file")
    args = ap.parse_args(argv)
    out = []
    try:
        for path in args.config:
            job = load_cluster_job(path, args.overrides)
            if job.dims is None:
                raise JobConfigError(f"{path}: no `model:` section; the budget needs the model's dimensions")
            out.append(preflight(job, force=args.force))
    except (JobConfigError, ValueError, TypeError) as exc:  # OverrideError is a ValueError
        print(f"otr-megatron plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"name": b.name, "params_total": b.params_total, "memory": b.memory, "loss": b.loss,
                           "comm": b.comm} for b in out], indent=2))
    else:
        print("\n\n".join(format_table(b) for b in out))
    return 0


if __name__ == "__main__":
    from otr_megatron import console

    console.install()  # megatron-core's "not installed" warnings: one line
    sys.exit(main())
