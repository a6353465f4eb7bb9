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


@pytest.mark.parametrize(
    "override, msg",
    [
        ("data.pack=3", r"data\.pack=3; expected true or false"),  # OmegaConf alone would read 3 as true
        ("data.pack=maybe", r"data\.pack='maybe'; expected true or false"),
        ("model.bf16=1", r"model\.bf16=1; expected true or false"),
        ("micro_batch_size=2.5", r"micro_batch_size=2\.5; expected an integer"),
        ("optim.lr=fast", r"optim\.lr='fast'; expected a number"),
        ("optim.lr=.nan", r"optim\.lr=nan; expected a finite number > 0"),
        ("pretrain_lr=true", r"pretrain_lr=True; expected a number or null"),
        ("data.train=null", r"data\.train=None; expected a list"),
        ("data.eval.x=3", r"data\.eval\.x=3; expected a list"),
        ("model=3", r"model=3; expected a mapping"),
        ("optim.lr.x=1", r"optim\.lr is a value, not a section"),
        ("optim.lr=[1", r"override 'optim\.lr=\[1': the value is not valid YAML"),
        ("output_dir=${nope}", r"output_dir: .*nope"),
        ("=1", "expected KEY=VALUE"),
        ("a..b=1", "expected KEY=VALUE"),
    ],
)
def test_hostile_overrides_name_key_value_expectation(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


def test_unknown_otr_key_has_the_core_message(tmp_path):
    from otr_megatron.core.config import OTRConfig, UnknownOTRKeyError

    with pytest.raises(UnknownOTRKeyError) as core:
        OTRConfig.from_dict({"num_sample": 8})
    with pytest.raises(ConfigError) as job:
        load_config(None, ["otr.num_sample=8"])
    assert str(job.value) == str(core.value)
    p = tmp_path / "c.yaml"
    p.write_text("otr:\n  num_sample: 8\n")
    with pytest.raises(ConfigError) as from_file:
        load_config(str(p))
    assert str(from_file.value) == f"{p}: {core.value}"


def test_otr_is_the_core_config_with_estimator_and_seed_from_the_job():
    from otr_megatron.core.config import OTRConfig

    cfg = load_config(None, ["otr.chunk_tokens=128", "otr.backend=torch", "otr.temperature=2", "seed=7",
                             "loss=otr-expected"])
    assert type(cfg.otr) is OTRConfig and cfg.otr.temperature == 2.0 and cfg.otr.chunk_tokens == 128
    assert (cfg.otr.estimator, cfg.otr.seed) == ("expected", 7)
    pre, fine = cfg.core_otr_config("pretrain"), cfg.core_otr_config()
    assert (pre.estimator, pre.normalization, pre.seed, pre.backend) == ("sft", "token", 7, "torch")
    assert fine == cfg.otr and cfg.core_otr_config("dft").estimator == "dft"
    seq = load_config(None, ["otr.normalization=sequence"])
    assert seq.core_otr_config().normalization == "sequence" and seq.core_otr_config("pretrain").normalization == "token"
    with pytest.raises(ConfigError, match=r"otr\.estimator='expected': the job sets it from `loss` "
                                          r"\(loss='otr' gives 'sample'\); set `loss` instead"):
        load_config(None, ["otr.estimator=expected"])
    with pytest.raises(ConfigError, match=r"otr\.seed=5: the job sets it from `seed` \(seed=1234 gives 1234\)"):
        load_config(None, ["otr.seed=5"])
    assert load_config(None, ["loss=sft", "otr.estimator=sft", "seed=3", "otr.seed=3"]).otr.estimator == "sft"
    with pytest.raises(ConfigError, match=r"otr\.backend must be one of"):
        load_config(None, ["otr.backend=cuda"])
    with pytest.raises(ConfigError, match=r"otr\.chunk_tokens=0\.5; expected an integer or null"):
        load_config(None, ["otr.chunk_tokens=0.5"])


def test_dumps_load_back_and_yaml_sections_merge_or_replace(tmp_path):
    import dataclasses

    from otr_megatron.train.config import dump_yaml, from_dict

    cfg = load_config(None, ["loss=dft", "seed=9", "otr.num_samples=4", "data.eval.extra=e.jsonl"])
    for text in (dump_yaml(cfg), yaml.safe_dump(dataclasses.asdict(cfg))):  # with and without otr.estimator/seed
        p = tmp_path / "dump.yaml"
        p.write_text(text)
        assert load_config(str(p)) == cfg
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    # a file's mapping for a section sets its keys; for the free-form data.eval it replaces the splits
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  num_layers: 4\ndata:\n  train: one.jsonl\n  eval:\n    old: [a.jsonl]\n")
    got = load_config(str(p))
    assert got.model.num_layers == 4 and got.model.hidden_size == 128
    assert got.data.train == ["one.jsonl"] and got.data.eval == {"old": ["a.jsonl"]}
    assert load_config(str(p), ["data.eval.new=b.jsonl"]).data.eval == {"old": ["a.jsonl"], "new": ["b.jsonl"]}
    assert load_config(str(p), ["data.eval={z: [c.jsonl]}"]).data.eval == {"z": ["c.jsonl"]}


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*missing\.yaml' not found"):
        load_config(str(tmp_path / "missing.yaml"))
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level must be a mapping"):
        load_config(str(p))
    p.write_text("model: [\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: not valid YAML"):
        load_config(str(p))
