"""Hostile data files: every problem is an SFTDataError that starts with the file (and the line or
1-based Parquet row) and says what is wrong; no raw `datasets`/codec exception reaches the user."""

import json
import os
import socket

import pytest

from otr_megatron.data import ByteTokenizer, SFTDataError, build_sft_dataset, load_records

TOK = ByteTokenizer()
GOOD = {"prompt": "q:", "response": "ab"}
DATASETS_NOISE = ("An error occurred while generating the dataset", "could not read this json file")


def _load_error(path: str, *, build: bool = False) -> str:
    """The SFTDataError message for ``path``; checks the shared contract (type, prefix, no raw noise)."""
    with pytest.raises(SFTDataError) as info:
        if build:
            build_sft_dataset([path], TOK, 32, verbose=False)
        else:
            load_records([path])
    msg = str(info.value)
    assert msg.startswith(path + ":"), msg
    assert not any(n in msg for n in DATASETS_NOISE), msg
    assert "\n" not in msg
    return msg


def _parquet(path, table) -> str:
    import pyarrow.parquet as pq

    pq.write_table(table, str(path))
    return str(path)


def test_non_utf8_names_line_column_and_offset(tmp_path):
    p = tmp_path / "latin1.jsonl"
    lines = [json.dumps(GOOD).encode(), json.dumps(GOOD).encode(), '{"prompt": "caf\u00e9", "response": "x"}'.encode("latin-1")]
    p.write_bytes(b"\n".join(lines) + b"\n")
    msg = _load_error(str(p))
    # line 3, the 0xe9 of "café" is character 16 of the line; offset = two good lines + their newlines + 15
    offset = 2 * (len(lines[0]) + 1) + 15
    assert msg == (f"{p}:3: not valid UTF-8: byte 0xe9 at column 16 (byte offset {offset} in the file); "
                   "data files must be UTF-8 encoded")


def test_column_counts_characters_not_bytes(tmp_path):
    p = tmp_path / "d.jsonl"
    prefix = '{"prompt": "\u00e9\u00e9", "response": "'  # two 2-byte characters before the bad byte
    p.write_bytes(prefix.encode() + b"\xff" + b'"}\n')
    assert f"byte 0xff at column {len(prefix) + 1} (byte offset {len(prefix.encode())} in the file)" in _load_error(str(p))


def test_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    recs, origins = load_records([str(p)])
    assert recs == [GOOD] and origins == [f"{p}:1"]


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_bytes(b"")
    assert _load_error(str(p)) == f"{p}: the file is empty (0 bytes); expected one JSON record per line"


def test_blank_lines_only(tmp_path):
    p = tmp_path / "blank.jsonl"
    p.write_text("\n   \n\t\n\n")
    assert _load_error(str(p)) == f"{p}: no records: all 4 line(s) are blank; expected one JSON record per line"


def test_zero_row_parquet(tmp_path):
    import pyarrow as pa

    p = _parquet(tmp_path / "zero.parquet", pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())}))
    assert _load_error(p) == f"{p}: the Parquet file has 0 rows (columns ['prompt', 'response']); expected at least one record"


def test_parquet_missing_columns(tmp_path):
    import pyarrow as pa

    p = _parquet(tmp_path / "cols.parquet", pa.table({"prompt": ["a"], "text": ["b"]}))
    assert _load_error(p) == (f"{p}: Parquet columns ['prompt', 'text'] lack ['response']; "
                              "expected a 'messages' column or both 'prompt' and 'response'")


