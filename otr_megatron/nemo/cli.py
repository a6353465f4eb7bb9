"""`otr-megatron nemo`: run a NeMo 2.x recipe (nemo-toolkit 2.7) with OTR as the loss.

    otr-megatron nemo [--recipe otr_megatron.nemo.recipes:tiny_gpt_cpu_recipe] [--dry-run] \\
        [max_steps=4 ...]                 arguments of the recipe function (no dot)
        [trainer.max_steps=4 ...]         attributes of the recipe it returns (dotted)
        [otr.num_samples=8 ...]           OTR settings (OTRConfig)

    torchrun --nproc-per-node 2 -m otr_megatron nemo tensor_model_parallel_size=2

The recipe is a dotted path `module:function` returning a NeMo-Run `run.Partial` (e.g.
`nemo.collections.llm.recipes.llama3_8b:finetune_recipe`); `otr_recipe` swaps its model for
`OTRGPTModel`. Values are YAML (`4`, `1e-3`, `true`, `null`). Under torchrun the trainer's
`devices` follows the local process count unless a word sets it. On a machine without a GPU the
NeMo CPU mode (`otr_megatron.nemo.cpu`) is applied first.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from typing import Any, Callable

DEFAULT_RECIPE = "otr_megatron.nemo.recipes:tiny_gpt_cpu_recipe"


class NeMoCLIError(ValueError):
    """A user-facing error of `otr-megatron nemo` (bad recipe, key or value)."""


def split_words(words: list[str]) -> tuple[dict, dict, dict]:
    """KEY=VALUE words -> (recipe-function kwargs, recipe attribute paths, otr settings)."""
    from otr_megatron.config.reader import OverrideError, parse_override

    kwargs: dict[str, Any] = {}
    attrs: dict[str, Any] = {}
    otr: dict[str, Any] = {}
    for word in words:
        if word.startswith("-"):
            raise NeMoCLIError(f"unknown option {word!r}; see --help")
        try:
            key, value = parse_override(word)
        except OverrideError as exc:
            raise NeMoCLIError(str(exc)) from None
        if key.startswith("otr."):
            otr[key[len("otr."):]] = value
        elif "." in key:
            attrs[key] = value
        else:
            kwargs[key] = value
    return kwargs, attrs, otr


def load_recipe(spec: str) -> Callable:
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise NeMoCLIError(f"--recipe {spec!r}: expected module:function, e.g. {DEFAULT_RECIPE}")
    mod_name, fn_name = spec.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise NeMoCLIError(f"--recipe {spec!r}: importing {mod_name!r} failed ({exc})") from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise NeMoCLIError(f"--recipe {spec!r}: {mod_name} has no function {fn_name!r}")
    return fn


def build_recipe(spec: str, kwargs: dict, attrs: dict, otr: dict):
    """Call the recipe function, set the dotted attributes, then turn the recipe into OTR.

    Returns (recipe, OTRConfig)."""
    from otr_megatron.core.config import OTRConfig
    from otr_megatron.nemo import otr_recipe

    try:
        otr_cfg = OTRConfig.from_dict(otr)
    except ValueError as exc:
        raise NeMoCLIError(str(exc)) from None
    fn = load_recipe(spec)
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise NeMoCLIError(f"{unknown[0]}={kwargs[unknown[0]]!r}: {spec} has no argument {unknown[0]!r}; "
                               f"its arguments: {', '.join(params)} (dotted words such as trainer.max_steps=4 "
                               "set the recipe it returns)")
    # under torchrun, Lightning must be told the process count it did not start itself
    local = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE"))
    set_devices = local is not None and "devices" not in kwargs and "trainer.devices" not in attrs
    if set_devices and "devices" in params:
        kwargs["devices"] = int(local)
    try:
        recipe = fn(**kwargs)
    except (TypeError, ValueError) as exc:  # the recipe's own argument checks
        raise NeMoCLIError(f"--recipe {spec} with {kwargs}: {exc}") from None
    if not hasattr(recipe, "model"):
        raise NeMoCLIError(f"--recipe {spec!r} returned {type(recipe).__name__}, not a NeMo-Run recipe with a .model")
    for key, value in attrs.items():
        set_attribute(recipe, key, value)
    if set_devices and "devices" not in params and getattr(recipe, "trainer", None) is not None:
        recipe.trainer.devices = int(local)
    return otr_recipe(recipe, otr_cfg), otr_cfg


def set_attribute(recipe, key: str, value) -> None:
    """Set `a.b.c` on a fiddle/NeMo-Run config tree; an unknown name is an error naming it."""
    *path, name = key.split(".")
    node = recipe
    for i, part in enumerate(path):
        try:
            node = getattr(node, part)
        except (AttributeError, ValueError) as exc:
            raise NeMoCLIError(f"{key}={value!r}: the recipe has no {'.'.join(path[:i + 1])!r} ({exc})") from None
        if node is None:
            raise NeMoCLIError(f"{key}={value!r}: {'.'.join(path[:i + 1])} is None in this recipe")
    try:
        setattr(node, name, value)
    except (AttributeError, TypeError, ValueError) as exc:
        raise NeMoCLIError(f"{key}={value!r}: cannot be set ({str(exc).splitlines()[0]})") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="otr-megatron nemo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"module:function (default {DEFAULT_RECIPE})")
    ap.add_argument("--dry-run", action="store_true", help="build and print the recipe, do not train")
    ns, words = ap.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    from otr_megatron.nemo import NeMoVersionError, check_nemo_version

    try:
        version = check_nemo_version()
        recipe, otr_cfg = build_recipe(ns.recipe, *split_words(words))
    except (NeMoCLIError, NeMoVersionError) as exc:
        print(f"otr-megatron nemo: {exc}", file=sys.stderr)
        return 2
    print(f"otr-megatron nemo: recipe {ns.recipe} (nemo-toolkit {version}), {otr_cfg}", flush=True)
    if ns.dry_run:
        print(recipe)
        return 0
    import fiddle as fdl

    from otr_megatron.nemo.cpu import enable_cpu_mode

    enable_cpu_mode()
    task = fdl.build(recipe)
    task()
    metrics = task.keywords["model"].otr_metrics() if hasattr(task, "keywords") else {}
    if metrics:  # the last pipeline stage holds them
        print("otr-megatron nemo: last step " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    return 0


if __name__ == "__main__":
    from otr_megatron import console

    console.install()  # megatron-core's "not installed" warnings: one line
    sys.exit(main())
