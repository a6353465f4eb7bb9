"""One reader and one grammar for every command's config files and `KEY=VALUE` overrides.

`train`, `plan`, `slurm --config`, `bridge` (its `--config` file and `otr.*` words), `nemo` and
`compare` (its `--sweep` values) all read YAML through `safe_yaml_load` and override values through
`parse_override`, so a value means the same everywhere: `1e-3` is a number (YAML 1.2, as OmegaConf and
Bridge read it; PyYAML's YAML 1.1 default would make it the string '1e-3'), `[a, b]` a list, `null`
None. A YAML file, then `KEY.SUB=VALUE` words: a mapping given for a section of fixed keys sets those
keys one by one; any other value replaces what was there (a list, a free-form mapping such as the
train job's `data.eval`). Errors name the key, the value and what was expected; an unknown key lists
the valid keys at its level.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import typing

class OverrideError(ValueError):
    """A config file or `KEY=VALUE` override names an unknown key or gives a value of the wrong type."""


def parse_override(text: str) -> tuple[str, typing.Any]:
    """`a.b.c=value` -> ("a.b.c", value), the value read as YAML by `safe_yaml_load` (as in a file)."""
    from yaml import YAMLError

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not all(key.split(".")):
        raise OverrideError(f"override {text!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
    try:
        return key, safe_yaml_load(raw, f"override {text[:80]!r}")
    except YAMLError as e:
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


# YAML 1.2 floats: `1e-3`, `+1E5`, `.5`, `1_000.0`, `.inf`, `.nan` (PyYAML's YAML 1.1 resolver needs a
# dot and a signed exponent, so it reads `1e-3` as a string)
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                       |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                       |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                       |[-+]?\.(?:inf|Inf|INF)
                       |\.(?:nan|NaN|NAN))$""", re.X)


# YAML 1.2 booleans: true / false only (YAML 1.1 also reads yes, no, on, off, y, n as booleans)
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


@functools.lru_cache(maxsize=1)
def yaml_loader():
    """`yaml.SafeLoader` with YAML 1.2 floats and booleans: the loader of every YAML text this package
    reads (files, override values, sweep values)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    replaced = ("tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")
    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in replaced]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
    return Loader


@functools.lru_cache(maxsize=1)
def yaml_dumper():
    """`yaml.SafeDumper` that quotes what `yaml_loader()` would read as a number or a boolean (the string
    '1e3' is written '1e3' in quotes, so it loads back as the string it was)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeDumper.yaml_implicit_resolvers.items()}
    Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return Dumper


def dump_yaml(data, stream=None, **kwargs):
    """`yaml.dump` with `yaml_dumper()`: what this package writes, it reads back unchanged."""
    import yaml

    return yaml.dump(data, stream, Dumper=yaml_dumper(), **kwargs)


def safe_yaml_load(text, source: str, loader=None):
    """The one YAML reader of this package: `yaml.load(text, loader)` (default `yaml_loader()`) that
    first composes the document and refuses it, naming `source`, when it expands to more than
    `MAX_YAML_VALUES` values, nests deeper than `MAX_YAML_DEPTH` or refers to itself. Syntax errors
    are `yaml.YAMLError` as usual; limit errors are `OverrideError`."""
    ld = (loader or yaml_loader())(text)
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


def resolve_interpolations(data: dict, source: str) -> dict:
    """`${other.key}` references of a parsed config resolved (OmegaConf's syntax), as a plain dict."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(OmegaConf.create(data), resolve=True)
    except OmegaConfBaseException as e:  # e.g. an interpolation ${...} that does not resolve
        raise OverrideError(f"{source}: {str(e).splitlines()[0]}") from None


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
