"""`otr-megatron bridge`: run a Megatron-Bridge recipe with OTR as the loss.

    otr-megatron bridge --recipe megatron.bridge.recipes.llama:llama3_70b_sft_config \\
        [--config overrides.yaml] [--mode auto|sft|pretrain] [--hf-path DIR] [--vocab-size N] [--dry-run] \\
        [otr.num_samples=256 otr.temperature=1.3 ...] [model.tensor_model_parallel_size=8 train.global_batch_size=128 ...]

The recipe is a dotted path `module:function` to a zero-argument function returning Bridge's
`ConfigContainer` (recipe names churn between Bridge releases, so none is hard-coded). `otr.*`
keys (on the command line, or an `otr:` section of the YAML file) are parsed here into
`otr_megatron.OTRConfig`; everything else goes to Bridge's own override machinery
(`process_config_with_overrides`: YAML merge, then Hydra-style `key=value`, `+key=value`, `~key`).

On a machine without a CUDA device the real Bridge loop runs on the CPU (gloo): `bridge/cpu.py`
applies its import shims and runtime patches and names them in one log line. Try it with the tiny
recipe shipped here:

    otr-megatron bridge --recipe otr_megatron.bridge.recipes:tiny_gpt_cpu_config train.train_iters=4 otr.num_samples=8
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

MIN_BRIDGE = (0, 3, 0)  # NeMo Framework 26.02; older releases lack the recipe/override API used here
TESTED_BRIDGE = (0, 7)  # newest minor line whose API was read; CI runs 0.6.2 (scripts/requirements)

OTR_PREFIX = "otr."


class BridgeCLIError(ValueError):
    """A user-facing error of `otr-megatron bridge` (bad recipe, key, version, value)."""


@dataclass
class BridgeArgs:
    recipe: str
    mode: str = "auto"
    config: Optional[str] = None
    hf_path: Optional[str] = None
    vocab_size: Optional[int] = None
    dry_run: bool = False
    world_size: Optional[int] = None
    otr: dict = field(default_factory=dict)
    overrides: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------

def _parse_value(key: str, text: str) -> Any:
    """The value of `otr.key=value`, read as every other command reads KEY=VALUE (OmegaConf's dotlist:
    256 -> int, 1.3 and 1e-3 -> float, null -> None)."""
    from otr_megatron.config.reader import OverrideError, parse_override

    try:
        return parse_override(f"{key}={text}")[1]
    except OverrideError as exc:
        raise BridgeCLIError(f"{OTR_PREFIX}{exc}") from None


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
                raise BridgeCLIError(f"{tok!r}: expected otr.KEY=VALUE (OTR settings are not nested)")
            otr[key] = _parse_value(key, value)
        elif tok.startswith("-"):
            raise BridgeCLIError(f"unknown option {tok!r}; Bridge overrides are KEY=VALUE, see --help")
        elif "=" in tok or tok.startswith("~"):
            bridge.append(tok)
        else:
            raise BridgeCLIError(f"{tok!r}: expected KEY=VALUE (Bridge override) or otr.KEY=VALUE")
    return otr, bridge


def build_otr_config(values: dict):
    """`OTRConfig` from parsed `otr.*` values, through the one unknown-key check (`OTRConfig.from_dict`)."""
    from otr_megatron import OTRConfig

    try:
        return OTRConfig.from_dict(values)
    except (TypeError, ValueError) as exc:  # UnknownOTRKeyError is a ValueError naming otr.KEY
        raise BridgeCLIError(str(exc)) from exc


def parse_args(argv: list[str]) -> BridgeArgs:
    ap = argparse.ArgumentParser(prog="otr-megatron bridge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help="module:function returning a Bridge ConfigContainer")
    ap.add_argument("--config", help="YAML merged into the recipe (Bridge keys; an `otr:` section is read here)")
    ap.add_argument("--mode", choices=("auto", "sft", "pretrain"), default="auto",
                    help="sft -> megatron.bridge.training.finetune (needs checkpoint.pretrained_checkpoint or "
                         "checkpoint.load), pretrain -> .pretrain (from the recipe's initialization); auto (default): "
                         "sft when the configuration names a checkpoint, else pretrain")
    ap.add_argument("--hf-path", metavar="DIR",
                    help="local Hugging Face model directory (config.json, tokenizer) used wherever the recipe "
                         "asks the Hugging Face Hub for a model (AutoBridge.from_hf_pretrained), e.g. offline")
    ap.add_argument("--vocab-size", type=int, help="real vocabulary size (default: cfg.model.vocab_size)")
    ap.add_argument("--dry-run", action="store_true",
                    help="build the configuration, run Bridge's own validation on a copy (CPU is fine), print the "
                         "final configuration, do not train")
    ap.add_argument("--world-size", type=int, metavar="N",
                    help="ranks the --dry-run validation assumes (default: $WORLD_SIZE, else tp*pp*cp, i.e. dp=1)")
    ns, rest = ap.parse_known_args(argv)
    otr, bridge = split_overrides(rest)
    return BridgeArgs(recipe=ns.recipe, mode=ns.mode, config=ns.config, hf_path=ns.hf_path,
                      vocab_size=ns.vocab_size, dry_run=ns.dry_run, world_size=ns.world_size, otr=otr,
                      overrides=bridge)


def split_yaml(path: str) -> tuple[dict, Optional[dict]]:
    """Read the YAML file; return (its `otr:` section, the remaining Bridge part or None).

    Read by the package's one YAML reader (`config/reader.py`: YAML 1.2 numbers, as Bridge's OmegaConf
    reads the rest, so `1e-3` is a number, not a string)."""
    from yaml import YAMLError

    from otr_megatron.config.reader import OverrideError, safe_yaml_load

    if not os.path.isfile(path):
        raise BridgeCLIError(f"--config {path!r}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        data = safe_yaml_load(text, f"--config {path!r}")
        if data is not None and not isinstance(data, dict):
            raise BridgeCLIError(f"--config {path!r}: expected a mapping at the top level")
        data = data or {}
    except OverrideError as exc:  # the size limits of every YAML reader here
        raise BridgeCLIError(str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BridgeCLIError(f"--config {path!r}: cannot be read ({exc})") from None
    except YAMLError as exc:
        raise BridgeCLIError(f"--config {path!r}: not valid YAML ({str(exc).splitlines()[0]})") from None
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
            "Framework container 26.08 (Bridge 0.6; 26.04 or later has Bridge), or `MCORE=0.19.2 BRIDGE=0.6.2 bash scripts/setup_env.sh`"
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
    runtime_config_update: Optional[Callable] = None  # Bridge's pre-initialisation + validate (--dry-run)

    @classmethod
    def default(cls) -> "BridgeAPI":
        """Check the version; on a machine without CUDA apply CPU mode first (`bridge/cpu.py`)."""
        version = installed_bridge_version()
        check_bridge_version(version)
        try:
            from otr_megatron.bridge import cpu

            cpu.enable_cpu_mode()
            from megatron.bridge.training.config import runtime_config_update
            from megatron.bridge.training.finetune import finetune
            from megatron.bridge.training.pretrain import pretrain
            from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides
        except ImportError as exc:
            raise BridgeCLIError(
                f"Megatron-Bridge {version} is installed but its training API failed to import ({exc}). Bridge 0.6 "
                "needs megatron-core >= 0.19 (with its megatron.training package), transformers, nvidia-modelopt, "
                "megatron-energon, tensorboard, diffusers, omegaconf and hydra-core; Transformer Engine and a GPU "
                "are optional (without CUDA, otr-megatron runs Bridge on the CPU with gloo). Pinned versions: "
                "`MCORE=0.19.2 BRIDGE=0.6.2 bash scripts/setup_env.sh`"
            ) from exc
        return cls(version, process_config_with_overrides, finetune, pretrain, runtime_config_update)


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


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _is_hub_error(exc: BaseException) -> bool:
    """True if `exc` (or what caused it) is Hugging Face failing to fetch a model: Bridge's
    `safe_load_config_with_retry` turns transformers' OSError into a ValueError."""
    seen = exc
    while seen is not None:
        text = str(seen).lower()
        if "huggingface" in text or "failed to load configuration from" in text or "hf_hub_offline" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def local_hf_models(hf_path: Optional[str]):
    """While the recipe is built, `AutoBridge.from_hf_pretrained(ID)` reads `hf_path` instead of the
    Hub model ID; yields the IDs asked for (so `_replace_strings` can point the tokenizer there too)."""
    requested: list[str] = []
    if hf_path is None:
        yield requested
        return
    if not os.path.isfile(os.path.join(hf_path, "config.json")):
        raise BridgeCLIError(f"--hf-path {hf_path!r}: expected a Hugging Face model directory with a config.json")
    from megatron.bridge.models.conversion.auto_bridge import AutoBridge

    original = AutoBridge.__dict__["from_hf_pretrained"]

    def from_local(cls, path, *args, **kwargs):
        requested.append(str(path))
        return original.__func__(cls, hf_path, *args, **kwargs)

    AutoBridge.from_hf_pretrained = classmethod(from_local)
    try:
        yield requested
    finally:
        AutoBridge.from_hf_pretrained = original


