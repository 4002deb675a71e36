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
        "test": ["pytest", "hypothesis", "triton", "numpy", "transformers", "peft"],
        "plot": ["matplotlib"],
    },
)
