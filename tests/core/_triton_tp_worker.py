"""Worker for test_triton_backend.py's gloo test: one TP rank of the loss with backend='triton'
(kernels in Triton's interpreter; TRITON_INTERPRET=1 is inherited from the parent's environment)."""

import os

import torch
import torch.distributed as dist


def main(rank: int, world: int, port: int, out_dir: str, estimators: list, k: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import otr_megatron as otr
        from tests.core.test_triton_backend import KAPPA, BETA, VOCAB, make_logits

        x, y = make_logits(n=8, seed=21)
        shard = x.size(1) // world
        upstream = torch.linspace(0.5, 2.0, x.size(0))
        result = {}
        for est in estimators:
            cfg = otr.OTRConfig(estimator=est, num_samples=k, temperature=KAPPA, neg_reward=BETA, seed=9,
                                backend="triton")
            leaf = x[:, rank * shard:(rank + 1) * shard].clone().requires_grad_()
            loss, stats = otr.vocab_parallel_otr_loss(leaf, y, cfg, tp_group=dist.group.WORLD, step=5,
                                                      vocab_size=VOCAB, return_stats=True)
            loss.backward(upstream)
            result[est] = (loss.detach(), leaf.grad, stats.get("owned_samples"), stats.get("hits"))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
