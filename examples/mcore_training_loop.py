"""The smallest complete use: OTR in a hand-written Megatron-Core training loop.

    python examples/mcore_training_loop.py                  # one CPU process (gloo)
    torchrun --nproc-per-node 2 examples/mcore_training_loop.py --tp 2   # TP=2 (gloo on CPU, NCCL on GPU)

A stock GPTModel learns to copy the prompt: each row is `a b c ... | a b c ...`, the loss mask
covers the second half. A few steps of cross entropy give it a base distribution; then
`enable_otr` switches the same model to One-Token Rollout without touching anything else.
"""

import argparse
import os

import torch
import torch.distributed as dist

import otr_megatron as otr
from otr_megatron import mcore


def copy_task_batch(step: int, batch: int, seq: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(step)
    half = seq // 2
    prompt = torch.randint(1, vocab, (batch, half + 1), generator=g)
    row = torch.cat([prompt[:, :half], prompt], dim=1)  # [b, seq + 1]: prompt, then its copy
    loss_mask = torch.zeros(batch, seq)
    loss_mask[:, half:] = 1.0  # supervise the copy only
    return {"tokens": row[:, :-1].contiguous(), "labels": row[:, 1:].contiguous(), "loss_mask": loss_mask,
            "sample_ids": torch.arange(batch) + step * batch, "step": step}  # sample ids: global random keys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ce-steps", type=int, default=60)
    p.add_argument("--otr-steps", type=int, default=40)
    args = p.parse_args(argv)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        mcore.enable_cpu_mode()  # lets megatron-core run without CUDA (tests, laptops)
    dist.init_process_group("nccl" if cuda else "gloo", rank=int(os.environ.get("RANK", 0)),
                            world_size=int(os.environ.get("WORLD_SIZE", 1)))
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ps.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    vocab, seq, batch = 32, 16, 16
    model = mcore.build_gpt_model(mcore.GPTBuildConfig(vocab_size=vocab, seq_length=seq, hidden_size=64,
                                                       num_layers=2, num_attention_heads=4,
                                                       tensor_model_parallel_size=args.tp))
    if cuda:
        model.cuda()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    forward_backward = get_forward_backward_func()

    def train_step(step):
        opt.zero_grad()
        data = iter([copy_task_batch(step, batch, seq, vocab)])
        out = forward_backward(forward_step_func=mcore.forward_step, data_iterator=data, model=[model],
                               num_microbatches=1, seq_length=seq, micro_batch_size=batch, forward_only=False)
        # calculate_per_token_loss=True: the schedule leaves sums; divide by the loss's own count ourselves
        # (Megatron's finalize_model_grads does this across DP x CP ranks in a full training setup).
        # With OTR on, "otr loss" is what was backpropagated; with cross entropy, "lm loss" is.
        n = out[0]["otr loss" if "otr loss" in out[0] else "lm loss"][1]
        for prm in model.parameters():
            if prm.grad is not None:
                prm.grad /= n
        opt.step()
        return {k: (v[0] / v[1]).item() for k, v in out[0].items()}

    for step in range(args.ce_steps):  # cross entropy first: OTR's signal scales with p(label)
        m = train_step(step)
    print(f"after {args.ce_steps} CE steps: loss {m['lm loss']:.3f}")
    mcore.enable_otr(model, otr.OTRConfig(num_samples=64, temperature=1.3, neg_reward=-0.1), vocab_size=vocab)
    first = None
    for step in range(args.ce_steps, args.ce_steps + args.otr_steps):
        mcore.set_iteration(model, step)
        m = train_step(step)
        first = first or m
    if dist.get_rank() == 0:
        print(f"OTR: hit rate {first['otr hit rate']:.3f} -> {m['otr hit rate']:.3f}, "
              f"lm loss (label CE) {first['lm loss']:.3f} -> {m['lm loss']:.3f}")
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return m


if __name__ == "__main__":
    main()
