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
"""

from __future__ import annotations

import atexit
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

_STATE: dict = {"previous": None, "named": set()}


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

    Returns False (and changes nothing) when the user asked for warnings with -W or PYTHONWARNINGS.
    """
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
