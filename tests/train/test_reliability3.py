"""Issue 17 (reliability round 3), the train job's groups: -o is a literal path (1), --resume keeps
the run's record and checks model, seed and stage first (2), SIGTERM takes the Ctrl-C path for every
process of the run (3), checkpoint errors and a full disk are one line (4), every setting is checked
before any worker, against the machine too (5), and the advice after a stop works (7). The fast
tests need no training; the `slow` ones run the real job on CPU."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from otr_megatron.train.checkpoint import (LATEST, checkpoint_errors, checkpoint_problem, data_position, describe,
                                           inspect_resume, is_disk_full, job_record, write_manifest)
from otr_megatron.train.config import GIB, ConfigError, load_config
from otr_megatron.train.errors import CheckpointError, NothingToDo
from otr_megatron.train.main import _interrupt_advice, main, resolve_config, stop_processes
from otr_megatron.train.rundir import LOCK_NAME, prepare_output_dir

TINY = ["pretrain_iters=1", "finetune_iters=1", "progress_bar=false", "plot=false"]


def _one_line(capsys, code, expected_code=2, stream="err"):
    out = getattr(capsys.readouterr(), stream).strip().splitlines()
    assert code == expected_code, out
    assert len(out) == 1 and "Traceback" not in out[0], out
    return out[0]


# -- group 1: --output-dir is a literal path -----------------------------------------------------


@pytest.mark.parametrize("name", ["exp #2", "a\nb", "007", "true", "${oc.env:HOME}", "null", "1e3", "[x]"])
def test_output_dir_flag_is_the_literal_string(tmp_path, name, capsys):
    path = str(tmp_path / name)
    for flag in ("-o", "--output-dir"):
        cfg, _ = resolve_config([flag, path])
        assert cfg.output_dir == path
    assert resolve_config(["-o", name])[0].output_dir == name  # relative: '007' stays '007', 'true' stays 'true'
    assert main(["-o", name, "--print-config"]) == 0
    printed = capsys.readouterr().out
    dumped = tmp_path / f"dump{abs(hash(name))}.yaml"
    dumped.write_text(printed)
    assert load_config(str(dumped)).output_dir == name  # the dump quotes it, so it loads back as written


def test_overwrite_removes_only_the_named_directory_s_results(tmp_path):
    """`-o 'runs/exp #2' --overwrite` used to remove runs/exp's results; a symlinked entry is
    unlinked, never followed."""
    named, other, outside = tmp_path / "exp #2", tmp_path / "exp", tmp_path / "elsewhere"
    for d in (named, other):
        (d / "checkpoints" / "iter_0000001").mkdir(parents=True)
        (d / "metrics.jsonl").write_text("{}\n")
    (outside / "keep").mkdir(parents=True)
    (outside / "keep" / "f").write_text("x")
    os.symlink(outside / "keep", named / "curves.png")  # a result name that is a link to elsewhere
    cfg, args = resolve_config(["-o", str(named), "--overwrite", *TINY])
    lock = prepare_output_dir(cfg, overwrite=args.overwrite, log=lambda m: None)
    lock.release()
    assert sorted(os.listdir(named)) == []
    assert (other / "metrics.jsonl").exists() and (other / "checkpoints" / "iter_0000001").is_dir()
    assert (outside / "keep" / "f").read_text() == "x"


# -- group 2: resume semantics (launcher side, on checkpoints with manifests) -------------------


def _ckpt(out, it, cfg, latest=True):
    root = out / "checkpoints"
    path = root / f"iter_{it:07d}"
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"w" * 100)
    (path / ".metadata").write_bytes(b"m")
    (path / "metadata.json").write_text("{}")
    write_manifest(str(path), it, {"job": job_record(cfg), "data": data_position(cfg, it)})
    if latest:
        (root / LATEST).write_text(path.name + "\n")
    return path


SMALL = ["pretrain_iters=3", "finetune_iters=3", "progress_bar=false", "plot=false"]


def _finished_run(out):
    cfg = load_config(None, [f"output_dir={out}", *SMALL])
    _ckpt(out, 6, cfg)
    (out / "summary.json").write_text('{"first_eval": {"x": 1}, "final_eval": {"x": 2}, "iterations": 6}')
    (out / "config.yaml").write_text("seed: 1234\n")
    (out / "metrics.jsonl").write_text('{"iteration": 6, "kind": "train"}\n')
    return {p: (out / p).read_bytes() for p in ("summary.json", "config.yaml", "metrics.jsonl")}


@pytest.mark.parametrize("extra", [[], ["finetune_iters=1"]])
def test_resume_with_nothing_to_do_keeps_the_record(tmp_path, capsys, extra):
    out = tmp_path / "run"
    before = _finished_run(out)
    line = _one_line(capsys, main(["-o", str(out), "--resume", *SMALL, *extra]), 0, stream="out")
    assert line.startswith(f"otr-megatron train: nothing to do: checkpoint {out / 'checkpoints' / 'iter_0000006'} "
                           "is at iteration 6")
    assert "results are unchanged" in line
    assert {p: (out / p).read_bytes() for p in before} == before
    assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("override, named", [
    ("seed=5", "seed=1234; this run has seed=5"),
    ("model.hidden_size=64", "model.hidden_size=128; this run has model.hidden_size=64"),
    ("model.position_embedding_type=learned_absolute",
     "model.position_embedding_type='rope'; this run has model.position_embedding_type='learned_absolute'"),
    ("pretrain_iters=4", "after 3 warm-start (cross-entropy) and 1 fine-tuning step(s); with pretrain_iters=4"),
    ("pretrain_iters=2", "with pretrain_iters=2 this run would count 2 and 2"),
])
def test_refused_resume_names_what_changed_and_writes_nothing(tmp_path, capsys, override, named):
    out = tmp_path / "run"
    before = _finished_run(out)
    cfg = load_config(None, [f"output_dir={out}", *SMALL])
    _ckpt(out, 4, cfg)  # latest: one OTR step after the 3 cross-entropy steps
    (out / "summary.json").unlink()
    before.pop("summary.json")
    line = _one_line(capsys, main(["-o", str(out), "--resume", *SMALL, override]))
    assert line.startswith("otr-megatron train: error: --resume: checkpoint ") and named in line, line
    assert {p: (out / p).read_bytes() for p in before} == before  # config.yaml is not the refused one


def test_stage_check_allows_extending_the_warm_start(tmp_path):
    """A warm start that ended at its boundary may be continued with more CE steps (nothing was
    fine-tuned yet), and as an arm with any loss (compare does that)."""
    out = tmp_path / "run"
    warm = load_config(None, [f"output_dir={out}", "pretrain_iters=3", "finetune_iters=0"])
    _ckpt(out, 3, warm)
    for extra in (["pretrain_iters=5"], ["pretrain_iters=3", "--loss", "sft"], ["pretrain_iters=3"]):
        cfg, _ = resolve_config(["-o", str(out), "--resume", "finetune_iters=3", *extra])
        assert inspect_resume(cfg, str(out / "checkpoints")).iteration == 3
    cfg, _ = resolve_config(["-o", str(out), "--resume", "pretrain_iters=2", "finetune_iters=3"])
    with pytest.raises(CheckpointError, match="after 3 warm-start .* and 0 fine-tuning .*resume with pretrain_iters >= 3"):
        inspect_resume(cfg, str(out / "checkpoints"))
    (out / "summary.json").write_text("{}")
    cfg, _ = resolve_config(["-o", str(out), "--resume", "pretrain_iters=3", "finetune_iters=0"])
    with pytest.raises(NothingToDo):
        inspect_resume(cfg, str(out / "checkpoints"))


# -- group 4: checkpoint exceptions -------------------------------------------------------------


def test_torch_checkpoint_exception_is_caught_precisely_and_described():
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    assert not issubclass(CheckpointException, Exception)  # why `except Exception` missed it
    errs = checkpoint_errors()
    assert CheckpointException in errs and KeyboardInterrupt not in errs and SystemExit not in errs
    full = OSError(28, "No space left on device")
    e = CheckpointException("save failed", {0: (full, traceback.extract_stack()), 1: (ValueError("x"), None)})
    assert describe(e) == "OSError: [Errno 28] No space left on device"
    assert is_disk_full(e)
    pos = RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                       "data/0: unexpected pos 704 vs 598")
    assert not is_disk_full(CheckpointException("m", {0: (pos, None)}), "/")  # / has space: not a full disk
    assert describe(KeyError("k" * 1000)).endswith(" ...") and len(describe(KeyError("k" * 1000))) < 300


# -- group 5: every setting checked before any data, model or worker ----------------------------


@pytest.mark.parametrize("override, msg", [
    ("model.sequence_parallel=true", r"model\.sequence_parallel=true needs tp > 1"),
    ("seed=-1", r"^seed=-1; expected an integer in \[0, 2\*\*63\)"),
    (f"seed={2**64}", rf"^seed={2**64}; expected an integer in \[0, 2\*\*63\)"),
    ("otr.temperature=1e-300", r"otr\.temperature \(kappa\)=1e-300: float32\(1 / kappa\) = inf is not a finite"),
    ("otr.temperature=1e300", r"otr\.temperature \(kappa\)=1e\+300: float32\(1 / kappa\) = 0\.0"),
    ("otr.num_samples=1000000000", r"otr\.num_samples=1000000000 exceeds 1048576 \(2\*\*20.*8 bytes per sample"),
])
def test_value_bounds(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


LAPTOP = (16 * GIB, "16 GiB of RAM")


@pytest.mark.parametrize("overrides, msg", [
    (["data.seq_length=10000000"], r"^data\.seq_length=10000000 needs ~[0-9.]+ PiB per rank \(attention scores "
                                   r"~.*a lower bound\) but a rank has 16 GiB on this machine \(16 GiB of RAM\)"),
    (["model.hidden_size=65536"], r"^model\.hidden_size=65536 needs ~5\d\d GiB per rank \(weights and Adam state"),
    (["otr.num_samples=1000000", "data.seq_length=4096", "micro_batch_size=16"],
     r"^otr\.num_samples=1000000 needs .*OTR samples ~.*lower otr\.num_samples$"),
    (["micro_batch_size=8", "data.seq_length=8192", "vocab=150000"],  # a real tokenizer's vocabulary
     r"^data\.seq_length=8192 needs ~[0-9.]+ GiB per rank \(logits ~[0-9.]+ GiB, .*lower data\.seq_length or micro_batch_size"),
])
def test_memory_bounds_name_the_limit_and_the_reason(overrides, msg):
    vocab = int(next((o.split("=")[1] for o in overrides if o.startswith("vocab=")), 259))
    cfg = load_config(None, [o for o in overrides if not o.startswith("vocab=")])
    with pytest.raises(ConfigError, match=msg):
        cfg.check_machine(False, vocab, memory=LAPTOP)
    load_config(None, []).check_machine(False, 259, memory=LAPTOP)  # the default job fits a laptop


def test_machine_checks(monkeypatch):
    with pytest.raises(ConfigError, match=r"model\.bf16=true needs a CUDA GPU; this run is on the CPU \(device=cpu\)"):
        load_config(None, ["model.bf16=true", "device=cpu"]).check_machine(False, 259, memory=LAPTOP)
    te = load_config(None, ["model.transformer_impl=transformer_engine"])
    with pytest.raises(ConfigError, match=r"transformer_engine' needs a CUDA GPU"):
        te.check_machine(False, 259, memory=LAPTOP)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "transformer_engine" else real(n, *a))
    with pytest.raises(ConfigError, match=r"the transformer_engine package is not installed"):
        te.check_machine(True, 259, memory=LAPTOP)


@pytest.mark.parametrize("override, needle", [
    ("model.hidden_size=1048576", "model.hidden_size=1048576 needs ~"),  # ~130 TiB: no machine has it
    ("data.seq_length=10000000", "data.seq_length=10000000 needs ~"),
    ("model.bf16=true", "model.bf16=true needs a CUDA GPU"),
    ("model.sequence_parallel=true", "needs tp > 1"),
    ("seed=-1", "seed=-1; expected"),
    ("otr.temperature=1e-300", "otr.temperature (kappa)=1e-300"),
    ("otr.num_samples=1000000000", "otr.num_samples=1000000000 exceeds"),
])
def test_cli_refuses_before_the_output_directory_exists(tmp_path, capsys, override, needle):
    if override == "model.bf16=true":
        import torch

        if torch.cuda.is_available():
            pytest.skip("bf16 is allowed where CUDA is available")
    line = _one_line(capsys, main(["-o", str(tmp_path / "o"), *TINY, override]))
    assert needle in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("files, held", [([], "it is empty"), (["README.md"], "it holds 1 other file")])
def test_tokenizer_directory_without_files_is_named_not_a_package(tmp_path, capsys, files, held):
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in files:
        (tok / f).write_text("x")
    line = _one_line(capsys, main(["-o", str(tmp_path / "o"), *TINY, f"data.tokenizer={tok}"]))
    assert f"data.tokenizer='{tok}': '{tok}' holds no tokenizer file ({held}); expected one of tokenizer.json" in line
    assert "install" not in line and "package" not in line


# -- groups 3 and 7: stopping ----------------------------------------------------------------------


def test_advice_after_a_stop_is_what_works(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, [f"output_dir={out}", *SMALL])
    assert _interrupt_advice(cfg, []) == "no checkpoint was saved yet; start again with the same command"
    out.mkdir()
    (out / "config.yaml").write_text("x")  # written at the start: no result, a fresh run is accepted
    assert _interrupt_advice(cfg, []) == "no checkpoint was saved yet; start again with the same command"
    (out / "metrics.jsonl").write_text('{"iteration": 0, "kind": "eval"}\n')  # a fresh run would be refused
    assert "--overwrite -o" in _interrupt_advice(cfg, [])
    _ckpt(out, 2, cfg)
    assert _interrupt_advice(cfg, []) == f"continue from the checkpoint of iteration 2 with the same settings and --resume -o {out}"
    # the advised commands are accepted by the launcher's checks
    lock = prepare_output_dir(load_config(None, [f"output_dir={out}", *SMALL, "resume=true"]), log=lambda m: None)
    lock.release()


def test_main_restores_the_callers_signal_handlers(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    main(["-o", str(tmp_path / "o"), "model.hidden_size=0"])
    assert {s: signal.getsignal(s) for s in before} == before


def test_stop_processes_ends_a_tree_that_ignores_sigterm():
    """A worker that does not unwind in time is killed with everything it started."""
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "c = subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, "
            "signal.SIG_IGN); time.sleep(600)']); print(c.pid, flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(p.stdout.readline())
    stop_processes([p.pid], grace_s=0.5)
    p.wait(timeout=10)
    for _ in range(100):
        if not _running(child):
            break
        time.sleep(0.1)
    assert not _running(child)


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- slow: the real job ---------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB = ["pretrain_iters=3", "finetune_iters=3", "eval_interval=3", "progress_bar=false", "log_interval=1",
       "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64", "otr.num_samples=8",
       "data.eval.in_domain=assets:eval_id.jsonl", "plot=false", "save_interval=1"]


def _cmd(out, *extra):
    return [sys.executable, "-W", "ignore", "-m", "otr_megatron.cli", "train", "--device", "cpu", "-o", str(out),
            *JOB, *extra]


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")


def _run(out, *extra):
    r = subprocess.run(_cmd(out, *extra), env=_env(), capture_output=True, text=True, timeout=600)
    return r


def _steps(out):
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    return {r["iteration"]: (r["otr_loss"], r.get("otr_hit_rate"), r["grad_norm"], r["lm_loss"])
            for r in recs if r["kind"] == "train"}


def _session_processes(sid):
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append(int(name))
    return found


def _sigterm_after_first_checkpoint(out, *extra):
    """Start the job in its own session, SIGTERM only the launcher (as `timeout`/`kill` do) as soon as
    the first checkpoint exists (give the job enough steps that it is still running then); return (exit status, stderr, processes of the session 10 s later)."""
    errf = open(out.parent / f"{out.name}.err", "w+")
    p = subprocess.Popen(_cmd(out, *extra), env=_env(), stdout=subprocess.DEVNULL, stderr=errf,
                         start_new_session=True)
    for _ in range(1200):
        if (out / "checkpoints" / LATEST).exists() or p.poll() is not None:
            break
        time.sleep(0.1)
    assert p.poll() is None, "the job ended before it could be stopped"
    os.kill(p.pid, signal.SIGTERM)  # megatron's manager started at the first save; the job runs on
    code = p.wait(timeout=60)
    time.sleep(10)
    left = _session_processes(p.pid)
    for pid in left:  # clean up so a failure does not leak processes into the rest of the suite
        os.kill(pid, signal.SIGKILL)
    errf.seek(0)
    return code, errf.read(), left


@pytest.mark.slow
def test_sigterm_to_a_dp2_run_stops_every_process_and_resume_is_exact(tmp_path):
    """Issue 17 group 3: SIGTERM to the launcher of a --dp 2 run (two spawned gloo workers, each with
    megatron-core's multiprocessing manager, and a resource tracker): 10 s later no process of the
    run is alive, the lock is released, no temporary error directory is left, the one line advises
    --resume, and --resume gives the uninterrupted run's per-step numbers."""
    import tempfile

    tmp_before = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("otr-megatron-train-")}
    long = "finetune_iters=30"  # 33 steps of ~0.1-0.2 s: still running when the first checkpoint appears
    full = tmp_path / "full"
    r = _run(full, "--dp", "2", long)
    assert r.returncode == 0, r.stderr[-3000:]
    cut = tmp_path / "cut"
    code, err, left = _sigterm_after_first_checkpoint(cut, "--dp", "2", long)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert left == []
    assert not (cut / LOCK_NAME).exists()
    assert {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("otr-megatron-train-")} <= tmp_before
    lines = err.strip().splitlines()
    assert lines[-1].startswith("otr-megatron train: stopped by SIGTERM; continue from the checkpoint of iteration "), err
    assert "Traceback" not in err, err[-3000:]
    r = _run(cut, "--dp", "2", long, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _steps(full), _steps(cut)
    assert sorted(a) == sorted(b) == list(range(1, 34))
    for it in a:
        for x, y in zip(a[it], b[it]):  # the hit rate is None in the cross-entropy steps
            assert (x is None and y is None) or x == pytest.approx(y, rel=1e-6, abs=1e-9), (it, a[it], b[it])


@pytest.mark.slow
def test_sigterm_to_a_single_process_run_leaves_no_process(tmp_path):
    """The single-process job used to leave megatron-core's manager and the resource tracker."""
    out = tmp_path / "one"
    code, err, left = _sigterm_after_first_checkpoint(out, "finetune_iters=30")
    assert code == 128 + signal.SIGTERM and left == [], (left, err[-3000:])
    assert not (out / LOCK_NAME).exists()
    assert err.strip().splitlines()[-1].startswith("otr-megatron train: stopped by SIGTERM; continue from the "
                                                   "checkpoint of iteration ")


def _mount_tmpfs(path, size):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        path.rmdir()
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                    reason="filling a disk needs a small tmpfs, which only root can mount")
def test_full_disk_during_a_save_is_one_line_and_checkpoints_stay_safe(tmp_path):
    """~360 KB per checkpoint of this model: a 1000 KiB tmpfs takes two, the third save runs out of
    space. One line saying so, exit 2, `latest` still the complete second checkpoint, the partial one
    removed; with space again, --resume finishes the run."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "1000k")
    try:
        out = disk / "run"
        r = _run(out)
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        err = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        ckpts = out / "checkpoints"
        assert err[0].startswith("otr-megatron train: error: no space left on device while saving checkpoint "
                                 f"iteration 3 to {ckpts / 'iter_0000003'}")
        assert f"the latest checkpoint is still {ckpts / 'iter_0000002'}" in err[0]
        assert (ckpts / LATEST).read_text().strip() == "iter_0000002"
        assert checkpoint_problem(str(ckpts / "iter_0000002")) is None
        assert not (ckpts / "iter_0000003").exists()
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        r = _run(out, "--resume")
        assert r.returncode == 0, r.stderr[-3000:]
        assert sorted(_steps(out)) == [1, 2, 3, 4, 5, 6]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
