"""Megatron distributed checkpoints of the job: model, optimizer, iteration and data position.

Layout: ``<output_dir>/checkpoints/iter_XXXXXXX/`` (a `megatron.core.dist_checkpointing`
directory, loadable in another TP/PP layout) and ``<output_dir>/checkpoints/latest`` holding the
directory name of the newest complete checkpoint (written last, so a crash mid-save never points
to a partial checkpoint).
"""

from __future__ import annotations

import os

import torch

LATEST = "latest"


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _state(trainer, iteration: int, is_loading: bool) -> dict:
    from otr_megatron.mcore.hook import unwrap_model

    if len(trainer.model) != 1:
        raise NotImplementedError("checkpointing with virtual pipeline chunks is not supported by the train job")
    model_sd = unwrap_model(trainer.model[0]).sharded_state_dict()
    cfg = trainer.cfg
    stage, k = trainer._stage_of(iteration) if iteration < cfg.total_iters else ("finetune", cfg.finetune_iters)
    return {
        "model": model_sd,
        "optimizer": trainer.optimizer.sharded_state_dict(model_sd, is_loading=is_loading),
        "iteration": iteration,
        # Data position: the next global batch of `stage` starts at this stream position.
        "data": {"stage": stage, "consumed_samples": k * cfg.global_batch_size, "seed": cfg.seed,
                 "global_batch_size": cfg.global_batch_size},
    }


def save_checkpoint(trainer, iteration: int) -> str:
    from megatron.core import dist_checkpointing

    name = f"iter_{iteration:07d}"
    path = os.path.join(trainer.ckpt_root, name)
    if _rank0():
        os.makedirs(path, exist_ok=True)
    _barrier()
    dist_checkpointing.save(_state(trainer, iteration, is_loading=False), path)
    _barrier()
    if _rank0():
        tmp = os.path.join(trainer.ckpt_root, LATEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(name + "\n")
        os.replace(tmp, os.path.join(trainer.ckpt_root, LATEST))
    _barrier()
    return path


def latest_checkpoint(root: str) -> str | None:
    marker = os.path.join(root, LATEST)
    if not os.path.isfile(marker):
        return None
    with open(marker, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{marker} names {name!r} but {path!r} does not exist")
    return path


def load_checkpoint(trainer, path: str) -> int:
    """Restore model and optimizer in place and set `trainer.iteration`; check the data position."""
    from megatron.core import dist_checkpointing

    from otr_megatron.mcore.hook import unwrap_model

    # peek at the saved iteration (0.16 keeps it in common.pt, 0.19 inside the .distcp files)
    iteration = int(dist_checkpointing.load_common_state_dict(path)["iteration"])
    state = _state(trainer, iteration, is_loading=True)
    loaded = dist_checkpointing.load(state, path)
    unwrap_model(trainer.model[0]).load_state_dict(loaded["model"])
    trainer.optimizer.load_state_dict(loaded["optimizer"])
    data = loaded["data"]
    cfg = trainer.cfg
    if data["global_batch_size"] != cfg.global_batch_size or data["seed"] != cfg.seed:
        raise ValueError(
            f"--resume: checkpoint {path} was written with global_batch_size={data['global_batch_size']}, "
            f"seed={data['seed']}; this run has global_batch_size={cfg.global_batch_size}, seed={cfg.seed}: "
            "the data stream would not continue where it stopped"
        )
    trainer.iteration = iteration
    return iteration
