"""Hugging Face in, Hugging Face out, offline: OTR fine-tuning of a local Llama model with Megatron-Bridge.

    python examples/bridge_hf_roundtrip.py [--workdir DIR] [--train-iters 3] [--json result.json]

1. writes a tiny random-weight Llama (2 layers, hidden 64, vocab 256) and its tokenizer with
   `transformers` (nothing is downloaded);
2. fine-tunes it with OTR through the `otr-megatron bridge` command and Bridge's own Llama SFT recipe
   (`otr_megatron.bridge.hf:llama_sft_cpu_config --hf-path DIR`): the Hugging Face weights go in
   through `checkpoint.pretrained_checkpoint`, and `checkpoint.also_save_hf_checkpoint` writes the
   fine-tuned model back out as `iter_N/hf`;
3. in a second Bridge process, loads the native Megatron checkpoint (`AutoBridge.load_megatron_model`)
   and computes its logits on a fixed batch; also the logits of the original Hugging Face weights
   imported into Megatron, and a second export (`AutoBridge.export_ckpt`);
4. here, with plain `transformers`: the exported model's logits against the Megatron model's, and the
   weights against the original.

Bridge runs in child processes: on a machine without a GPU, CPU mode patches the process for good
(`otr_megatron/bridge/cpu.py`), and Bridge's loop owns `torch.distributed`. The comparison runs in
this process, without those patches. Needs the Bridge environment
(`MCORE=0.19.2 BRIDGE=0.6.2 bash scripts/setup_env.sh`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEQ = 32
BATCH = 2
OTR = ["otr.num_samples=8", "otr.temperature=1.3", "otr.neg_reward=-0.1", "otr.seed=7"]
# The recipe's learning rate (5e-6, cosine to 0) barely moves a random model in 3 steps; 1e-3 makes the
# fine-tune visible in the weights and logits, far above the round trip's float32 rounding.
LR = ["optimizer.lr=1e-3", "scheduler.lr_decay_style=constant"]


def bridge_probe(hf_in: str, save_dir: str, tokens_path: str, out_path: str, export_dir: str) -> None:
    """Child process: Megatron logits of the fine-tuned checkpoint and of the imported original weights."""
    import torch

    from otr_megatron.bridge import cpu

    cpu.enable_cpu_mode()
    from megatron.bridge import AutoBridge
    from megatron.bridge.training.model_load_save import temporary_distributed_context
    from megatron.core import tensor_parallel

    from otr_megatron.bridge.hf import export_hf
    from otr_megatron.bridge.recipes import make_model_cpu_ready

    tokens = torch.load(tokens_path)
    positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    bridge = AutoBridge.from_hf_pretrained(hf_in)
    with temporary_distributed_context("gloo"):
        # Bridge seeds Megatron's RNG tracker here only with CUDA; the attention forward forks it (dropout 0).
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        tuned = bridge.load_megatron_model(save_dir, wrap_with_ddp=False)[0].eval()
        provider = bridge.to_megatron_provider(load_weights=True)  # Bridge's HF -> Megatron weight mapping
        make_model_cpu_ready(provider)
        provider.finalize()
        imported = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)[0].eval()
        with torch.no_grad():
            logits = {"tuned": tuned(tokens, positions, None).float(),
                      "imported": imported(tokens, positions, None).float()}
    torch.save(logits, out_path)
    export_hf(hf_in, save_dir, export_dir)


def compare(work: Path, hf_in: str, hf_out: Path, hf_out2: Path, tokens) -> dict:
    """Plain transformers (no CPU-mode patches): exported vs Megatron logits, weights vs the original."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    meg = torch.load(work / "megatron_logits.pt")
    logits = {}
    for name, path in (("hf_in", hf_in), ("hf_out", hf_out)):
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits[name] = model(tokens).logits
    w_in = load_file(os.path.join(hf_in, "model.safetensors"))
    w_out = load_file(hf_out / "model.safetensors")
    w_out2 = load_file(hf_out2 / "model.safetensors")
    return {
        "exported_vs_megatron_logits_max_abs": (logits["hf_out"] - meg["tuned"]).abs().max().item(),
        "imported_vs_original_logits_max_abs": (logits["hf_in"] - meg["imported"]).abs().max().item(),
        "logits_max_abs": meg["tuned"].abs().max().item(),
        "finetune_logit_change_max_abs": (logits["hf_out"] - logits["hf_in"]).abs().max().item(),
        "same_tensor_names": sorted(w_in) == sorted(w_out),
        "tensors_changed": sum(not torch.equal(w_in[k], w_out[k]) for k in w_in),
        "tensors": len(w_in),
        "weight_change_max_abs": max((w_in[k] - w_out[k]).abs().max().item() for k in w_in),
        "exports_identical": sorted(w_out) == sorted(w_out2) and all(torch.equal(w_out[k], w_out2[k]) for k in w_out),
    }


def _child_cpu_s() -> float:
    """CPU seconds of finished child processes (wall times mean little on a shared machine)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(work: Path, train_iters: int = 3, timeout: int = 900) -> dict:
    import torch

    from otr_megatron.bridge.hf import latest_hf_export, make_tiny_llama

    times = {}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t = time.time()
    hf_in = make_tiny_llama(work / "hf_in", seed=0)
    tokens = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, work / "tokens.pt")
    times["make_s"] = time.time() - t

    save_dir = work / "checkpoints"
    t = time.time()
    cmd = [sys.executable, "-m", "otr_megatron", "bridge", "--recipe", "otr_megatron.bridge.hf:llama_sft_cpu_config",
           "--hf-path", hf_in, f"train.train_iters={train_iters}", f"checkpoint.save_interval={train_iters}",
           f"checkpoint.save={save_dir}", *LR, *OTR]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True, timeout=timeout)
    times["finetune_s"] = time.time() - t
    times["finetune_cpu_s"] = _child_cpu_s()

    t = time.time()
    subprocess.run([sys.executable, __file__, "--probe", hf_in, str(save_dir), str(work / "tokens.pt"),
                    str(work / "megatron_logits.pt"), str(work / "hf_export_ckpt")],
                   env=env, check=True, timeout=timeout)
    times["probe_s"] = time.time() - t
    times["probe_cpu_s"] = _child_cpu_s() - times["finetune_cpu_s"]

    t = time.time()
    result = compare(work, hf_in, latest_hf_export(save_dir), work / "hf_export_ckpt", tokens)
    times["compare_s"] = time.time() - t
    return {**result, **{k: round(v, 1) for k, v in times.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", help="directory for the models and checkpoints (default: a temporary one)")
    ap.add_argument("--train-iters", type=int, default=3)
    ap.add_argument("--json", help="also write the numbers to this file")
    ap.add_argument("--probe", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        bridge_probe(*args.probe)
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="otr-hf-roundtrip-"))
    work.mkdir(parents=True, exist_ok=True)
    result = run(work, args.train_iters)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    ok = (result["exported_vs_megatron_logits_max_abs"] < 1e-4 and result["tensors_changed"] > 0
          and result["exports_identical"])
    print(f"round trip {'OK' if ok else 'FAILED'}: exported vs Megatron logits max |diff| "
          f"{result['exported_vs_megatron_logits_max_abs']:.2e} (logits up to {result['logits_max_abs']:.2f}), "
          f"{result['tensors_changed']}/{result['tensors']} tensors changed by fine-tuning; files in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
