"""Input checks of the OTR loss without a blocking host sync (issue 14, `OTRConfig.check_inputs`).

Every call all-gathers a small fingerprint of its inputs (`core/contract.py`, ``FP_*``): shapes,
settings, step, hashes of labels and token keys, out-of-range labels. What happens with it:

- ``"deferred"`` (default): the gathered fingerprints are copied without blocking to pinned host
  memory, behind a CUDA event, and checked when that event has passed: at the start of the next
  call, or by `check_pending()`, which the integrations call once per step (it waits for the
  copies). The error names the step of the call it came from. On CPU tensors there is nothing to
  overlap (the copy is done when it returns), so the check runs at the end of the same call: a CPU
  run raises where it did before. Under CUDA-graph capture nothing is read at capture time: the
  captured call's gathered fingerprint (a graph output, rewritten by every replay) is registered
  once, and every later `check_pending()` reads it (a blocking copy, once per step).
- ``"eager"``: read at once (one blocking copy per call), with up to 5 examples of bad labels.
- ``"off"``: no fingerprint, no collective, no check.

A mismatch across ranks of the number of tokens or the shard makes the statistics all-gather of the
same call fail (or hang, on NCCL) before a deferred check can name it; use "eager" to debug.
"""

from __future__ import annotations

import atexit
import sys
import threading
from collections import deque

import torch

from otr_megatron.core.contract import (
    FP_BAD,
    FP_BAD_FIRST,
    FP_BAD_MAX,
    FP_BAD_MIN,
    FP_COMPARED,
    FP_KEYS,
    FP_LABELS,
    FP_SETTINGS,
    FP_SHARD,
    FP_STEP,
    FP_TOKENS,
    FP_VOCAB,
)

FIELD_NAMES = {FP_TOKENS: "number of tokens", FP_SHARD: "logits last dimension", FP_VOCAB: "vocab_size",
               FP_SETTINGS: "OTR settings / ignore_index", FP_STEP: "step", FP_LABELS: "labels",
               FP_KEYS: "token_keys"}


class _Record:
    """One call's gathered fingerprints on their way to the host."""

    def __init__(self, sources, vocab_size: int, ignore_index: int, captured: bool = False):
        self.vocab_size, self.ignore_index, self.captured = vocab_size, ignore_index, captured
        self.event = None
        if captured:  # graph outputs: read them (blocking) when asked, after the replay
            self.host = sources
            return
        cuda = sources[0].device.type == "cuda"
        self.host = []
        for source in sources:
            host = torch.empty(source.shape, dtype=source.dtype, pin_memory=cuda)
            host.copy_(source, non_blocking=cuda)
            host.otr_host_copy = True  # host memory: reading it is no device sync (tests tell)
            self.host.append(host)
        if cuda:
            self.event = torch.cuda.Event()
            self.event.record()

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def rows(self) -> tuple:
        """(gathered rows [tp][FP_COMPARED], this rank's whole fingerprint [FP_FIELDS])."""
        if self.captured:
            return tuple(t.cpu().tolist() for t in self.host)
        if self.event is not None:
            self.event.synchronize()  # passed already when ready() said so
        return tuple(t.tolist() for t in self.host)  # host memory: no device sync


_PENDING: deque = deque()  # records of calls not yet checked, oldest first
_CAPTURED: list = []  # records of captured calls: checked at every check_pending()
_LOCK = threading.Lock()  # calls from several threads share the queue


