"""SFT data for the OTR training job: local JSONL/Parquet through `datasets`, response-only loss
masks, padding or packing with layout-invariant token keys, deterministic Megatron-style batches."""

from otr_megatron.data.records import RecordKeys, SFTDataError, load_records, validate_record
from otr_megatron.data.sampler import (
    GlobalBatchSampler,
    eval_microbatches,
    microbatch_iterator,
    num_microbatches,
    split_global_batch,
)
from otr_megatron.data.sft import (
    BATCH_KEYS,
    DataStats,
    SFTDataset,
    build_sft_dataset,
    packed_boundaries,
    render_segments,
    tokenize_record,
)
from otr_megatron.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = [
    "BATCH_KEYS",
    "ByteTokenizer",
    "DataStats",
    "GlobalBatchSampler",
    "HFTokenizer",
    "RecordKeys",
    "SFTDataError",
    "SFTDataset",
    "build_sft_dataset",
    "build_tokenizer",
    "eval_microbatches",
    "load_records",
    "microbatch_iterator",
    "num_microbatches",
    "packed_boundaries",
    "render_segments",
    "split_global_batch",
    "tokenize_record",
    "validate_record",
]