def _replace_strings(cfg, old: set, new: Optional[str]) -> None:
    """Set every string field of cfg's sections (tokenizer.tokenizer_model, dataset.hf_processor_path, ...)
    that equals a redirected Hub ID to the local directory."""
    if not old or new is None:
        return
    for section in vars(cfg).values():
        if dataclasses.is_dataclass(section):
            for f in dataclasses.fields(section):
                if isinstance(getattr(section, f.name, None), str) and getattr(section, f.name) in old:
                    setattr(section, f.name, new)


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
        with local_hf_models(args.hf_path) as requested:
            cfg = recipe()
    except TypeError as exc:
        raise BridgeCLIError(f"--recipe {args.recipe!r}: calling it with no arguments failed ({exc})") from exc
    except (ValueError, OSError) as exc:
        if not _is_hub_error(exc):
            raise
        raise BridgeCLIError(
            f"--recipe {args.recipe!r} asks the Hugging Face Hub for its model config when it is built, and that "
            f"failed ({_first_line(exc)}). Offline, pass a local Hugging Face model directory (config.json and "
            "tokenizer files, e.g. written by transformers' save_pretrained) with --hf-path DIR: the recipe's "
            "AutoBridge.from_hf_pretrained(...) and its tokenizer then read DIR. Or set HF_HUB_OFFLINE=1 with the "
            "model already in the Hugging Face cache (HF_HOME). The weights to fine-tune come from "
            "checkpoint.pretrained_checkpoint=DIR (the same Hugging Face directory, or a Megatron checkpoint); "
            "otr_megatron.bridge.hf:llama_sft_cpu_config shows the whole offline route"
        ) from exc
    for attr in ("model", "train"):
        if not hasattr(cfg, attr):
            raise BridgeCLIError(f"--recipe {args.recipe!r} returned {type(cfg).__name__}, not a Bridge ConfigContainer "
                                 f"(no .{attr})")
    _replace_strings(cfg, set(requested), args.hf_path)

    tmp = None
    try:
        if bridge_yaml:
            from otr_megatron.config.reader import dump_yaml

            fd, tmp = tempfile.mkstemp(suffix=".yaml", prefix="otr-bridge-")
            with os.fdopen(fd, "w") as f:
                dump_yaml(bridge_yaml, f)
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


