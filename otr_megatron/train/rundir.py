"""The output directory of `otr-megatron train`: one run at a time, results never replaced silently.

`prepare_output_dir` runs in the launching process before any worker is spawned:

* lock: ``<output_dir>/.otr-megatron.lock`` (created with O_EXCL) records pid, host, start time and
  command of the run using the directory. A second run into it is refused with that record. A lock
  whose pid no longer runs on this host (or whose pid now belongs to a different process) is stale:
  it is replaced with a note. A lock from another host cannot be checked and is reported as is.
* results: a fresh run into a directory that already holds results (metrics.jsonl, summary.json,
  curves.png, checkpoints/) refuses unless `--overwrite` is given, which removes exactly
  those (and says so). `--resume` continues in place.
* checks that would otherwise fail late inside the workers: the directory is writable, the data
  files and tokenizer exist, and for `--resume` there is a checkpoint to continue from.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import socket
import sys

from otr_megatron.train.config import ConfigError, TrainConfig, resolve_path
from otr_megatron.train.errors import CheckpointError, RunDirError

LOCK_NAME = ".otr-megatron.lock"
RESULTS = ("metrics.jsonl", "summary.json", "curves.png", "checkpoints")  # config.yaml alone is no result


def _proc_start(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` is running: it exists and is not a zombie (exited, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _command_line() -> str:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "otr-megatron"
    if prog.endswith(".py"):  # python -m otr_megatron.cli ...
        prog = "python -m " + ("otr_megatron.cli" if prog == "cli.py" else "otr_megatron")
    return shlex.join([prog, *sys.argv[1:]])


class RunLock:
    """The lock file of one output directory, held by this process until `release()`."""

    def __init__(self, out: str):
        self.path = os.path.join(out, LOCK_NAME)
        self.held = False
        self.resume = None  # the ResumeInfo `prepare_output_dir` checked, for --resume

    def _record(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "proc_start": _proc_start(os.getpid()),
            "command": _command_line(),
        }

    def _read(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                rec = json.load(f)
            return rec if isinstance(rec, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _stale(self, rec: dict) -> bool:
        if rec.get("host") != socket.gethostname() or not isinstance(rec.get("pid"), int):
            return False
        pid = rec["pid"]
        if not pid_alive(pid):
            return True
        then, now = rec.get("proc_start"), _proc_start(pid)
        return then is not None and now is not None and then != now  # the pid was reused

    def acquire(self) -> str | None:
        """Take the lock; returns a note if a stale lock was replaced. Raises RunDirError if in use."""
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                rec = self._read()
                if rec is None:  # released between our open and read
                    continue
                if rec and self._stale(rec):
                    note = (f"removed the stale lock {self.path} of pid {rec['pid']} on {rec.get('host')} "
                            f"(started {rec.get('started')}), which no longer runs")
                    try:
                        os.remove(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                if not rec:
                    raise RunDirError(
                        f"output directory {os.path.dirname(self.path)} is locked by an unreadable {self.path}; "
                        "if no run uses this directory, delete that file"
                    ) from None
                raise RunDirError(
                    f"output directory {os.path.dirname(self.path)} is in use by another run: pid {rec.get('pid')} "
                    f"on {rec.get('host')}, started {rec.get('started')}, command: {rec.get('command')} "
                    f"(lock file {self.path}; delete it only if that run is gone)"
                ) from None
            except OSError as e:
                raise RunDirError(
                    f"output directory {os.path.dirname(self.path)} is not writable ({type(e).__name__}: {e.strerror or e})"
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._record(), f)
            self.held = True
            return note
        raise RunDirError(f"could not take the lock {self.path} (another run is starting at the same time?)")

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if not self.held:
            return
        rec = self._read()
        if rec and rec.get("pid") == os.getpid() and rec.get("host") == socket.gethostname():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.held = False


def existing_results(out: str) -> list[str]:
    """The result files/directories of a previous run present in `out`."""
    found = []
    for name in RESULTS:
        p = os.path.join(out, name)
        if os.path.isfile(p) or (os.path.isdir(p) and os.listdir(p)):
            found.append(name + ("/" if os.path.isdir(p) else ""))
    return found


def check_inputs(cfg: TrainConfig) -> None:
    """Data files and tokenizer exist (the data layer would say so too, but only inside a worker)."""
    d = cfg.data
    keys = []
    if cfg.pretrain_iters > 0:
        keys += [(f"data.pretrain[{i}]", p) for i, p in enumerate(d.pretrain)]
    if cfg.finetune_iters > 0:
        keys += [(f"data.train[{i}]", p) for i, p in enumerate(d.train)]
    keys += [(f"data.eval.{name}[{i}]", p) for name, ps in d.eval.items() for i, p in enumerate(ps)]
    for key, p in keys:
        if not os.path.isfile(resolve_path(p)):
            raise ConfigError(f"{key}={p!r}: no such file ({resolve_path(p)})")
    _check_tokenizer_dir(cfg)


def _check_tokenizer_dir(cfg: TrainConfig) -> None:
    from otr_megatron.data.tokenizer import tokenizer_dir_problem

    if cfg.data.tokenizer != "byte":
        problem = tokenizer_dir_problem(resolve_path(cfg.data.tokenizer))
        if problem:
            raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r}: {problem}")


def vocab_size(cfg: TrainConfig) -> int:
    """The tokenizer's real vocabulary, loaded here in the launcher (so a directory that does not
    load is one line before any worker, and the memory check knows the logits' width)."""
    from otr_megatron.data.tokenizer import ByteTokenizer, build_tokenizer

    if cfg.data.tokenizer == "byte":
        return ByteTokenizer.vocab_size
    _check_tokenizer_dir(cfg)
    try:
        return int(build_tokenizer(resolve_path(cfg.data.tokenizer)).vocab_size)
    except ImportError as e:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r} needs the `transformers` package ({e}); install "
                          "it or use data.tokenizer=byte") from None
    except (OSError, ValueError, TypeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r}: the directory does not load as a tokenizer "
                          f"({type(e).__name__}: {first})") from None


