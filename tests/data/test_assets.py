"""``assets:NAME``: generated on first use into a keyed cache, byte-identical to the files the shipped
study ran on, safe when several processes generate at once, and one clear line when it cannot be."""

import hashlib
import os
import subprocess
import sys

import pytest

from otr_megatron.data import SFTDataError
from otr_megatron.data.assets import CACHE_ENV, asset_path, assets_dir, ensure_assets
from otr_megatron.data.synthetic import ASSET_NAMES, GENERATOR_VERSION, asset_files
from otr_megatron.train.config import resolve_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# sha256 of the files committed as otr_megatron/data/assets/*.jsonl until they were replaced by the
# generator: the data of the default job and of the shipped A/B study (docs/compare_ab_results.json,
# run at commits aacaa7c / c4728a3, whose files were these). A generator change that moves one byte
# fails here; if it is meant, bump GENERATOR_VERSION and re-record these (the study's numbers then
# belong to the old data).
SHIPPED_SHA256 = {
    # the surface-forms study's files (added with it; the files above kept their bytes)
    "ab_forms_eval.jsonl": "b0a8c5540315e85d09d58ce7c7946d52ee375136efdc3e5b8f9d9bc9105958a4",
    "ab_forms_fixed.jsonl": "023cd078d870d4bfec908dba1000fc4ab5a1d5227ef1896ceec2b0c27f8eb31e",
    "ab_forms_many.jsonl": "207e9e31492bd11d2ba80c74062be77fba3f0d18928069948ed5d037338b4062",
    "ab_forms_pretrain.jsonl": "a3162fd44c3f66f26aae150c0b6e63d97ecf8f88ab2ab0889adecd22f8d30ee1",
    "ab_parity_eval.jsonl": "b4578d70a602a7643c08ae8ed4b56037c898bafb6fd42005cf583de2cb27c022",
    "ab_parity_fixed.jsonl": "6eab2af38fbe7e293e39b4e21f8a6fc03bc1bd45b24a01f3f03fcae50a3c70ca",
    "ab_parity_uniform.jsonl": "e15e50b46346aa1d7986cfb0f74c446f59b14b2dffc9dae53b526d87f799e97b",
    "ab_pretrain.jsonl": "6c6c0f5ff5a4122395316b76133e45711761f6f9fef4c569499de4ef2395bf59",
    "ab_strings_eval.jsonl": "4c81414826c3a782f528db1cc5e5e432d25b33f55faeec0e1a7bcfa5d3ff7920",
    "ab_strings_long.jsonl": "8fc5765d796b45f5ee0931b16c1136bfe35c053a0cbcf0cc411b672dfe784cdc",
    "ab_strings_ood.jsonl": "c49ade50b8efde6477b60c63631f3ce22264a5846bed614473d451dbfb81110b",
    "ab_strings_train.jsonl": "afda5b02644bc9f593dfc4789ba7fe374a56280409c3ca4021066be281f19da9",
    "eval_id.jsonl": "d28e1c51b59410249f0b063f9328227d7d372a5437b889222ad56fde88bd62fd",
    "eval_ood.jsonl": "c0ad2838352cce92d0070da3fe5d97b7d2bf0fdf0b5962b2f8bb811b9e187f55",
    "pretrain.jsonl": "b570b2583490c7146a1affb5facdab0c25b87a754e025f3d20b9a249015123c2",
    "train.jsonl": "b82a8334cc0fe0f47166e72f2c67ff9127761edc78ddb508f4faab93e4f8856f",
}


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_generated_files_are_the_shipped_ones_and_regenerate_byte_identically(cache, tmp_path):
    assert sorted(SHIPPED_SHA256) == list(ASSET_NAMES)
    first = ensure_assets()
    assert sorted(n for n in os.listdir(first)) == list(ASSET_NAMES)  # no temporary file left behind
    for name, want in SHIPPED_SHA256.items():
        assert _sha256(os.path.join(first, name)) == want, f"{name} differs from the shipped study's data"
    second = ensure_assets(str(tmp_path / "again"))
    for name in ASSET_NAMES:
        with open(os.path.join(first, name), "rb") as a, open(os.path.join(second, name), "rb") as b:
            assert a.read() == b.read(), name