def resolve_mode(mode: str, cfg) -> tuple[str, str]:
    """("sft" or "pretrain", why): auto picks sft (Bridge's finetune) when the configuration names a
    checkpoint to start from; Bridge's finetune asserts one."""
    ckpt = getattr(cfg, "checkpoint", None)
    source = next((f"checkpoint.{k}={getattr(ckpt, k)}" for k in ("pretrained_checkpoint", "load")
                   if getattr(ckpt, k, None)), None)
    if mode == "sft" and source is None:
        raise BridgeCLIError("--mode sft runs Bridge's finetune, which starts from a checkpoint: set "
                             "checkpoint.pretrained_checkpoint=DIR (or checkpoint.load=DIR to resume), or use "
                             "--mode pretrain to train from the recipe's initialization")
    if mode == "auto":
        mode = "sft" if source else "pretrain"
    if mode == "sft":
        return mode, f"starts from {source}"
    return mode, source or "from the recipe's initialization: no checkpoint configured"


def train(api: BridgeAPI, mode: str, cfg, step) -> None:
    """Bridge's finetune/pretrain with `OTRConsoleMetrics` as a callback where Bridge takes callbacks."""
    from otr_megatron.bridge.console import OTRConsoleMetrics

    fn = api.finetune if mode == "sft" else api.pretrain
    try:
        takes_callbacks = "callbacks" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins / C callables without a signature
        takes_callbacks = False
    if takes_callbacks:
        fn(cfg, step, callbacks=[OTRConsoleMetrics()])
    else:
        warnings.warn(f"Megatron-Bridge {api.version} takes no training callbacks: its console drops negative "
                      "averages, so 'otr loss' and 'otr mean reward' appear only in TensorBoard/W&B", stacklevel=2)
        fn(cfg, step)


