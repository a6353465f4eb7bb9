"""`otr-megatron` command line: one entry point, each subcommand owned by its layer, one override grammar.

Subcommands import their framework lazily, so `otr-megatron slurm` works on a login node that has
neither Megatron-Bridge nor a GPU.

Config files and overrides (`train`, `plan`, `slurm --config`; `bridge` hands its `KEY=VALUE`
words to Bridge's own OmegaConf machinery): a YAML file, then `KEY.SUB=VALUE` words, each value
read as OmegaConf's dotlist reads it (YAML: `3`, `1e-3`, `true`, `null`, `[a, b]`, `{k: v}`). A
mapping given for a section of fixed keys sets those keys one by one; any other value replaces
what was there (a list, a free-form mapping such as the train job's `data.eval`). Errors name the
key, the value and what was expected; an unknown key lists the valid keys at its level.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import typing

# name -> (module, one-line help). Each module exposes `main(argv: list[str]) -> int`.
SUBCOMMANDS = {
    "train": ("otr_megatron.train.main", "OTR fine-tuning with Megatron-Core (embedded default runs on this machine)"),
    "demo": ("otr_megatron.demo", "run the vocab-parallel OTR loss under tensor parallelism and explain it"),
    "bridge": ("otr_megatron.bridge.cli", "run a Megatron-Bridge recipe with OTR turned on"),
    "nemo": ("otr_megatron.nemo.cli", "run a NeMo 2.x (nemo-toolkit 2.7) recipe with OTR turned on"),
    "slurm": ("otr_megatron.launch.slurm", "write an sbatch script for a train or bridge command"),
    "plan": ("otr_megatron.planning.cli", "memory and communication budget per GPU for a configuration"),
    "compare": ("otr_megatron.compare.cli", "A/B harness: the train job over losses, knobs and seeds; mean +- std"),
}
# The setup.py extra that holds what a subcommand needs (`bridge` runs in a NeMo Framework container).
EXTRAS = {"train": "train", "compare": "train", "demo": "mcore", "plan": "launch", "slurm": "launch"}


class OverrideError(ValueError):
    """A config file or `KEY=VALUE` override names an unknown key or gives a value of the wrong type."""


def parse_override(text: str) -> tuple[str, typing.Any]:
    """`a.b.c=value` -> ("a.b.c", value), the value parsed by OmegaConf's dotlist reader."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not all(key.split(".")):
        raise OverrideError(f"override {text!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
    try:
        safe_yaml_load(raw, f"override {text[:80]!r}")  # the size limits, before OmegaConf copies the value
        return key, OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]
    except (YAMLError, OmegaConfBaseException) as e:
        raise OverrideError(f"override {text!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None


# Limits of every YAML text this package reads (config files, override values, sweep values). A
# YAML alias (`*a`) is a reference, so a 1 KB file of nested aliases stands for ~10^9 values: PyYAML
# builds it as shared objects in milliseconds, but OmegaConf, json.dumps or a deep copy expand it
# (minutes, gigabytes, then a MemoryError). Configs are far below both limits.
MAX_YAML_VALUES = 100_000  # scalars, lists and mappings, counted with every alias expanded
MAX_YAML_DEPTH = 100  # nesting levels


def _yaml_children(node) -> list:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_yaml_graph(root, source: str) -> None:
    """Count the values of a composed YAML document with every alias expanded (each shared node is
    counted once per reference, memoized, so the count itself is linear); refuse cycles and depth."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, 0, False)]
    while stack:
        node, depth, finished = stack.pop()
        if finished:
            on_path.discard(id(node))
            size = 1 + sum(sizes[id(k)] for k in _yaml_children(node))
            if size > MAX_YAML_VALUES:
                raise OverrideError(
                    f"{source}: the YAML stands for more than {MAX_YAML_VALUES} values once its aliases (*name) "
                    f"are expanded (nested aliases, a 'billion laughs'); expected a config of at most "
                    f"{MAX_YAML_VALUES} values")
            sizes[id(node)] = size
            continue
        if id(node) in sizes:
            continue
        if depth > MAX_YAML_DEPTH:
            raise OverrideError(f"{source}: the YAML is nested deeper than {MAX_YAML_DEPTH} levels; "
                                f"expected at most {MAX_YAML_DEPTH}")
        on_path.add(id(node))
        stack.append((node, depth, True))
        for child in _yaml_children(node):
            if id(child) in on_path:
                raise OverrideError(f"{source}: a YAML alias refers to a list or mapping that contains it "
                                    "(a recursive structure); expected a tree of values")
            if id(child) not in sizes:
                stack.append((child, depth + 1, False))


def safe_yaml_load(text, source: str, loader=None):
    """The one YAML reader of this package: `yaml.load(text, loader)` (default `yaml.SafeLoader`) that
    first composes the document and refuses it, naming `source`, when it expands to more than
    `MAX_YAML_VALUES` values, nests deeper than `MAX_YAML_DEPTH` or refers to itself. Syntax errors
    are `yaml.YAMLError` as usual; limit errors are `OverrideError`."""
    import yaml

    ld = (loader or yaml.SafeLoader)(text)
    try:
        try:
            node = ld.get_single_node()
        except RecursionError:  # PyYAML's composer recurses once per nesting level
            raise OverrideError(f"{source}: the YAML is nested deeper than {MAX_YAML_DEPTH} levels; "
                                f"expected at most {MAX_YAML_DEPTH}") from None
        if node is None:
            return None
        _check_yaml_graph(node, source)
        return ld.construct_document(node)
    finally:
        ld.dispose()


def load_yaml(path: str) -> dict:
    """A YAML config file's top-level mapping (an empty file is an empty mapping)."""
    import yaml

    if not os.path.isfile(path):
        raise OverrideError(f"config file {path!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise OverrideError(f"config file {path!r} cannot be read: {e}") from None
    try:
        data = safe_yaml_load(text, path)
    except yaml.YAMLError as e:
        raise OverrideError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OverrideError(f"{path}: the top level must be a mapping of config keys, got {type(data).__name__}")
    return data


def load_config_dict(path: str, overrides: typing.Sequence[str] = ()) -> dict:
    """A config file without a schema (`plan`, `slurm --config`) plus overrides of the keys it has."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    data = load_yaml(path)
    try:
        conf = OmegaConf.create(data)
        OmegaConf.set_struct(conf, True)  # an override may change a key, never add one (a typo fails)
        for text in overrides:
            set_key(conf, *parse_override(text))
        return OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as e:  # e.g. an interpolation ${...} that does not resolve
        raise OverrideError(f"{path}: {str(e).splitlines()[0]}") from None


def set_key(conf, key: str, value) -> None:
    """Set the dotted `key` of an OmegaConf config, checked against its schema or its keys."""
    from omegaconf import DictConfig

    *sections, name = key.split(".")
    node = conf
    for i, part in enumerate(sections):
        path = ".".join(sections[: i + 1])
        _check_known(node, part, path)
        node = node._get_node(part)
        if not isinstance(node, DictConfig):
            raise OverrideError(f"{path} is a value, not a section; {key!r} cannot be set")
    _set(node, name, value, key)


def _fixed_keys(node) -> bool:
    """A dataclass section or a struct config: its keys are the valid ones (a free-form dict's are not)."""
    from omegaconf import OmegaConf

    return bool(OmegaConf.is_struct(node)) or dataclasses.is_dataclass(OmegaConf.get_type(node))


def _check_known(node, name: str, key: str) -> None:
    if name not in node and _fixed_keys(node):
        raise OverrideError(f"unknown config key {key!r}; valid keys here: {sorted(node)}")


def _set(node, name: str, value, key: str) -> None:
    from omegaconf import DictConfig, ListConfig
    from omegaconf.errors import OmegaConfBaseException
    from omegaconf.nodes import BooleanNode

    _check_known(node, name, key)
    child = node._get_node(name) if name in node else None
    if isinstance(value, dict) and isinstance(child, DictConfig) and _fixed_keys(child):
        for k, v in value.items():
            _set(child, str(k), v, f"{key}.{k}")
        return
    if isinstance(child, BooleanNode) and not isinstance(value, bool):  # OmegaConf reads 3 or 'yes' as true
        raise OverrideError(f"{key}={value!r}; expected true or false")
    element = None if child is not None else getattr(node._metadata, "element_type", None)
    if isinstance(value, str) and (isinstance(child, ListConfig) or typing.get_origin(element) is list):
        value = [value]  # one path given where a list of paths is expected
    try:
        node[name] = value
    except OmegaConfBaseException as e:
        raise OverrideError(f"{key}={value!r}; expected {_expected(child, element, e)}") from None


def _expected(child, element, exc) -> str:
    """What the schema wants at a key, in words (a new entry of a typed dict: its element type)."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.nodes import FloatNode, IntegerNode, StringNode

    for kind, words in ((IntegerNode, "an integer"), (FloatNode, "a number"), (StringNode, "a string"),
                        (ListConfig, "a list"), (DictConfig, "a mapping")):
        if isinstance(child, kind):
            return words + (" or null" if child._is_optional() else "")
    origin = typing.get_origin(element)
    if origin in (list, dict):
        return "a list" if origin is list else "a mapping"
    return str(exc).splitlines()[0]


def _usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    lines = ["usage: otr-megatron <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `otr-megatron <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The `otr-megatron` command; `argv` None means the real command line (then the console is made quiet)."""
    if argv is None:
        from otr_megatron import console

        console.install()  # megatron-core's "not installed" warnings: one line (otr_megatron/console.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"otr-megatron: unknown command {name!r}; expected one of {sorted(SUBCOMMANDS)}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    try:
        return int(importlib.import_module(SUBCOMMANDS[name][0]).main(rest) or 0)
    except ModuleNotFoundError as e:  # `pip install otr-megatron` alone installs only the loss (torch)
        if not e.name or e.name.split(".")[0] == "otr_megatron":
            raise
        hint = f"pip install 'otr-megatron[{EXTRAS[name]}]'" if name in EXTRAS else "see the README's containers"
        print(f"otr-megatron {name}: needs the module {e.name!r}, which is not installed; {hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
