"""Render (and optionally submit) the Llama-3 70B OTR fine-tuning job: 4 nodes x 8 H100, Bridge recipe.

    python examples/slurm_70b.py --account ACCT --partition batch -o otr-70b.sbatch [--submit]

Everything comes from configs/llama3_70b_4node.yaml: node count, the Bridge recipe, the layout and
the OTR settings (`otr_megatron.launch.bridge_job` derives the Bridge command from them, the same
command the planner's layout describes). The job runs `otr-megatron bridge` under torchrun (one task per
node) in the NeMo container, requeues itself before the time limit, and resumes from checkpoints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bridge_command(config_path: Path) -> list[str]:
    from otr_megatron.config.cluster_job import load_cluster_job, preflight
    from otr_megatron.launch.bridge_job import bridge_command as derived

    job = load_cluster_job(str(config_path))
    preflight(job)  # the schema, the layout against the model, the memory verdict: before the queue
    return derived(job.cfg) + [
        "checkpoint.save=/ckpt/llama3_70b_otr", "checkpoint.load=/ckpt/llama3_70b_otr"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "llama3_70b_4node.yaml"))
    ap.add_argument("--account", required=True)
    ap.add_argument("--partition", default="batch")
    ap.add_argument("--image", default="nvcr.io/nvidia/nemo:26.08")
    ap.add_argument("--data", default="/lustre/data", help="host directory mounted at /data (datasets, HF cache)")
    ap.add_argument("--ckpt", default="/lustre/checkpoints", help="host directory mounted at /ckpt")
    ap.add_argument("-o", "--output", default="otr-llama3-70b.sbatch")
    ap.add_argument("--submit", action="store_true")
    args = ap.parse_args(argv)

    from otr_megatron.launch.slurm import main as slurm_main

    slurm_argv = [
        "--config", args.config, "--launcher", "torchrun", "--account", args.account, "--partition", args.partition,
        "--time", "04:00:00", "--container-image", args.image,
        "--container-mounts", f"{args.data}:/data,{args.ckpt}:/ckpt", "--hf-home", "/data/hf",
        "--requeue", "-o", args.output,
    ]
    if args.submit:
        slurm_argv.append("--submit")
    return slurm_main(slurm_argv + ["--"] + bridge_command(Path(args.config)))


if __name__ == "__main__":
    sys.exit(main())
