"""Load SFT records from local JSONL or Parquet files, validating each one.

Accepted record shapes (one per JSONL line or Parquet row):

* ``{"prompt": str, "response": str}``  (key names configurable)
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` with at least one
  assistant turn; every assistant turn is supervised.

Every problem with a data file is an :class:`SFTDataError` whose message starts with the file and,
where one exists, the line (JSONL) or row (Parquet, 1-based like lines): ``file:line: what is
wrong``. Nothing is ever dropped silently.

JSONL is parsed here, line by line, rather than by pyarrow's JSON reader (through `datasets`): that
reader reports a bad line by byte offset at best, says nothing about which line holds non-UTF-8
bytes, unifies types across rows (so an unrelated extra column can fail a whole file) and gives
only "An error occurred while generating the dataset" for an empty file. Parquet goes through
`datasets` after its footer (row count, columns) has been checked with pyarrow.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass

CHAT_ROLES = ("system", "user", "assistant")


class SFTDataError(ValueError):
    """A malformed SFT record or data file; the message starts with ``file:line:`` (or ``file:``
    for a problem with the whole file)."""


@dataclass(frozen=True)
class RecordKeys:
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"


def _where(path: str, line: int, kind: str) -> str:
    return f"{path}:{line}" if kind == "jsonl" else f"{path}:row {line}"


def _check_text(v: str, where: str, name: str) -> None:
    """Reject strings that cannot be encoded (a JSON ``\\ud800`` escape decodes to a lone surrogate,
    which every tokenizer and pyarrow refuse later with an error that names no record)."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SFTDataError(
            f"{where}: {name} contains an unpaired UTF-16 surrogate {v[e.start]!r} at character {e.start + 1}; "
            "expected valid Unicode text"
        ) from None


def validate_record(rec, path: str, line: int, keys: RecordKeys, kind: str = "jsonl") -> str:
    """Check one record; return its shape ('pair' or 'chat') or raise SFTDataError naming file:line.

    ``line`` is 1-based for both kinds (JSONL line, Parquet row)."""
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
                    f"{where}: {keys.messages}[{i}] must be an object with string 'role' and 'content', got {m!r:.80}"
                )
            if m["role"] not in CHAT_ROLES:
                raise SFTDataError(f"{where}: {keys.messages}[{i}].role={m['role']!r}; expected one of {CHAT_ROLES}")
            _check_text(m["content"], where, f"{keys.messages}[{i}].content")
            if m["role"] == "assistant" and not m["content"]:  # like an empty pair response: only EOS learned
                raise SFTDataError(f"{where}: {keys.messages}[{i}] is an assistant turn with empty 'content', "
                                   "so only the end token would be supervised; expected a non-empty answer")
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
        _check_text(v, where, repr(name))
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