def _remove_result(out: str, name: str) -> None:
    """Remove one result entry of `out` itself: a symlink is unlinked, never followed, so
    --overwrite deletes nothing outside the named directory."""
    p = os.path.join(out, name.rstrip("/"))
    if os.path.islink(p) or not os.path.isdir(p):
        os.remove(p)
    else:
        shutil.rmtree(p)


def prepare_output_dir(cfg: TrainConfig, overwrite: bool = False, log=print) -> RunLock:
    """All output-directory checks and the lock, in the launching process. Returns the held lock
    (the caller releases it when the job ends; for --resume `lock.resume` is the checked
    checkpoint); raises RunDirError/CheckpointError/ConfigError, or NothingToDo (a --resume of a
    finished run: nothing is written)."""
    from otr_megatron.train.checkpoint import inspect_resume

    out = cfg.output_dir
    if cfg.resume and overwrite:
        raise ConfigError("--resume continues the run in --output-dir and --overwrite replaces it; give one of them")
    check_inputs(cfg)
    if cfg.resume and not os.path.isdir(out):
        raise CheckpointError(f"--resume: output directory {out} does not exist; run without --resume to start fresh")
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunDirError(f"output directory {out} is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create output directory {out} ({type(e).__name__}: {e.strerror or e})") from None
    lock = RunLock(out)  # creating the lock file is also the check that `out` is writable
    note = lock.acquire()
    try:
        if note:
            log(f"lock  {note}")
        if cfg.resume:  # raises if there is nothing to resume, or it was written with other settings
            lock.resume = inspect_resume(cfg, os.path.join(out, "checkpoints"))
        else:
            found = existing_results(out)
            if found and not overwrite:
                raise RunDirError(
                    f"output directory {out} already holds results of a previous run ({', '.join(found)}); "
                    "continue it with --resume, replace it with --overwrite, or choose another --output-dir"
                )
            for name in found:
                _remove_result(out, name)
            if found:
                log(f"overwrite: removed {', '.join(found)} from {out}")
    except OSError as e:
        lock.release()
        raise RunDirError(f"output directory {out}: {type(e).__name__}: {e}") from None
    except BaseException:
        lock.release()
        raise
    return lock
