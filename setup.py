"""otr-megatron: One-Token Rollout fine-tuning for Megatron-Core, Megatron-Bridge and NeMo."""

from setuptools import find_packages, setup

setup(
    name="otr-megatron",
    version="0.1.0",
    description="One-Token Rollout (OTR) policy-gradient fine-tuning over vocab-parallel logits "
    "for Megatron-Core, Megatron-Bridge and NeMo",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["otr_megatron", "otr_megatron.*"]),
    package_data={"otr_megatron": ["data/assets/*.jsonl"]},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16",
        "numpy",
        "PyYAML>=6",
        "tqdm",
        "psutil",  # megatron-core's distributed checkpoint writer needs it
    ],
    extras_require={
        # Training job extras: SFT data through Hugging Face `datasets`, plots.
        "train": ["datasets>=2.18", "matplotlib"],
        # SLURM through NeMo-Run (optional; plain sbatch rendering needs nothing). nemo-run 0.11
        # does not import with newer leptonai releases, hence the pin.
        "nemo-run": ["nemo-run", "leptonai==0.27.3"],
        "test": ["pytest>=7", "datasets>=2.18", "matplotlib", "scipy"],
    },
    entry_points={"console_scripts": ["otr-megatron=otr_megatron.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
