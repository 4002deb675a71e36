from setuptools import setup

setup(
    name="minirl",
    version="0.1.0",
    description="Memory-constrained RL for LLM reasoning (GRPO, S-GRPO, T-SPMO) on a self-contained Qwen2",
    python_requires=">=3.10",
    packages=["minirl", "minirl.rl", "minirl.kernels"],
    package_dir={"minirl.kernels": "kernels"},
    package_data={"minirl": ["data/svamp/*", "data/tiny/*"]},
    install_requires=["torch>=2.5", "safetensors", "tokenizers"],
    extras_require={
        # triton and numpy run the kernels under TRITON_INTERPRET=1; transformers and peft are references only.
        # Triton ≥ 3.1, what torch 2.5 ships (kernels/triton_logprobs.py, MIN_TRITON); wheels are Linux-only.
        "test": ["pytest", "hypothesis", 'triton>=3.1; platform_system == "Linux"', "numpy", "transformers", "peft"],
        "plot": ["matplotlib"],
        # tools/fetch_smollm2.py: reads and dequantizes a GGUF file; never imported by minirl itself.
        "tools": ["transformers", "gguf"],
        # tools/bench_vs_trl.py: TRL's GRPOTrainer as the reference it is timed against; never imported by minirl.
        "bench": ["trl>=1.16", "transformers", "peft"],
    },
)
