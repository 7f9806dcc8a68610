"""trellis installs as ONE import package, `trellis`: the repository's top-level folders
(fixed by the project's design) are mapped to `trellis.<folder>` through package_dir, so
site-packages gains no generic names such as `model` or `cluster`."""
from setuptools import find_packages, setup

PARTS = ("launcher", "model", "parallel", "rl", "data_pipeline", "cluster")


def _packages() -> tuple[list[str], dict[str, str]]:
    packages, dirs = [], {}
    for part in PARTS:
        for sub in [""] + [f".{p}" for p in find_packages(part)]:
            name = f"trellis.{part}{sub}"
            packages.append(name)
            dirs[name] = part + sub.replace(".", "/")
    return packages, dirs


PACKAGES, PACKAGE_DIR = _packages()

setup(
    name="trellis",
    version="0.2.0",
    description="Distributed training of transformer LMs: pretraining, fine-tuning and RLHF on Ray + DeepSpeed ZeRO + Arrow",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"trellis.launcher": ["configs/*.yaml"], "trellis.cluster": ["configs/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.3",
        "deepspeed>=0.15,<0.20",
        "ray[default]>=2.40",
        "pyarrow>=15",
        "sentencepiece>=0.2",
        "prometheus-client>=0.20",
        "safetensors>=0.4",
        "pyyaml>=6",
        "numpy>=1.24",
        "tqdm>=4.60",
        "xxhash>=3",
        "matplotlib>=3.7",
        "sacrebleu>=2.4,<3",
    ],
    extras_require={"test": ["pytest>=8", "transformers>=4.40", "accelerate>=0.30"],
                    # peers for bench/ only (bench/rl_algorithms.py, bench/ppo.py)
                    "bench": ["trl>=1.16", "datasets", "transformers>=4.40", "accelerate>=0.30"]},
    entry_points={"console_scripts": ["trellis=trellis.launcher.cli:main"]},
)
