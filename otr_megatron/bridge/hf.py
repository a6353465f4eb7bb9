"""Hugging Face in, Hugging Face out: OTR fine-tuning of a local Hugging Face model with Bridge's own recipe.

The route is Megatron-Bridge 0.6.2's, nothing is converted here:
- in: Bridge's Llama SFT recipe builds the architecture with
  `AutoBridge.from_hf_pretrained(DIR).to_megatron_provider(load_weights=False)`, and
  `checkpoint.pretrained_checkpoint=DIR` (a Hugging Face directory) makes `finetune` load the weights
  through `AutoBridge.load_hf_weights`;
- out: `checkpoint.also_save_hf_checkpoint=True` writes `iter_N/hf/` (safetensors, config, tokenizer)
  next to every native checkpoint; `export_hf` converts an existing native checkpoint afterwards
  (`AutoBridge.export_ckpt`).

    otr-megatron bridge --recipe otr_megatron.bridge.hf:llama_sft_cpu_config --hf-path DIR \\
        train.train_iters=4 checkpoint.save=OUT otr.num_samples=8

`--hf-path` makes the recipe's `AutoBridge.from_hf_pretrained("meta-llama/...")` read DIR, so nothing
touches the Hub. DIR needs `config.json`, weights and tokenizer files (Bridge's export copies the
tokenizer). `make_tiny_llama` writes such a directory from random weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

BASE_RECIPE = "llama32_1b_sft_config"  # in megatron.bridge.recipes.llama; its settings, DIR's architecture
def make_tiny_llama(path: Union[str, os.PathLike], *, seed: int = 0, vocab_size: int = 256, hidden_size: int = 64,
                    num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, ffn_hidden_size: int = 128,
                    max_positions: int = 128) -> str:
    """Write a random-weight Llama model and a character-level tokenizer to `path` (never downloads).

    The tokenizer maps 4 special tokens and `vocab_size - 4` printable characters one-to-one to ids,
    so every id the model can emit has a token.
    """
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    if vocab_size <= len(specials):
        raise ValueError(f"make_tiny_llama: vocab_size={vocab_size}; expected more than {len(specials)} "
                         "(the special tokens)")
    chars = [chr(c) for c in range(32, 32 + vocab_size - len(specials))]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=ffn_hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=max_positions,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def llama_sft_cpu_config(hf_path: Optional[str] = None, *, seq_length: int = 64, train_iters: int = 4):
    """Bridge's Llama 3.2 SFT recipe on the local Hugging Face model `hf_path`, made CPU-ready.

    hf_path: the model directory; None when `otr-megatron bridge --hf-path DIR` already points the
        recipe's `AutoBridge.from_hf_pretrained` there (otherwise the recipe asks the Hub).
    Changed from the recipe: the CPU settings (`make_cpu_ready`); Bridge's mock dataset instead of
    SQuAD (a download); weights from the Hugging Face directory (`checkpoint.pretrained_checkpoint`);
    a Hugging Face export next to each checkpoint, saved at the last iteration; no warm-up, no
    evaluation, no TensorBoard. Everything else (optimizer, Adam betas, seed) is the recipe's.
    """
    from megatron.bridge.recipes import llama

    if hf_path is None:
        cfg = getattr(llama, BASE_RECIPE)()
    else:
        from otr_megatron.bridge.cli import local_hf_models

        with local_hf_models(str(hf_path)):
            cfg = getattr(llama, BASE_RECIPE)()
    source = getattr(cfg.model, "hf_model_id", None)
    if not source or not os.path.isdir(source):
        raise ValueError(f"llama_sft_cpu_config: the recipe's model came from {source!r}, not a local directory; "
                         "pass hf_path=DIR (or `otr-megatron bridge --hf-path DIR`)")
    from otr_megatron.bridge.recipes import make_cpu_ready, short_mock_run

    make_cpu_ready(cfg)
    short_mock_run(cfg, seq_length=seq_length, train_iters=train_iters, global_batch_size=2, micro_batch_size=1)
    cfg.tokenizer.tokenizer_model = source
    cfg.checkpoint.pretrained_checkpoint = source
    cfg.checkpoint.also_save_hf_checkpoint = True
    cfg.checkpoint.save_interval = train_iters
    return cfg


def export_hf(hf_source: Union[str, os.PathLike], megatron_checkpoint: Union[str, os.PathLike],
              out_dir: Union[str, os.PathLike]) -> str:
    """Convert a native Megatron checkpoint (a run directory or one `iter_N`) to a Hugging Face directory.

    hf_source: the Hugging Face model the run started from (architecture, tokenizer). Bridge opens its
    own one-process gloo group for this, so call it outside a training job (no process group yet).
    """
    from megatron.bridge import AutoBridge

    AutoBridge.from_hf_pretrained(str(hf_source)).export_ckpt(str(megatron_checkpoint), str(out_dir),
                                                              show_progress=False)
    return str(out_dir)


def latest_hf_export(save_dir: Union[str, os.PathLike]) -> Path:
    """The `iter_N/hf` directory that `also_save_hf_checkpoint` wrote for the newest checkpoint in `save_dir`."""
    iters = sorted(Path(save_dir).glob("iter_*/hf"), key=lambda p: p.parent.name)
    if not iters:
        raise FileNotFoundError(f"{save_dir}: no iter_*/hf directory; was checkpoint.also_save_hf_checkpoint on and "
                                "checkpoint.save set?")
    return iters[-1]
