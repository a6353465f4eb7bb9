"""`otr-megatron bridge` logic with Bridge replaced by recording fakes: otr.* parsing, YAML split,
recipe loading, version checks, mode choice, hub errors, the console callback. Fast, and runs where
Megatron-Bridge is not installed; the real Bridge loop is tested in test_real_bridge.py.
"""

import warnings

import pytest
import yaml

from otr_megatron import OTRConfig
from otr_megatron.bridge import cli
from otr_megatron.bridge.cli import BridgeAPI, BridgeCLIError
from otr_megatron.bridge.step import OTRForwardStep

RECIPE = "tests.bridge.fake_recipes:tiny_sft_config"


def test_split_overrides_and_types():
    otr, bridge = cli.split_overrides(
        ["otr.num_samples=64", "otr.temperature=2", "otr.neg_reward=-0.2", "otr.estimator=expected",
         "otr.chunk_tokens=null", "model.tensor_model_parallel_size=8", "+train.extra=1", "~optimizer.foo",
         "train.global_batch_size=128"])
    assert otr == {"num_samples": 64, "temperature": 2, "neg_reward": -0.2, "estimator": "expected", "chunk_tokens": None}
    assert bridge == ["model.tensor_model_parallel_size=8", "+train.extra=1", "~optimizer.foo",
                      "train.global_batch_size=128"]
    cfg = cli.build_otr_config(otr)
    assert cfg == OTRConfig(num_samples=64, temperature=2.0, neg_reward=-0.2, estimator="expected", chunk_tokens=None)


@pytest.mark.parametrize("tokens,needle", [
    (["otr.bogus=1"], "otr.bogus=1"),
    (["otr.num_samples=0"], "num_samples"),
    (["otr.temperature=hot"], "temperature"),
    (["otr.estimator=ppo"], "estimator"),
    (["+otr.num_samples=3"], "otr.KEY=VALUE"),
    (["otr.num_samples"], "otr.KEY=VALUE"),
    (["otr.a.b=1"], "expected otr.KEY=VALUE"),
    (["justaword"], "expected KEY=VALUE"),
    (["--bogus"], "unknown option '--bogus'"),
])
def test_otr_errors_name_the_key(tokens, needle):
    with pytest.raises(BridgeCLIError) as exc:
        otr, _ = cli.split_overrides(tokens)
        cli.build_otr_config(otr)
    assert needle in str(exc.value)


@pytest.mark.parametrize("version,ok", [("0.3.0", True), ("0.3.1", True), ("0.6.2", True), ("0.7.0rc1+abc", True),
                                        ("0.2.9", False), ("0.1", False), ("garbage", False)])
def test_version_check(version, ok):
    if ok:
        assert cli.check_bridge_version(version)[:2] >= (0, 3)
    else:
        with pytest.raises(BridgeCLIError, match="not supported"):
            cli.check_bridge_version(version)


def test_version_missing_and_newer():
    with pytest.raises(BridgeCLIError, match="not installed"):
        cli.check_bridge_version(None)
    with pytest.warns(UserWarning, match="newer than the tested"):
        cli.check_bridge_version("1.2.0")


@pytest.mark.parametrize("spec,needle", [
    ("no_colon_here", "expected module:function"),
    ("a:b:c", "expected module:function"),
    ("definitely_not_a_module_xyz:f", "module 'definitely_not_a_module_xyz' not found"),
    ("tests.bridge.fake_recipes:missing_config", "has no 'missing_config'"),
    ("tests.bridge.fake_recipes:not_a_recipe_config", "is not callable"),
])
def test_recipe_errors(spec, needle):
    with pytest.raises(BridgeCLIError) as exc:
        cli.load_recipe(spec)
    assert needle in str(exc.value)
    if "missing_config" in spec:
        assert "tiny_sft_config" in str(exc.value)  # lists the recipes that do exist


class Recorder:
    def __init__(self, fail=None):
        self.calls = []
        self.fail = fail

    def api(self, version="0.6.2"):
        def pco(cfg, config_filepath=None, cli_overrides=None):
            y = yaml.safe_load(open(config_filepath)) if config_filepath else None
            self.calls.append(("overrides", y, cli_overrides))
            if self.fail:
                raise RuntimeError(self.fail)
            for o in cli_overrides or []:
                k, v = o.split("=")
                sect, attr = k.split(".")
                setattr(getattr(cfg, sect), attr, yaml.safe_load(v))
            return cfg

        def finetune(c, f, callbacks=None):
            self.calls.append(("finetune", c, f, callbacks))

        def pretrain(c, f, callbacks=None):
            self.calls.append(("pretrain", c, f, callbacks))

        return BridgeAPI(version, pco, finetune, pretrain)


