"""NeMo 2.0 adapter (nemo-toolkit <= 2.7, container nemo:26.02): OTR as the loss of an `llm` recipe.

    from nemo.collections import llm
    from otr_megatron.nemo import otr_recipe
    recipe = otr_recipe(llm.llama3_70b.finetune_recipe(num_nodes=4, peft_scheme=None), num_samples=256)

On a machine without a GPU, `otr_megatron.nemo.cpu.enable_cpu_mode()` lets the real loop run over
gloo, and `otr_megatron.nemo.recipes.tiny_gpt_cpu_recipe()` is a recipe small enough for a laptop
(`otr-megatron nemo` runs both). OTRGPTModel logs every OTR report each step ("lm loss" =
label cross entropy, "otr loss" = the backpropagated surrogate, "otr hit rate", "otr mean reward").

With nemo-toolkit 3.x (speech-only) `load_adapter()` raises `NeMoVersionError` pointing to the
Megatron-Bridge path. Nothing here imports NeMo until `load_adapter()` / `otr_recipe()` is called.
"""

from otr_megatron.nemo.compat import BRIDGE_HINT, NeMoVersionError, check_nemo_version, installed_nemo_version


def load_adapter():
    """Import and return `otr_megatron.nemo.adapter` (OTRGPTModel, OTRMaskedTokenLossReduction)."""
    check_nemo_version()
    from otr_megatron.nemo import adapter

    return adapter


def otr_recipe(recipe, otr=None, **kwargs):
    """See `otr_megatron.nemo.recipe.otr_recipe`."""
    from otr_megatron.nemo.recipe import otr_recipe as _otr_recipe

    return _otr_recipe(recipe, otr, **kwargs)


__all__ = ["BRIDGE_HINT", "NeMoVersionError", "check_nemo_version", "installed_nemo_version", "load_adapter",
           "otr_recipe"]
