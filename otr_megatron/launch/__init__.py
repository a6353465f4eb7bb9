"""SLURM launch: sbatch rendering (`otr-megatron slurm`) and an optional NeMo-Run path."""
