"""The quiet console (otr_megatron/console.py): megatron-core's "not installed" warnings become one line.

Real processes, real megatron-core imports: the filter is process-global, so each case runs in a
fresh interpreter and the test counts the lines it printed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from otr_megatron import console

ROOT = Path(__file__).resolve().parents[1]
needs_mcore = pytest.mark.skipif(importlib.util.find_spec("megatron") is None
                                 or importlib.util.find_spec("megatron.core") is None,
                                 reason="megatron-core is not installed")
SUMMARY = "otr-megatron: Transformer Engine and Apex are not installed"
# what megatron-core prints at import without TE and Apex (0.15 ... 0.19: six warnings)
MCORE_IMPORT = "import megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs"


def _run(args: list[str], env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "RANK", console.ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _raw_warnings(stderr: str) -> list[str]:
    """Shown Transformer Engine / Apex warnings (0.19's absl-py one is an internal notice, dropped)."""
    return [ln for ln in stderr.splitlines() if "UserWarning:" in ln and ("Apex" in ln or "Transformer Engine" in ln)]


def _summaries(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("otr-megatron:") and "not installed" in ln]


@pytest.mark.parametrize("message, filename, expected", [
    ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
     "/x/site-packages/megatron/core/optimizer/__init__.py", ["Transformer Engine", "Apex"]),
    ("Apex is not installed. Falling back to Torch Norm", "/x/megatron/core/models/backends.py", ["Apex"]),
    ("Apex is not installed. Falling back to Torch Norm", "/x/my_project/model.py", None),  # not megatron's
    ("Transformer Engine is slow today", "/x/megatron/core/a.py", None),
    ("absl.logging is not installed. Using logging.getLogger", "/x/megatron/core/hyper_comm_grid.py", None),
])
def test_known_missing(message, filename, expected):
    assert console.known_missing(message, UserWarning, filename.replace("/", os.sep)) == expected


@pytest.mark.parametrize("message, filename, expected", [
    ("absl.logging is not installed. Using logging.getLogger", "/x/megatron/core/hyper_comm_grid.py", True),
    ("full scope is deprecated. Use empty cuda_graph_modules", "/x/megatron/core/transformer/t.py", True),
    ("MimoModelConfig is experimental and still under", "/x/megatron/core/models/mimo/c.py", True),
    ("full scope is deprecated. Use empty cuda_graph_modules", "/x/my_project/t.py", False),  # not megatron's
    ("the tokenizer is deprecated", "/x/megatron/core/a.py", False),
])
def test_internal_notices(message, filename, expected):
    assert console.is_internal_notice(message, UserWarning, filename.replace("/", os.sep)) is expected


def test_internal_log_notices_are_dropped_and_others_kept(caplog):
    """megatron-core >= 0.17 logs "GPTModel IS DEPRECATED" and (from its own synchronous save) "MCore's
    async save is deprecated"; only those messages, only on their loggers, are dropped."""
    import logging

    console.drop_internal_logs()
    console.drop_internal_logs()  # idempotent
    gpt = logging.getLogger("megatron.core.models.gpt.gpt_model")
    ckpt = logging.getLogger("megatron.core.dist_checkpointing.strategies.torch")
    assert sum(type(f).__name__ == "_DropInternal" for f in gpt.filters) == 1
    with caplog.at_level(logging.WARNING):
        gpt.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
        ckpt.warning("MCore's async save is deprecated and will be removed in the future releases.")
        gpt.warning("a real problem with the model")
        logging.getLogger("other").warning("GPTModel IS DEPRECATED (someone else's logger)")
    assert [r.getMessage() for r in caplog.records] == ["a real problem with the model",
                                                        "GPTModel IS DEPRECATED (someone else's logger)"]


def test_known_missing_ignores_other_categories():
    msg = "Apex is not installed. Falling back to Torch Norm"
    assert console.known_missing(msg, DeprecationWarning, f"{os.sep}megatron{os.sep}core.py") is None


@needs_mcore
def test_a_real_command_prints_one_line_instead_of_the_warnings():
    """`otr-megatron demo` imports megatron-core in two spawned gloo ranks: 2 x the warnings before."""
    args = ["-m", "otr_megatron.cli", "demo", "--tp", "2", "--tokens", "4", "--vocab", "16", "--num-samples", "2"]
    r = _run(args)
    assert r.returncode == 0, r.stderr
    assert _raw_warnings(r.stderr) == [], r.stderr
    assert _summaries(r.stderr) == [console.summary_line(["Transformer Engine", "Apex"])], r.stderr
    assert "OTR over vocab-parallel logits: TP=2" in r.stdout
    # without the console (a library call, not the CLI): the same imports print the raw warnings
    raw = _run(["-c", f"from otr_megatron import demo; demo.main({args[3:]!r})"])
    assert raw.returncode == 0, raw.stderr
    assert len(_raw_warnings(raw.stderr)) >= 2 and _summaries(raw.stderr) == [], raw.stderr


CASE = f"""
import warnings
from otr_megatron import console
console.install()
{MCORE_IMPORT}
warnings.warn("an unrelated warning of ours")
warnings.warn_explicit("Apex is not installed. Falling back to X", UserWarning, "/elsewhere/mod.py", 1)
"""


@needs_mcore
def test_only_the_known_warnings_are_folded():
    r = _run(["-c", CASE])
    assert r.returncode == 0, r.stderr
    assert _summaries(r.stderr) == [console.summary_line(["Transformer Engine", "Apex"])], r.stderr
    assert "UserWarning: an unrelated warning of ours" in r.stderr
    assert _raw_warnings(r.stderr) == ["/elsewhere/mod.py:1: UserWarning: Apex is not installed. Falling back to X"]


@needs_mcore
def test_rank_above_zero_stays_quiet_and_asked_for_warnings_show():
    r = _run(["-c", CASE], {"RANK": "1"})
    assert r.returncode == 0 and _summaries(r.stderr) == [] and len(_raw_warnings(r.stderr)) == 1, r.stderr
    shown = _run(["-W", "default", "-c", CASE])  # the user asked for warnings: all of them
    assert shown.returncode == 0 and _summaries(shown.stderr) == [], shown.stderr
    assert len(_raw_warnings(shown.stderr)) >= 5, shown.stderr  # megatron-core's own (6 on 0.16, 0.19) + ours


@needs_mcore
def test_workers_of_one_job_share_one_line(tmp_path):
    """Two processes with the same console folder (a job and its worker): only the first speaks."""
    env = {console.ENV: str(tmp_path)}
    first, second = _run(["-c", CASE], env), _run(["-c", CASE], env)
    assert len(_summaries(first.stderr)) == 1 and _summaries(second.stderr) == [], (first.stderr, second.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["said-Apex", "said-Transformer_Engine"]
