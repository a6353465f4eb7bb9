"""``assets:NAME`` data paths: the synthetic files of `otr_megatron.data.synthetic`, generated into a
per-user cache the first time one is used, so a fresh install trains offline with no extra step.

Where: ``$OTR_MEGATRON_CACHE``, else ``$XDG_CACHE_HOME/otr-megatron``, else ``~/.cache/otr-megatron``,
then ``assets/<package version>-g<GENERATOR_VERSION>``. The key names the generator that wrote the
files, so a changed generator writes a new directory and never reads an older one's files (old
directories are left for the user to delete: 1.2 MB each).

Several processes may find a file missing at once (DP ranks started by torchrun, parallel
`compare` arms, test sessions). Each writes the whole file under a unique temporary name in the
same directory, fsyncs it, then `os.replace`s it onto the final name. A rename within one
filesystem is atomic, so a reader sees no file or a complete one, never part of one; racing writers
write the same bytes, so whichever rename lands last changes nothing.
"""

from __future__ import annotations

import os
import secrets

import otr_megatron
from otr_megatron.data.records import SFTDataError
from otr_megatron.data.synthetic import ASSET_NAMES, GENERATOR_VERSION, asset_files

CACHE_ENV = "OTR_MEGATRON_CACHE"


class UnknownAssetError(SFTDataError):
    """An ``assets:NAME`` that no generator makes."""


def cache_root() -> str:
    """The otr-megatron cache directory (not created here)."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "otr-megatron")
    return os.path.abspath(os.path.expanduser(root))


def assets_dir() -> str:
    """The directory that holds (or will hold) this generator's files."""
    return os.path.join(cache_root(), "assets", f"{otr_megatron.__version__}-g{GENERATOR_VERSION}")


def asset_path(name: str) -> str:
    """The file ``assets:NAME`` stands for, generated first if the cache lacks it."""
    if name not in ASSET_NAMES:
        raise UnknownAssetError(f"assets:{name}: no such data asset; valid names: "
                                + ", ".join(f"assets:{n}" for n in ASSET_NAMES))
    path = os.path.join(assets_dir(), name)
    if not os.path.isfile(path):
        ensure_assets()
    return path


def ensure_assets(directory: str | None = None) -> str:
    """Write every asset file missing from `directory` (default: the cache's); return the directory."""
    directory = directory or assets_dir()
    try:
        os.makedirs(directory, exist_ok=True)
        missing = [n for n in ASSET_NAMES if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            files = asset_files()
            for name in missing:
                _write_atomically(os.path.join(directory, name), files[name])
    except OSError as e:
        where = e.filename or directory
        raise SFTDataError(f"{where}: cannot write the otr-megatron data cache ({e.strerror or e}); set {CACHE_ENV} "
                           "to a writable directory") from None
    return directory


def _write_atomically(path: str, data: bytes) -> None:
    # os.open with 0o666 (not mkstemp's 0o600) so the umask decides, as for any other file: a cache
    # shared through OTR_MEGATRON_CACHE stays readable by the group it was meant for.
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
