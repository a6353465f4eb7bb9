"""The Bridge preflight (otr_megatron/bridge/preflight.py) with the real Megatron-Bridge, on CPU: every
shipped cluster job's Bridge command builds and passes Bridge's own validation at the file's world
size, a key Bridge does not have stops `slurm --config` naming it, and `bridge --dry-run` prints the
final configuration without training."""

import importlib.util
from pathlib import Path

import pytest
import yaml

from otr_megatron.config.cluster_job import load_cluster_job

# find_spec, not importorskip: importing megatron.bridge on Python 3.11 needs CPU mode's import shims.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron.bridge") is None,
                                reason="Megatron-Bridge is not installed")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CLUSTER_JOBS = sorted(p for p in CONFIGS.glob("*.yaml") if "parallel" in yaml.safe_load(p.read_text()))


def test_every_shipped_cluster_job_builds_and_validates_in_bridge():
    from otr_megatron.bridge.preflight import check_job

    assert len(CLUSTER_JOBS) >= 6
    for path in CLUSTER_JOBS:
        job = load_cluster_job(str(path))
        said = check_job(job)
        assert f"validated it at {job.layout.world_size} ranks" in said, (path.name, said)


def test_bridge_validation_sees_the_derived_layout():
    """What Bridge checks is the file's layout (not the recipe's defaults): Bridge's data-parallel size."""
    from otr_megatron.bridge.cli import BridgeAPI, build_config, parse_args
    from otr_megatron.bridge.preflight import validate_on_cpu, write_hf_config
    from otr_megatron.launch.bridge_job import bridge_command

    job = load_cluster_job(str(CONFIGS / "llama3_70b_8node.yaml"))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        write_hf_config(job.cfg["model"], job.cfg["bridge"]["recipe"], d)
        api = BridgeAPI.default()
        cfg, _ = build_config(parse_args(bridge_command(job.cfg)[2:] + ["--hf-path", d]), api)
        checked, _ = validate_on_cpu(cfg, job.layout.world_size, api.runtime_config_update)
    assert checked.model.tensor_model_parallel_size == job.layout.tp == 8
    assert checked.model.num_layers == job.dims.num_layers == 80
    assert checked.data_parallel_size == job.layout.dp == 64 // (8 * 4 * 2)


def test_slurm_config_stops_on_a_key_bridge_does_not_have(tmp_path, capsys):
    from otr_megatron.launch.slurm import main as slurm_main

    src = yaml.safe_load((CONFIGS / "llama3_8b.yaml").read_text())
    src["bridge"]["overrides"] = ["model.no_such_knob=3"]
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(src))
    out = tmp_path / "job.sbatch"
    assert slurm_main(["--config", str(p), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the Bridge command does not build" in err and "model.no_such_knob" in err, err
    assert not out.exists()
    assert slurm_main(["--config", str(CONFIGS / "llama3_8b.yaml"), "-o", str(out)]) == 0
    assert "Bridge 0." in capsys.readouterr().err and out.exists()


def test_bridge_dry_run_prints_the_final_config_and_does_not_train(capsys):
    from otr_megatron.bridge.cli import main

    assert main(["--recipe", "otr_megatron.bridge.recipes:tiny_gpt_cpu_config", "--dry-run", "--world-size", "2",
                 "train.global_batch_size=8", "otr.num_samples=8"]) == 0
    out = capsys.readouterr().out
    assert "global_batch_size: 8" in out and "--dry-run: built and validated at 2 ranks; not training" in out
    # an impossible setting fails in Bridge's own validation, one line
    assert main(["--recipe", "otr_megatron.bridge.recipes:tiny_gpt_cpu_config", "--dry-run", "--world-size", "3",
                 "model.tensor_model_parallel_size=2"]) == 2
    err = capsys.readouterr().err
    assert "Bridge's validation of the configuration at 3 ranks failed" in err and err.count("\n") == 1, err