@pytest.mark.parametrize(
    "columns, row, needle",
    [
        ({"prompt": ["a", "b", "c"], "response": ["x", None, "z"]}, 2, "'response' must be a string, got NoneType"),
        ({"prompt": ["a", "b"], "response": [1, 2]}, 1, "'response' must be a string, got int (1)"),
        ({"messages": [[{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
                       [{"role": "user", "content": "u"}]]}, 2, "'messages' has no assistant turn"),
    ],
)
def test_parquet_bad_rows_are_numbered_from_one(tmp_path, columns, row, needle):
    import pyarrow as pa

    p = _parquet(tmp_path / "rows.parquet", pa.table(columns))
    msg = _load_error(p)
    assert msg.startswith(f"{p}:row {row}: ") and needle in msg, msg


def test_not_a_parquet_file(tmp_path):
    p = tmp_path / "junk.parquet"
    p.write_text("hello\n")
    msg = _load_error(str(p))
    assert msg.startswith(f"{p}: not a readable Parquet file (ArrowInvalid: "), msg


def test_directory_and_non_regular_file(tmp_path):
    d = tmp_path / "shards.jsonl"
    d.mkdir()
    assert _load_error(str(d)) == f"{d}: is a directory; expected a .jsonl/.parquet file (list the files in it instead)"
    sock_path = tmp_path / "s.jsonl"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(sock_path))
        assert _load_error(str(sock_path)) == f"{sock_path}: not a regular file; expected a .jsonl/.parquet file"
    finally:
        s.close()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    p = tmp_path / "secret.jsonl"
    p.write_text(json.dumps(GOOD) + "\n")
    p.chmod(0)
    try:
        assert _load_error(str(p)) == f"{p}: cannot read the data file (Permission denied)"
    finally:
        p.chmod(0o600)


def test_lone_surrogate_escape(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps(GOOD) + "\n" + '{"prompt": "a\\ud800b", "response": "x"}\n')
    assert _load_error(str(p), build=True) == (
        f"{p}:2: 'prompt' contains an unpaired UTF-16 surrogate '\\ud800' at character 2; expected valid Unicode text"
    )


def test_deeply_nested_json(tmp_path):
    p = tmp_path / "deep.jsonl"
    p.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    assert _load_error(str(p)) == f"{p}:1: invalid JSON (nested too deeply)"


@pytest.mark.parametrize("chat_first", [False, True])
def test_mixed_pair_and_chat_records_in_one_split(tmp_path, chat_first):
    """`Dataset.from_list` takes its columns from the first record: a pair record followed by a chat
    record (or the reverse) used to crash in tokenization with a bare AttributeError/TypeError."""
    chat = {"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}
    rows = [chat, GOOD] if chat_first else [GOOD, chat]
    p = tmp_path / "mixed.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = build_sft_dataset([str(p)], TOK, 32, verbose=False)
    sup = [ds.labels[i][ds.loss_mask[i] > 0].tolist() for i in range(2)]
    expect = {id(chat): [ord("A"), TOK.eos_id], id(GOOD): [ord("a"), ord("b"), TOK.eos_id]}
    assert sup == [expect[id(r)] for r in rows]


def test_type_changing_extra_field_is_ignored(tmp_path):
    """Only the record fields are read: an unrelated column that changes type between lines is fine."""
    p = tmp_path / "extra.jsonl"
    p.write_text(json.dumps({**GOOD, "meta": 1}) + "\n" + json.dumps({**GOOD, "meta": "x"}) + "\n")
    recs, _ = load_records([str(p)])
    assert recs == [GOOD, GOOD]


@pytest.mark.parametrize("turns, index", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], 1),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"},
      {"role": "assistant", "content": ""}], 3),
])
def test_chat_with_empty_assistant_content_is_refused_like_an_empty_response(tmp_path, turns, index):
    """Issue 17 group 6: an empty assistant turn would supervise only the end token; an empty pair
    response was already refused, the chat shape now is too, naming the file, line and turn."""
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps(GOOD) + "\n" + json.dumps({"messages": turns}) + "\n")
    msg = _load_error(str(p))
    assert msg.startswith(f"{p}:2: messages[{index}] is an assistant turn with empty 'content'"), msg
    pair = tmp_path / "pair.jsonl"
    pair.write_text(json.dumps({"prompt": "q", "response": ""}) + "\n")
    assert "is empty, so nothing would be supervised" in _load_error(str(pair))
