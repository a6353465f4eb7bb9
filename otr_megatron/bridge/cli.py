"""`otr-megatron bridge`: run a Megatron-Bridge recipe with OTR as the loss.

    otr-megatron bridge --recipe megatron.bridge.recipes.llama:llama3_70b_sft_config \\
        [--config overrides.yaml] [--mode sft|pretrain] [--vocab-size N] [--dry-run] \\
        [otr.num_samples=256 otr.temperature=1.3 ...] [model.tensor_model_parallel_size=8 train.global_batch_size=128 ...]

The recipe is a dotted path `module:function` to a zero-argument function returning Bridge's
`ConfigContainer` (recipe names churn between Bridge releases, so none is hard-coded). `otr.*`
keys (on the command line, or an `otr:` section of the YAML file) are parsed here into
`otr_megatron.OTRConfig`; everything else goes to Bridge's own override machinery
(`process_config_with_overrides`: YAML merge, then Hydra-style `key=value`, `+key=value`, `~key`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

MIN_BRIDGE = (0, 3, 0)  # NeMo Framework 26.02; older releases lack the recipe/override API used here
TESTED_BRIDGE = (0, 7)  # newest minor line read when writing this adapter

OTR_PREFIX = "otr."


class BridgeCLIError(ValueError):
    """A user-facing error of `otr-megatron bridge` (bad recipe, key, version, value)."""


@dataclass
class BridgeArgs:
    recipe: str
    mode: str = "sft"
    config: Optional[str] = None
    vocab_size: Optional[int] = None
    dry_run: bool = False
    otr: dict = field(default_factory=dict)
    overrides: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------

def _parse_value(key: str, text: str) -> Any:
    """YAML scalar semantics for `otr.key=value` (256 -> int, 1.3 -> float, null -> None)."""
    import yaml

    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as exc:
        raise BridgeCLIError(f"{OTR_PREFIX}{key}={text!r}: not a valid value ({exc})") from exc


def split_overrides(tokens: list[str]) -> tuple[dict, list[str]]:
    """Split trailing arguments into `otr.*` settings and Bridge Hydra overrides."""
    otr: dict[str, Any] = {}
    bridge: list[str] = []
    for tok in tokens:
        name = tok.lstrip("+~").split("=", 1)[0]
        if name.startswith(OTR_PREFIX):
            if tok[0] in "+~" or "=" not in tok:
                raise BridgeCLIError(f"{tok!r}: OTR settings take the form otr.KEY=VALUE")
            key, value = tok[len(OTR_PREFIX):].split("=", 1)
            if not key or "." in key:
                raise BridgeCLIError(f"{tok!r}: expected otr.KEY=VALUE with one of {otr_keys()}")
            otr[key] = _parse_value(key, value)
        elif tok.startswith("-"):
            raise BridgeCLIError(f"unknown option {tok!r}; Bridge overrides are KEY=VALUE, see --help")
        elif "=" in tok or tok.startswith("~"):
            bridge.append(tok)
        else:
            raise BridgeCLIError(f"{tok!r}: expected KEY=VALUE (Bridge override) or otr.KEY=VALUE")
    return otr, bridge


def otr_keys() -> list[str]:
    from otr_megatron import OTRConfig

    return [f.name for f in dataclasses.fields(OTRConfig)]


def build_otr_config(values: dict):
    """`OTRConfig` from parsed `otr.*` values; unknown keys and bad values are named in the error."""
    from otr_megatron import OTRConfig

    known = otr_keys()
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise BridgeCLIError(f"unknown OTR key(s) {['otr.' + k for k in unknown]}; known: {['otr.' + k for k in known]}")
    vals = dict(values)
    # YAML reads `otr.temperature=2` as int; the config wants a number either way.
    for k in ("temperature", "neg_reward"):
        if isinstance(vals.get(k), int) and not isinstance(vals.get(k), bool):
            vals[k] = float(vals[k])
    try:
        return OTRConfig(**vals)
    except (TypeError, ValueError) as exc:
        raise BridgeCLIError(str(exc)) from exc


def parse_args(argv: list[str]) -> BridgeArgs:
    ap = argparse.ArgumentParser(prog="otr-megatron bridge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help="module:function returning a Bridge ConfigContainer")
    ap.add_argument("--config", help="YAML merged into the recipe (Bridge keys; an `otr:` section is read here)")
    ap.add_argument("--mode", choices=("sft", "pretrain"), default="sft",
                    help="sft -> megatron.bridge.training.finetune, pretrain -> .pretrain (default sft)")
    ap.add_argument("--vocab-size", type=int, help="real vocabulary size (default: cfg.model.vocab_size)")
    ap.add_argument("--dry-run", action="store_true", help="build and print the configuration, do not train")
    ns, rest = ap.parse_known_args(argv)
    otr, bridge = split_overrides(rest)
    return BridgeArgs(recipe=ns.recipe, mode=ns.mode, config=ns.config, vocab_size=ns.vocab_size,
                      dry_run=ns.dry_run, otr=otr, overrides=bridge)


def split_yaml(path: str) -> tuple[dict, Optional[dict]]:
    """Read the YAML file; return (its `otr:` section, the remaining Bridge part or None)."""
    import yaml

    if not os.path.isfile(path):
        raise BridgeCLIError(f"--config {path!r}: no such file")
    data = yaml.safe_load(open(path, encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise BridgeCLIError(f"--config {path!r}: expected a mapping at the top level")
    otr = data.pop("otr", None) or {}
    if not isinstance(otr, dict):
        raise BridgeCLIError(f"--config {path!r}: `otr:` must be a mapping of OTR settings")
    return otr, (data or None)


# ------------------------------------------------------------------------------------------------
# Bridge access (lazy; injectable for tests)
# ------------------------------------------------------------------------------------------------

def _version_tuple(text: str) -> tuple[int, ...]:
    nums = []
    for part in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        if digits == "":
            break
        nums.append(int(digits))
    return tuple(nums)


def check_bridge_version(version: Optional[str]) -> tuple[int, ...]:
    """Refuse Bridge releases without the APIs used here; warn on releases newer than tested."""
    if version is None:
        raise BridgeCLIError(
            "Megatron-Bridge is not installed (pip package megatron-bridge, import megatron.bridge); use a NeMo "
            "Framework container 26.02 or later, or `pip install megatron-bridge`"
        )
    v = _version_tuple(version)
    if not v or v < MIN_BRIDGE:
        raise BridgeCLIError(
            f"Megatron-Bridge {version} is not supported: need >= {'.'.join(map(str, MIN_BRIDGE))} (recipes returning "
            "ConfigContainer, training.utils.omegaconf_utils.process_config_with_overrides, forward steps with state)"
        )
    if v[:2] > TESTED_BRIDGE:
        warnings.warn(f"Megatron-Bridge {version} is newer than the tested {TESTED_BRIDGE[0]}.{TESTED_BRIDGE[1]}.x; "
                      "the adapter is version-checked but not tested there", stacklevel=2)
    return v


def installed_bridge_version() -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version("megatron-bridge")
    except metadata.PackageNotFoundError:
        return None


@dataclass
class BridgeAPI:
    """The Bridge functions the CLI calls; `default()` imports them from megatron.bridge."""

    version: Optional[str]
    process_config_with_overrides: Callable
    finetune: Callable
    pretrain: Callable

    @classmethod
    def default(cls) -> "BridgeAPI":
        version = installed_bridge_version()
        check_bridge_version(version)
        try:
            from megatron.bridge.training.finetune import finetune
            from megatron.bridge.training.pretrain import pretrain
            from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides
        except ImportError as exc:
            raise BridgeCLIError(
                f"Megatron-Bridge {version} is installed but its training API failed to import ({exc}); it needs "
                "Transformer Engine and a GPU machine (NeMo Framework container)"
            ) from exc
        return cls(version, process_config_with_overrides, finetune, pretrain)


def load_recipe(spec: str) -> Callable:
    """Resolve `module:function`; errors say what was wrong and where to look."""
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise BridgeCLIError(
            f"--recipe {spec!r}: expected module:function, e.g. megatron.bridge.recipes.llama:llama3_70b_sft_config"
        )
    mod_name, fn_name = spec.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        raise BridgeCLIError(f"--recipe {spec!r}: module {mod_name!r} not found ({exc})") from exc
    except ImportError as exc:
        raise BridgeCLIError(f"--recipe {spec!r}: importing {mod_name!r} failed ({exc})") from exc
    fn = getattr(module, fn_name, None)
    if fn is None:
        near = sorted(n for n in dir(module) if n.endswith("_config") and not n.startswith("_"))
        hint = f"; recipes in {mod_name}: {', '.join(near[:20])}" if near else ""
        raise BridgeCLIError(f"--recipe {spec!r}: {mod_name} has no {fn_name!r} (recipe names change between "
                             f"Bridge releases){hint}")
    if not callable(fn):
        raise BridgeCLIError(f"--recipe {spec!r}: {fn_name} is not callable")
    return fn


def build_config(args: BridgeArgs, api: BridgeAPI):
    """Recipe -> ConfigContainer with YAML and CLI overrides applied; returns (cfg, OTRConfig)."""
    otr_values: dict = {}
    bridge_yaml = None
    if args.config:
        otr_values, bridge_yaml = split_yaml(args.config)
    otr_values.update(args.otr)  # command line wins over the file
    otr_cfg = build_otr_config(otr_values)

    recipe = load_recipe(args.recipe)
    try:
        cfg = recipe()
    except TypeError as exc:
        raise BridgeCLIError(f"--recipe {args.recipe!r}: calling it with no arguments failed ({exc})") from exc
    for attr in ("model", "train"):
        if not hasattr(cfg, attr):
            raise BridgeCLIError(f"--recipe {args.recipe!r} returned {type(cfg).__name__}, not a Bridge ConfigContainer "
                                 f"(no .{attr})")

    tmp = None
    try:
        if bridge_yaml:
            import yaml

            fd, tmp = tempfile.mkstemp(suffix=".yaml", prefix="otr-bridge-")
            with os.fdopen(fd, "w") as f:
                yaml.safe_dump(bridge_yaml, f)
        if bridge_yaml or args.overrides:
            try:
                cfg = api.process_config_with_overrides(cfg, config_filepath=tmp, cli_overrides=list(args.overrides) or None)
            except Exception as exc:  # Bridge raises OverridesError / omegaconf errors naming the key
                raise BridgeCLIError(f"Bridge rejected the overrides {args.overrides or ''}"
                                     f"{' and --config ' + args.config if bridge_yaml else ''}: {exc}") from exc
    finally:
        if tmp:
            os.unlink(tmp)
    return cfg, otr_cfg


def run(argv: list[str], api: Optional[BridgeAPI] = None) -> int:
    args = parse_args(argv)
    api = api or BridgeAPI.default()
    cfg, otr_cfg = build_config(args, api)
    from otr_megatron.bridge.step import OTRForwardStep

    step = OTRForwardStep(otr_cfg, vocab_size=args.vocab_size)
    model = cfg.model
    print(f"otr-megatron bridge: recipe {args.recipe} (Bridge {api.version}), mode {args.mode}, "
          f"tp={getattr(model, 'tensor_model_parallel_size', '?')} pp={getattr(model, 'pipeline_model_parallel_size', '?')} "
          f"cp={getattr(model, 'context_parallel_size', '?')}, {otr_cfg}")
    if args.dry_run:
        return 0
    (api.finetune if args.mode == "sft" else api.pretrain)(cfg, step)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(argv)
    except BridgeCLIError as exc:
        print(f"otr-megatron bridge: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
