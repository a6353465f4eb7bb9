"""otr-megatron: One-Token Rollout fine-tuning for Megatron-Core, Megatron-Bridge and NeMo."""

from setuptools import find_packages, setup

MCORE = ["megatron-core>=0.15", "numpy", "psutil"]  # psutil: megatron-core's distributed checkpoint writer
# OmegaConf: typed configs and dotlist overrides; NeMo 2.7 requires <= 2.3, Bridge 0.6 >= 2.3.
LAUNCH = ["PyYAML>=6", "omegaconf>=2.3,<2.4"]
TRAIN = MCORE + LAUNCH + ["tqdm", "datasets>=2.18", "matplotlib"]  # datasets: SFT data; matplotlib: plots

setup(
    name="otr-megatron",
    version="0.1.0",
    description="One-Token Rollout (OTR) policy-gradient fine-tuning over vocab-parallel logits "
    "for Megatron-Core, Megatron-Bridge and NeMo",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["otr_megatron", "otr_megatron.*"]),
    # The loss (`import otr_megatron`, `OTRConfig`, `vocab_parallel_otr_loss`) needs only torch.
    install_requires=["torch>=2.4"],
    extras_require={
        "mcore": MCORE,  # otr_megatron.mcore: enable_otr / forward_step on a Megatron-Core GPTModel
        "launch": LAUNCH,  # otr-megatron plan / slurm: config files and KEY=VALUE overrides
        "train": TRAIN,  # otr-megatron train / compare: the job
        # SLURM through NeMo-Run (optional; plain sbatch rendering needs only `launch`). nemo-run
        # 0.11 does not import with newer leptonai releases, hence the pin.
        "nemo-run": LAUNCH + ["nemo-run", "leptonai==0.27.3"],
        "test": TRAIN + ["pytest>=7", "scipy"],
    },
    entry_points={"console_scripts": ["otr-megatron=otr_megatron.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
