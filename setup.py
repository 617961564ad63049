"""slime: Megatron-core SFT trainer on slime's RL rollout pipeline."""

from setuptools import find_packages, setup

# GPU rollouts need both the server and the router in front of several servers.
SGLANG = ["sglang>=0.5", "sglang-router>=0.2"]

setup(
    name="slime",
    version="0.1.0",
    description="Megatron-core supervised fine-tuning with exact chat-template loss masks",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["slime", "slime.*"]),
    package_data={"slime": ["assets/*.jsonl", "assets/tiny-qwen3/*"]},
    include_package_data=True,
    # Ranges we test: torch 2.13 (CPU, CI) and 2.11 (CUDA box); megatron-core 0.16.x is the
    # last line that installs on Python 3.11. Install torch first with `pip install
    # torch==2.13.0` (or your CUDA build): a bare torch requirement pulls several GB.
    install_requires=[
        "torch>=2.11,<2.14",
        "megatron-core>=0.16.1,<0.17",
        "ray[default]>=2.60,<2.61",
        "transformers>=4.57,<5",
        "tokenizers>=0.22,<0.23",
        "datasets>=4.0,<6",
        "pyarrow>=20",
        "numpy>=1.26",
        "safetensors>=0.6",
        "wandb>=0.22",
        "tensorboard>=2.18",
        "tqdm>=4.66",
        "rich>=13",
        "psutil>=5.9",  # megatron-core dist_checkpointing needs it to save
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
        # `pip install -e .[sglang]`; "rl" is the older name of the same extra.
        "sglang": SGLANG,
        "rl": SGLANG,
    },
)
