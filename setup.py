from setuptools import setup

setup(
    name="trellis",
    version="0.1.0",
    description="Distributed training of transformer LMs: pretraining, fine-tuning and RLHF on Ray + DeepSpeed ZeRO + Arrow",
    packages=["launcher", "model", "parallel", "rl", "data_pipeline", "cluster"],
    package_data={"launcher": ["configs/*.yaml"], "cluster": ["configs/*"]},
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
        "matplotlib>=3.7",
    ],
    extras_require={"test": ["pytest>=8", "transformers>=4.40", "accelerate>=0.30"]},
    entry_points={"console_scripts": ["trellis=launcher.cli:main"]},
)