def test_assets_resolve_into_a_keyed_cache_generated_on_first_use(cache):
    import otr_megatron

    d = assets_dir()
    assert d == os.path.join(str(cache), "assets", f"{otr_megatron.__version__}-g{GENERATOR_VERSION}")
    assert not os.path.exists(d)  # nothing is written until a file is asked for
    p = resolve_path("assets:train.jsonl")
    assert p == os.path.join(d, "train.jsonl") and _sha256(p) == SHIPPED_SHA256["train.jsonl"]
    os.remove(p)  # a file gone from the cache is written again, the others are left as they are
    before = os.stat(os.path.join(d, "eval_id.jsonl")).st_mtime_ns
    assert _sha256(asset_path("train.jsonl")) == SHIPPED_SHA256["train.jsonl"]
    assert os.stat(os.path.join(d, "eval_id.jsonl")).st_mtime_ns == before


def test_default_cache_location_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets_dir().startswith(os.path.join(str(tmp_path / "xdg"), "otr-megatron", "assets") + os.sep)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets_dir().startswith(os.path.join(str(tmp_path / "home"), ".cache", "otr-megatron", "assets") + os.sep)


def test_unknown_asset_names_the_valid_ones(cache):
    with pytest.raises(SFTDataError, match=r"assets:nope\.jsonl: no such data asset; valid names: "
                       r"assets:ab_forms_eval\.jsonl, .*assets:train\.jsonl$"):
        resolve_path("assets:nope.jsonl")
    assert not os.path.exists(cache)


def test_unwritable_cache_is_one_error_naming_the_path_and_the_variable(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))  # a directory below a file cannot be made
    with pytest.raises(SFTDataError) as e:
        resolve_path("assets:train.jsonl")
    msg = str(e.value)
    assert str(blocker) in msg and CACHE_ENV in msg and "\n" not in msg


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into a read-only directory")
def test_read_only_cache_directory(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    monkeypatch.setenv(CACHE_ENV, str(ro))
    try:
        with pytest.raises(SFTDataError, match=rf"{ro}.*Permission denied.*set {CACHE_ENV} to a writable directory"):
            resolve_path("assets:train.jsonl")
    finally:
        ro.chmod(0o755)


READER = r"""
import hashlib, os, sys, time
from otr_megatron.data.synthetic import ASSET_NAMES
d, want = sys.argv[1], dict(a.split("=") for a in sys.argv[2:])
seen, t0 = set(), time.time()
while len(seen) < len(ASSET_NAMES) and time.time() - t0 < 120:
    for n in (os.listdir(d) if os.path.isdir(d) else []):
        if n in ASSET_NAMES and n not in seen:
            with open(os.path.join(d, n), "rb") as f:
                got = hashlib.sha256(f.read()).hexdigest()
            assert got == want[n], f"{n}: a reader saw a partial or wrong file"
            seen.add(n)
print(len(seen))
"""

WRITER = r"""
import os, sys, time
from otr_megatron.data.assets import asset_path
while not os.path.exists(sys.argv[1]):  # start together
    time.sleep(0.005)
for n in sys.argv[2:]:
    with open(asset_path(n), "rb") as f:
        f.read()
"""


@pytest.mark.slow
def test_concurrent_first_use_is_safe(cache, tmp_path):
    """Four processes generate into one empty cache at once while a fifth reads every file the moment
    its name appears: all succeed, the reader never sees a partial file, no temporary file is left."""
    d = assets_dir()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    go = tmp_path / "go"
    reader = subprocess.Popen([sys.executable, "-c", READER, d, *(f"{n}={h}" for n, h in SHIPPED_SHA256.items())],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    orders = [list(ASSET_NAMES), list(reversed(ASSET_NAMES))] * 2  # different first misses
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(go), *o], env=env, stderr=subprocess.PIPE, text=True)
               for o in orders]
    go.write_text("")
    for w in writers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    out, err = reader.communicate(timeout=300)
    assert reader.returncode == 0 and out.strip() == str(len(ASSET_NAMES)), err
    assert sorted(os.listdir(d)) == list(ASSET_NAMES)
    assert {n: _sha256(os.path.join(d, n)) for n in ASSET_NAMES} == SHIPPED_SHA256


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown", "unwritable"])
def test_train_cli_reports_one_line_and_exits_2(tmp_path, case):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    args = ["-o", str(tmp_path / "run"), "plot=false"]
    if case == "unknown":
        args.append("data.train=assets:nope.jsonl")
        want = "assets:nope.jsonl: no such data asset; valid names: assets:ab_forms_eval.jsonl"
    else:
        (tmp_path / "a_file").write_text("")
        env[CACHE_ENV] = str(tmp_path / "a_file" / "cache")
        want = f"set {CACHE_ENV} to a writable directory"
    r = subprocess.run([sys.executable, "-m", "otr_megatron.cli", "train", *args], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("otr-megatron train: error: ") and want in lines[0], r.stderr
