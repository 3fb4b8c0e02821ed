"""Reading PyTorch checkpoints into numpy, safely (no arbitrary pickle)."""

import json
import os
import struct

import numpy as np

# dtype names of the safetensors format -> numpy dtypes.
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}

# Containers that training scripts wrap a state_dict in.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def read_safetensors(path):
    """Reads a `.safetensors` file into {name: np.ndarray}, no torch needed.

    The format is an 8-byte little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets}}, then the raw tensor bytes. Every
    header entry is checked against the bytes, so a damaged or truncated file
    raises `ValueError` naming the tensor instead of loading wrong values.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path} is not a safetensors file (too short).")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > len(raw) - 8:
        raise ValueError(
            f"{path} is not a safetensors file or is truncated: its header "
            f"claims {header_len} bytes but only {len(raw) - 8} follow."
        )
    try:
        header = json.loads(raw[8 : 8 + header_len])
    except ValueError as error:
        raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({error}).") from None
    if not isinstance(header, dict):
        raise ValueError(
            f"{path} is not a safetensors file: its header is a JSON "
            f"{type(header).__name__}, not an object of tensor entries."
        )
    data = memoryview(raw)[8 + header_len :]
    return {name: _read_tensor(name, info, data, path) for name, info in header.items() if name != "__metadata__"}


def _numpy_dtype(name, dtype_name, path):
    if dtype_name == "BF16":
        import ml_dtypes  # A dependency of TensorFlow.

        return ml_dtypes.bfloat16
    if isinstance(dtype_name, str) and dtype_name in _SAFETENSORS_DTYPES:
        return _SAFETENSORS_DTYPES[dtype_name]
    raise ValueError(
        f"Tensor {name!r} in {path} has dtype {dtype_name!r}, which is "
        f"not supported; supported: {sorted(_SAFETENSORS_DTYPES)} and BF16."
    )


def _is_count(value):
    # bool is an int to Python, but never a valid size or offset.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked_entry(name, info, path):
    """(dtype name, shape, start, end) of a header entry, or ValueError."""
    if not isinstance(info, dict):
        raise ValueError(f"Tensor {name!r} in {path}: its header entry is {type(info).__name__}, not an object.")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info]
    if missing:
        raise ValueError(
            f"Tensor {name!r} in {path}: header entry lacks {missing}; "
            "a safetensors entry needs 'dtype', 'shape' and 'data_offsets'."
        )
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise ValueError(f"Tensor {name!r} in {path}: shape {shape!r} is not a list of non-negative integers.")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_count(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise ValueError(
            f"Tensor {name!r} in {path}: data_offsets {offsets!r} is not [start, end] with 0 <= start <= end."
        )
    return info["dtype"], tuple(shape), offsets[0], offsets[1]


def _read_tensor(name, info, data, path):
    dtype_name, shape, start, end = _checked_entry(name, info, path)
    dtype = np.dtype(_numpy_dtype(name, dtype_name, path))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - start != expected:
        raise ValueError(
            f"Tensor {name!r} in {path}: data_offsets [{start}, {end}] hold "
            f"{end - start} bytes, but dtype {dtype_name} and shape "
            f"{list(shape)} need {expected}."
        )
    if end > len(data):
        raise ValueError(
            f"Tensor {name!r} in {path} ends at byte {end} of the data, but "
            f"the file holds only {len(data)} data bytes: it is truncated."
        )
    array = np.frombuffer(data[start:end], dtype=dtype).reshape(shape)
    return array.astype(np.float32) if dtype_name == "BF16" else array.copy()


def _read_torch(path):
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"Reading the PyTorch checkpoint {path} needs PyTorch, which is "
            "not installed. Install it (`pip install keras_mobilevitv2[convert]`), "
            "or use the `.safetensors` form of the checkpoint, which needs no "
            "PyTorch."
        ) from None
    try:
        # weights_only=True refuses arbitrary pickled objects: a checkpoint
        # can then hold tensors and plain containers only.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"Could not read {path} as a PyTorch checkpoint with torch.load(weights_only=True): {error}"
        ) from None
    return checkpoint


def to_numpy(value):
    """A torch tensor or array-like as a numpy array (bfloat16 -> float32)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def unwrap_state_dict(checkpoint, source="checkpoint"):
    """Finds the {name: tensor} mapping inside a loaded checkpoint object."""
    for _ in range(3):
        if not isinstance(checkpoint, dict):
            break
        wrapped = [k for k in _WRAPPER_KEYS if isinstance(checkpoint.get(k), dict)]
        if not wrapped:
            break
        checkpoint = checkpoint[wrapped[0]]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ValueError(
            f"{source} does not hold a state_dict (a mapping of tensor names "
            f"to tensors); found {type(checkpoint).__name__}."
        )
    state = {}
    for name, value in checkpoint.items():
        if not isinstance(name, str):
            raise ValueError(f"{source}: tensor names must be strings, got {name!r}.")
        state[name] = to_numpy(value)
    return state


def read_checkpoint(path):
    """Reads `.safetensors`, `.pt`, `.pth` or `.bin` into {name: np.ndarray}."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    if path.lower().endswith(".safetensors"):
        return read_safetensors(path)
    if path.lower().endswith((".pt", ".pth", ".bin")):
        return unwrap_state_dict(_read_torch(path), source=path)
    raise ValueError(f"Unrecognised checkpoint file {path}: expected .safetensors, .pt, .pth or .bin.")
