"""The real TFLite Micro interpreter (PyPI `tflite-micro`), run in a
subprocess (`micro_worker.py`) because TFLM aborts or segfaults the whole
process on some bad models; that is reported as `MicroRuntimeError`.

Arena figures come from TFLM's `RecordingMicroAllocator` with the reference
kernels of the Python build. Optimized kernels (CMSIS-NN, ESP-NN, ...) can ask
for different scratch buffers, so leave some headroom on the device.
"""

import os
import re
import signal
import subprocess
import sys
import tempfile

import numpy as np

# The worker runs under a generous arena first, then under a 4x bigger one
# while TFLM reports that it ran out, up to this cap.
_FIRST_ARENA_BYTES = 16 * 2**20
_MAX_ARENA_BYTES = 4 * 2**30
_ARENA_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")
_ARENA_SHORTFALL = re.compile(r"Failed to (allocate|resize)")
_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "micro_worker.py")


class MicroRuntimeError(RuntimeError):
    """The TFLM interpreter process failed: an error, a crash or a timeout.

    Attributes:
        returncode: The worker's exit status (negative: killed by a signal;
            None: timed out).
        signal_name: e.g. "SIGABRT" or "SIGSEGV" when a signal killed it.
        stderr_tail: The end of what the interpreter printed.
        arena_shortfall: True when TFLM reported that the arena was too small.
    """

    def __init__(self, message, returncode=None, signal_name=None, stderr_tail="", arena_shortfall=False):
        super().__init__(message)
        self.returncode = returncode
        self.signal_name = signal_name
        self.stderr_tail = stderr_tail
        self.arena_shortfall = arena_shortfall


def _signal_name(returncode):
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _run_worker(model_path, arena_bytes, inputs_path, outputs_path, timeout):
    """One worker run; returns the arena total or raises MicroRuntimeError."""
    command = [sys.executable, _WORKER, model_path, str(int(arena_bytes))]
    if inputs_path is not None:
        command += [inputs_path, outputs_path]
    # TFLM reports (allocations, kernel errors) are printed by C code on fd 2:
    # only a separate process's captured stderr sees them, crash or not.
    try:
        completed = subprocess.run(command, capture_output=True, timeout=timeout, text=True, errors="replace")
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr.decode(errors="replace") if isinstance(expired.stderr, bytes) else expired.stderr
        raise MicroRuntimeError(
            f"the TFLite Micro interpreter did not finish within {timeout} s (arena {arena_bytes:,} bytes)",
            stderr_tail=(stderr or "")[-2000:],
        ) from None
    stderr_tail = completed.stderr[-2000:].strip()
    shortfall = bool(_ARENA_SHORTFALL.search(completed.stderr))
    if completed.returncode != 0:
        if completed.returncode < 0:
            name = _signal_name(completed.returncode)
            what = f"the TFLite Micro interpreter process was killed by {name}"
            if name == "SIGABRT":
                what += (
                    " (a failed TFLITE_CHECK, e.g. an int8 SOFTMAX whose input scale is too small, "
                    "see check_micro_compatibility)"
                )
        else:
            name = None
            what = f"the TFLite Micro interpreter failed (exit status {completed.returncode})"
        if shortfall:
            what += f"; TFLM ran out of its {arena_bytes:,}-byte arena"
        raise MicroRuntimeError(
            f"{what}. Its stderr ends with:\n{stderr_tail or '(nothing)'}",
            returncode=completed.returncode,
            signal_name=name,
            stderr_tail=stderr_tail,
            arena_shortfall=shortfall,
        )
    totals = _ARENA_TOTAL.findall(completed.stderr)
    if not totals:
        raise MicroRuntimeError(
            "the TFLite Micro interpreter ran but printed no 'Arena allocation total' line. Its stderr ends "
            f"with:\n{stderr_tail or '(nothing)'}",
            returncode=0,
            stderr_tail=stderr_tail,
        )
    return int(totals[-1])


