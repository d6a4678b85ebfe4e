"""ms_llm: MindSpore-native training and inference of foundation-model architectures."""
from setuptools import find_packages, setup

setup(
    name="ms_llm",
    version="0.1.0",
    description="Transformer, BERT, GPT-3, MoE (Shazeer/Switch/GLaM) on MindSpore: Ascend 910 clusters and CPU",
    python_requires=">=3.9,<3.12",
    packages=find_packages(include=["ms_llm", "ms_llm.*"]),
    include_package_data=True,
    package_data={"ms_llm": ["data/assets/*/*", "data/corpus/*", "data/finetune/*", "kernels/csrc/*",
                             "planner/*.yaml"]},
    install_requires=[
        "mindspore==2.10.0",
        "numpy>=1.24,<2",          # numpy 2 breaks MindSpore 2.10's argument parsing
        "pyyaml>=6.0,<7",
        "tokenizers>=0.20,<0.24",
        "safetensors>=0.4,<0.9",
        "tqdm>=4.66,<5",
        "matplotlib>=3.7,<4",
        "decorator>=5.1,<6",       # needed by MindSpore's custom-op build server
        "psutil>=5.9",
        "scipy-openblas32==0.3.34.481.3",   # OpenBLAS (headers + library) for the CPU linear-layer kernel
    ],
    extras_require={
        "test": ["pytest>=8,<10"],
        "bench": ["torch==2.13.0", "transformers==5.24.0"],
    },
    entry_points={"console_scripts": ["ms-llm=ms_llm.cli:main"]},
)
