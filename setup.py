"""lemo_ds packaging.

Development install: ``pip install -e ".[test]"``.
"""

from setuptools import find_packages, setup

setup(
    name="lemo_ds",
    version="0.1.0",
    description="Contextual token sparsity (LeMo) for long-context LLM fine-tuning, as a DeepSpeed plugin",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    # every subpackage of lemo_ds/ (the Triton kernels included), found rather than listed
    packages=find_packages(include=["lemo_ds", "lemo_ds.*"]),
    python_requires=">=3.10",
    # The supported range of each dependency. Lower bounds: the oldest versions CI installs and tests
    # (.ci/oldest.txt; tests/test_packaging.py keeps the two equal). Upper bounds: none, there is no known break;
    # CI's second run takes whatever pip resolves that day. torch is the exception CI cannot test on its CPU
    # machine, which has only torch 2.13.0 (CPU): 2.11 is the GPU suite's torch (tests on the H200).
    install_requires=[
        "torch>=2.11",
        "deepspeed>=0.19.8",
        "transformers>=5.17",
        "peft>=0.21",
        "pydantic>=2.10.6",
        "tqdm",
        "safetensors",
    ],
    extras_require={
        # Triton ships with CUDA builds of torch; on CPU it is only needed to run the kernels' tests
        # under TRITON_INTERPRET=1.
        "triton": ["triton>=3.6"],
        "wandb": ["wandb"],
        # Liger-Kernel's fused linear cross-entropy: the segment loss's kernel on CUDA (memory.segment_loss_impl
        # "auto" takes it where it is installed). lemo_ds's own fused RMSNorm/RoPE/SwiGLU need only Triton.
        "liger": ["liger-kernel>=0.8.5"],
        "bench": ["matplotlib"],
        # lemo_ds.megatron (Megatron-core GPT layer specs); its local spec also runs on CPU (lemo_ds/megatron/cpu.py).
        "megatron": ["megatron-core>=0.16.1"],
        # trl: the SFTTrainer test of lemo_ds.integrations.transformers (about 10 s of install: trl, datasets, pyarrow)
        "test": [
            "pytest",
            "pytest-timeout",
            "pytest-xdist",  # CI runs the suite on 2 workers (-n 2, .ci/run)
            "triton>=3.6",
            "megatron-core>=0.16.1",
            "ruff",
            "matplotlib",
            "wandb",
            "trl",
            "liger-kernel>=0.8.5",
        ],
    },
)
