"""Tokenized SFT samples laid out in fixed-length rows (padded or packed) as Megatron batches.

A *sample* is one record: ``[BOS] prompt response [EOS]`` shifted for next-token prediction
(``tokens = ids[:-1]``, ``labels = ids[1:]``), with ``loss_mask`` = 1 exactly where the label is a
response token (or the EOS closing a response). A *row* is one ``[seq_length]`` line of a batch:
one sample plus padding, or several packed samples.

Every token carries ``sample_ids`` (the sample's index in the dataset, int64; -1 on padding) and a
``position_ids`` that restarts at 0 at each sample, so ``(sample_ids, position_ids)`` is a global
key of the token that does not depend on packing, batch layout or parallelism. The OTR loss keys its
random stream on it, and ``packed_boundaries`` recovers sequence boundaries (``cu_seqlens``) from it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from otr_megatron.data.records import RecordKeys, SFTDataError, load_records
from otr_megatron.data.tokenizer import Tokenizer

BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids", "sample_ids")


def render_segments(record: dict) -> list[tuple[str, bool]]:
    """Text segments of a record with a flag 'supervised'.

    Chat records use a plain built-in template, ``<|role|>\\n content \\n`` per turn; assistant
    content is supervised and closed by EOS (added by the tokenizing step), other turns are context.
    """
    if "messages" in record:
        segs: list[tuple[str, bool]] = []
        for m in record["messages"]:
            segs.append((f"<|{m['role']}|>\n", False))
            if m["role"] == "assistant":
                segs.append((m["content"], True))
                segs.append(("<EOS>", True))
            else:
                segs.append((m["content"] + "\n", False))
        return segs
    return [(record["prompt"], False), (record["response"], True), ("<EOS>", True)]


def tokenize_record(record: dict, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of a whole record and, per id, whether it is a response (supervised) token."""
    ids: list[int] = []
    sup: list[bool] = []
    if tokenizer.bos_id is not None:
        ids.append(tokenizer.bos_id)
        sup.append(False)
    for text, supervised in render_segments(record):
        piece = [tokenizer.eos_id] if text == "<EOS>" and supervised else tokenizer.encode(text)
        ids.extend(piece)
        sup.extend([supervised] * len(piece))
    return ids, sup


@dataclass
class DataStats:
    """Counts reported after loading: nothing is dropped or cut without being counted here."""

    records: int = 0
    truncated: int = 0
    unsupervised_after_truncation: int = 0
    rows: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    max_sample_tokens: int = 0

    def summary(self, name: str) -> str:
        return (
            f"{name}: {self.records} records -> {self.rows} rows, {self.tokens} tokens "
            f"({self.supervised_tokens} supervised), longest sample {self.max_sample_tokens} tokens, "
            f"{self.truncated} truncated, {self.unsupervised_after_truncation} with no response token left"
        )


