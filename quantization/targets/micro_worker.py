"""Subprocess side of `quantization.targets.micro_runtime`: one TFLite Micro interpreter run.

    python quantization/targets/micro_worker.py MODEL.tflite ARENA_BYTES [INPUTS.npz OUTPUTS.npz]

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
  * With INPUTS.npz (arrays `input_0`, `input_1`, ... for the model's
    inputs in order, float32 [N, ...] in each input's range, e.g. images
    [N, H, W, C]) every sample is quantized with its input tensor's own
    scale/zero point (float inputs are passed as they are) and run; every
    output is dequantized, and OUTPUTS.npz gets `output_0`, `output_1`, ...
    (float32 [N, ...]) for the model's outputs in order.

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


def _to_input(values, details):
    """Float values -> the input tensor's dtype (quantized when it is integer)."""
    dtype = np.dtype(details["dtype"])
    if dtype.kind == "f":
        return values.astype(dtype)
    quantization = _quantization(details)
    if quantization is None:
        raise ValueError(f"the {dtype.name} input tensor has no per-tensor scale to quantize the inputs with")
    scale, zero_point = quantization
    info = np.iinfo(dtype)
    # Same rounding as quantization.audit.run_tflite, so both runtimes see identical inputs.
    return np.clip(np.round(values / scale + zero_point), info.min, info.max).astype(dtype)


def _to_float(output, details):
    quantization = _quantization(details)
    if np.dtype(details["dtype"]).kind == "f" or quantization is None:
        return output.astype(np.float32)
    scale, zero_point = quantization
    return ((output.astype(np.float32) - zero_point) * scale).astype(np.float32)


def _details(interpreter, kind):
    """Every input's or output's details, in order; the wrapper has no count,
    and answers an index past the last with IndexError."""
    get = interpreter.get_input_details if kind == "input" else interpreter.get_output_details
    details = []
    while True:
        try:
            details.append(get(len(details)))
        except IndexError:
            return details


def _load_inputs(inputs_path, input_details):
    with np.load(inputs_path) as archive:
        arrays = [archive[f"input_{i}"].astype(np.float32) for i in range(len(archive.files))]
    if len(arrays) != len(input_details):
        raise ValueError(f"got {len(arrays)} input arrays; the model has {len(input_details)} inputs")
    for array, details in zip(arrays, input_details):
        shape = [int(d) for d in details["shape"]]
        if list(array.shape[1:]) != shape[1:] or len(array) != len(arrays[0]):
            raise ValueError(f"an input array has shape {list(array.shape)}; the model input is {shape}")
    return arrays


def run(model_path, arena_bytes, inputs_path=None, outputs_path=None):
    from tflite_micro import runtime

    with open(model_path, "rb") as f:
        model = f.read()
    interpreter = runtime.Interpreter.from_bytes(model, arena_size=arena_bytes)
    # Allocation is complete after construction: report the arena before any
    # invoke, so the figure survives a kernel that crashes at run time.
    interpreter.print_allocations()
    sys.stderr.flush()
    if inputs_path is None:
        return
    input_details, output_details = _details(interpreter, "input"), _details(interpreter, "output")
    arrays = _load_inputs(inputs_path, input_details)
    batch = int(input_details[0]["shape"][0])
    outputs = [[] for _ in output_details]
    for start in range(0, len(arrays[0]), batch):
        count = min(batch, len(arrays[0]) - start)
        for index, (array, details) in enumerate(zip(arrays, input_details)):
            chunk = array[start : start + count]
            if count < batch:  # a static batch: pad with the last sample, drop its outputs
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - count, 0)])
            interpreter.set_input(_to_input(chunk, details), index)
        interpreter.invoke()
        for index, details in enumerate(output_details):
            outputs[index].append(_to_float(np.asarray(interpreter.get_output(index)), details)[:count])
    np.savez(outputs_path, **{f"output_{i}": np.concatenate(chunks) for i, chunks in enumerate(outputs)})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("arena_bytes", type=int)
    parser.add_argument("inputs", nargs="?")
    parser.add_argument("outputs", nargs="?")
    args = parser.parse_args(argv)
    if (args.inputs is None) != (args.outputs is None):
        parser.error("give both INPUTS and OUTPUTS, or neither")
    try:
        run(args.model, args.arena_bytes, args.inputs, args.outputs)
    except Exception as error:  # the parent shows this line; a traceback would bury it
        print(f"micro_worker: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