def test_full_flow_with_yaml_and_overrides(tmp_path, capsys):
    from otr_megatron.bridge.console import OTRConsoleMetrics

    y = tmp_path / "o.yaml"
    y.write_text(yaml.safe_dump({"otr": {"num_samples": 128, "seed": 5}, "train": {"micro_batch_size": 2}}))
    rec = Recorder()
    rc = cli.run(["--recipe", RECIPE, "--config", str(y), "otr.num_samples=256", "model.tensor_model_parallel_size=8",
                  "checkpoint.pretrained_checkpoint=/ckpt"], api=rec.api())
    assert rc == 0
    kind, yaml_part, overrides = rec.calls[0]
    assert kind == "overrides" and yaml_part == {"train": {"micro_batch_size": 2}}  # no otr section for Bridge
    assert overrides == ["model.tensor_model_parallel_size=8", "checkpoint.pretrained_checkpoint=/ckpt"]
    kind, cfg, step, callbacks = rec.calls[1]
    assert kind == "finetune" and cfg.model.tensor_model_parallel_size == 8  # auto: a checkpoint -> finetune
    assert isinstance(step, OTRForwardStep)
    assert step.otr_config == OTRConfig(num_samples=256, seed=5)  # command line wins over the file
    assert [type(c) for c in callbacks] == [OTRConsoleMetrics]
    out = capsys.readouterr().out
    assert "tp=8" in out and "mode sft (starts from checkpoint.pretrained_checkpoint=/ckpt)" in out


def test_mode_choice():
    rec = Recorder()
    assert cli.run(["--recipe", RECIPE], api=rec.api()) == 0  # auto without a checkpoint -> pretrain
    assert [c[0] for c in rec.calls] == ["pretrain"]  # no overrides -> Bridge's override step skipped
    rec = Recorder()
    assert cli.run(["--recipe", RECIPE, "--mode", "pretrain", "checkpoint.load=/run"], api=rec.api()) == 0
    assert [c[0] for c in rec.calls] == ["overrides", "pretrain"]
    with pytest.raises(BridgeCLIError, match="checkpoint.pretrained_checkpoint=DIR"):
        cli.run(["--recipe", RECIPE, "--mode", "sft"], api=Recorder().api())
    rec = Recorder()
    assert cli.run(["--recipe", RECIPE, "--dry-run", "train.global_batch_size=4"], api=rec.api()) == 0
    assert [c[0] for c in rec.calls] == ["overrides"]


def test_bridge_without_callbacks_warns():
    calls = []
    api = BridgeAPI("0.3.1", None, None, lambda c, f: calls.append((c, f)))
    with pytest.warns(UserWarning, match="takes no training callbacks"):
        assert cli.run(["--recipe", RECIPE], api=api) == 0
    assert len(calls) == 1


def test_offline_hub_error_says_how_to_pass_a_local_model():
    with pytest.raises(BridgeCLIError) as exc:
        cli.run(["--recipe", "tests.bridge.fake_recipes:offline_hub_config"], api=Recorder().api())
    msg = str(exc.value)
    assert "--hf-path DIR" in msg and "HF_HUB_OFFLINE=1" in msg and "meta-llama/Llama-3.2-1B" in msg
    with pytest.raises(ValueError, match="unrelated to the hub") as exc:  # other recipe errors are not relabelled
        cli.run(["--recipe", "tests.bridge.fake_recipes:broken_config"], api=Recorder().api())
    assert not isinstance(exc.value, BridgeCLIError)
    with pytest.raises(BridgeCLIError, match="config.json"):
        cli.run(["--recipe", RECIPE, "--hf-path", "/no/such/dir"], api=Recorder().api())


def test_bridge_override_error_is_wrapped():
    rec = Recorder(fail="Key 'model.nonexistent' is not in struct")
    with pytest.raises(BridgeCLIError, match="model.nonexistent"):
        cli.run(["--recipe", RECIPE, "model.nonexistent=1"], api=rec.api())


def test_recipe_shape_errors():
    with pytest.raises(BridgeCLIError, match="calling it with no arguments failed"):
        cli.run(["--recipe", "tests.bridge.fake_recipes:needs_args_config"], api=Recorder().api())
    with pytest.raises(BridgeCLIError, match="not a Bridge ConfigContainer"):
        cli.run(["--recipe", "tests.bridge.fake_recipes:returns_dict_config"], api=Recorder().api())


def test_main_without_bridge_says_so(capsys, monkeypatch):
    monkeypatch.setattr(cli, "installed_bridge_version", lambda: None)
    assert cli.main(["--recipe", RECIPE]) == 2
    assert "Megatron-Bridge is not installed" in capsys.readouterr().err


def test_main_with_old_bridge(capsys, monkeypatch):
    monkeypatch.setattr(cli, "installed_bridge_version", lambda: "0.2.0")
    assert cli.main(["--recipe", RECIPE]) == 2
    assert "0.2.0 is not supported" in capsys.readouterr().err


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("otr: 3\n")
    with pytest.raises(BridgeCLIError, match="must be a mapping"):
        cli.split_yaml(str(bad))
    with pytest.raises(BridgeCLIError, match="no such file"):
        cli.split_yaml(str(tmp_path / "nope.yaml"))


