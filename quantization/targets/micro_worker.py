"""Subprocess side of `quantization.targets.micro_runtime`: one TFLite Micro interpreter run.

    python quantization/targets/micro_worker.py MODEL.tflite ARENA_BYTES [IMAGES.npy OUTPUTS.npy]

Runs in its own process because the TFLM Python wrapper can take the whole
process down: a failed `TFLITE_CHECK` aborts (e.g. an int8 SOFTMAX whose input
scale is too small) and some kernels dereference a failed allocation
(segfault) when the arena is too small. The parent reads the outcome from the
exit status and from stderr.

Protocol:
  * The interpreter is constructed with an arena of ARENA_BYTES; TFLM plans
    and allocates every tensor at construction (`AllocateTensors`), so the
    arena usage is final before any `invoke()`. It is printed right away with
    `print_allocations()`, whose "Arena allocation total N bytes" line goes to
    the C-level stderr (fd 2): the parent captures the process's stderr.
  * With IMAGES.npy (float32, [N, H, W, C], in the model's input range) every
    image is quantized with the input tensor's own scale/zero point, run, and
    the output dequantized; the float32 [N, ...] result goes to OUTPUTS.npy.

Imports only numpy and tflite_micro (not TensorFlow), so it starts fast.
"""

import os
import sys

# Run as a script, Python puts this file's folder (quantization/) first on
# sys.path, where module names such as `layers` could shadow real packages.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402

import numpy as np  # noqa: E402


def _quantization(details):
    """(scale, zero_point) of a per-tensor quantized tensor, else None."""
    params = details.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", []), np.float64)
    zero_points = np.asarray(params.get("zero_points", []), np.int64)
    if scales.size != 1 or scales[0] == 0:
        return None
    return float(scales[0]), int(zero_points[0]) if zero_points.size else 0


def _to_input(images, details):
    """Float images -> the input tensor's dtype (quantized when it is integer)."""
    dtype = np.dtype(details["dtype"])
    if dtype.kind == "f":
        return images.astype(dtype)
    quantization = _quantization(details)
    if quantization is None:
        raise ValueError(f"the {dtype.name} input tensor has no per-tensor scale to quantize the images with")
    scale, zero_point = quantization
    info = np.iinfo(dtype)
    # Same rounding as quantization.audit.run_tflite, so both runtimes see identical inputs.
    return np.clip(np.round(images / scale + zero_point), info.min, info.max).astype(dtype)


def _to_float(output, details):
    quantization = _quantization(details)
    if np.dtype(details["dtype"]).kind == "f" or quantization is None:
        return output.astype(np.float32)
    scale, zero_point = quantization
    return ((output.astype(np.float32) - zero_point) * scale).astype(np.float32)


def run(model_path, arena_bytes, images_path=None, outputs_path=None):
    from tflite_micro import runtime

    with open(model_path, "rb") as f:
        model = f.read()
    interpreter = runtime.Interpreter.from_bytes(model, arena_size=arena_bytes)
    # Allocation is complete after construction: report the arena before any
    # invoke, so the figure survives a kernel that crashes at run time.
    interpreter.print_allocations()
    sys.stderr.flush()
    if images_path is None:
        return
    images = np.load(images_path).astype(np.float32)
    input_details = interpreter.get_input_details(0)
    output_details = interpreter.get_output_details(0)
    input_shape = [int(d) for d in input_details["shape"]]
    if list(images.shape[1:]) != input_shape[1:]:
        raise ValueError(f"images have shape {list(images.shape)}; the model input is {input_shape}")
    batch = input_shape[0]
    outputs = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        count = len(chunk)
        if count < batch:  # a static batch: pad with the last image, drop its outputs
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - count, 0)])
        interpreter.set_input(_to_input(chunk, input_details), 0)
        interpreter.invoke()
        outputs.append(_to_float(np.asarray(interpreter.get_output(0)), output_details)[:count])
    np.save(outputs_path, np.concatenate(outputs))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("arena_bytes", type=int)
    parser.add_argument("images", nargs="?")
    parser.add_argument("outputs", nargs="?")
    args = parser.parse_args(argv)
    if (args.images is None) != (args.outputs is None):
        parser.error("give both IMAGES and OUTPUTS, or neither")
    try:
        run(args.model, args.arena_bytes, args.images, args.outputs)
    except Exception as error:  # the parent shows this line; a traceback would bury it
        print(f"micro_worker: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
