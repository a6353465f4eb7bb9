"""`otr-megatron slurm` checks everything before writing (issue 17): the config's OTR settings and
layout numbers, ASCII-only times, and an output path that is a directory or on a full disk give one
line, exit 2, and no (partial) script."""

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from otr_megatron.launch import slurm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = os.path.join(ROOT, "configs", "llama3_8b.yaml")


def _run(argv, capsys):
    rc = slurm.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("override, words", [
    ("otr.num_samples=0", "num_samples must be an integer >= 1, got 0"),
    ("otr.temperature=-5", "temperature (kappa) must be a finite number > 0"),
    ("otr.estimator=ppo", "estimator must be one of"),
    ("otr.num_sample=8", "unknown config key 'otr.num_sample'"),
    ("train.micro_batch_size=-2", "train.micro_batch_size=-2; expected an integer >= 1"),
    ("parallel.tensor_model_parallel_size=0", "parallel.tensor_model_parallel_size=0"),
    ("train.global_batch_size=102", "global_batch_size 102 is not divisible"),
])
def test_slurm_config_refuses_bad_job_settings_before_writing(tmp_path, capsys, override, words):
    out = tmp_path / "job.sbatch"
    rc, stdout, err = _run(["--config", CFG, "-o", str(out), override], capsys)
    assert rc == 2 and err.count("\n") == 1 and words in err, err
    assert not out.exists() and stdout == ""
    assert os.listdir(tmp_path) == []


def test_slurm_config_checks_the_command_line_node_count(tmp_path, capsys):
    rc, _, err = _run(["--config", CFG, "--nodes", "3", "-o", str(tmp_path / "j")], capsys)
    assert rc == 2 and "global_batch_size 128 is not divisible" in err and not (tmp_path / "j").exists()
    rc, _, err = _run(["--config", CFG, "--nodes", "2", "-o", str(tmp_path / "j")], capsys)
    assert rc == 0 and (tmp_path / "j").is_file()


@pytest.mark.parametrize("value", ["\uff10\uff14:\uff10\uff10:\uff10\uff10", "\u0664\u0660", "\u0664-00:00:00",
                                   "04:00:\u0660\u0660", "\U0001d7ce"])
def test_slurm_time_takes_ascii_digits_only(value, capsys):
    rc, out, err = _run(["--time", value, "--", "echo", "hi"], capsys)
    assert rc == 2 and out == "" and "--time" in err and "expected SLURM time" in err
    rc, out, _ = _run(["--time", "1-02:03:04", "--", "echo", "hi"], capsys)
    assert rc == 0 and "#SBATCH --time=1-02:03:04" in out


def test_slurm_output_into_a_directory_is_one_line(tmp_path, capsys):
    rc, _, err = _run(["-o", str(tmp_path), "--", "echo", "hi"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "is a directory" in err
    assert os.listdir(tmp_path) == []


def test_slurm_output_keeps_an_existing_script_when_the_write_fails(tmp_path, capsys, monkeypatch):
    target = tmp_path / "job.sbatch"
    target.write_text("old script\n")
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(slurm.os, "replace", failing_replace)
    rc, _, err = _run(["-o", str(target), "--", "echo", "hi"], capsys)
    monkeypatch.setattr(slurm.os, "replace", real_replace)
    assert rc == 2 and "no space left on the device" in err and err.count("\n") == 1
    assert target.read_text() == "old script\n" and os.listdir(tmp_path) == ["job.sbatch"]


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs filled up; skipped where this process may not mount one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", f"otr-test-{uuid.uuid4().hex[:8]}", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        with open(mnt / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_slurm_output_onto_a_full_disk_is_one_line_and_leaves_nothing(full_disk):
    target = full_disk / "job.sbatch"
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "otr_megatron.cli", "slurm", "-o", str(target),
                        "--", "echo", "hi"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "no space left on the device" in r.stderr
    assert sorted(os.listdir(full_disk)) == ["filler"]  # no partial script, no temporary file


def test_slurm_output_to_a_special_file_still_works(capsys):
    rc, _, err = _run(["-o", os.devnull, "--", "echo", "hi"], capsys)
    assert rc == 0 and "wrote" in err
