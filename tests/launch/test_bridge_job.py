"""configs/*.yaml state the layout once: the planner and the rendered Bridge job read the same values."""

from __future__ import annotations

import dataclasses
import importlib.util
import shlex
from pathlib import Path

import pytest

from otr_megatron.cli import load_config_dict
from otr_megatron.launch.bridge_job import DERIVED, FIXED, FULL_RECOMPUTE, BridgeJobError, bridge_command
from otr_megatron.launch.slurm import SlurmSpec, task_script
from otr_megatron.launch.slurm import main as slurm_main
from otr_megatron.planning.budget import from_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
LAYOUT_CONFIGS = [p for p in CONFIGS if "parallel" in load_config_dict(str(p))]


def _overrides(cmd: list[str]) -> dict[str, str]:
    """The KEY=VALUE words of a rendered `otr-megatron bridge` command, as text."""
    assert cmd[:2] == ["otr-megatron", "bridge"] and cmd[2] == "--recipe"
    return dict(w.split("=", 1) for w in cmd[4:])


def _planned_as_bridge(path: Path) -> dict[str, str]:
    """What `otr-megatron plan` assumes, written independently as the Bridge words it implies."""
    cfg = load_config_dict(str(path))
    dims, lay, loss, _ = from_config(cfg)
    want = {
        "model.tensor_model_parallel_size": str(lay.tp),
        "model.pipeline_model_parallel_size": str(lay.pp),
        "model.context_parallel_size": str(lay.cp),
        "model.virtual_pipeline_model_parallel_size": "null" if lay.vpp == 1 else str(lay.vpp),
        "model.sequence_parallel": str(lay.sequence_parallel).lower(),
        "ddp.use_distributed_optimizer": str(lay.use_distributed_optimizer).lower(),
        "optimizer.use_distributed_optimizer": str(lay.use_distributed_optimizer).lower(),
        "model.seq_length": str(lay.seq_length),
        "dataset.seq_length": str(lay.seq_length),
        "train.micro_batch_size": str(lay.micro_batch_size),
        "train.global_batch_size": str(lay.global_batch_size),
        "model.recompute_granularity": "null" if lay.recompute == "none" else lay.recompute,
        "model.fp8": "hybrid" if lay.fp8 else "null",
        "otr.num_samples": str(loss.num_samples),
    }
    if lay.recompute == "full":
        want.update({"model.recompute_method": "uniform", "model.recompute_num_layers": "1"})
    return want


def test_some_configs_state_a_layout():
    assert len(LAYOUT_CONFIGS) >= 6


@pytest.mark.parametrize("path", LAYOUT_CONFIGS, ids=lambda p: p.name)
def test_planner_and_bridge_job_see_the_same_layout(path):
    cfg = load_config_dict(str(path))
    got = _overrides(bridge_command(cfg))
    for key, value in _planned_as_bridge(path).items():
        assert got[key] == value, (key, got.get(key), value)
    assert got["model.calculate_per_token_loss"] == "true"
    assert float(got["optimizer.lr"]) == cfg["train"]["lr"] and int(got["train.train_iters"]) == cfg["train"]["train_iters"]
    for k, v in cfg["otr"].items():
        assert got[f"otr.{k}"] == str(v)
    # the layout is nowhere else in the file
    assert not any(w.split("=", 1)[0] in DERIVED for w in cfg["bridge"].get("overrides") or [])


@pytest.mark.parametrize("path", LAYOUT_CONFIGS[:1], ids=lambda p: p.name)
def test_slurm_renders_the_derived_command_with_the_same_overrides_as_plan(path, tmp_path):
    out = tmp_path / "job.sbatch"
    # (train.micro_batch_size=2 would be refused where Bridge is installed: its packed-sequence SFT needs 1)
    over = ["parallel.tensor_model_parallel_size=4", "train.global_batch_size=128"]
    assert slurm_main(["--config", str(path), "-o", str(out), "--force", *over]) == 0  # 405B at tp=4: no fit
    text = out.read_text()
    cfg = load_config_dict(str(path), over)
    spec = SlurmSpec(command=bridge_command(cfg), nodes=cfg["cluster"]["nodes"], job_name=cfg["name"])
    assert f"OTR_TASK_SCRIPT={shlex.quote(task_script(spec))}" in text  # the derived command, exactly
    assert "model.tensor_model_parallel_size=4" in text and "train.global_batch_size=128" in text
    assert _overrides(spec.command)["model.tensor_model_parallel_size"] == str(from_config(cfg)[1].tp)
    # an explicit command after -- still wins
    assert slurm_main(["--config", str(path), "-o", str(out), "--", "echo", "hi"]) == 0
    assert "exec echo hi" in out.read_text()


def test_layout_stated_twice_or_bad_is_refused(tmp_path, capsys):
    cfg = load_config_dict(str(LAYOUT_CONFIGS[0]))
    cfg["bridge"]["overrides"] = ["model.tensor_model_parallel_size=4"]
    with pytest.raises(BridgeJobError, match=r"sets model\.tensor_model_parallel_size, which comes from "
                                             r"parallel\.tensor_model_parallel_size"):
        bridge_command(cfg)
    cfg["bridge"]["overrides"] = ["model.calculate_per_token_loss=false"]
    with pytest.raises(BridgeJobError, match="every OTR job"):
        bridge_command(cfg)
    cfg["bridge"] = {}
    with pytest.raises(BridgeJobError, match="no `bridge.recipe`"):
        bridge_command(cfg)
    assert slurm_main(["--nodes", "1", "cluster.nodes=2", "--", "x"]) == 2
    assert "KEY=VALUE overrides need --config" in capsys.readouterr().err
    assert slurm_main(["--config", str(LAYOUT_CONFIGS[0]), "parallel.tp=2"]) == 2
    assert "unknown config key 'parallel.tp'" in capsys.readouterr().err


def test_derived_keys_exist_in_bridge():
    """Every rendered key is a field of the Bridge 0.6 config it addresses (Bridge env only)."""
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.bridge") is None:
        pytest.skip("Megatron-Bridge is not installed")
    cpu = pytest.importorskip("otr_megatron.bridge.cpu", reason="the Bridge CPU import shims are not available")
    with cpu.import_shims():
        from megatron.bridge.models.gpt_provider import GPTModelProvider
        from megatron.bridge.training import config as bridge_config
        from megatron.core.optimizer import OptimizerConfig
    sections = {"model": GPTModelProvider, "train": bridge_config.TrainingConfig, "optimizer": OptimizerConfig,
                "ddp": bridge_config.DistributedDataParallelConfig, "dataset": bridge_config.FinetuningDatasetConfig}
    for key in [*DERIVED, *FIXED, *FULL_RECOMPUTE]:
        section, name = key.split(".")
        assert name in {f.name for f in dataclasses.fields(sections[section])}, key


def test_bridge_ci_line_runs_this_file():
    """`test_derived_keys_exist_in_bridge` skips without Bridge, so the Bridge line must run this file."""
    import re

    script = (Path(__file__).resolve().parents[2] / "scripts" / "run_tests.sh").read_text()
    bridge = re.search(r'if \[ -n "\$\{BRIDGE:-\}" \]; then paths=\(([^)]*)\)', script)
    assert bridge is not None, "scripts/run_tests.sh: no BRIDGE line found"
    here = Path(__file__).resolve().relative_to(Path(__file__).resolve().parents[2]).as_posix()
    assert here in bridge.group(1).split(), bridge.group(1)