@dataclass
class SFTDataset:
    """Samples of one split, grouped into rows; `collate(rows)` gives a Megatron batch dict."""

    tokens: list[np.ndarray]
    labels: list[np.ndarray]
    loss_mask: list[np.ndarray]
    rows: list[list[int]]
    seq_length: int
    pad_id: int
    packed: bool
    packed_attention_mask: bool = True
    stats: DataStats = field(default_factory=DataStats)
    origins: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_samples(self) -> int:
        return len(self.tokens)

    def row(self, r: int) -> dict[str, np.ndarray]:
        """One row as numpy arrays of length seq_length (plus its block ids for the attention mask)."""
        s = self.seq_length
        out = {
            "tokens": np.full(s, self.pad_id, np.int64),
            "labels": np.full(s, self.pad_id, np.int64),
            "loss_mask": np.zeros(s, np.float32),
            "position_ids": np.zeros(s, np.int64),
            "sample_ids": np.full(s, -1, np.int64),
            "segment": np.full(s, -1, np.int64),
        }
        at = 0
        for k, i in enumerate(self.rows[r]):
            n = len(self.tokens[i])
            out["tokens"][at : at + n] = self.tokens[i]
            out["labels"][at : at + n] = self.labels[i]
            out["loss_mask"][at : at + n] = self.loss_mask[i]
            out["position_ids"][at : at + n] = np.arange(n)
            out["sample_ids"][at : at + n] = i
            out["segment"][at : at + n] = k
            at += n
        # Trailing padding is its own segment with positions restarting at 0: it never attends into
        # (or is attended from) a real sample, and its positions stay inside the position table.
        out["position_ids"][at:] = np.arange(s - at)
        out["segment"][at:] = len(self.rows[r])
        return out

    def collate(self, row_indices) -> dict[str, torch.Tensor | None]:
        """Stack rows into ``[b, s]`` tensors. ``attention_mask`` is None (plain causal) unless rows are
        packed, then ``[b, 1, s, s]`` bool with True = masked (Megatron's convention), block-diagonal
        causal so packed samples do not see each other. ``row_indices`` of -1 give an all-padding row
        (used to fill the last evaluation batch; it has no supervised token)."""
        rows = [self.row(r) if r >= 0 else self._empty_row() for r in row_indices]
        batch: dict[str, torch.Tensor | None] = {
            k: torch.from_numpy(np.stack([x[k] for x in rows])) for k in BATCH_KEYS if k != "attention_mask"
        }
        if self.packed and self.packed_attention_mask:
            seg = torch.from_numpy(np.stack([x["segment"] for x in rows]))
            s = self.seq_length
            causal = torch.ones(s, s, dtype=torch.bool).tril()
            same = seg[:, :, None] == seg[:, None, :]
            batch["attention_mask"] = (~(same & causal)).unsqueeze(1)
        else:
            batch["attention_mask"] = None
        return {k: batch[k] for k in BATCH_KEYS}

    def _empty_row(self) -> dict[str, np.ndarray]:
        s = self.seq_length
        return {
            "tokens": np.full(s, self.pad_id, np.int64),
            "labels": np.full(s, self.pad_id, np.int64),
            "loss_mask": np.zeros(s, np.float32),
            "position_ids": np.arange(s, dtype=np.int64),
            "sample_ids": np.full(s, -1, np.int64),
            "segment": np.zeros(s, np.int64),
        }


