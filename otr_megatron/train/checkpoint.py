"""Megatron distributed checkpoints of the job: model, optimizer, iteration and data position.

Layout: ``<output_dir>/checkpoints/iter_XXXXXXX/`` (a `megatron.core.dist_checkpointing`
directory, loadable in another TP/PP layout) and ``<output_dir>/checkpoints/latest`` holding the
directory name of the newest complete checkpoint.

Completeness: after every rank has written its shards, rank 0 writes ``otr_manifest.json`` into the
checkpoint directory (iteration, every file with its size), and only then moves ``latest`` to it.
A crash mid-save therefore never moves ``latest``, and a checkpoint damaged later (a truncated
shard, a deleted ``.metadata``) is recognised before loading. `--resume` falls back from a damaged
``latest`` to the newest complete checkpoint and says so. The trainer only saves parameters it has
checked to be finite (`Trainer.check_params`), so ``latest`` never names diverged weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

from otr_megatron.train.errors import CheckpointError

LATEST = "latest"
MANIFEST = "otr_manifest.json"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")


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


def _list_files(path: str) -> dict[str, int]:
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, path)
            if not rel.startswith(MANIFEST):
                out[rel] = os.path.getsize(full)
    return out


def write_manifest(path: str, iteration: int) -> None:
    """Record every file of a finished checkpoint with its size (written atomically)."""
    files = _list_files(path)  # before the .tmp below exists
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"iteration": iteration, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MANIFEST))


def checkpoint_problem(path: str, legacy_ok: bool = False) -> str | None:
    """None if `path` is a complete checkpoint; otherwise why not (missing/truncated file, ...).

    legacy_ok: accept a checkpoint without manifest (written before manifests existed) if megatron's
    own ``metadata.json`` and ``.metadata`` are there; only for the one ``latest`` names (``latest``
    was always written after the save finished), never for a fallback candidate.
    """
    if not os.path.isdir(path):
        return "the directory does not exist"
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        if legacy_ok:
            missing = [f for f in ("metadata.json", ".metadata") if not os.path.isfile(os.path.join(path, f))]
            return f"{missing[0]} is missing" if missing else None
        return f"no {MANIFEST} (the save did not finish)"
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
        files = dict(manifest["files"])
        int(manifest["iteration"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    if not files:
        return f"{MANIFEST} lists no files"
    for rel, size in sorted(files.items()):
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        actual = os.path.getsize(full)
        if actual != size:
            return f"{rel} has {actual} bytes, the save wrote {size} (truncated or overwritten)"
    return None


def _iteration_dirs(root: str) -> list[tuple[int, str]]:
    """(iteration, path) of every iter_* directory under `root`, newest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _ITER_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found, reverse=True)


def select_checkpoint(root: str) -> tuple[str, str | None]:
    """The checkpoint `--resume` continues from: the one ``latest`` names if it is complete, else the
    newest complete one. Returns ``(path, note)``: note says why ``latest`` was passed over (None if
    it was not). Raises CheckpointError (naming the paths) when there is nothing to resume from."""
    marker = os.path.join(root, LATEST)
    note = None
    named = None
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            name = f.read().strip()
        named = os.path.join(root, name)
        problem = checkpoint_problem(named, legacy_ok=True) if name else "it is empty"
        if problem is None:
            return named, None
        note = f"{marker} names {named}, which is damaged: {problem}"
    elif not os.path.isdir(root):
        raise CheckpointError(
            f"--resume: no checkpoint under {root} (the directory does not exist); "
            "run without --resume to start a fresh run"
        )
    for it, path in _iteration_dirs(root):
        if path == named:
            continue
        if checkpoint_problem(path) is None:
            if note is None:
                note = f"{marker} is missing"
            return path, f"{note}; resuming from the newest complete checkpoint {path} (iteration {it})"
    if note is None:
        raise CheckpointError(
            f"--resume: no checkpoint under {root} (no '{LATEST}' file and no complete iter_* directory); "
            "run without --resume to start a fresh run"
        )
    raise CheckpointError(f"--resume: {note}; and no other complete checkpoint under {root} to fall back to")


def save_checkpoint(trainer, iteration: int) -> str:
    """Save all ranks' shards, then the manifest, then move ``latest`` (rank 0, atomic rename)."""
    from megatron.core import dist_checkpointing

    name = f"iter_{iteration:07d}"
    path = os.path.join(trainer.ckpt_root, name)
    if _rank0():
        if os.path.isdir(path):  # left by a crash or by the part of this run before a resume fallback
            shutil.rmtree(path)
        os.makedirs(path, exist_ok=True)
    _barrier()
    dist_checkpointing.save(_state(trainer, iteration, is_loading=False), path)
    _barrier()
    if _rank0():
        write_manifest(path, iteration)
        tmp = os.path.join(trainer.ckpt_root, LATEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(name + "\n")
        os.replace(tmp, os.path.join(trainer.ckpt_root, LATEST))
    _barrier()
    return path


def load_checkpoint(trainer, path: str) -> int:
    """Restore model and optimizer in place and set `trainer.iteration`; check the data position."""
    from megatron.core import dist_checkpointing

    from otr_megatron.mcore.hook import unwrap_model

    try:
        # peek at the saved iteration (0.16 keeps it in common.pt, 0.19 inside the .distcp files)
        iteration = int(dist_checkpointing.load_common_state_dict(path)["iteration"])
        state = _state(trainer, iteration, is_loading=True)
        loaded = dist_checkpointing.load(state, path)
    except Exception as e:  # complete by its manifest, yet unreadable: name it, no megatron traceback
        raise CheckpointError(
            f"--resume: could not read checkpoint {path} ({type(e).__name__}: {e}); point "
            f"{os.path.join(os.path.dirname(path), LATEST)} at an older iter_* directory or start fresh"
        ) from e
    unwrap_model(trainer.model[0]).load_state_dict(loaded["model"])
    trainer.optimizer.load_state_dict(loaded["optimizer"])
    data = loaded["data"]
    cfg = trainer.cfg
    if data["global_batch_size"] != cfg.global_batch_size or data["seed"] != cfg.seed:
        raise CheckpointError(
            f"--resume: checkpoint {path} was written with global_batch_size={data['global_batch_size']}, "
            f"seed={data['seed']}; this run has global_batch_size={cfg.global_batch_size}, seed={cfg.seed}: "
            "the data stream would not continue where it stopped"
        )
    trainer.iteration = iteration
    return iteration
