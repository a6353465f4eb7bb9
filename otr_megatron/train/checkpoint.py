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
Another run that starts from a checkpoint (compare's arms) gets a copy from `copy_checkpoint`, which
also moves ``latest`` last (`point_latest`), so a copy killed midway is never resumed.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shutil

import torch

from otr_megatron.train.errors import CheckpointError, NothingToDo

LATEST = "latest"
MANIFEST = "otr_manifest.json"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
# Settings a resume must keep: the weights' shapes (a changed one cannot load) and the data stream.
JOB_MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "position_embedding_type",
                  "share_embeddings_and_output_weights", "transformer_impl")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def checkpoint_errors() -> tuple[type[BaseException], ...]:
    """What a failed distributed-checkpoint save or load raises: any Exception, and torch's
    `CheckpointException`, which derives from BaseException (so `except Exception` misses it) and
    carries every rank's failure. KeyboardInterrupt and SystemExit stay out on purpose."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # pragma: no cover - torch without distributed checkpointing
        return (Exception,)
    return (Exception, CheckpointException)


def root_causes(e: BaseException) -> list[BaseException]:
    """`e`, its causes and contexts, and for a CheckpointException each rank's failure, in order."""
    out, todo, seen = [], [e], set()
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        out.append(x)
        for failure in (getattr(x, "failures", None) or {}).values():  # {rank: (exception, traceback)}
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
        todo += [x.__cause__, x.__context__]
    return out


def describe(e: BaseException) -> str:
    """One line for an exception: the innermost rank failure of a CheckpointException (its own text
    is a dict of tracebacks), else the exception itself, as ``Type: first line``."""
    causes = root_causes(e)
    pick = next((c for c in causes[1:] if type(c).__name__ != "CheckpointException"), causes[0]) \
        if type(e).__name__ == "CheckpointException" else e
    text = (str(pick).strip().splitlines() or [""])[0]
    if len(text) > 240:  # e.g. a KeyError that lists every key of the checkpoint
        text = text[:240] + " ..."
    return f"{type(pick).__name__}: {text}".rstrip(": ")


def is_disk_full(e: BaseException, path: str | None = None) -> bool:
    """An out-of-space failure: an OSError with ENOSPC/EDQUOT anywhere in `e`, or (torch's zip
    writer only says ``unexpected pos 704 vs 598``) a filesystem under `path` with < 1 MiB free."""
    for c in root_causes(e):
        if isinstance(c, OSError) and c.errno in NO_SPACE or "No space left on device" in str(c):
            return True
    return path is not None and free_bytes(path) < 2**20


def free_bytes(path: str) -> int:
    """Free bytes of the filesystem holding `path` (or its nearest existing parent)."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return 2**62


def job_record(cfg) -> dict:
    """What a checkpoint must match to be continued: {key: value} with train-config key names."""
    rec = {"seed": cfg.seed, "global_batch_size": cfg.global_batch_size}
    rec.update({f"model.{k}": getattr(cfg.model, k) for k in JOB_MODEL_KEYS})
    if cfg.model.position_embedding_type == "learned_absolute":  # its table has seq_length rows
        rec["data.seq_length"] = cfg.data.seq_length
    return rec


def job_problem(cfg, saved: dict, path: str) -> str | None:
    """None if this run may continue a checkpoint written with job record `saved`, else the line."""
    now = job_record(cfg)
    changed = [(k, saved[k], now.get(k)) for k in saved if k in now and saved[k] != now[k]]
    if not changed:
        return None
    was = ", ".join(f"{k}={v!r}" for k, v, _ in changed)
    has = ", ".join(f"{k}={v!r}" for k, _, v in changed)
    return (f"--resume: checkpoint {path} was written with {was}; this run has {has}: a resume continues the same "
            "model and data stream; restore those settings, or start a fresh run in another --output-dir")


def stage_problem(cfg, iteration: int, data: dict, path: str) -> str | None:
    """None if this run's stages put the checkpoint's data position where it was, else the line.

    The checkpoint at `iteration` has done `ce` warm-start (cross-entropy) steps and the rest
    fine-tuning steps; this run counts min(iteration, pretrain_iters) of the first kind. If those
    differ, the data stream and the loss would not continue (e.g. cross entropy again after an OTR
    step); refused rather than silently retrained."""
    k = int(data["consumed_samples"]) // max(int(data["global_batch_size"]), 1)
    ce = k if data["stage"] == "pretrain" else iteration - k
    ce_now = min(iteration, cfg.pretrain_iters)
    if ce == ce_now:
        return None
    ft = iteration - ce
    fix = f"pretrain_iters={ce}" if ft else f"pretrain_iters >= {iteration}"
    return (f"--resume: checkpoint {path} is at iteration {iteration} after {ce} warm-start (cross-entropy) and {ft} "
            f"fine-tuning step(s); with pretrain_iters={cfg.pretrain_iters} this run would count {ce_now} and "
            f"{iteration - ce_now}, so neither the data position nor the loss would continue where it stopped; "
            f"resume with {fix}")


@dataclasses.dataclass
class ResumeInfo:
    """The checkpoint `--resume` continues from, as the launcher checked it."""

    path: str
    note: str | None
    iteration: int


def read_manifest(path: str) -> dict:
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            rec = json.load(f)
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def inspect_resume(cfg, root: str) -> ResumeInfo:
    """In the launcher, before any worker: the checkpoint to continue, checked against this run's
    settings from its manifest (older checkpoints without those records are checked on load).
    Raises CheckpointError, or NothingToDo when the checkpoint is at or past the run's last
    iteration and the run's summary.json exists (it is left as it is)."""
    path, note = select_checkpoint(root)
    manifest = read_manifest(path)
    m = _ITER_DIR.match(os.path.basename(path))
    iteration = int(manifest.get("iteration", int(m.group(1)) if m else 0))
    if isinstance(manifest.get("job"), dict):
        problem = job_problem(cfg, manifest["job"], path)
        if problem:
            raise CheckpointError(problem)
    if isinstance(manifest.get("data"), dict):
        problem = stage_problem(cfg, iteration, manifest["data"], path)
        if problem:
            raise CheckpointError(problem)
    summary = os.path.join(os.path.dirname(root), "summary.json")
    if iteration >= cfg.total_iters and os.path.isfile(summary):
        raise NothingToDo(
            f"nothing to do: checkpoint {path} is at iteration {iteration} and this run has pretrain_iters + "
            f"finetune_iters = {cfg.total_iters}; the run's results are unchanged ({summary}); raise finetune_iters "
            "to train further"
        )
    return ResumeInfo(path, note, iteration)


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
    state = {
        "model": model_sd,
        "optimizer": trainer.optimizer.sharded_state_dict(model_sd, is_loading=is_loading),
        "iteration": iteration,
        # Data position: the next global batch of `stage` starts at this stream position.
        "data": data_position(cfg, iteration),
    }
    if not is_loading:  # older checkpoints lack it; it is read with load_common_state_dict
        state["job"] = job_record(cfg)
    return state


