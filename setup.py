"""Capsule networks (dynamic routing and EM routing) for TensorFlow 2 and Keras 3.

The wheel holds the packages `capsules` (models, training, the driver `capsules.experiment`,
installed as the `capsules-experiment` command) and `input_data`; the shipped checkpoints
stay in the repository.
"""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="capsules",
    version="0.1.0",
    description=(
        "Capsule networks for TensorFlow 2 / Keras 3: dynamic routing (Sabour, Frosst and "
        "Hinton, 2017) and EM routing (Hinton, Sabour and Frosst, 2018), faithful to the "
        "reference implementations"
    ),
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["capsules", "capsules.*", "input_data", "input_data.*"]),
    # The EM routing kernels' C++ source, compiled on first use (capsules/em_kernels.py).
    package_data={"capsules": ["kernels/*.cc"]},
    install_requires=[
        "tensorflow>=2.16,<3",
        "keras>=3.0,<4",
        "numpy>=1.23",
        "absl-py>=1.0",
        "tensorflow-datasets>=4.9",
        # tensorflow-datasets 4.9 imports importlib_resources when it prepares a data set
        # but declares it only for Python < 3.9: without it the tfds source of
        # input_data.mnist.fetch and --data_dir=tfds:DIR stop with "No module named
        # 'importlib_resources'".
        "importlib_resources>=5",
        # tf.summary needs TensorBoard's implementation; it also views the summaries.
        "tensorboard>=2.16",
        # capsules.visualize draws its PNG figures with matplotlib.
        "matplotlib>=3.5",
    ],
    extras_require={"test": [
        "pytest>=7", "ruff>=0.5",
        # notebooks/run.py and tests/test_notebook.py execute notebooks/tour.ipynb.
        "nbclient>=0.7.3", "nbformat>=5", "ipykernel>=6",
    ]},
    entry_points={"console_scripts": ["capsules-experiment=capsules.experiment:console_main"]},
    # An SPDX expression (setuptools >= 77 deprecates the license classifiers for it).
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