def problem(rows: list, vocab_size: int, ignore_index: int, examples: list | None = None,
            local: list | None = None) -> str | None:
    """The one-line error for gathered fingerprint rows ``[tp][>= FP_COMPARED]`` and this rank's whole
    fingerprint ``local`` (default ``rows[0]``), or None if all is well. Only the first FP_COMPARED
    fields are gathered: the label-range fields agree on every rank once the label hashes do."""
    step = rows[0][FP_STEP]
    where = f"vocab_parallel_otr_loss at step {step}"
    for field in range(FP_COMPARED):
        values = [r[field] for r in rows]
        if len(set(values)) > 1:
            return (f"{where}: tensor-parallel ranks disagree on {FIELD_NAMES[field]} (per rank: {values}); every TP "
                    "rank must call vocab_parallel_otr_loss with the same labels, token keys, step and settings and "
                    "equally shaped logits")
    if step < 0:
        return f"{where}: step must be an integer >= 0 (the training iteration), got {step}"
    row = rows[0] if local is None else local
    if row[FP_BAD]:
        if examples is not None:
            seen = f"e.g. {examples}"
        else:
            lows = f"smallest {row[FP_BAD_MIN]}, " if row[FP_BAD_MIN] < 0 else ""
            highs = f"largest {row[FP_BAD_MAX]}, " if row[FP_BAD_MAX] >= vocab_size else ""
            seen = f"{lows}{highs}first at flat position {row[FP_TOKENS] - row[FP_BAD_FIRST]}"
        return (f"{where}: labels must be token ids in [0, vocab_size={vocab_size}) or ignore_index={ignore_index}; "
                f"found {row[FP_BAD]} outside ({seen})")
    return None


def _message(record: _Record) -> str | None:
    gathered, local = record.rows()
    return problem(gathered, record.vocab_size, record.ignore_index, local=local)


def _check_queue(wait: bool) -> None:
    """Check pending records oldest first (all of them if ``wait``, else those whose copy has
    arrived). On the first problem the queue is emptied before raising, so a caught error never
    resurfaces later inside an unrelated call."""
    with _LOCK:
        while _PENDING and (wait or _PENDING[0].ready()):
            msg = _message(_PENDING.popleft())
            if msg:
                _PENDING.clear()
                raise ValueError(msg)


def _reads_now(device: torch.device) -> bool:
    """Whether a deferred check is read at the end of its own call: on CPU (nothing to overlap)."""
    return device.type != "cuda"


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def submit(gathered: torch.Tensor, local: torch.Tensor, mode: str, vocab_size: int, ignore_index: int,
           labels=None) -> None:
    """Check the gathered fingerprints ``[tp, FP_COMPARED]`` and this rank's ``[FP_FIELDS]`` as
    ``mode`` says (module docstring)."""
    if mode == "eager":
        rows, mine = gathered.tolist(), local.tolist()  # the blocking reads
        examples = None
        if mine[FP_BAD] and labels is not None:
            bad = ((labels < 0) & (labels != ignore_index)) | (labels >= vocab_size)
            examples = labels[bad].flatten()[:5].tolist()
        msg = problem(rows, vocab_size, ignore_index, examples, local=mine)
        if msg:
            raise ValueError(msg)
        return
    if _capturing(gathered.device):
        _CAPTURED.append(_Record((gathered, local), vocab_size, ignore_index, captured=True))
        return
    _PENDING.append(_Record((gathered, local), vocab_size, ignore_index))
    if _reads_now(gathered.device):
        check_ready()


def check_ready() -> None:
    """Check, oldest first, the pending records whose copy has arrived (never blocks); raises the
    first problem found. Called at the start of every call; a no-op during graph capture."""
    if torch.cuda.is_available() and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        return
    _check_queue(wait=False)


def check_pending() -> None:
    """Raise the first problem of any call not yet checked (the error names its step), waiting for
    their copies to arrive; then nothing is pending. The integrations call this once per step; call it
    yourself after the last step of a loop of your own. Under CUDA-graph capture it does nothing; after
    a replay it reads every captured call's fingerprints (one blocking copy each): those of the latest
    replay, so a graph replayed several times per step needs a check_pending() after each replay."""
    if torch.cuda.is_available() and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        return
    _check_queue(wait=True)
    for record in _CAPTURED:
        msg = _message(record)
        if msg:
            raise ValueError(msg)


def clear_captured() -> None:
    """Forget the captured calls' fingerprints (when their CUDA graph is dropped)."""
    _CAPTURED.clear()


def pending_count() -> int:
    """Calls whose fingerprints have not been checked yet (captured calls not included)."""
    return len(_PENDING)


@atexit.register
def _report_at_exit() -> None:
    """A run whose last calls were never checked (a training loop without a final check_pending())
    still reports their input errors: on stderr, at interpreter exit, never silently dropped."""
    try:
        check_pending()
    except ValueError as e:
        print(f"otr_megatron: a deferred input check failed after the last check_pending(): {e}", file=sys.stderr)
    except Exception:  # the process is ending (e.g. CUDA already torn down): nothing more to say
        pass

