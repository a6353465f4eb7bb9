"""Lint the Dockerfiles (no Docker engine here): structure, no framework reinstall, paths that exist."""

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {"torch", "transformer-engine", "transformer_engine", "megatron-core", "megatron_core", "megatron-bridge",
             "nemo-toolkit", "apex"}


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def pip_installs(instrs) -> list[list[str]]:
    cmds = []
    for op, rest in instrs:
        if op != "RUN":
            continue
        lex = shlex.shlex(rest, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        parts, cur = [], []
        for tok in lex:
            if tok in ("&&", ";", "||", "|"):
                parts.append(cur)
                cur = []
            else:
                cur.append(tok)
        parts.append(cur)
        for toks in parts:
            if len(toks) >= 2 and toks[0] in ("pip", "pip3") and toks[1] == "install" or toks[:4] == ["python", "-m", "pip", "install"]:
                cmds.append(toks)
    return cmds


def _pkg(tok: str) -> str:
    return re.split(r"[=<>!~\[ ]", tok.strip("\"'"), maxsplit=1)[0].lower()


def test_setup_name_matches():
    assert 'name="otr-megatron"' in (REPO / "setup.py").read_text()


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_common_structure(name):
    ins = instructions(REPO / "docker" / name)
    assert ins[0][0] == "FROM", "FROM must be the first instruction"
    assert sum(op == "FROM" for op, _ in ins) == 1
    for op, rest in ins:
        if op == "COPY":
            for src in shlex.split(rest)[:-1]:
                if not src.startswith("--"):
                    assert (REPO / src).exists(), f"{name}: COPY source {src} does not exist"
    assert not any(re.search(r"/(work|home|root)/", rest) for _, rest in ins), "machine-specific path"


def test_ngc_image_installs_without_deps():
    ins = instructions(REPO / "docker" / "Dockerfile")
    assert ins[0][1].startswith("nvcr.io/nvidia/nemo:")
    pips = pip_installs(ins)
    assert pips, "the package must be pip-installed"
    for cmd in pips:
        assert "--no-deps" in cmd, f"pip install without --no-deps: {cmd}"
        pkgs = {_pkg(t) for t in cmd[2:] if not t.startswith("-")}
        assert not pkgs & FORBIDDEN, f"reinstalls a framework package: {pkgs & FORBIDDEN}"
    assert "." in pips[0]


def test_cpu_image_pins():
    ins = instructions(REPO / "docker" / "Dockerfile.cpu")
    assert ins[0][1] == "python:3.11-slim"
    toks = [t for cmd in pip_installs(ins) for t in cmd]
    assert "torch==2.13.0" in toks and "megatron-core==0.16.1" in toks
    assert any(cmd[-1] == "." and "--no-deps" in cmd for cmd in pip_installs(ins))
