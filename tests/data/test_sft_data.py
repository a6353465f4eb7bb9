"""SFT data: loading (jsonl/parquet/chat), masking, packing, determinism, micro-batch split, errors."""

import json

import pytest
import torch

from otr_megatron.data import (
    ByteTokenizer,
    GlobalBatchSampler,
    SFTDataError,
    build_sft_dataset,
    eval_microbatches,
    load_records,
    num_microbatches,
    packed_boundaries,
    split_global_batch,
)

TOK = ByteTokenizer()


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


PAIRS = [{"prompt": f"q{i}:", "response": "ab" * (i % 3 + 1)} for i in range(10)]


def test_pair_masking_and_shift(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"prompt": "hi=", "response": "yo"}])
    ds = build_sft_dataset([p], TOK, 16)
    b = ds.collate([0])
    ids = [TOK.bos_id, *b"hi=", *b"yo", TOK.eos_id]
    n = len(ids) - 1
    assert b["tokens"][0, :n].tolist() == ids[:-1]
    assert b["labels"][0, :n].tolist() == ids[1:]
    # supervised exactly where the label is a response token or the closing EOS
    assert b["loss_mask"][0].tolist() == [0, 0, 0, 1, 1, 1] + [0] * (16 - 6)
    assert b["sample_ids"][0, :n].tolist() == [0] * n and (b["sample_ids"][0, n:] == -1).all()
    assert b["attention_mask"] is None
    assert b["tokens"].dtype == torch.int64 and b["loss_mask"].dtype == torch.float32