def _check_file(path: str) -> None:
    """The path must be an existing, readable regular file (a clear error beats `datasets` trying a
    directory as a glob or a hub dataset name)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SFTDataError(f"{path}: data file not found (only local files are read, never the hub)") from None
    except OSError as e:
        raise SFTDataError(f"{path}: cannot access the data file ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise SFTDataError(f"{path}: is a directory; expected a .jsonl/.parquet file (list the files in it instead)")
    if not stat.S_ISREG(st.st_mode):
        raise SFTDataError(f"{path}: not a regular file; expected a .jsonl/.parquet file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise SFTDataError(f"{path}: cannot read the data file ({e.strerror or e})") from None


def _read_jsonl(path: str, keys: RecordKeys) -> tuple[list[dict], list[int]]:
    """Decode, parse and validate each non-blank line; return the records and their 1-based line numbers.

    Read as bytes so that a non-UTF-8 byte is reported with its line and column, not as a bare
    UnicodeDecodeError with an offset into some internal buffer."""
    records: list[dict] = []
    lines: list[int] = []
    n = 0
    offset = 0  # byte offset of the current line in the file
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                col = len(raw[: e.start].decode("utf-8", errors="replace")) + 1
                raise SFTDataError(
                    f"{path}:{n}: not valid UTF-8: byte 0x{raw[e.start]:02x} at column {col} "
                    f"(byte offset {offset + e.start} in the file); data files must be UTF-8 encoded"
                ) from None
            offset += len(raw)
            if n == 1 and text.startswith("\ufeff"):  # a UTF-8 byte-order mark is not part of the record
                text = text[1:]
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise SFTDataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise SFTDataError(f"{path}:{n}: invalid JSON (nested too deeply)") from None
            validate_record(rec, path, n, keys, "jsonl")
            records.append(rec)
            lines.append(n)
    if not records:
        if offset == 0:
            raise SFTDataError(f"{path}: the file is empty (0 bytes); expected one JSON record per line")
        raise SFTDataError(
            f"{path}: no records: all {n} line(s) are blank; expected one JSON record per line"
        )
    return records, lines


def _root_cause(e: BaseException) -> str:
    """The innermost exception of a chain: `datasets` wraps the real reason (pyarrow's message) in
    "An error occurred while generating the dataset"."""
    seen = 0
    while (e.__cause__ or e.__context__) is not None and seen < 20:
        e = e.__cause__ or e.__context__
        seen += 1
    return f"{type(e).__name__}: {e}"


def _read_parquet(path: str, keys: RecordKeys, cache_dir: str | None) -> list[dict]:
    """Check the Parquet footer (is it Parquet, row count, columns), then read the rows through `datasets`."""
    try:
        import datasets
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover
        raise ImportError("SFT data loading needs the `datasets` package (pip install 'otr-megatron[train]')") from e
    try:
        pf = pq.ParquetFile(path)
        num_rows = pf.metadata.num_rows
        columns = list(pf.schema_arrow.names)
    except Exception as e:
        raise SFTDataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    if num_rows == 0:
        raise SFTDataError(f"{path}: the Parquet file has 0 rows (columns {columns}); expected at least one record")
    if keys.messages not in columns:
        missing = [k for k in (keys.prompt, keys.response) if k not in columns]
        if missing:
            raise SFTDataError(
                f"{path}: Parquet columns {columns} lack {missing}; expected a {keys.messages!r} column "
                f"or both {keys.prompt!r} and {keys.response!r}"
            )
    try:
        ds = datasets.load_dataset(
            "parquet", data_files=[os.path.abspath(path)], split="train", cache_dir=cache_dir, keep_in_memory=True
        )
    except Exception as e:
        raise SFTDataError(f"{path}: could not read this Parquet file ({_root_cause(e)})") from None
    if len(ds) != num_rows:
        raise SFTDataError(f"{path}: `datasets` read {len(ds)} rows but the Parquet footer says {num_rows}")
    out = []
    for i, rec in enumerate(ds, start=1):
        validate_record(rec, path, i, keys, "parquet")
        out.append(rec)
    return out


def _normalize(rec: dict, keys: RecordKeys) -> dict:
    """Reduce a row to the fields tokenization needs (`datasets` fills absent columns with None)."""
    msgs = rec.get(keys.messages)
    if msgs is not None:
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    return {"prompt": rec[keys.prompt], "response": rec[keys.response]}


def load_records(paths, keys: RecordKeys = RecordKeys(), cache_dir: str | None = None) -> tuple[list[dict], list[str]]:
    """Load and validate every record of the given local files, in file order then line order.

    Returns ``(records, origins)``: normalized records ({prompt, response} or {messages}) and a
    ``file:line`` (or ``file:row N``) string per record (kept so later errors can still name the source).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise SFTDataError("no data files given; expected one or more local .jsonl/.parquet paths")

    records: list[dict] = []
    origins: list[str] = []
    for path in paths:
        path = os.fspath(path)
        _check_file(path)
        kind = _file_kind(path)
        if kind == "jsonl":
            recs, numbers = _read_jsonl(path, keys)
        else:
            recs = _read_parquet(path, keys, cache_dir)
            numbers = range(1, len(recs) + 1)
        for rec, line in zip(recs, numbers):
            records.append(_normalize(rec, keys))
            origins.append(_where(path, line, kind))
    return records, origins