def data_position(cfg, iteration: int) -> dict:
    stage, k = _stage_of(cfg, iteration) if iteration < cfg.total_iters else ("finetune", cfg.finetune_iters)
    return {"stage": stage, "consumed_samples": k * cfg.global_batch_size, "seed": cfg.seed,
            "global_batch_size": cfg.global_batch_size}


def _stage_of(cfg, it: int) -> tuple[str, int]:
    return ("pretrain", it) if it < cfg.pretrain_iters else ("finetune", it - cfg.pretrain_iters)


def _list_files(path: str) -> dict[str, int]:
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, path)
            if not rel.startswith(MANIFEST):
                out[rel] = os.path.getsize(full)
    return out


def write_manifest(path: str, iteration: int, extra: dict | None = None) -> None:
    """Record every file of a finished checkpoint with its size (written atomically), and `extra`
    (the job record and data position, which the launcher checks a --resume against)."""
    files = _list_files(path)  # before the .tmp below exists
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"iteration": iteration, "files": files, **(extra or {})}, f, indent=1, sort_keys=True)
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


def read_latest(root: str) -> str | None:
    """The directory name ``root/latest`` holds, or None when it is missing or empty."""
    try:
        with open(os.path.join(root, LATEST), encoding="utf-8") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def point_latest(root: str, name: str) -> None:
    """Make ``root/latest`` name `name` by an atomic rename: a crash leaves the old one (or none),
    never a half-written one."""
    tmp = os.path.join(root, LATEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST))


def copy_checkpoint(src_root: str, dst_root: str) -> str:
    """Copy the checkpoint ``src_root/latest`` names into `dst_root` and point ``dst_root/latest`` at
    it (another run continues from identical weights, optimizer state and data position).

    The copy is made under ``<name>.partial`` (never a resume candidate), checked complete, renamed to
    ``<name>``, and only then is ``latest`` moved: a copy killed at any point leaves no ``latest``
    naming a partial checkpoint, and calling this again starts over. `dst_root` must not have a
    ``latest`` yet; anything else in it is what an interrupted copy left, and is removed. Returns the
    copied checkpoint's path; raises CheckpointError when the source has no complete checkpoint."""
    name = read_latest(src_root)
    if name is None:
        raise CheckpointError(f"no checkpoint to copy under {src_root} ({LATEST} is missing or empty)")
    src = os.path.join(src_root, name)
    problem = checkpoint_problem(src, legacy_ok=True)
    if problem is not None:
        raise CheckpointError(f"cannot copy checkpoint {src} ({os.path.join(src_root, LATEST)} names it): {problem}")
    if read_latest(dst_root) is not None:
        raise CheckpointError(f"{dst_root} already has a {LATEST} checkpoint; copying {src} over it is refused")
    if os.path.isdir(dst_root):
        shutil.rmtree(dst_root)
    os.makedirs(dst_root)
    partial = os.path.join(dst_root, name + ".partial")
    shutil.copytree(src, partial)
    problem = checkpoint_problem(partial, legacy_ok=True) or (
        None if _list_files(partial) == _list_files(src) else "its files or sizes differ from the source's")
    if problem is not None:  # e.g. the source was overwritten while it was copied
        raise CheckpointError(f"the copy of checkpoint {src} in {partial} is incomplete: {problem}")
    dst = os.path.join(dst_root, name)
    os.rename(partial, dst)
    point_latest(dst_root, name)
    return dst


