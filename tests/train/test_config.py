"""Config: embedded default == configs/tiny_cpu.yaml, overrides, unknown keys, type errors, CLI."""

import os

import pytest
import yaml

from otr_megatron.train.config import ConfigError, TrainConfig, load_config, resolve_path, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_embedded_default_matches_configs_file():
    with open(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), encoding="utf-8") as f:
        on_disk = yaml.safe_load(f)
    assert on_disk == to_dict(TrainConfig())
    assert load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml")) == load_config(None)


def test_default_assets_resolve():
    cfg = TrainConfig()
    for p in cfg.data.train + cfg.data.pretrain + [x for v in cfg.data.eval.values() for x in v]:
        assert os.path.isfile(resolve_path(p)), p


def test_overrides_nested_and_typed():
    cfg = load_config(None, ["optim.lr=3e-4", "otr.num_samples=64", "data.pack=false", "loss=sft",
                             "data.train=[a.jsonl, b.jsonl]", "data.eval.extra=c.jsonl", "finetune_lr=null"])
    assert cfg.optim.lr == 3e-4 and cfg.otr.num_samples == 64 and cfg.data.pack is False and cfg.loss == "sft"
    assert cfg.data.train == ["a.jsonl", "b.jsonl"] and cfg.data.eval["extra"] == ["c.jsonl"]
    assert cfg.finetune_lr is None and "in_domain" in cfg.data.eval
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0  # int accepted for a float


@pytest.mark.parametrize(
    "override, msg",
    [
        ("optim.learning_rate=1", "unknown config key 'optim.learning_rate'; valid keys here: .*'lr'"),
        ("nope=1", "unknown config key 'nope'"),
        ("otr.num_samples=many", r"otr.num_samples='many'; expected an integer"),
        ("data.pack=3", "data.pack=3; expected true or false"),
        ("loss=ce", "loss='ce'; expected one of"),
        ("global_batch_size=30", "global_batch_size=30 must be divisible by micro_batch_size x dp"),
        ("tp=3", "num_attention_heads=4 is not divisible by tp=3"),
        ("optim.lr", "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_are_clear(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


def test_unknown_key_in_yaml_names_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  hidden: 64\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'model\.hidden'"):
        load_config(str(p))


def test_cli_flags_and_errors(capsys):
    from otr_megatron.train.main import main, resolve_config

    cfg, _ = resolve_config(["--loss", "dft", "--tp", "2", "--output-dir", "x", "otr.neg_reward=0", "--resume"])
    assert (cfg.loss, cfg.tp, cfg.output_dir, cfg.otr.neg_reward, cfg.resume) == ("dft", 2, "x", 0.0, True)
    assert main(["bogus.key=1"]) == 2
    assert "unknown config key 'bogus'" in capsys.readouterr().err
    assert main(["--print-config", "pretrain_iters=7"]) == 0
    assert "pretrain_iters: 7" in capsys.readouterr().out
