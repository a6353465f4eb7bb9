"""OTR as the loss of a NeMo 2.0 recipe (nemo-toolkit <= 2.7, container nvcr.io/nvidia/nemo:26.02).

    python examples/nemo2_recipe_otr.py --nodes 4 --account ACCT --partition batch [--dryrun]

Takes NeMo's own `llm.llama3_70b.finetune_recipe` (full fine-tuning, no PEFT), swaps its model for
`OTRGPTModel` (same config, same optimizer) and submits it with NeMo-Run's SlurmExecutor.
On nemo-toolkit 3.x (no LLM collections) it stops with a message pointing to the Bridge path.
"""

from __future__ import annotations

import argparse
import sys


def make_recipe(nodes: int = 4):
    from nemo.collections import llm

    from otr_megatron.nemo import otr_recipe

    recipe = llm.llama3_70b.finetune_recipe(name="otr_llama3_70b", num_nodes=nodes, num_gpus_per_node=8,
                                            peft_scheme=None)
    recipe.trainer.strategy.tensor_model_parallel_size = 8
    recipe.trainer.strategy.pipeline_model_parallel_size = 4
    recipe.trainer.strategy.sequence_parallel = True
    return otr_recipe(recipe, num_samples=256, temperature=1.3, neg_reward=-0.1, vocab_size=128256)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--account", default="my_account")
    ap.add_argument("--partition", default="batch")
    ap.add_argument("--job-dir", default="/lustre/nemo_run/jobs")
    ap.add_argument("--dryrun", action="store_true")
    args = ap.parse_args(argv)

    from otr_megatron.nemo import NeMoVersionError, check_nemo_version

    try:
        check_nemo_version()
    except NeMoVersionError as exc:
        print(f"nemo2_recipe_otr: {exc}", file=sys.stderr)
        return 2
    import nemo_run as run

    from otr_megatron.launch.nemo_run import slurm_executor
    from otr_megatron.launch.slurm import SlurmSpec

    spec = SlurmSpec(command=["nemo"], nodes=args.nodes, gpus_per_node=8, launcher="torchrun", account=args.account,
                     partition=args.partition, container_image="nvcr.io/nvidia/nemo:26.02", requeue=True)
    executor = slurm_executor(spec, job_dir=args.job_dir, packager=run.Packager())
    run.run(make_recipe(args.nodes), executor=executor, name="otr_llama3_70b", dryrun=args.dryrun)
    return 0


if __name__ == "__main__":
    sys.exit(main())
