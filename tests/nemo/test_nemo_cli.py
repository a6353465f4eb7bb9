"""`otr-megatron nemo`: word parsing and errors everywhere; the real NeMo 2.x loop where it is installed."""

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from otr_megatron.nemo.cli import NeMoCLIError, build_recipe, main, split_words

REPO = Path(__file__).resolve().parents[2]


def test_words_split_into_recipe_arguments_attributes_and_otr():
    pytest.importorskip("omegaconf")
    kwargs, attrs, otr = split_words(["max_steps=4", "trainer.max_steps=5", "otr.num_samples=8",
                                      "otr.temperature=2", "optim.config.lr=1e-3", "log_dir=null"])
    assert kwargs == {"max_steps": 4, "log_dir": None}
    assert attrs == {"trainer.max_steps": 5, "optim.config.lr": 1e-3}
    assert otr == {"num_samples": 8, "temperature": 2}


@pytest.mark.parametrize("word, message", [
    ("--tp", "unknown option '--tp'"),
    ("max_steps", "expected KEY=VALUE"),
])
def test_bad_words_are_named(word, message):
    pytest.importorskip("omegaconf")
    with pytest.raises(NeMoCLIError, match=re.escape(message)):
        split_words([word])


def test_unknown_otr_key_and_recipe_argument_are_refused_before_anything_runs():
    with pytest.raises(NeMoCLIError, match=r"otr\.num_sample=8"):
        build_recipe("otr_megatron.nemo.recipes:tiny_gpt_cpu_recipe", {}, {}, {"num_sample": 8})
    with pytest.raises(NeMoCLIError, match=r"has no argument 'max_step'.*max_steps"):
        build_recipe("otr_megatron.nemo.recipes:tiny_gpt_cpu_recipe", {"max_step": 3}, {}, {})
    if importlib.util.find_spec("nemo_run") is not None:  # the recipe function itself runs
        with pytest.raises(NeMoCLIError, match="devices=3 is not a multiple"):
            build_recipe("otr_megatron.nemo.recipes:tiny_gpt_cpu_recipe",
                         {"devices": 3, "tensor_model_parallel_size": 2}, {}, {})
    with pytest.raises(NeMoCLIError, match="expected module:function"):
        build_recipe("otr_megatron.nemo.recipes.tiny_gpt_cpu_recipe", {}, {}, {})


def test_without_nemo_the_command_says_what_to_install(capsys):
    try:
        import nemo.collections.llm  # noqa: F401
    except Exception:
        assert main(["max_steps=2"]) == 2
        assert "nemo-toolkit" in capsys.readouterr().err
    else:
        pytest.skip("NeMo 2.x is installed here; the real run below covers it")


@pytest.mark.slow
def test_cli_trains_tiny_recipe_with_tp2_under_torchrun(tmp_path):
    """The real NeMo loop (llm.pretrain, MegatronStrategy over gloo) started by torchrun, TP=2; then the
    same run with otr.fuse_output_layer=true reports the same metrics."""
    pytest.importorskip("nemo.collections.llm", reason="NeMo 2.x not installed (NEMO=2.7.3 line)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    reported = []
    for fused in (False, True):
        logs = tmp_path / ("fused" if fused else "unfused")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "otr_megatron", "nemo",
               "tensor_model_parallel_size=2", "max_steps=3", "otr.num_samples=8", f"log_dir={logs}",
               "trainer.log_every_n_steps=1"] + (["otr.fuse_output_layer=true"] if fused else [])
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        text = out.stdout + out.stderr
        assert "otr_megatron NeMo CPU mode" in text
        last = [ln for ln in text.splitlines() if ln.startswith("otr-megatron nemo: last step")]
        assert len(last) == 2 and last[0] == last[1]  # both TP ranks report the same reduced metrics
        values = dict(re.findall(r"(otr [a-z ]+|lm loss) (-?[0-9.]+)", last[0]))
        assert set(values) == {"lm loss", "otr loss", "otr hit rate", "otr mean reward"}
        assert all(math.isfinite(float(v)) for v in values.values())
        assert 0 < float(values["lm loss"]) < 10 and 0 <= float(values["otr hit rate"]) <= 1
        assert list(logs.rglob("events.out.tfevents.*")), "NeMo's logger wrote no TensorBoard file"
        reported.append({k: float(v) for k, v in values.items()})
    for name, value in reported[0].items():
        assert reported[1][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