def run_micro(flatbuffer, images=None, arena_size=None, timeout=600):
    """Runs `flatbuffer` in the TFLite Micro interpreter, in a subprocess.

    Args:
        flatbuffer: The `.tflite` model (bytes).
        images: float32 [N, H, W, C] in the model's input range (quantized
            with the input tensor's scale and zero point, as
            `quantization.audit.run_tflite` does), or None to only allocate.
        arena_size: The TFLM tensor arena in bytes. None: a generous arena,
            grown while TFLM reports running out of it.
        timeout: Seconds for each interpreter process.

    Returns:
        (outputs, arena_bytes): the first output, dequantized to float32
        [N, ...] (None without images), and the arena bytes TFLM allocated
        (head + tail, from `print_allocations()`; an arena of exactly this
        size works). `run_micro_outputs` returns every output.

    Raises:
        MicroRuntimeError: the interpreter refused the model, crashed (the
        signal and the end of its stderr are in the message) or timed out.
    """
    if images is not None:
        images = np.asarray(images, np.float32)
        if images.ndim < 2 or len(images) == 0:
            raise ValueError(f"images must be a non-empty batch [N, H, W, C]; got shape {images.shape}")
    outputs, arena_bytes = run_micro_outputs(flatbuffer, None if images is None else [images], arena_size, timeout)
    return (None if outputs is None else outputs[0]), arena_bytes


def run_micro_outputs(flatbuffer, inputs=None, arena_size=None, timeout=600):
    """`run_micro` for a model with several inputs or outputs.

    `inputs`: one float32 array [N, ...] per model input, in order (integer
    inputs are quantized with their tensor's scale and zero point, float ones
    passed as they are), or None to only allocate. Returns (outputs,
    arena_bytes): one float32 array [N, ...] per model output, in order
    (None without inputs)."""
    flatbuffer = bytes(flatbuffer)
    with tempfile.TemporaryDirectory(prefix="micro_run_") as folder:
        model_path = os.path.join(folder, "model.tflite")
        with open(model_path, "wb") as f:
            f.write(flatbuffer)
        inputs_path = outputs_path = None
        if inputs is not None:
            arrays = [np.asarray(array, np.float32) for array in inputs]
            if not arrays or any(array.ndim < 1 or len(array) != len(arrays[0]) for array in arrays):
                raise ValueError("inputs must be one non-empty [N, ...] array per model input, all of the same N")
            inputs_path = os.path.join(folder, "inputs.npz")
            outputs_path = os.path.join(folder, "outputs.npz")
            np.savez(inputs_path, **{f"input_{i}": array for i, array in enumerate(arrays)})
        arena_bytes = _run_growing(model_path, arena_size, len(flatbuffer), inputs_path, outputs_path, timeout)
        outputs = None
        if inputs is not None:
            with np.load(outputs_path) as archive:
                outputs = [archive[f"output_{i}"] for i in range(len(archive.files))]
    return outputs, arena_bytes


def _run_growing(model_path, arena_size, model_bytes, inputs_path, outputs_path, timeout):
    """The worker under `arena_size`, or under a generous arena grown 4x
    while TFLM reports running out of it; returns the arena total."""
    if arena_size is not None:
        return _run_worker(model_path, arena_size, inputs_path, outputs_path, timeout)
    arena_size = max(_FIRST_ARENA_BYTES, 4 * model_bytes)
    while True:
        try:
            return _run_worker(model_path, arena_size, inputs_path, outputs_path, timeout)
        except MicroRuntimeError as error:
            if not error.arena_shortfall or arena_size * 4 > _MAX_ARENA_BYTES:
                raise
            arena_size *= 4


def measure_arena(flatbuffer, timeout=600):
    """Bytes of tensor arena TFLite Micro needs for `flatbuffer` (measured).

    TFLM plans and allocates all tensors when the interpreter is built, so
    this only allocates (no inference) under a generous arena and reads the
    "Arena allocation total" of `print_allocations()`.
    """
    return run_micro(flatbuffer, None, timeout=timeout)[1]
