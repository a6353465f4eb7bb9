"""Reliability of `otr-megatron train` without training: up-front validation, one-line errors, the
output-directory lock, --overwrite, checkpoint completeness and the --resume fallback, and the
divergence guard (on a plain torch module; the real job is in test_train_e2e.py)."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from otr_megatron.train.checkpoint import (LATEST, MANIFEST, checkpoint_problem, copy_checkpoint, point_latest,
                                          read_latest, select_checkpoint, write_manifest)
from otr_megatron.train.config import ConfigError, TrainConfig, load_config
from otr_megatron.train.errors import CheckpointError, DivergenceError, RunDirError
from otr_megatron.train.main import main
from otr_megatron.train.rundir import LOCK_NAME, RunLock, prepare_output_dir

TINY = ["pretrain_iters=1", "finetune_iters=1", "progress_bar=false", "plot=false"]


def _one_error_line(capsys, code, expected_code=2):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == expected_code
    assert len(err) == 1 and err[0].startswith("otr-megatron train: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


# -- items 10, 11, 12: config validated up front ------------------------------------------------


@pytest.mark.parametrize(
    "override, msg",
    [
        ("otr.neg_reward=0.5", r"otr\.neg_reward .*\[-1, 0\].*0\.5"),  # item 10 (core OTRConfig rule)
        ("otr.neg_reward=-5", r"otr\.neg_reward .*-5"),
        ("otr.temperature=.nan", r"otr\.temperature .*finite.*nan"),  # item 9
        ("otr.temperature=0", r"otr\.temperature"),
        ("finetune_lr=0", r"finetune_lr=0\.0; expected a finite number > 0"),  # item 11
        ("finetune_lr=-1e-3", r"finetune_lr=-0\.001; expected a finite number > 0"),
        ("pretrain_lr=-1", r"pretrain_lr=-1\.0; expected a finite number > 0"),
        ("finetune_lr=inf", r"finetune_lr=inf; expected a finite number > 0"),
        ("optim.lr=0", r"optim\.lr=0\.0"),
        ("optim.min_lr=-1", r"optim\.min_lr=-1\.0"),
        ("model.num_attention_heads=0", r"model\.num_attention_heads=0; expected a positive integer"),  # 12
        ("model.hidden_size=0", r"model\.hidden_size=0; expected a positive integer"),
        ("model.num_layers=0", r"model\.num_layers=0; expected a positive integer"),
        ("model.make_vocab_size_divisible_by=0", r"model\.make_vocab_size_divisible_by=0"),
        ("model.ffn_hidden_size=0", r"model\.ffn_hidden_size=0"),
        ("model.hidden_size=12", r"12 / 4 = 3: rotary embeddings need an even head dimension"),
        ("data.seq_length=1", r"data\.seq_length=1; expected an integer >= 2"),
        ("max_param_abs=0", r"max_param_abs=0\.0"),
        ("optim.adam_beta2=1", r"optim\.adam_beta2=1\.0; expected a number in \[0, 1\)"),
    ],
)
def test_bad_values_refused_before_anything_is_built(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


def test_ffn_must_split_over_tp():
    with pytest.raises(ConfigError, match=r"model\.ffn_hidden_size=511 is not divisible by tp=2"):
        load_config(None, ["model.ffn_hidden_size=511", "tp=2"])


def test_explicit_stage_lr_is_used_and_only_null_means_optim_lr():
    from otr_megatron.train.trainer import Trainer

    cfg = load_config(None, ["pretrain_iters=4", "finetune_iters=4", "optim.warmup_iters=0", "optim.min_lr=0",
                             "optim.lr=0.5", "pretrain_lr=null", "finetune_lr=1e-9"])
    tr = Trainer(cfg)
    assert tr.lr_at(0) == 0.5  # pretrain_lr null -> optim.lr
    assert tr.lr_at(4) == pytest.approx(1e-9)  # an explicit (tiny) finetune_lr is never replaced


@pytest.mark.parametrize("override", ["otr.neg_reward=0.5", "model.num_attention_heads=0", "finetune_lr=-1"])
def test_cli_config_error_is_one_line_exit_2(override, capsys, tmp_path):
    line = _one_error_line(capsys, main(["-o", str(tmp_path / "o"), override]))
    assert override.split("=")[0] in line
    assert not (tmp_path / "o").exists()  # refused before the output directory was even created


def test_missing_data_file_is_named_before_launch(capsys, tmp_path):
    code = main(["-o", str(tmp_path / "o"), *TINY, f"data.train={tmp_path / 'nope.jsonl'}"])
    line = _one_error_line(capsys, code)
    assert "data.train[0]=" in line and "nope.jsonl" in line and "no such file" in line


# -- item 5: lock and --overwrite ----------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_run_into_a_directory_in_use_is_refused_naming_the_other(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    first = RunLock(str(out))
    assert first.acquire() is None
    try:
        rec = json.loads((out / LOCK_NAME).read_text())
        assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname() and rec["command"]
        line = _one_error_line(capsys, main(["-o", str(out), *TINY]))
        assert f"in use by another run: pid {os.getpid()} on {socket.gethostname()}, started {rec['started']}" in line
        assert f"command: {rec['command']}" in line
        with pytest.raises(RunDirError, match="in use by another run"):
            RunLock(str(out)).acquire()
    finally:
        first.release()
    assert not (out / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_process_is_replaced_with_a_note(tmp_path):
    lock = tmp_path / LOCK_NAME
    pid = _dead_pid()
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then", "command": "x"}))
    rl = RunLock(str(tmp_path))
    note = rl.acquire()
    assert f"removed the stale lock {lock} of pid {pid}" in note
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    rl.release()
    # a reused pid (same number, other process start time) is stale too
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "proc_start": "-1"}))
    assert "stale" in RunLock(str(tmp_path)).acquire()


def test_lock_from_another_host_is_not_guessed_stale(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere", "started": "t",
                                                  "command": "c"}))
    with pytest.raises(RunDirError, match="pid .* on elsewhere"):
        RunLock(str(tmp_path)).acquire()


def test_fresh_run_never_deletes_results_without_overwrite(tmp_path, capsys):
    out = tmp_path / "o"
    (out / "checkpoints" / "iter_0000001").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"iteration": 1}\n')
    line = _one_error_line(capsys, main(["-o", str(out), *TINY]))
    assert "already holds results of a previous run (metrics.jsonl, checkpoints/)" in line and "--overwrite" in line
    assert (out / "metrics.jsonl").read_text() == '{"iteration": 1}\n' and not (out / LOCK_NAME).exists()
    _one_error_line(capsys, main(["-o", str(out), "--resume", "--overwrite", *TINY]))

    logged = []
    cfg = load_config(None, [f"output_dir={out}", *TINY])
    lock = prepare_output_dir(cfg, overwrite=True, log=logged.append)
    lock.release()
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    assert logged == [f"overwrite: removed metrics.jsonl, checkpoints/ from {out}"]


def test_unwritable_output_dir_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    line = _one_error_line(capsys, main(["-o", str(tmp_path / "file" / "sub"), *TINY]))
    assert "cannot create output directory" in line and "file/sub" in line


# -- item 4: checkpoint completeness and --resume fallback ---------------------------------------


def _fake_ckpt(root, it, latest=True):
    path = root / f"iter_{it:07d}"
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"w" * 1000)
    (path / ".metadata").write_bytes(b"m" * 100)
    (path / "metadata.json").write_text("{}")
    write_manifest(str(path), it)
    if latest:
        (root / LATEST).write_text(path.name + "\n")
    return path


def test_manifest_lists_files_with_sizes(tmp_path):
    p = _fake_ckpt(tmp_path, 3)
    m = json.loads((p / MANIFEST).read_text())
    assert m == {"iteration": 3, "files": {"__0_0.distcp": 1000, ".metadata": 100, "metadata.json": 2}}
    assert checkpoint_problem(str(p)) is None
    assert select_checkpoint(str(tmp_path)) == (str(p), None)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: (p / "__0_0.distcp").write_bytes(b"w" * 10), "__0_0.distcp has 10 bytes, the save wrote 1000"),
        (lambda p: (p / ".metadata").unlink(), ".metadata is missing"),
        (lambda p: (p / MANIFEST).unlink(), "metadata.json|no otr_manifest"),
    ],
)
def test_damaged_latest_falls_back_to_newest_complete(tmp_path, damage, reason):
    good = _fake_ckpt(tmp_path, 2)
    _fake_ckpt(tmp_path, 1, latest=False)
    bad = _fake_ckpt(tmp_path, 4)
    (tmp_path / "iter_0000003").mkdir()  # a save killed before its manifest: never a candidate
    (tmp_path / "iter_0000003" / "__0_0.distcp").write_bytes(b"w")
    damage(bad)
    path, note = select_checkpoint(str(tmp_path))
    if "no otr_manifest" in reason:  # latest's manifest gone: accepted as a pre-manifest checkpoint
        assert (path, note) == (str(bad), None)
        return
    assert path == str(good)
    assert note.startswith(f"{tmp_path / LATEST} names {bad}, which is damaged: ")
    assert reason in note
    assert note.endswith(f"resuming from the newest complete checkpoint {good} (iteration 2)")


def test_damaged_latest_with_nothing_to_fall_back_to(tmp_path):
    bad = _fake_ckpt(tmp_path, 4)
    (bad / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"names {bad}, which is damaged: __0_0.distcp has 0 bytes.*no other complete"):
        select_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        select_checkpoint(str(tmp_path / "none"))


def test_copy_checkpoint_copies_what_latest_names_and_points_latest_at_it(tmp_path):
    src = tmp_path / "warm"
    _fake_ckpt(src, 1, latest=False)
    p = _fake_ckpt(src, 2)
    dst = tmp_path / "arm" / "checkpoints"
    (dst / "iter_0000002.partial").mkdir(parents=True)  # what an interrupted copy left: replaced
    (dst / "iter_0000002.partial" / "__0_0.distcp").write_bytes(b"w" * 10)
    assert copy_checkpoint(str(src), str(dst)) == str(dst / "iter_0000002")
    assert sorted(os.listdir(dst)) == ["iter_0000002", LATEST]  # only the named one, no partial or .tmp
    assert read_latest(str(dst)) == "iter_0000002" and checkpoint_problem(str(dst / "iter_0000002")) is None
    assert all((dst / "iter_0000002" / f).read_bytes() == (p / f).read_bytes() for f in os.listdir(p))
    with pytest.raises(CheckpointError, match="already has a latest checkpoint"):  # never over a run's own
        copy_checkpoint(str(src), str(dst))
    point_latest(str(dst), "iter_0000009")
    assert (dst / LATEST).read_text() == "iter_0000009\n" and not (dst / (LATEST + ".tmp")).exists()


def test_copy_checkpoint_refuses_a_damaged_or_missing_source(tmp_path):
    src = tmp_path / "warm"
    (_fake_ckpt(src, 2) / "__0_0.distcp").write_bytes(b"w")
    with pytest.raises(CheckpointError, match=r"cannot copy checkpoint .*iter_0000002.*__0_0.distcp has 1 bytes"):
        copy_checkpoint(str(src), str(tmp_path / "dst"))
    assert not (tmp_path / "dst").exists()
    with pytest.raises(CheckpointError, match="no checkpoint to copy under .*latest is missing"):
        copy_checkpoint(str(tmp_path / "none"), str(tmp_path / "dst"))
    assert read_latest(str(tmp_path / "none")) is None


def test_resume_without_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    line = _one_error_line(capsys, main(["-o", str(tmp_path / "o"), "--resume", *TINY]))
    assert "--resume: no checkpoint under" in line
    bad = _fake_ckpt(tmp_path / "o" / "checkpoints", 2)
    (bad / ".metadata").unlink()
    line = _one_error_line(capsys, main(["-o", str(tmp_path / "o"), "--resume", *TINY]))
    assert f"names {bad}, which is damaged: .metadata is missing" in line


# -- items 2, 3: the divergence guard -------------------------------------------------------------


def _trainer_with(module, **cfg_overrides):
    from otr_megatron.train.trainer import Trainer

    cfg = load_config(None, ["pretrain_iters=2", "finetune_iters=2"] + [f"{k}={v}" for k, v in cfg_overrides.items()])
    tr = Trainer(cfg)
    tr.model = [module]
    return tr


def test_check_params_names_the_parameter():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    tr = _trainer_with(net)
    assert tr.check_params() is None
    with torch.no_grad():
        net[1].bias[0] = 2e6
    assert tr.check_params() == "parameter 1.bias has max |w| = 2e+06 > max_param_abs=1e+06"
    with torch.no_grad():
        net[0].weight[1, 2] = float("nan")
    assert tr.check_params() == "parameter 0.weight is not finite (max |w| = nan)"  # non-finite wins
    assert _trainer_with(torch.nn.Linear(2, 2), max_param_abs=".inf").check_params() is None


def test_check_step_and_save_refuse_non_finite(tmp_path):
    net = torch.nn.Linear(3, 3)
    tr = _trainer_with(net, output_dir=str(tmp_path))
    with pytest.raises(DivergenceError, match=r"^training diverged at iteration 3 \(finetune stage, otr loss, lr "
                       r"[^)]+\): the otr loss is nan; no checkpoint was saved"):
        tr.check_step({"iteration": 3, "loss_name": "otr", "otr_loss": math.nan, "lm_loss": 2.0, "grad_norm": 1.0})
    with pytest.raises(DivergenceError, match=r"iteration 3 .*: the label cross entropy is inf"):
        tr.check_step({"iteration": 3, "loss_name": "otr", "otr_loss": 0.1, "lm_loss": math.inf, "grad_norm": 1.0})
    with pytest.raises(DivergenceError, match=r"iteration 1 \(pretrain stage, sft loss.*gradient norm is inf"):
        tr.check_step({"iteration": 1, "loss_name": "sft", "lm_loss": 1.0, "grad_norm": math.inf})
    tr.last_checkpoint = (str(tmp_path / "checkpoints" / "iter_0000001"), 1)
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    tr.iteration = 2
    with pytest.raises(DivergenceError, match=r"iteration 2 .*parameter weight is not finite.*nothing saved after "
                       r"iteration 1: the latest checkpoint is still .*iter_0000001"):
        tr.save()  # refused before anything is written
    assert not (tmp_path / "checkpoints").exists()


def test_default_config_bound_is_documented():
    assert TrainConfig().max_param_abs == 1.0e6
