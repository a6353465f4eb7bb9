"""Hostile YAML and sizes at the command line (issue 17): every YAML reader (config files, override
values, sweep values, Bridge and NeMo words) refuses a "billion laughs" fast, in one line; the demo
refuses sizes it cannot run instead of exiting 0 with nothing."""

import os
import subprocess
import sys
import time

import pytest
import yaml

from otr_megatron.cli import MAX_YAML_VALUES, OverrideError, load_config_dict, load_yaml, parse_override, safe_yaml_load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bomb_value(levels=9, width=9) -> str:
    """A ~300-byte YAML list standing for width**levels values."""
    parts, prev = ["&a [" + ",".join(["x"] * width) + "]"], "a"
    for name in "bcdefghijk"[: levels - 1]:
        parts.append(f"&{name} [" + ",".join([f"*{prev}"] * width) + "]")
        prev = name
    return "[" + ", ".join(parts) + "]"


def _bomb_file(tmp_path):
    p = tmp_path / "bomb.yaml"
    p.write_text("a: " + _bomb_value() + "\n")
    assert p.stat().st_size < 1024
    return str(p)


def test_safe_yaml_load_counts_aliases_expanded_and_keeps_ordinary_aliases():
    assert safe_yaml_load("base: &b {lr: 1}\nrun: *b\n", "x") == {"base": {"lr": 1}, "run": {"lr": 1}}
    assert safe_yaml_load("", "x") is None
    t = time.perf_counter()
    with pytest.raises(OverrideError, match=r"src: .*more than 100000 values once its aliases"):
        safe_yaml_load(_bomb_value(), "src")
    assert time.perf_counter() - t < 5  # composed and counted, never expanded (was 46 s and 5.5 GB)
    # merge keys expand too
    merge = "a: &a {x: 1, y: 2}\n" + "".join(
        f"{n}: &{n} {{<<: [" + ", ".join([f"*{p}"] * 9) + "]}\n" for p, n in zip("abcdefgh", "bcdefghi"))
    with pytest.raises(OverrideError, match="aliases"):
        safe_yaml_load(merge, "src")
    with pytest.raises(OverrideError, match="recursive"):
        safe_yaml_load("a: &a [*a]\n", "src")
    with pytest.raises(OverrideError, match="deeper than 100"):
        safe_yaml_load("a: " + "[" * 3000 + "]" * 3000, "src")
    with pytest.raises(OverrideError, match="deeper than 100"):
        safe_yaml_load("a: " + "[" * 150 + "]" * 150, "src")
    big = "[" + ",".join(["1"] * (MAX_YAML_VALUES - 10)) + "]"  # a long plain list within the limit
    assert len(safe_yaml_load(big, "src")) == MAX_YAML_VALUES - 10
    with pytest.raises(yaml.YAMLError):
        safe_yaml_load("a: [1", "src")


def test_every_config_reader_refuses_a_billion_laughs(tmp_path):
    path = _bomb_file(tmp_path)
    for read in (load_yaml, lambda p: load_config_dict(p, [])):
        with pytest.raises(OverrideError, match=r"bomb\.yaml: .*billion laughs"):
            read(path)
    with pytest.raises(OverrideError, match=r"override 'data\.eval=.*billion laughs"):
        parse_override("data.eval=" + _bomb_value())
    from otr_megatron.bridge.cli import BridgeCLIError, split_overrides, split_yaml

    with pytest.raises(BridgeCLIError, match=r"--config .*billion laughs"):
        split_yaml(path)
    with pytest.raises(BridgeCLIError, match="billion laughs"):
        split_overrides(["otr.seed=" + _bomb_value()])
    from otr_megatron.nemo.cli import NeMoCLIError, split_words

    with pytest.raises(NeMoCLIError, match="billion laughs"):
        split_words(["trainer.x=" + _bomb_value()])
    from otr_megatron.compare.grid import parse_sweep
    from otr_megatron.train.config import ConfigError

    with pytest.raises(ConfigError, match="billion laughs"):
        parse_sweep("finetune_lr=" + _bomb_value())
    # the Bridge reader still reads 1e-3 as a number (OmegaConf's loader), plain aliases still work
    ok = tmp_path / "ok.yaml"
    ok.write_text("otr: {temperature: 1e-3}\nopt: &o {lr: 2}\nsched: *o\n")
    otr, rest = split_yaml(str(ok))
    assert otr == {"temperature": 1e-3} and rest == {"opt": {"lr": 2}, "sched": {"lr": 2}}


@pytest.mark.parametrize("command", [["plan", "--config"], ["slurm", "-o", "job.sbatch", "--config"],
                                     ["compare", "--dry-run", "--config"], ["train", "--config"]])
def test_commands_refuse_the_file_in_one_line(tmp_path, command):
    path = _bomb_file(tmp_path)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "otr_megatron.cli", *command, path], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2 and "billion laughs" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].count("billion") == 1
    assert time.perf_counter() - t < 120
    assert not (tmp_path / "job.sbatch").exists()


@pytest.mark.parametrize("args, word", [(["--tp", "0"], "--tp 0"), (["--tp", "-2"], "--tp -2"),
                                        (["--vocab", "0"], "--vocab 0"), (["--tokens", "0"], "--tokens 0"),
                                        (["--num-samples", "0"], "--num-samples 0"),
                                        (["--tokens", "10000000"], "--tokens 10000000"),
                                        (["--tp", "1000"], "--tp 1000")])
def test_demo_refuses_sizes_it_cannot_run(args, word, capsys):
    from otr_megatron import demo

    assert demo.main(args) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and word in out.err and "expected" in out.err
