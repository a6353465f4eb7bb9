"""Build and validate the Bridge job on CPU, before it queues: no weights, no GPU, no Hub.

`validate_on_cpu` runs Bridge's own pre-initialisation on a copy of the `ConfigContainer`
(`runtime_config_update`: mixed precision resolved and applied, data-parallel size from the world
size, communication overlap, then `ConfigContainer.validate()`, which finalises megatron-core's
TransformerConfig), so an impossible setting fails here with Bridge's or Megatron's own message.
Without Transformer Engine, the fusions that only its kernels provide (`TE_ONLY_FUSIONS`) are turned
off in that copy alone (megatron-core refuses them without TE); the job on the cluster keeps the
recipe's values, and the result names what was turned off.

`check_job` does this for a cluster job file: the Bridge command `otr-megatron slurm --config` writes
(`launch/bridge_job.py`), built with a Hugging Face `config.json` written from the file's `model:`
section (so the recipe's `AutoBridge.from_hf_pretrained(...)` reads the file's dimensions instead of
the Hub), and validated at the file's world size.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from typing import Optional

from otr_megatron.bridge.cli import BridgeAPI, BridgeCLIError, build_config, parse_args

# (section, flag): megatron-core refuses these without Transformer Engine (RoPE fusion), or without
# the gradient-accumulation fusion that needs TE or Apex (deferred embedding wgrad)
TE_ONLY_FUSIONS = (("model", "apply_rope_fusion"), ("comm_overlap", "defer_embedding_wgrad_compute"))
# recipe module -> (Hugging Face architecture, model_type) of the config.json written for it
FAMILIES = {
    "megatron.bridge.recipes.llama": ("LlamaForCausalLM", "llama"),
    "megatron.bridge.recipes.qwen": ("Qwen2ForCausalLM", "qwen2"),
}


@contextlib.contextmanager
def _scoped_environ(**values: str):
    """Set environment variables for the block; afterwards the environment is as before (Bridge's
    `apply_environment_variables` sets the recipe's defaults in os.environ)."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def validate_on_cpu(cfg, world_size: int, runtime_config_update=None):
    """Bridge's `runtime_config_update` on a deep copy of `cfg` at `world_size` ranks; returns (the
    validated copy, the TE-only fusions turned off in it). Bridge's error is a BridgeCLIError."""
    if runtime_config_update is None:
        from megatron.bridge.training.config import runtime_config_update

    checked = copy.deepcopy(cfg)
    turned_off = []
    if importlib.util.find_spec("transformer_engine") is None:
        for section, flag in TE_ONLY_FUSIONS:
            part = getattr(checked, section, None)
            if part is not None and getattr(part, flag, False):
                setattr(part, flag, False)
                turned_off.append(f"{section}.{flag}")
    with _scoped_environ(WORLD_SIZE=str(world_size), RANK="0", LOCAL_RANK="0"):
        try:
            runtime_config_update(checked)
        except (AssertionError, ValueError, TypeError, AttributeError, KeyError) as exc:
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise BridgeCLIError(f"Bridge's validation of the configuration at {world_size} ranks failed: "
                                 f"{type(exc).__name__}: {text}") from None
    return checked, turned_off


def write_hf_config(model: dict, recipe: str, folder: str) -> Optional[str]:
    """`folder/config.json` for the recipe's model family from a job file's `model:` section; None for
    a recipe outside `FAMILIES` (it is then built as it is)."""
    family = next((v for k, v in FAMILIES.items() if recipe.split(":")[0].startswith(k)), None)
    if family is None:
        return None
    arch, model_type = family
    config = {
        "architectures": [arch], "model_type": model_type, "vocab_size": model["vocab_size"],
        "hidden_size": model["hidden_size"], "intermediate_size": model["ffn_hidden_size"],
        "num_hidden_layers": model["num_layers"], "num_attention_heads": model["num_attention_heads"],
        "num_key_value_heads": model["num_query_groups"], "max_position_embeddings": 131072,
        "tie_word_embeddings": not model.get("untie_embeddings_and_output_weights", True),
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0 if model_type == "llama" else 1000000.0,
        "torch_dtype": "bfloat16",
    }
    if model.get("kv_channels"):
        config["head_dim"] = model["kv_channels"]
    if model_type == "llama":
        config["attention_bias"] = bool(model.get("add_qkv_bias", False))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    return folder


@contextlib.contextmanager
def _quiet():
    """Bridge's import and build talk (INFO tracebacks of optional imports, fallback warnings, the CPU
    mode line) held back: the preflight says one line. Shown after all if the build crashes."""
    out, err = io.StringIO(), io.StringIO()
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("ignore")
            yield
    except BridgeCLIError:
        raise
    except BaseException:
        sys.stderr.write(out.getvalue() + err.getvalue())
        raise
    finally:
        logging.disable(logging.NOTSET)


def check_job(job, api: Optional[BridgeAPI] = None) -> str:
    """Build the job file's Bridge command on CPU and validate it; returns what was checked, in words.
    Raises BridgeCLIError (the recipe, an override key Bridge does not have, Bridge's validation)."""
    from otr_megatron.launch.bridge_job import bridge_command

    cfg = job.cfg
    command = bridge_command(cfg)
    recipe = cfg["bridge"]["recipe"]
    layout = job.layout
    with _quiet(), tempfile.TemporaryDirectory(prefix="otr-preflight-") as folder:
        argv = command[2:]
        if isinstance(cfg.get("model"), dict) and write_hf_config(cfg["model"], recipe, folder):
            argv += ["--hf-path", folder]
        args = parse_args(argv)
        api = api or BridgeAPI.default()
        built, _ = build_config(args, api)
        _, turned_off = validate_on_cpu(built, layout.world_size, api.runtime_config_update)
    off = f" ({', '.join(turned_off)} off for this check only: Transformer Engine is not installed here)" \
        if turned_off else ""
    return f"Bridge {api.version} built {recipe} with the job's overrides and validated it at " \
           f"{layout.world_size} ranks{off}"
