"""Turn a NeMo 2.0 recipe (`run.Partial` from `llm.<model>.finetune_recipe(...)`) into an OTR recipe."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional


def otr_recipe(recipe, otr=None, *, model_cls=None, vocab_size: Optional[int] = None, **otr_overrides: Any):
    """Swap the recipe's model class for `OTRGPTModel`, keeping its config, optimizer and tokenizer.

    recipe: a NeMo-Run `run.Partial` whose `.model` is a `run.Config(<GPTModel subclass>, config=...)`.
    otr: an `OTRConfig` (default OTRConfig()); `otr_overrides` replace single fields
    (`num_samples=256, temperature=1.3, neg_reward=-0.1`); an unknown one raises
    `UnknownOTRKeyError` (a ValueError). Returns the same (mutated) recipe.
    model_cls: the replacement class (default `otr_megatron.nemo.adapter.OTRGPTModel`; tests pass a
    stand-in). After training, export to Hugging Face with the original model class (e.g.
    `llm.LlamaModel`): OTR changes the loss, not the weights' layout.
    """
    import fiddle as fdl
    import nemo_run as run

    from otr_megatron import OTRConfig

    base = otr if otr is not None else OTRConfig()
    cfg = OTRConfig.from_dict({**dataclasses.asdict(base), **otr_overrides})  # names an unknown otr.KEY
    model = getattr(recipe, "model", None)
    if not isinstance(model, fdl.Buildable):
        raise TypeError(f"otr_recipe: expected a NeMo 2.0 recipe whose .model is a run.Config(GPTModel, ...), got "
                        f"{type(model).__name__}")
    if model_cls is None:
        from otr_megatron.nemo import load_adapter

        model_cls = load_adapter().OTRGPTModel
    fdl.update_callable(model, model_cls)
    model.otr = run.Config(OTRConfig, **dataclasses.asdict(cfg))
    if vocab_size is not None:
        model.vocab_size = int(vocab_size)
    return recipe
