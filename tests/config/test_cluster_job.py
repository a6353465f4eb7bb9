"""The cluster job schema and preflight (otr_megatron/config/cluster_job.py), through the two commands
that run before a job queues: `plan` and `slurm --config`. Each bad job is one line, exit 2, and no
sbatch file; the shipped files pass."""

from pathlib import Path

import pytest
import yaml

from otr_megatron.config.cluster_job import SCHEMA, JobConfigError, load_cluster_job, preflight
from otr_megatron.launch.slurm import main as slurm_main
from otr_megatron.planning.cli import main as plan_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CLUSTER_JOBS = sorted(p for p in CONFIGS.glob("*.yaml") if "parallel" in yaml.safe_load(p.read_text()))
LLAMA_8B = CONFIGS / "llama3_8b.yaml"


def test_every_shipped_cluster_job_passes_the_preflight():
    assert len(CLUSTER_JOBS) >= 6
    for path in CLUSTER_JOBS:
        job = load_cluster_job(str(path))
        budget = preflight(job)
        assert budget.fits(), path.name


def _both_refuse(path: Path, tmp_path, capsys, words: str, *overrides: str):
    """`plan` and `slurm --config` each: exit 2, one line on stderr containing `words`, no file."""
    assert plan_main(["--config", str(path), *overrides]) == 2
    plan = capsys.readouterr()
    out = tmp_path / "job.sbatch"
    assert slurm_main(["--config", str(path), "-o", str(out), "--no-bridge-check", *overrides]) == 2
    slurm = capsys.readouterr()
    for got in (plan, slurm):
        assert got.out == "" and got.err.count("\n") == 1 and words in got.err, got.err
    assert not out.exists() and list(tmp_path.glob("*.sbatch")) == []
    return plan.err


def _edited(tmp_path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_the_typo_in_the_file_stops_both_commands(tmp_path, capsys):
    """The issue's first case: `num_sample: 256` for `num_samples` in configs/llama3_8b.yaml."""
    p = _edited(tmp_path, LLAMA_8B.read_text().replace("  num_samples: 256", "  num_sample: 256"))
    err = _both_refuse(p, tmp_path, capsys, "unknown OTR setting otr.num_sample=256")
    assert str(p) in err and "otr.num_samples" in err  # the file, the key, the valid keys


@pytest.mark.parametrize("path", CLUSTER_JOBS, ids=lambda p: p.name)
@pytest.mark.parametrize("section", [*SCHEMA, "top"])
def test_an_unknown_key_in_any_section_of_any_shipped_config(path, section, tmp_path, capsys):
    cfg = yaml.safe_load(path.read_text())
    if section == "top":
        cfg["bogus_key"] = 1
        key = "'bogus_key'"
    else:
        cfg.setdefault(section, {})["bogus_key"] = 1
        key = f"'{section}.bogus_key'"
    p = _edited(tmp_path, yaml.safe_dump(cfg))
    err = _both_refuse(p, tmp_path, capsys, f"unknown config key {key}; valid keys here: ")
    assert str(p) in err


def test_a_tp_that_does_not_divide_the_heads(tmp_path, capsys):
    err = _both_refuse(LLAMA_8B, tmp_path, capsys, "parallel.tensor_model_parallel_size=3 must divide "
                       "model.num_attention_heads=32", "parallel.tensor_model_parallel_size=3")
    assert str(LLAMA_8B) in err


def test_a_layout_that_does_not_fit_and_force(tmp_path, capsys):
    over = ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false", "train.micro_batch_size=4"]
    err = _both_refuse(LLAMA_8B, tmp_path, capsys, "the layout does not fit: ", *over)
    assert "largest term: activations" in err and "train.recompute" in err and "--force" in err
    out = tmp_path / "forced.sbatch"
    assert slurm_main(["--config", str(LLAMA_8B), "-o", str(out), "--force", "--no-bridge-check", *over]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().err and out.exists()
    assert plan_main(["--config", str(LLAMA_8B), "--force", *over]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, words", [
    (["model.num_layers=30", "parallel.pipeline_model_parallel_size=4"],
     "model.num_layers=30 must be divisible by parallel.pipeline_model_parallel_size*"),
    (["parallel.virtual_pipeline_model_parallel_size=2"], "needs parallel.pipeline_model_parallel_size > 1"),
    (["parallel.context_parallel_size=2", "train.seq_length=4098"],
     "train.seq_length=4098 must be divisible by 2*parallel.context_parallel_size=4"),
    (["train.global_batch_size=130"], "global_batch_size 130 is not divisible by micro_batch_size*dp"),
    (["parallel.tensor_model_parallel_size=16"], "must divide model.num_attention_heads"),
    (["train.fp8=yes"], "train.fp8='yes'; expected true or false"),
    (["train.recompute=some"], "train.recompute='some'; expected one of none, selective, full"),
    (["cluster.gpu=3"], "cluster.gpu=3; expected a string"),
    (["bridge.overrides=x=1"], "bridge.overrides='x=1'; expected a list of strings"),
    (["otr.temperature=0"], "temperature (kappa) must be a finite number > 0"),
    (["parallel.tp=2"], "unknown config key 'parallel.tp'; valid keys here: "),
])
def test_what_megatron_would_refuse_is_refused_here(overrides, words, tmp_path, capsys):
    _both_refuse(LLAMA_8B, tmp_path, capsys, words, *overrides)


def test_an_override_may_set_a_schema_key_the_file_leaves_out():
    job = load_cluster_job(str(LLAMA_8B), ["otr.chunk_tokens=4096", "cluster.gpu_memory_gib=141"])
    assert job.loss.chunk_tokens == 4096 and job.layout.gpu_memory_gib == 141


def test_uneven_pipeline_split_counts_embedding_and_loss(tmp_path):
    """126 layers on 16 stages only with Megatron's uneven split (the 405B file sets it, as Bridge's recipe)."""
    path = CONFIGS / "llama31_405b.yaml"
    preflight(load_cluster_job(str(path)))
    with pytest.raises(JobConfigError, match=r"model.num_layers=126 \+ 1 .* must be divisible"):
        preflight(load_cluster_job(str(path), ["parallel.account_for_loss_in_pipeline_split=false"]))


def test_a_train_job_file_is_named_as_such(capsys):
    assert plan_main(["--config", str(CONFIGS / "tiny_cpu.yaml")]) == 2
    err = capsys.readouterr().err
    assert "looks like a train job file" in err and err.count("\n") == 1
