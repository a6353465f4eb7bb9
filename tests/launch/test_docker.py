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


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.nemo2", "Dockerfile.cpu"])
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


def _pin(requirements: str, package: str) -> str:
    """The `package==X` version of a CI line's requirements file (scripts/requirements/*.txt)."""
    for line in (REPO / "scripts" / "requirements" / requirements).read_text().splitlines():
        if line.split("==")[0].strip().lower() == package:
            return line.split("==")[1].strip()
    raise AssertionError(f"{package} is not pinned in {requirements}")


# image -> (NGC tag, the package whose version the build checks, the CI requirements file it must match)
NGC = {
    "Dockerfile": ("nvcr.io/nvidia/nemo:26.08", "megatron-bridge", "bridge-0.6.2.txt"),  # Bridge path
    "Dockerfile.nemo2": ("nvcr.io/nvidia/nemo:26.02", "nemo-toolkit", "nemo-2.7.3.txt"),  # NeMo 2.0 path
}


@pytest.mark.parametrize("name", sorted(NGC))
def test_ngc_images_match_what_ci_tests_and_install_without_deps(name):
    tag, package, requirements = NGC[name]
    ins = instructions(REPO / "docker" / name)
    assert ins[0][1] == tag
    # the build refuses an image whose framework is not the major.minor line CI runs
    major_minor = ".".join(_pin(requirements, package).split(".")[:2]) + "."
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    assert f"m.version('{package}')" in runs and f"v.startswith('{major_minor}')" in runs
    assert runs.index(f"m.version('{package}')") < runs.index("pip install")
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
