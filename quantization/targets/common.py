"""What every deployment target shares: the refusal error, the I/O types,
name checks, the quantization of a float model, and staged writing.

A target writes its files in a staging folder and moves them into the output
folder only when every check passed, so a refused export leaves the output
folder exactly as it was (no half-written model, no stale report beside a new
model).
"""

import contextlib
import json
import os
import re
import shutil
import tempfile

# The input/output types each target can give its model, default first.
TARGET_IO_TYPES = {
    "edgetpu": ("int8", "uint8"),  # the Edge TPU runs integer tensors only
    "micro": ("int8",),  # TFLM's int8 kernels; a float/uint8 interface adds ops it refuses
    "android": ("float32", "int8", "uint8"),  # of the int8 model; the float16 model is float32
    "onnx": ("float32",),  # the QDQ graph quantizes the float image itself
}
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class TargetError(ValueError):
    """The model does not fit the target; `report` says what and by how much.

    Every target raises it for every refusal, and writes nothing then."""

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


def check_io_type(target, io_type):
    """`io_type` for `target` (its default for None); ValueError listing what
    the target accepts, so that no requested type is silently dropped."""
    accepted = TARGET_IO_TYPES[target]
    if io_type is None:
        return accepted[0]
    if io_type not in accepted:
        whose = " (of its int8 model; the float16 model has float32)" if target == "android" else ""
        raise ValueError(
            f"The {target} target takes {' or '.join(accepted)} input and output"
            f"{' only' if len(accepted) == 1 else ''}{whose}; got io_type={io_type!r}."
        )
    return io_type


def check_name(name, model):
    """The file name stem: `name`, else the model's name; ValueError for a
    path or characters that do not belong in a file name."""
    name = name or getattr(model, "name", None)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"name must be a plain file name stem (letters, digits, _ . -); got {name!r}")
    return name


def quantized_for(model, graph, calibration_images):
    """A QAT model in `graph`: rewritten when `model` is QAT already,
    otherwise quantized and calibrated (post-training quantization)."""
    from quantization.quantize import calibrate
    from quantization.quantize import quantize_model
    from quantization.quantize import rewrite_graph
    from quantization.tflite_export import is_qat

    if is_qat(model):
        return rewrite_graph(model, graph)
    if calibration_images is None:
        raise ValueError("A float model needs calibration_images (about 100 typical inputs) to be quantized.")
    return calibrate(quantize_model(model, graph=graph), calibration_images)


def report_file(name, target):
    """The report's file name: `<name>.<target>.report.json`."""
    return f"{name}.{target}.report.json"


def _staging_parent(output_dir):
    """The folder above output_dir when it exists and is writable (the final
    move is then a rename on one file system), else the system's temporary
    folder."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    return parent if os.path.isdir(parent) and os.access(parent, os.W_OK) else None


def _replace_paths(value, staging, final):
    """`value` (a JSON-like structure) with every path under `staging`
    pointing under `final` instead."""
    if isinstance(value, str):
        return final + value[len(staging) :] if value.startswith(staging) else value
    if isinstance(value, dict):
        return {key: _replace_paths(item, staging, final) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_paths(item, staging, final) for item in value]
    return value


class Staging:
    """A staging folder for one export (see `staged`)."""

    def __init__(self, folder, output_dir):
        self.folder = folder
        self.output_dir = os.path.abspath(output_dir)

    def path(self, file_name):
        """Where to write `file_name` now (inside the staging folder)."""
        return os.path.join(self.folder, file_name)

    def final(self, file_name):
        """Where `file_name` will be once the export succeeded."""
        return os.path.join(self.output_dir, file_name)

    def commit(self, report, name, target):
        """Writes `report` as `<name>.<target>.report.json`, rewrites the
        staging paths in it and in the staged JSON files to their final
        places, and moves every staged file into the output folder. Returns
        the report with the final paths."""
        report = _replace_paths(report, self.folder, self.output_dir)
        report.setdefault("files", {})["report"] = self.final(report_file(name, target))
        with open(self.path(report_file(name, target)), "w") as f:
            json.dump(report, f, indent=2, default=str)
        os.makedirs(self.output_dir, exist_ok=True)
        for file_name in sorted(os.listdir(self.folder)):
            source = self.path(file_name)
            if file_name.endswith(".json"):
                with open(source) as f:
                    staged = json.load(f)
                with open(source, "w") as f:
                    json.dump(_replace_paths(staged, self.folder, self.output_dir), f, indent=2, default=str)
            shutil.move(source, self.final(file_name))
        return report


@contextlib.contextmanager
def staged(output_dir, target):
    """Yields a `Staging` whose folder is deleted on the way out: files move
    into `output_dir` only through `Staging.commit`, so an exception before
    it leaves `output_dir` untouched."""
    with tempfile.TemporaryDirectory(prefix=f".{target}-", dir=_staging_parent(output_dir)) as folder:
        yield Staging(os.path.abspath(folder), output_dir)
