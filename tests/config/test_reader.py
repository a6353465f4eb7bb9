"""One reader, one grammar (otr_megatron/config/reader.py): a value means the same in a file, an
override, a sweep and the Bridge command's YAML."""

import pytest

from otr_megatron.config.reader import OverrideError, load_yaml, parse_override, safe_yaml_load


@pytest.mark.parametrize("text, value", [
    ("1e-3", 0.001), ("1.0e-5", 1e-05), ("-2E+2", -200.0), (".5", 0.5), ("3", 3), ("1_000.0", 1000.0),
    (".inf", float("inf")), ("true", True), ("null", None), ("[1, 2]", [1, 2]), ("[a, b]", ["a", "b"]),
    ("abc1e3", "abc1e3"), ("yes", "yes"), ("off", "off"), ("False", False), ("'1e-3'", "1e-3"), ("{k: 1e-4}", {"k": 0.0001}),
])
def test_a_value_reads_the_same_in_a_file_and_an_override(text, value):
    assert safe_yaml_load(f"v: {text}", "test")["v"] == value
    assert parse_override(f"a.b={text}")[1] == value


def test_a_config_file_reads_yaml_1_2_numbers(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-3\n  min_lr: 1.0e-6\nbridge:\n  overrides: [a=1, b=2]\n")
    data = load_yaml(str(p))
    assert data["train"] == {"lr": 0.001, "min_lr": 1e-6}
    assert isinstance(data["train"]["lr"], float) and data["bridge"]["overrides"] == ["a=1", "b=2"]


def test_the_bridge_split_and_sweeps_use_the_same_reader(tmp_path):
    from otr_megatron.bridge.cli import split_yaml
    from otr_megatron.compare.grid import parse_sweep

    p = tmp_path / "b.yaml"
    p.write_text("otr:\n  temperature: 13e-1\noptimizer:\n  lr: 1e-3\n")
    otr, rest = split_yaml(str(p))
    assert otr == {"temperature": 1.3} and rest == {"optimizer": {"lr": 0.001}}
    assert list(parse_sweep("finetune_lr=1e-4,3e-4").values) == [0.0001, 0.0003]


def test_bad_override_names_the_word():
    with pytest.raises(OverrideError, match="expected KEY=VALUE"):
        parse_override("otr.num_samples")
