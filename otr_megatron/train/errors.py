"""Errors of `otr-megatron train` that are the user's to fix (or a run that diverged), not bugs.

Each is reported as one line, ``otr-megatron train: error: <message>``, with no traceback, by the
launching process, also when it was raised inside a spawned worker (`main.py` passes it back
through a file). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TrainJobError(Exception):
    """Base: a message for the user and the exit status of the command."""

    exit_code = 2


class CheckpointError(TrainJobError):
    """--resume cannot continue: no checkpoint, a damaged one with nothing to fall back to, or one
    written with a different data stream."""


class RunDirError(TrainJobError):
    """The output directory is in use by another run, holds results of a previous run (a fresh run
    refuses to overwrite them without --overwrite), or is not writable."""


class DivergenceError(TrainJobError):
    """Training produced a non-finite loss, gradient norm or parameter (or a parameter beyond
    `max_param_abs`); the job stopped before saving it."""

    exit_code = 1


class NothingToDo(TrainJobError):
    """--resume of a run whose checkpoint is at or past its last iteration: nothing is trained or
    written (the run's summary.json and metrics stay as they are); reported as one line, exit 0."""

    exit_code = 0


class DiskFullError(TrainJobError):
    """A write failed because the filesystem is full (or over quota)."""


def as_user_error(e: BaseException) -> TrainJobError | None:
    """A user error for an OSError the user has to fix (no space left), else None (a bug)."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {e.filename}" if e.filename else ""
        return DiskFullError(f"no space left on device{where} ({e.strerror}); free some space, then --resume "
                             "(checkpoints are only ever replaced by complete ones)")
    return None


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types reported as one line (imported lazily: data pulls in `datasets`)."""
    from otr_megatron.data.records import SFTDataError
    from otr_megatron.train.config import ConfigError

    return (TrainJobError, ConfigError, SFTDataError)


def exit_code(e: BaseException) -> int:
    return int(getattr(e, "exit_code", 2))


def error_line(e: BaseException) -> str:
    """The single line printed for a user error (newlines inside the message are folded)."""
    msg = " ".join(str(e).split("\n")).strip() or type(e).__name__
    if isinstance(e, NothingToDo):
        return f"otr-megatron train: {msg}"
    return f"otr-megatron train: error: {msg}"
