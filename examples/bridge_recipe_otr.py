"""Turn OTR on in a Megatron-Bridge recipe, in Python (the `otr-megatron bridge` command does the same).

Run inside a NeMo Framework container (26.02+), one process per GPU:

    torchrun --nproc-per-node 8 examples/bridge_recipe_otr.py

The recipe is Bridge's own; OTR changes only the forward step's loss. Overrides use Bridge's
Hydra-style keys; the OTR settings are the paper's (K=256, kappa=1.3, beta=-0.1).
"""

from __future__ import annotations

import sys

RECIPE = "megatron.bridge.recipes.llama:llama3_8b_sft_config"
OVERRIDES = [
    "model.tensor_model_parallel_size=2",
    "model.sequence_parallel=true",
    "model.calculate_per_token_loss=true",
    "train.global_batch_size=128",
    "train.micro_batch_size=1",
]
OTR = {"num_samples": 256, "temperature": 1.3, "neg_reward": -0.1, "estimator": "sample", "seed": 1234}


def make_job(recipe: str = RECIPE, overrides=OVERRIDES, otr: dict = OTR, api=None):
    """Return (Bridge ConfigContainer, OTR forward step) ready for `finetune(cfg, step)`."""
    from otr_megatron.bridge.cli import BridgeAPI, BridgeArgs, build_config
    from otr_megatron.bridge.step import OTRForwardStep

    api = api or BridgeAPI.default()  # checks the Bridge version, imports finetune/pretrain lazily
    cfg, otr_cfg = build_config(BridgeArgs(recipe=recipe, otr=dict(otr), overrides=list(overrides)), api)
    return cfg, OTRForwardStep(otr_cfg)


def main() -> int:
    from megatron.bridge.training.finetune import finetune

    cfg, step = make_job()
    finetune(cfg, step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