def dry_run(args: BridgeArgs, cfg, api: BridgeAPI) -> int:
    """Bridge's validation (`bridge/preflight.py`) on a copy, then the final configuration on stdout."""
    from otr_megatron.bridge.preflight import validate_on_cpu

    model = cfg.model
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "0") or 0) or (
        getattr(model, "tensor_model_parallel_size", 1) * getattr(model, "pipeline_model_parallel_size", 1)
        * getattr(model, "context_parallel_size", 1))
    if world < 1:
        raise BridgeCLIError(f"--world-size {world}; expected an integer >= 1")
    if api.runtime_config_update is None:  # an injected API without Bridge's validation (tests)
        print("otr-megatron bridge: --dry-run: built; this Bridge API has no validation; not training", flush=True)
        return 0
    checked, turned_off = validate_on_cpu(cfg, world, api.runtime_config_update)
    if hasattr(checked, "print_yaml"):
        checked.print_yaml()
    else:  # pragma: no cover - Bridge releases without print_yaml
        print(checked)
    off = f"; {', '.join(turned_off)} off for the check only (Transformer Engine is not installed)" if turned_off else ""
    print(f"otr-megatron bridge: --dry-run: built and validated at {world} ranks{off}; not training", flush=True)
    return 0


def run(argv: list[str], api: Optional[BridgeAPI] = None) -> int:
    args = parse_args(argv)
    api = api or BridgeAPI.default()
    cfg, otr_cfg = build_config(args, api)
    from otr_megatron.bridge.step import OTRForwardStep

    mode, why = resolve_mode(args.mode, cfg)
    step = OTRForwardStep(otr_cfg, vocab_size=args.vocab_size)
    model = cfg.model
    if os.environ.get("RANK", "0") == "0":
        print(f"otr-megatron bridge: recipe {args.recipe} (Bridge {api.version}), mode {mode} ({why}), "
              f"tp={getattr(model, 'tensor_model_parallel_size', '?')} "
              f"pp={getattr(model, 'pipeline_model_parallel_size', '?')} "
              f"cp={getattr(model, 'context_parallel_size', '?')}, {otr_cfg}", flush=True)
    if args.dry_run:
        return dry_run(args, cfg, api)
    train(api, mode, cfg, step)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(argv)
    except BridgeCLIError as exc:
        print(f"otr-megatron bridge: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from otr_megatron import console

    console.install()  # megatron-core's "not installed" warnings: one line
    sys.exit(main())