def test_import_does_not_need_bridge():
    import sys

    assert "megatron.bridge" not in sys.modules
    warnings.simplefilter("default")


class _Ctx:
    """The fields of Bridge's CallbackContext that OTRConsoleMetrics reads."""

    def __init__(self, step, loss_dict=None, skipped=False, interval=2, skip_log=False):
        from types import SimpleNamespace as NS

        self.state = NS(train_state=NS(step=step), cfg=NS(logger=NS(log_interval=interval, skip_train_metrics_log=skip_log),
                                                          train=NS(train_iters=6)))
        self.loss_dict = loss_dict
        self.skipped_iter = skipped


def test_console_metrics_averages_like_training_log(capsys):
    """Bridge's order per iteration: on_train_step_end (step not yet incremented), its own line, then
    the next on_train_step_start; the OTR line is the interval mean over non-skipped iterations."""
    import torch

    from otr_megatron.bridge.console import OTRConsoleMetrics

    cb = OTRConsoleMetrics()
    t = torch.tensor
    seq = [({"lm loss": t(5.0), "otr loss": t(-0.5), "otr hit rate": t(0.1), "otr mean reward": t(-0.09)}, False),
           ({"lm loss": t(4.0), "otr loss": t(-0.3), "otr hit rate": t(0.2), "otr mean reward": t(-0.07)}, False),
           ({"lm loss": t(9.0), "otr loss": t(9.0)}, True),  # skipped: not averaged (as training_log)
           ({"lm loss": t(3.0), "otr loss": t(0.2), "otr hit rate": t(0.3), "otr mean reward": t(-0.05), "x": t(-1.0)},
            False)]
    for i, (losses, skipped) in enumerate(seq):
        cb.on_train_step_start(_Ctx(i))
        cb.on_train_step_end(_Ctx(i, losses, skipped))
    cb.on_train_end(_Ctx(4))
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        " [otr] iteration        2/       6 | otr loss: -4.000000E-01 | otr mean reward: -8.000000E-02 |",
        # otr loss positive: still shown (the set of names is fixed); any other negative average as well
        " [otr] iteration        4/       6 | otr loss: 2.000000E-01 | otr mean reward: -5.000000E-02 | x: -1.000000E+00 |",
    ]
    cb.on_train_step_end(_Ctx(4, {"otr loss": t(-1.0)}, interval=2, skip_log=True))
    cb.on_train_step_start(_Ctx(6, skip_log=True))
    assert capsys.readouterr().out == ""


def test_cpu_import_shims_are_scoped_to_the_importing_module():
    """The stubs reach only the named importer, only inside the block, never sys.modules."""
    import builtins
    import importlib.util
    import sys

    from otr_megatron.bridge import cpu

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed: the shim is (rightly) not applied")
    real_import = builtins.__import__
    lora = {"__name__": "megatron.bridge.peft.lora_layers"}
    other = {"__name__": "megatron.core.extensions.transformer_engine"}
    with cpu.import_shims() as used:
        exec("import transformer_engine.pytorch as te", lora)
        with pytest.raises(ImportError):  # anyone else still sees TE absent (megatron-core's probes)
            exec("import transformer_engine.pytorch as te", other)
        if sys.version_info < (3, 12):
            gpt = {"__name__": "megatron.training.models.gpt"}
            exec("from typing import override", gpt)
            assert gpt["override"] is __import__("typing_extensions").override
    assert builtins.__import__ is real_import
    assert used == ["lora_layers<-transformer_engine.pytorch.ops.Sequential"] + (
        ["training.models.gpt<-typing.override"] if sys.version_info < (3, 12) else [])
    assert not [m for m in sys.modules if m.startswith("transformer_engine")]
    with pytest.raises(ImportError, match="Transformer Engine is not installed"):
        lora["te"].ops.Sequential()  # an annotation target only
    with pytest.raises(ImportError):
        exec("import transformer_engine.pytorch as te", dict(lora))  # outside the block: the real import
    assert "override" in cpu.describe(used) and "allow_no_cuda=True" in cpu.describe(used)


def test_broken_bridge_install_lists_what_bridge_needs(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("megatron.bridge") is not None:
        pytest.skip("Megatron-Bridge is installed here")
    import torch

    monkeypatch.setattr(cli, "installed_bridge_version", lambda: "0.6.2")  # metadata says installed, import fails
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine: CPU mode stays off
    with pytest.raises(BridgeCLIError) as exc:
        BridgeAPI.default()
    msg = str(exc.value)
    assert "megatron-core >= 0.19" in msg and "nvidia-modelopt" in msg and "Transformer Engine and a GPU are optional" in msg