def save_checkpoint(trainer, iteration: int) -> str:
    """Save all ranks' shards, then the manifest, then move ``latest`` (rank 0, atomic rename)."""
    from megatron.core import dist_checkpointing

    name = f"iter_{iteration:07d}"
    path = os.path.join(trainer.ckpt_root, name)
    try:
        if _rank0():
            if os.path.isdir(path):  # left by a crash or by the part of this run before a resume fallback
                shutil.rmtree(path)
            os.makedirs(path, exist_ok=True)
        _barrier()
        # its writer logs "Local process 0 encountered an error: ..." before raising; the raised error
        # is reported below (one line for a full disk, the traceback otherwise)
        writer_log = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
        level = writer_log.level
        writer_log.setLevel(logging.CRITICAL)
        try:
            dist_checkpointing.save(_state(trainer, iteration, is_loading=False), path)
        finally:
            writer_log.setLevel(level)
        _barrier()
        if _rank0():
            write_manifest(path, iteration, {"job": job_record(trainer.cfg), "data": data_position(trainer.cfg, iteration)})
            point_latest(trainer.ckpt_root, name)
    except checkpoint_errors() as e:
        if not is_disk_full(e, path):
            raise  # not the user's to fix: keep the traceback
        raise CheckpointError(_disk_full_message(trainer.ckpt_root, path, iteration)) from None
    _barrier()
    return path


def _disk_full_message(root: str, path: str, iteration: int) -> str:
    """The line for a save that ran out of space; removes the partial directory (never a resume
    candidate: it has no manifest, and ``latest`` was not moved) to give the space back."""
    free = free_bytes(root)
    if _rank0():
        shutil.rmtree(path, ignore_errors=True)
        try:
            os.remove(os.path.join(root, LATEST + ".tmp"))
        except OSError:
            pass
    try:
        with open(os.path.join(root, LATEST), encoding="utf-8") as f:
            kept = f"the latest checkpoint is still {os.path.join(root, f.read().strip())}"
    except OSError:
        kept = "no earlier checkpoint"
    return (f"no space left on device while saving checkpoint iteration {iteration} to {path} "
            f"({free // 1024} KiB were free); the partial save was removed and {kept}; free some space, then --resume")


def load_checkpoint(trainer, path: str) -> int:
    """Restore model and optimizer in place and set `trainer.iteration`; check the data position."""
    from megatron.core import dist_checkpointing

    from otr_megatron.mcore.hook import unwrap_model

    cfg = trainer.cfg
    try:
        # peek at the saved iteration (0.16 keeps it in common.pt, 0.19 inside the .distcp files)
        common = dist_checkpointing.load_common_state_dict(path)
        iteration = int(common["iteration"])
    except checkpoint_errors() as e:
        raise CheckpointError(f"--resume: could not read checkpoint {path} ({describe(e)}); point "
                              f"{os.path.join(os.path.dirname(path), LATEST)} at an older iter_* directory or start "
                              "fresh") from None
    # before the tensors: what changed is named here, not as a shape mismatch deep in the loader
    problem = (job_problem(cfg, common["job"], path) if isinstance(common.get("job"), dict) else None) \
        or _data_problem(cfg, iteration, common.get("data"), path)
    if problem:
        raise CheckpointError(problem)
    try:
        state = _state(trainer, iteration, is_loading=True)
        loaded = dist_checkpointing.load(state, path)
    except checkpoint_errors() as e:  # complete by its manifest, yet unloadable into this model
        raise CheckpointError(
            f"--resume: could not load checkpoint {path} into this model ({describe(e)}); a resume needs the "
            "model settings it was written with (model.*, data.seq_length for learned_absolute positions), or point "
            f"{os.path.join(os.path.dirname(path), LATEST)} at an older iter_* directory, or start fresh"
        ) from None
    unwrap_model(trainer.model[0]).load_state_dict(loaded["model"])
    trainer.optimizer.load_state_dict(loaded["optimizer"])
    trainer.iteration = iteration
    return iteration


def _data_problem(cfg, iteration: int, data, path: str) -> str | None:
    """The data stream of the checkpoint (seed, batch size, stage position) against this run's."""
    if not isinstance(data, dict):
        return None
    if data["global_batch_size"] != cfg.global_batch_size or data["seed"] != cfg.seed:
        return (f"--resume: checkpoint {path} was written with global_batch_size={data['global_batch_size']}, "
                f"seed={data['seed']}; this run has global_batch_size={cfg.global_batch_size}, seed={cfg.seed}: "
                "the data stream would not continue where it stopped")
    return stage_problem(cfg, iteration, data, path)
