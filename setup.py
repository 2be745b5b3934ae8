"""Packaging for transkd-fast.

The top-level ``kernels/`` folder is installed as ``transkd_fast.kernels``: a PyPI package
called ``kernels`` exists (transformers imports it), so ours must never be top-level.
"""

from setuptools import find_packages, setup

setup(
    name="transkd-fast",
    version="0.1.0",
    description="Fast, faithful TransKD: Triton kernels and models for distilling SegFormer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["transkd_fast", "transkd_fast.*"]) + ["transkd_fast.kernels"],
    package_dir={"transkd_fast.kernels": "kernels"},
    install_requires=[
        # A range: CPU users get the local 2.13.0 wheel by pinning it first (see README);
        # CUDA users keep whichever CUDA build they already have.
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "tqdm",
        "pillow",
        "matplotlib",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-benchmark",
            "fvcore",
            "transformers>=4.40",
            "ruff",
        ],
        "xformers": ["xformers>=0.0.28"],
        # transkd-fast export / --verify: ONNX (onnxscript: torch.onnx's exporter), onnxruntime, HF safetensors
        "deploy": ["onnx>=1.16", "onnxscript", "onnxruntime>=1.17", "safetensors"],
        # --tensorboard: event files beside metrics.jsonl (torch.utils.tensorboard's SummaryWriter)
        "tensorboard": ["tensorboard>=2.10"],
        "bench": ["openvino>=2024.0"],  # benchmarks/test_deploy.py: OpenVINO beside ONNX Runtime (CPU wheel, no torch)
    },
    entry_points={"console_scripts": ["transkd-fast=transkd_fast.cli:main"]},
)
