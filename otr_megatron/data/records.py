"""Load SFT records from local JSONL or Parquet files through `datasets`, validating each one.

Accepted record shapes (one per JSONL line or Parquet row):

* ``{"prompt": str, "response": str}``  (key names configurable)
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` with at least one
  assistant turn; every assistant turn is supervised.

Why the JSONL pre-scan: pyarrow's JSON reader reports a bad line by byte offset at best, and it
silently unifies types across rows. Each line is parsed and checked here first so that a malformed
record is reported as ``file:line: what is wrong`` and nothing is ever dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

CHAT_ROLES = ("system", "user", "assistant")


class SFTDataError(ValueError):
    """A malformed SFT record or data file; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class RecordKeys:
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"


def _where(path: str, line: int, kind: str) -> str:
    return f"{path}:{line}" if kind == "jsonl" else f"{path}:row {line}"


def validate_record(rec, path: str, line: int, keys: RecordKeys, kind: str = "jsonl") -> str:
    """Check one record; return its shape ('pair' or 'chat') or raise SFTDataError naming file:line."""
    where = _where(path, line, kind)
    if not isinstance(rec, dict):
        raise SFTDataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    msgs = rec.get(keys.messages)
    if msgs is not None:
        if not isinstance(msgs, list) or not msgs:
            raise SFTDataError(f"{where}: {keys.messages!r} must be a non-empty list of {{role, content}} objects")
        n_assistant = 0
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise SFTDataError(
                    f"{where}: {keys.messages}[{i}] must be an object with string 'role' and 'content', got {m!r}"
                )
            if m["role"] not in CHAT_ROLES:
                raise SFTDataError(f"{where}: {keys.messages}[{i}].role={m['role']!r}; expected one of {CHAT_ROLES}")
            n_assistant += m["role"] == "assistant"
        if n_assistant == 0:
            raise SFTDataError(f"{where}: {keys.messages!r} has no assistant turn, so nothing would be supervised")
        return "chat"
    p, r = rec.get(keys.prompt), rec.get(keys.response)
    if p is None and r is None:
        raise SFTDataError(
            f"{where}: record has neither {keys.messages!r} nor {keys.prompt!r}/{keys.response!r}; "
            f"keys present: {sorted(rec)}"
        )
    for name, v in ((keys.prompt, p), (keys.response, r)):
        if not isinstance(v, str):
            raise SFTDataError(f"{where}: {name!r} must be a string, got {type(v).__name__} ({v!r:.60})")
    if not r:
        raise SFTDataError(f"{where}: {keys.response!r} is empty, so nothing would be supervised")
    return "pair"


def _file_kind(path: str) -> str:
    low = path.lower()
    if low.endswith((".jsonl", ".json")):
        return "jsonl"
    if low.endswith(".parquet"):
        return "parquet"
    raise SFTDataError(f"{path}: unsupported data file extension; expected .jsonl, .json (JSON lines) or .parquet")


def _prescan_jsonl(path: str, keys: RecordKeys) -> list[int]:
    """Parse and validate each non-blank line; return their 1-based line numbers in order."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise SFTDataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
            validate_record(rec, path, n, keys, "jsonl")
            lines.append(n)
    return lines


def _normalize(rec: dict, keys: RecordKeys) -> dict:
    """Reduce a row to the fields tokenization needs (`datasets` fills absent columns with None)."""
    msgs = rec.get(keys.messages)
    if msgs is not None:
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    return {"prompt": rec[keys.prompt], "response": rec[keys.response]}


def load_records(paths, keys: RecordKeys = RecordKeys(), cache_dir: str | None = None) -> tuple[list[dict], list[str]]:
    """Load and validate every record of the given local files, in file order then line order.

    Returns ``(records, origins)``: normalized records ({prompt, response} or {messages}) and a
    ``file:line`` string per record (kept so later errors can still name the source).
    """
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise SFTDataError("no data files given; expected one or more local .jsonl/.parquet paths")
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise ImportError("SFT data loading needs the `datasets` package (pip install 'otr-megatron[train]')") from e

    records: list[dict] = []
    origins: list[str] = []
    for path in paths:
        if not os.path.isfile(path):
            raise SFTDataError(f"{path}: data file not found (only local files are read, never the hub)")
        kind = _file_kind(path)
        line_numbers = _prescan_jsonl(path, keys) if kind == "jsonl" else None
        builder = "json" if kind == "jsonl" else "parquet"
        try:
            ds = datasets.load_dataset(
                builder, data_files=[os.path.abspath(path)], split="train", cache_dir=cache_dir, keep_in_memory=True
            )
        except Exception as e:
            raise SFTDataError(f"{path}: `datasets` could not read this {builder} file: {e}") from e
        if line_numbers is not None and len(ds) != len(line_numbers):
            raise SFTDataError(
                f"{path}: `datasets` read {len(ds)} records but the file has {len(line_numbers)} non-blank lines"
            )
        for i, rec in enumerate(ds):
            line = line_numbers[i] if line_numbers is not None else i
            if line_numbers is None:
                validate_record(rec, path, line, keys, kind)
            records.append(_normalize(rec, keys))
            origins.append(_where(path, line, kind))
    return records, origins
