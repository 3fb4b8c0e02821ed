"""Deployment targets: Edge TPU, TensorFlow Lite Micro, Android and ONNX.

Every target is a module here with the same contract:

    report = module.export(model, output_dir, name=None, *,
                           calibration_images=None, sample_images=None,
                           **target_options)
    print(module.format_report(report))

`model` is a float Keras model (quantized after training on
`calibration_images` where the target needs int8) or a QAT model from
`quantize_model`. A target checks what it builds against the target's limits
and writes its files and `<name>.<target>.report.json` into `output_dir` only
when everything fits; otherwise it raises `TargetError` (a ValueError whose
`report` says what did not fit) and leaves `output_dir` as it was.

    from quantization import targets
    report = targets.export("edgetpu", model, "out", calibration_images=images)
"""

import importlib

from quantization.targets.common import TARGET_IO_TYPES
from quantization.targets.common import TargetError
from quantization.targets.common import check_io_type

# Target name -> its module; imported on first use (ONNX needs tf2onnx,
# Micro a subprocess runtime: a user of one target does not pay for another).
_MODULES = {
    "edgetpu": "quantization.targets.edgetpu",
    "micro": "quantization.targets.micro",
    "android": "quantization.targets.android",
    "onnx": "quantization.targets.onnx",
}
TARGETS = tuple(_MODULES)

__all__ = ["TARGETS", "TARGET_IO_TYPES", "TargetError", "check_io_type", "export", "format_report", "target"]


def target(target_name):
    """The module of `target_name`; ValueError naming the targets there are."""
    if target_name not in _MODULES:
        raise ValueError(f"Unknown deployment target {target_name!r}; the targets are {', '.join(TARGETS)}.")
    return importlib.import_module(_MODULES[target_name])


def export(target_name, model, output_dir, name=None, **kwargs):
    """`target(target_name).export(model, output_dir, name, **kwargs)`."""
    return target(target_name).export(model, output_dir, name, **kwargs)


def format_report(report):
    """The report of any target's `export`, formatted by that target."""
    return target(report["target"]).format_report(report)
