"""Turn OTR on in a Megatron-Bridge recipe, in Python (the `otr-megatron bridge` command does the same).

Run inside a NeMo Framework container whose Bridge matches CI (0.6), one process per GPU:

    torchrun --nproc-per-node 8 examples/bridge_recipe_otr.py

The Llama recipe reads its model config from the Hugging Face Hub when built, and `finetune`
starts from `checkpoint.pretrained_checkpoint` (a Megatron checkpoint, e.g. from
`AutoBridge.import_ckpt`): add `checkpoint.pretrained_checkpoint=DIR` to OVERRIDES. Without a GPU,
`otr-megatron bridge --recipe otr_megatron.bridge.recipes:tiny_gpt_cpu_config` runs the same loop on
the CPU.

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

    api = api or BridgeAPI.default()  # checks the Bridge version; CPU mode when there is no CUDA device
    cfg, otr_cfg = build_config(BridgeArgs(recipe=recipe, otr=dict(otr), overrides=list(overrides)), api)
    return cfg, OTRForwardStep(otr_cfg)


def main() -> int:
    from otr_megatron.bridge.cli import BridgeAPI, train

    api = BridgeAPI.default()
    cfg, step = make_job(api=api)
    train(api, "sft", cfg, step)  # Bridge's finetune, with the console callback for the OTR metrics
    return 0


if __name__ == "__main__":
    sys.exit(main())