def test_chat_messages_supervise_assistant_turns_only(tmp_path):
    rec = {"messages": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                        {"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}]}
    ds = build_sft_dataset([_jsonl(tmp_path / "c.jsonl", [rec])], TOK, 64)
    b = ds.collate([0])
    sup_labels = b["labels"][0][b["loss_mask"][0] > 0].tolist()
    assert sup_labels == [ord("B"), TOK.eos_id, ord("D"), TOK.eos_id]


def test_parquet_and_jsonl_agree(tmp_path):
    import datasets

    pq = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list(PAIRS).to_parquet(pq)
    a = build_sft_dataset([_jsonl(tmp_path / "d.jsonl", PAIRS)], TOK, 32)
    b = build_sft_dataset([pq], TOK, 32)
    for k in ("tokens", "labels", "loss_mask"):
        assert torch.equal(a.collate(range(10))[k], b.collate(range(10))[k])


def test_packing_boundaries_positions_and_mask(tmp_path):
    ds = build_sft_dataset([_jsonl(tmp_path / "d.jsonl", PAIRS)], TOK, 32, pack=True, seed=3)
    assert sum(len(r) for r in ds.rows) == 10 and len(ds) < 10
    assert sorted(i for r in ds.rows for i in r) == list(range(10))  # every sample exactly once
    b = ds.collate(range(len(ds)))
    for r in range(len(ds)):
        pos, sid = b["position_ids"][r], b["sample_ids"][r]
        bounds = packed_boundaries(b["position_ids"][r : r + 1])[0].tolist()
        for s0, s1 in zip(bounds[:-1], bounds[1:]):
            seg = sid[s0:s1]
            assert (seg == seg[0]).all() and pos[s0:s1].tolist() == list(range(s1 - s0))
        # the packed samples are the samples themselves
        for i in ds.rows[r]:
            sel = sid == i
            assert b["tokens"][r][sel].tolist() == ds.tokens[i].tolist()
        m = b["attention_mask"][r, 0]
        # True = masked: no attention across samples, causal within
        for q in range(32):
            for k in range(32):
                allowed = k <= q and sid[q] == sid[k] and (sid[q] >= 0 or True)
                if sid[q] >= 0 and sid[k] >= 0:
                    assert bool(m[q, k]) == (not allowed)


def test_token_keys_are_packing_invariant(tmp_path):
    from otr_megatron.mcore.keys import token_keys

    p = _jsonl(tmp_path / "d.jsonl", PAIRS)
    keyed = {}
    for pack in (False, True):
        ds = build_sft_dataset([p], TOK, 32, pack=pack)
        b = ds.collate(range(len(ds)))
        k = token_keys(b["sample_ids"], 32, b["position_ids"])
        sup = b["loss_mask"] > 0
        keyed[pack] = dict(zip(k[sup].tolist(), b["labels"][sup].tolist()))
    assert keyed[False] == keyed[True]


def test_shuffle_deterministic_and_epoch_complete():
    a = GlobalBatchSampler(10, 4, seed=7)
    b = GlobalBatchSampler(10, 4, seed=7)
    assert [a.global_batch(4 * i) for i in range(6)] == [b.global_batch(4 * i) for i in range(6)]
    assert sorted(a.rows(0, 10)) == list(range(10)) and sorted(a.rows(10, 10)) == list(range(10))
    assert a.rows(0, 10) != a.rows(10, 10)  # a new permutation per epoch
    assert GlobalBatchSampler(10, 4, seed=8).rows(0, 10) != a.rows(0, 10)


def test_megatron_microbatch_split():
    rows = list(range(16))
    assert num_microbatches(16, 2, 2) == 4
    assert split_global_batch(rows, 2, 2, 0) == [[0, 1], [4, 5], [8, 9], [12, 13]]
    assert split_global_batch(rows, 2, 2, 1) == [[2, 3], [6, 7], [10, 11], [14, 15]]
    assert sorted(x for r in range(2) for mb in split_global_batch(rows, 2, 2, r) for x in mb) == rows
    with pytest.raises(ValueError, match="global_batch_size=10 is not divisible"):
        num_microbatches(10, 2, 2)
    ev = eval_microbatches(5, 2, 2, 1)
    assert ev == [[2, 3], [-1, -1]]


def test_malformed_json_reports_file_and_line(tmp_path):
    p = _jsonl(tmp_path / "bad.jsonl", [PAIRS[0], "", '{"prompt": "x", "response": ', PAIRS[1]])
    with pytest.raises(SFTDataError, match=r"bad\.jsonl:3: invalid JSON"):
        load_records([p])


@pytest.mark.parametrize(
    "rec, msg",
    [
        ({"prompt": "x"}, "'response' must be a string"),
        ({"prompt": "x", "response": 3}, "'response' must be a string"),
        ({"prompt": "x", "response": ""}, "is empty"),
        ({"text": "x"}, "neither 'messages' nor"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "role='bot'"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_schema_errors_name_file_and_line(tmp_path, rec, msg):
    p = _jsonl(tmp_path / "d.jsonl", [PAIRS[0], PAIRS[1], rec])
    with pytest.raises(SFTDataError, match=r"d\.jsonl:3: .*" + msg.replace("(", r"\(")):
        load_records([p])


def test_parquet_schema_error_names_row(tmp_path):
    import datasets

    pq = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": ""}]).to_parquet(pq)
    with pytest.raises(SFTDataError, match=r"d\.parquet:row 2: "):  # rows are numbered like lines, from 1
        load_records([pq])
    ok = _ok_parquet(tmp_path)
    assert load_records([ok])[1] == [f"{ok}:row 1", f"{ok}:row 2"]


def _ok_parquet(tmp_path):
    import datasets

    p = str(tmp_path / "ok.parquet")
    datasets.Dataset.from_list(PAIRS[:2]).to_parquet(p)
    return p


def test_overflow_truncate_counts_and_error(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p" * 20, "response": "r" * 5}, PAIRS[0]])
    with pytest.warns(UserWarning, match="1 of 2 records"):
        ds = build_sft_dataset([p], TOK, 16)
    assert ds.stats.truncated == 1 and ds.stats.unsupervised_after_truncation == 1
    assert len(ds.tokens[0]) == 16
    with pytest.raises(SFTDataError, match=r"d\.jsonl:1: record has 26 tokens"):
        build_sft_dataset([p], TOK, 16, on_overflow="error")


def test_split_with_no_response_token_left_is_an_error(tmp_path):
    """All files fine, but truncation at seq_length removes every response token of the split."""
    p = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p" * 30, "response": "r"}, {"prompt": "p" * 20, "response": "r" * 5}])
    with pytest.raises(SFTDataError) as info:
        build_sft_dataset([p], TOK, 16, name="train", verbose=False)
    # BOS + 20 prompt bytes come before the earliest response token (line 2)
    assert str(info.value) == (
        "train: no usable rows: all 2 record(s) lost every response token to truncation at seq_length=16; "
        f"the earliest response begins after 21 tokens ({p}:2), so seq_length must be at least 21"
    )
    ds = build_sft_dataset([p], TOK, 21, name="train", verbose=False)  # the stated minimum is enough
    assert ds.stats.supervised_tokens == 1 and ds.stats.unsupervised_after_truncation == 1
    with pytest.raises(SFTDataError, match="eval/id: no data files given"):
        build_sft_dataset([], TOK, 16, name="eval/id")


def test_missing_file_and_extension(tmp_path):
    with pytest.raises(SFTDataError, match="not found"):
        load_records([str(tmp_path / "nope.jsonl")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(SFTDataError, match="unsupported data file extension"):
        load_records([str(tmp_path / "x.csv")])


def test_demo_assets_are_small_and_the_script_writes_the_same_bytes(tmp_path):
    import importlib.util
    import os

    from otr_megatron.train.config import resolve_path

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("mkd", os.path.join(root, "scripts", "make_demo_data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--out", str(tmp_path)])
    total = 0
    for name in ("pretrain", "train", "eval_id", "eval_ood"):
        cached = open(resolve_path(f"assets:{name}.jsonl"), encoding="utf-8").read()
        assert (tmp_path / f"{name}.jsonl").read_text(encoding="utf-8") == cached
        total += len(cached)
    assert total < 1_000_000
    recs, _ = load_records([resolve_path("assets:eval_ood.jsonl")])
    assert min(len(r["response"]) for r in recs) >= 9  # OOD = longer words than training