def packed_boundaries(position_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per row, the start offsets of its sequences plus the row length (``cu_seqlens`` style),
    recovered from positions restarting at 0. For TE/flash attention's ``PackedSeqParams``."""
    out = []
    for row in position_ids:
        starts = torch.nonzero(row == 0, as_tuple=False).flatten()
        out.append(torch.cat([starts, torch.tensor([row.numel()])]).to(torch.int32))
    return out


def _pack(lengths: list[int], order: np.ndarray, seq_length: int, window: int = 32) -> list[list[int]]:
    """First-fit packing in the given (seeded) order over the last `window` open rows: deterministic,
    linear time, and typically >90% full for short SFT samples."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order.tolist():
        n = lengths[i]
        lo = max(0, len(rows) - window)
        for r in range(lo, len(rows)):
            if free[r] >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(seq_length - n)
    return rows


def build_sft_dataset(
    paths,
    tokenizer: Tokenizer,
    seq_length: int,
    *,
    pack: bool = False,
    packed_attention_mask: bool = True,
    on_overflow: str = "truncate",
    seed: int = 1234,
    keys: RecordKeys = RecordKeys(),
    cache_dir: str | None = None,
    name: str = "data",
    verbose: bool = True,
) -> SFTDataset:
    """Load, validate, tokenize and lay out one split.

    ``on_overflow``: 'truncate' cuts samples longer than ``seq_length`` (counted in ``stats``, and
    warned about), 'error' raises naming the first such record's file:line.
    """
    _check_arguments(paths, seq_length, on_overflow, name)
    records, origins = load_records(paths, keys, cache_dir=cache_dir)
    ids, sup = _tokenize(records, tokenizer)
    stats = DataStats(records=len(records))
    tokens, labels, masks = _shift_and_fit(ids, sup, origins, seq_length, on_overflow, stats)
    if stats.supervised_tokens == 0:
        # Only truncation can do this (every record has a non-empty response closed by EOS).
        first, where = _earliest_response(sup, origins)
        raise SFTDataError(
            f"{name}: no usable rows: all {stats.records} record(s) lost every response token to truncation at "
            f"seq_length={seq_length}; the earliest response begins after {first} tokens "
            f"({where}), so seq_length must be at least {first}"
        )
    rows = _layout_rows([len(t) for t in tokens], seq_length, pack, seed)
    stats.rows = len(rows)
    if stats.truncated and verbose:
        warnings.warn(
            f"{name}: {stats.truncated} of {stats.records} records are longer than seq_length={seq_length} "
            f"and were truncated ({stats.unsupervised_after_truncation} lost every response token)",
            stacklevel=2,
        )
    return SFTDataset(
        tokens=tokens,
        labels=labels,
        loss_mask=masks,
        rows=rows,
        seq_length=seq_length,
        pad_id=tokenizer.pad_id,
        packed=pack,
        packed_attention_mask=packed_attention_mask,
        stats=stats,
        origins=origins,
    )


def _check_arguments(paths, seq_length: int, on_overflow: str, name: str) -> None:
    """Refuse a bad call before any file is read (a wrong setting should not wait on a large load)."""
    if seq_length < 2:
        raise ValueError(f"seq_length={seq_length}; expected at least 2")
    if on_overflow not in ("truncate", "error"):
        raise ValueError(f"on_overflow={on_overflow!r}; expected 'truncate' or 'error'")
    if isinstance(paths, (list, tuple)) and not paths:
        raise SFTDataError(f"{name}: no data files given; expected one or more local .jsonl/.parquet paths")


def _tokenize(records: list[dict], tokenizer: Tokenizer) -> tuple[list[list[int]], list[list[bool]]]:
    """Token ids and 'supervised' flags per record, mapped in memory with no cache file: a changed
    tokenizer or file never meets a stale tokenization from an earlier run."""
    import datasets

    def _tok(rec):
        # Every row has all three columns (None where a record lacks one): keep only its own fields.
        if rec["messages"] is not None:
            rec = {"messages": rec["messages"]}
        else:
            rec = {"prompt": rec["prompt"], "response": rec["response"]}
        ids, sup = tokenize_record(rec, tokenizer)
        return {"ids": ids, "sup": sup}

    # `Dataset.from_list` takes its columns from the first record: give every record the same three
    # keys, or a split that mixes pair and chat records loses the other shape's fields.
    uniform = [{"prompt": r.get("prompt"), "response": r.get("response"), "messages": r.get("messages")} for r in records]
    ds = datasets.Dataset.from_list(uniform).map(
        _tok, remove_columns=None, keep_in_memory=True, load_from_cache_file=False, desc=None
    )
    return ds["ids"], ds["sup"]


def _shift_and_fit(ids_per_record, sup_per_record, origins: list[str], seq_length: int, on_overflow: str,
                   stats: DataStats) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Shift each record for next-token prediction and fit it into `seq_length` (truncate or raise),
    counting into `stats` everything that is cut, so nothing is lost silently."""
    tokens, labels, masks = [], [], []
    for i, (ids, sup) in enumerate(zip(ids_per_record, sup_per_record)):
        ids = np.asarray(ids, np.int64)
        sup = np.asarray(sup, bool)
        if len(ids) < 2:
            raise SFTDataError(f"{origins[i]}: record tokenizes to {len(ids)} token(s); need at least 2")
        stats.max_sample_tokens = max(stats.max_sample_tokens, len(ids) - 1)
        if len(ids) - 1 > seq_length:
            if on_overflow == "error":
                raise SFTDataError(
                    f"{origins[i]}: record has {len(ids) - 1} tokens after shifting, more than "
                    f"seq_length={seq_length} (set data.on_overflow=truncate to cut such records)"
                )
            stats.truncated += 1
            ids, sup = ids[: seq_length + 1], sup[: seq_length + 1]
        m = sup[1:].astype(np.float32)
        if not m.any():
            stats.unsupervised_after_truncation += 1
        tokens.append(ids[:-1])
        labels.append(ids[1:])
        masks.append(m)
        stats.tokens += len(ids) - 1
        stats.supervised_tokens += int(m.sum())
    return tokens, labels, masks


def _earliest_response(sup_per_record, origins: list[str]) -> tuple[int, str]:
    """(tokens before the earliest response token, its record): the smallest seq_length that keeps
    one supervised label (``ids[first]`` as a label needs `first` input positions)."""
    earliest = (np.iinfo(np.int64).max, "")
    for sup, origin in zip(sup_per_record, origins):
        sup = np.asarray(sup, bool)
        first = int(np.argmax(sup)) if sup.any() else len(sup)
        if first < earliest[0]:
            earliest = (first, origin)
    return earliest


def _layout_rows(lengths: list[int], seq_length: int, pack: bool, seed: int) -> list[list[int]]:
    """One sample per row, or samples packed in a seeded order (the same rows on every rank and run)."""
    if not pack:
        return [[i] for i in range(len(lengths))]
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(lengths))
    return _pack(lengths, order, seq_length)
