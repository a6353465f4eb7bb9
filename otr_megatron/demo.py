"""`otr-megatron demo`: the vocab-parallel OTR loss under real tensor parallelism on this machine.

Spawns TP gloo processes with megatron-core's parallel_state, gives each its vocabulary shard of the
same logits, and shows that losses, hit counts and sharded gradients equal the single-rank result
while only per-token statistics cross ranks.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import otr_megatron as otr
from otr_megatron.distributed import free_port


def _worker(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    group = ps.get_tensor_model_parallel_group()
    gen = torch.Generator().manual_seed(0)
    vocab, padded, n = args.vocab, -(-args.vocab // (128 * world)) * 128 * world, args.tokens
    full = (torch.randn(n, padded, generator=gen) * 3).bfloat16()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    shard = padded // world
    sent = []
    real_all_gather, real_all_reduce = dist.all_gather_into_tensor, dist.all_reduce
    dist.all_gather_into_tensor = lambda out, t, **kw: (sent.append(t.numel()), real_all_gather(out, t, **kw))[1]
    dist.all_reduce = lambda t, **kw: (sent.append(t.numel()), real_all_reduce(t, **kw))[1]
    lines = []
    for est in ("sample", "expected", "sft", "dft"):
        cfg = otr.OTRConfig(estimator=est, num_samples=args.num_samples, temperature=1.3, neg_reward=-0.1)
        part = full[:, rank * shard : (rank + 1) * shard].clone().requires_grad_()
        sent.clear()
        loss, st = otr.vocab_parallel_otr_loss(part, labels, cfg, tp_group=group, step=1, vocab_size=vocab,
                                               return_stats=True)
        loss.mean().backward()
        numbers_sent = sum(sent)
        whole = full.clone().requires_grad_()
        ref, ref_st = otr.vocab_parallel_otr_loss(whole, labels, cfg, step=1, vocab_size=vocab, return_stats=True)
        ref.mean().backward()
        dloss = (loss - ref).abs().max().item()
        dgrad = (part.grad.float() - whole.grad[:, rank * shard : (rank + 1) * shard].float()).abs().max().item()
        hits = f"mean hits {st['hits'].float().mean():.3f} (TP=1: {ref_st['hits'].float().mean():.3f})" \
            if est == "sample" else ""
        lines.append(f"  {est:<9} mean loss {loss.mean():+.5f}  |loss - TP1| <= {dloss:.1e}  "
                     f"|grad - TP1| <= {dgrad:.1e}  sent {numbers_sent / n:.1f} numbers/token  {hits}")
    if rank == 0:
        print(f"OTR over vocab-parallel logits: TP={world} gloo ranks, {n} tokens, vocab {vocab} "
              f"(padded {padded}, {shard} ids per rank), K={args.num_samples}, bf16 logits\n" + "\n".join(lines))
        print("Each rank sent O(tp) numbers per token (no vocabulary-sized tensor); backward: no collective.")
    ps.destroy_model_parallel()
    dist.destroy_process_group()


MAX_TP = 64  # gloo processes on this machine
# Every rank holds the whole [tokens, padded vocab] logits a few times over (bf16 logits, a bf16 and
# an fp32 gradient, the reference's copy): the demo refuses sizes that would not fit a laptop.
MAX_LOGITS = 2**27  # tp x tokens x padded vocab, ~2 GiB of bf16 logits summed over the ranks


def check_args(args) -> str | None:
    """Why these sizes cannot run (one line naming the option), or None."""
    for flag, value in (("--tp", args.tp), ("--tokens", args.tokens), ("--vocab", args.vocab),
                        ("--num-samples", args.num_samples)):
        if value < 1:  # --tp 0 would spawn no process and print nothing
            return f"{flag} {value}: expected an integer >= 1"
    if args.tp > MAX_TP:
        return f"--tp {args.tp}: expected at most {MAX_TP} (one gloo process per rank on this machine)"
    padded = -(-args.vocab // (128 * args.tp)) * 128 * args.tp
    if args.tp * args.tokens * padded > MAX_LOGITS:
        return (f"--tokens {args.tokens} x --vocab {args.vocab} (padded {padded}) x --tp {args.tp} = "
                f"{args.tp * args.tokens * padded} logits held by the ranks; expected at most {MAX_LOGITS} "
                "(lower --tokens or --vocab)")
    if args.tokens * args.num_samples > MAX_LOGITS:
        return (f"--tokens {args.tokens} x --num-samples {args.num_samples} = {args.tokens * args.num_samples} "
                f"samples; expected at most {MAX_LOGITS}")
    try:
        otr.OTRConfig(num_samples=args.num_samples, temperature=1.3, neg_reward=-0.1)
    except ValueError as e:
        return f"--num-samples {args.num_samples}: {e}"
    return None


def main(argv: list[str] | None = None) -> int:
    import sys

    p = argparse.ArgumentParser(prog="otr-megatron demo", description=__doc__)
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (gloo processes), >= 1")
    p.add_argument("--tokens", type=int, default=512, help="tokens in the batch, >= 1")
    p.add_argument("--vocab", type=int, default=32000, help="real vocabulary size, >= 1")
    p.add_argument("--num-samples", type=int, default=256, help="OTR samples K per token, >= 1")
    args = p.parse_args(argv)
    why = check_args(args)
    if why:
        print(f"otr-megatron demo: {why}", file=sys.stderr)
        return 2
    port = free_port()
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(args.tp, port, args), nprocs=args.tp, join=True, start_method="spawn")
    return 0
