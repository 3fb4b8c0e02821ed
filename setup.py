"""keras_mobilevitv2: MobileViTv2 for Keras 3 / TensorFlow."""

import os

from setuptools import find_packages
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(HERE, "keras_mobilevitv2", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    raise RuntimeError("__version__ not found")


with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    LONG_DESCRIPTION = f.read()

# Deployment targets: LiteRT interpreter (Android latency), ONNX, TFLite Micro.
DEPLOY = ["ai-edge-litert", "tf2onnx", "onnxruntime", "tflite-micro"]
# The implementations the benchmarks compare against, and the plot.
BENCHMARKS = ["torch>=2.1", "timm>=1.0", "torchvision", "matplotlib", "kimm", "keras-cv-attention-models"]
# PyTorch is only needed to read .pt/.pth checkpoints and to run the parity
# tests; it is never imported by the models themselves.
CONVERT = ["torch>=2.1", "safetensors"]
TEST = CONVERT + [
    "pytest",
    # `make test` runs two test processes
    "pytest-xdist",
    "timm>=1.0",
    "transformers>=4.40",
    "torchvision",
    # the reference QAT scheme, run in a subprocess (it switches to legacy Keras)
    "tensorflow-model-optimization==0.8.1",
    "tf_keras",
    # bundle small real image datasets (handwritten digits; photographs)
    "scikit-learn",
    "scikit-image",
    # the official COCO evaluator (detection mAP)
    "pycocotools",
    # formatter and linter (`make lint`); pinned: a new release may add rules
    "ruff==0.17.6",
]
# The tests also cover the deployment targets and smoke-run the benchmarks.
TEST = TEST + DEPLOY + [b for b in BENCHMARKS if b not in TEST]

setup(
    name="keras_mobilevitv2",
    version=_version(),
    description="MobileViTv2 (separable self-attention) for Keras 3 and TensorFlow, "
    "with official-checkpoint loading, tf.distribute training and int8 TFLite export.",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(
        include=["keras_mobilevitv2", "keras_mobilevitv2.*", "training", "training.*", "quantization", "quantization.*"]
    ),
    package_data={"keras_mobilevitv2": ["data/*.json"]},
    include_package_data=True,
    install_requires=["tensorflow>=2.16", "keras>=3.3", "absl-py"],
    extras_require={
        "convert": CONVERT,
        "test": TEST,
        "deploy": DEPLOY,
        "demo": DEPLOY + ["matplotlib"],  # `make demo`: every target and report.png
        # TensorBoard to view the logs (writing them needs only TensorFlow);
        # pycocotools, the official COCO evaluator, for --task detection.
        "train": ["tensorboard", "pycocotools"],
        "benchmarks": BENCHMARKS + ["ai-edge-litert"],
    },
    entry_points={
        "console_scripts": [
            "mobilevitv2-convert=keras_mobilevitv2.convert:main",
            "mobilevitv2-demo=keras_mobilevitv2.demo:main",
            "mobilevitv2-train=training.train:run",
            "mobilevitv2-qat=quantization.qat:run",
            "mobilevitv2-export=quantization.export:main",
            "mobilevitv2-pipeline=quantization.pipeline:run",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: Keras",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
