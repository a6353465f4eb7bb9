"""Worker for the loopback rendezvous test: joins the job through env:// and all-reduces on gloo."""

import os
import sys

import torch
import torch.distributed as dist

dist.init_process_group("gloo", init_method="env://")
rank, world = dist.get_rank(), dist.get_world_size()
assert rank == int(os.environ["RANK"]) and world == int(os.environ["WORLD_SIZE"]), (rank, world)
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
expected = world * (world + 1) / 2
out = os.path.join(sys.argv[1], f"rank{rank}.txt")
with open(out, "w") as f:
    f.write(f"{rank} {world} {os.environ.get('LOCAL_RANK')} {os.environ.get('NODE_RANK', '')} {t.item()} {expected}\n")
dist.barrier()
dist.destroy_process_group()
sys.exit(0 if t.item() == expected else 1)
