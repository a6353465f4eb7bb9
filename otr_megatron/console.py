"""A quiet console for our CLIs: megatron-core's "not installed" warnings become one line.

Importing megatron-core without Transformer Engine and Apex prints six UserWarnings ("Transformer
Engine and Apex are not installed. Falling back to ...", "Apex is not installed. Falling back to Torch
Norm"), per process, ahead of anything of ours. On a CPU they say nothing useful: the torch fallbacks
are the code a CPU runs anyway. `install()`, called once at CLI start, replaces them with one line that
names what is missing and why it does not matter on CPU; every other warning is shown as before.

One line for the whole job, not one per rank: spawned workers (the demo's, the train job's) inherit
`OTR_MEGATRON_CONSOLE_DIR`, and `otr_megatron/__init__.py` installs the same filter in them; the first
process to hit a known warning claims a marker file there and speaks, the others stay quiet. Ranks
other than 0 (RANK, as torchrun sets it) never speak. Asking Python for warnings explicitly (`-W`,
PYTHONWARNINGS) turns this off: then every warning shows.

megatron-core >= 0.17 also speaks about its own internals, whatever the job sets: "GPTModel IS
DEPRECATED", "MCore's async save is deprecated" (its synchronous save calls its async one), "full scope
is deprecated" (its own default), "MimoModelConfig is experimental", "absl.logging is not installed" (it
falls back to the standard logging). None names something a user of this job can change, so the job
drops them (`INTERNAL_WARNINGS`, `INTERNAL_LOGS`); every other megatron-core warning and log shows.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings

ENV = "OTR_MEGATRON_CONSOLE_DIR"
# megatron-core's wording (0.15 ... 0.19): "Transformer Engine and Apex are not installed. ...",
# "Apex is not installed. ..."; group 1 names what is missing
KNOWN = re.compile(r"^((?:Transformer Engine|Apex)(?: and (?:Transformer Engine|Apex))?) (?:is|are) not installed\b")

# megatron-core's notices about its own internals (0.17 ... 0.19), by message start
INTERNAL_WARNINGS = re.compile(r"^(?:absl\.logging is not installed|full scope is deprecated|"
                               r"MimoModelConfig is experimental)\b")
INTERNAL_LOGS = {  # logger name: message start (logging records, not warnings: -W does not reach them)
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
}

_STATE: dict = {"previous": None, "named": set()}


def is_internal_notice(message, category, filename: str) -> bool:
    """True for a megatron-core warning about its own internals (`INTERNAL_WARNINGS`)."""
    return (issubclass(category, UserWarning) and f"{os.sep}megatron{os.sep}" in str(filename)
            and INTERNAL_WARNINGS.match(str(message)) is not None)


class _DropInternal(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def drop_internal_logs() -> None:
    """Drop megatron-core's internal log notices (`INTERNAL_LOGS`) in this process; idempotent. Called
    by `install()` and by every rank of the jobs (spawned workers under -W do not install the rest)."""
    for name, start in INTERNAL_LOGS.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropInternal) for f in log.filters):
            log.addFilter(_DropInternal(start))


def known_missing(message, category, filename: str) -> list[str] | None:
    """What a megatron-core "not installed" warning says is missing, or None for any other warning."""
    if not issubclass(category, UserWarning) or f"{os.sep}megatron{os.sep}" not in str(filename):
        return None
    m = KNOWN.match(str(message))
    return m.group(1).split(" and ") if m else None


def summary_line(missing: list[str]) -> str:
    """The one line that stands for megatron-core's warnings about `missing`."""
    names = " and ".join(missing)
    verb = "is" if len(missing) == 1 else "are"
    return (f"otr-megatron: {names} {verb} not installed, so megatron-core uses its plain-torch fallbacks "
            f"(optimizers, norms, multi-tensor ops); on CPU those are the only path anyway (its warnings "
            f"folded into this line; on a GPU, install transformer_engine for fused kernels and FP8)")


def _claim(name: str) -> bool:
    """True for the first process of the job to report `name` (a marker file), and never on rank > 0."""
    if os.environ.get("RANK", "0") not in ("", "0"):
        return False
    folder = os.environ.get(ENV)
    if not folder:
        return True
    try:
        os.close(os.open(os.path.join(folder, "said-" + name.replace(" ", "_")), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    except OSError:  # the folder is gone (its owner exited): a repeated line beats a lost one
        return True
    return True


def _show(message, category, filename, lineno, file=None, line=None):
    if is_internal_notice(message, category, filename):
        return
    missing = known_missing(message, category, filename)
    if missing is None:
        return _STATE["previous"](message, category, filename, lineno, file, line)
    new = [n for n in missing if n not in _STATE["named"]]
    _STATE["named"].update(missing)
    spoken = [n for n in new if _claim(n)]
    if spoken:
        print(summary_line(spoken), file=sys.stderr if file is None else file, flush=True)


def install() -> bool:
    """Fold the known warnings into one line for this process and the workers it starts; idempotent.

    Returns False (and changes no warning) when the user asked for warnings with -W or PYTHONWARNINGS;
    megatron-core's internal log notices are dropped either way.
    """
    drop_internal_logs()
    if sys.warnoptions:
        return False
    if _STATE["previous"] is None:
        _STATE["previous"] = warnings.showwarning
        warnings.showwarning = _show
    if not os.environ.get(ENV):
        folder = tempfile.mkdtemp(prefix="otr-megatron-console-")
        os.environ[ENV] = folder
        atexit.register(shutil.rmtree, folder, True)
    return True
