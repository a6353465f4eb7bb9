"""examples/bridge_recipe_otr.py builds its job through the same path as the CLI (Bridge faked)."""

import runpy
from pathlib import Path

from otr_megatron import OTRConfig
from otr_megatron.bridge.step import OTRForwardStep

from tests.bridge.test_bridge_cli import Recorder

REPO = Path(__file__).resolve().parents[2]


def test_bridge_example_make_job():
    mod = runpy.run_path(str(REPO / "examples" / "bridge_recipe_otr.py"))
    rec = Recorder()
    cfg, step = mod["make_job"](recipe="tests.bridge.fake_recipes:tiny_sft_config",
                                overrides=["model.tensor_model_parallel_size=2"], api=rec.api())
    assert cfg.model.tensor_model_parallel_size == 2
    assert isinstance(step, OTRForwardStep) and step.otr_config == OTRConfig(num_samples=256, temperature=1.3,
                                                                            neg_reward=-0.1, seed=1234)
    assert mod["RECIPE"].startswith("megatron.bridge.recipes.")
