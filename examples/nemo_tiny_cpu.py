"""Try OTR in NeMo 2.x's real training loop on a laptop: no GPU, no download, about a minute.

    python examples/nemo_tiny_cpu.py [--max-steps 4] [--num-samples 8]
    torchrun --nproc-per-node 2 examples/nemo_tiny_cpu.py --tp 2      # tensor parallel over gloo
    python examples/nemo_tiny_cpu.py --tp 2                            # the same, Lightning starts rank 1

Needs nemo-toolkit 2.7 with megatron-core 0.15 (`NEMO=2.7.3 bash scripts/setup_env.sh`). It takes
`otr_megatron.nemo.recipes.tiny_gpt_cpu_recipe` (NeMo's `llm.pretrain` with a 2-layer `llm.GPTModel`
on `MockDataModule`), turns it into OTR with `otr_recipe`, applies the NeMo CPU mode
(`otr_megatron.nemo.cpu`, a no-op on a GPU machine) and runs it. NeMo logs "lm loss" (label cross
entropy), "otr loss" (the backpropagated surrogate, also NeMo's `reduced_train_loss`), "otr hit
rate" and "otr mean reward" every step, to TensorBoard under LOG_DIR/tiny_gpt_cpu/.../tb_logs.
"""

from __future__ import annotations

import argparse
import os
import sys


def make_recipe(max_steps: int = 4, tp: int = 1, num_samples: int = 8, log_dir: str | None = None):
    """The tiny CPU recipe with OTR as its loss (NeMo-Run `run.Partial` of `llm.pretrain`)."""
    from otr_megatron.nemo import otr_recipe
    from otr_megatron.nemo.recipes import tiny_gpt_cpu_recipe

    devices = int(os.environ.get("WORLD_SIZE", tp))  # torchrun starts the processes; else Lightning does
    recipe = tiny_gpt_cpu_recipe(max_steps=max_steps, devices=devices, tensor_model_parallel_size=tp, log_dir=log_dir)
    return otr_recipe(recipe, num_samples=num_samples, temperature=1.3, neg_reward=-0.1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (run under torchrun with as many processes)")
    ap.add_argument("--num-samples", type=int, default=8, help="OTR samples per token (K)")
    ap.add_argument("--log-dir", default=None, help="NeMo experiment directory (default ./nemo_experiments)")
    args = ap.parse_args(argv)

    from otr_megatron.nemo import NeMoVersionError, check_nemo_version

    try:
        check_nemo_version()
    except NeMoVersionError as exc:
        print(f"nemo_tiny_cpu: {exc}", file=sys.stderr)
        return 2
    from otr_megatron.nemo.cpu import enable_nemo_cpu

    enable_nemo_cpu()
    import fiddle as fdl

    run_fn = fdl.build(make_recipe(args.max_steps, args.tp, args.num_samples, args.log_dir))
    run_fn()
    metrics = run_fn.keywords["model"].otr_metrics()
    if metrics:  # the last pipeline stage holds them
        print("nemo_tiny_cpu: last step " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
