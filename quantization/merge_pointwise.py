"""Merge consecutive linear 1x1 convolutions of a float TFLite model.

In MobileViTv2 the projection that ends a block (1x1 conv + BatchNorm, no
activation) is followed directly by the next block's 1x1 expansion: where
the first result feeds nothing else, `W2 (W1 x + b1) + b2` is one 1x1
convolution `(W2 W1) x + (W2 b1 + b2)`. This happens three times per model
(stage 1 -> 2, and after the first two MobileViTv2 blocks), and the
intermediate tensors are the largest of their stages: merging them made
MobileViTv2-1.0 float TFLite at batch 16 about 15% faster (interleaved timing,
see README "Benchmarks").

The merge crosses Keras layer boundaries (the block and the next stage are
separate layers, and a user's model may read the block's output), so it is
done on the converted graph, where every consumer of a tensor is known. It
is exact algebra done in float64; the result differs from the unmerged model
by float32 rounding only. Only float32 weights are merged: in an int8 model
the intermediate has its own quantization, and float16 weights go through
DEQUANTIZE ops.
"""

import flatbuffers
import numpy as np
from tensorflow.lite.python import schema_py_generated as schema

_CONV_2D = schema.BuiltinOperator.CONV_2D
_FLOAT32 = schema.TensorType.FLOAT32
_NO_ACTIVATION = schema.ActivationFunctionType.NONE


def _builtin_code(model, operator):
    code = model.operatorCodes[operator.opcodeIndex]
    # Codes above 127 live only in `builtinCode`; older files only fill the
    # deprecated field.
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def _constant(model, subgraph, tensor_index):
    """The float32 constant behind `tensor_index`, or None."""
    if tensor_index < 0:
        return None
    tensor = subgraph.tensors[tensor_index]
    buffer = model.buffers[tensor.buffer]
    if tensor.type != _FLOAT32 or _is_quantized(tensor):
        return None
    if buffer.data is None or len(buffer.data) == 0:
        return None
    return np.frombuffer(bytes(buffer.data), np.float32).reshape(tensor.shape)


def _is_quantized(tensor):
    q = tensor.quantization
    return q is not None and q.scale is not None and len(q.scale) > 0


def _pointwise(model, subgraph, operator):
    """(kernel [Cout, Cin], bias [Cout]) of a float 1x1 stride-1 CONV_2D, else None."""
    if _builtin_code(model, operator) != _CONV_2D or len(operator.inputs) < 3:
        return None
    options = operator.builtinOptions
    if options.strideH != 1 or options.strideW != 1:
        return None
    kernel = _constant(model, subgraph, operator.inputs[1])
    bias = _constant(model, subgraph, operator.inputs[2])
    if kernel is None or bias is None or kernel.shape[1:3] != (1, 1):
        return None
    if any(subgraph.tensors[t].type != _FLOAT32 for t in (operator.inputs[0], operator.outputs[0])):
        return None
    return kernel[:, 0, 0, :].astype(np.float64), bias.astype(np.float64)


def _add_constant(model, subgraph, value, name):
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(value.astype(np.float32).tobytes(), np.uint8)
    model.buffers.append(buffer)
    tensor = schema.TensorT()
    tensor.shape = np.array(value.shape, np.int32)
    tensor.type = _FLOAT32
    tensor.buffer = len(model.buffers) - 1
    tensor.name = name
    subgraph.tensors.append(tensor)
    return len(subgraph.tensors) - 1


def _merge_in_subgraph(model, subgraph):
    consumers = {}
    for index, operator in enumerate(subgraph.operators):
        for tensor in operator.inputs:
            consumers.setdefault(int(tensor), []).append(index)
    graph_outputs = {int(t) for t in subgraph.outputs}

    # Operators are stored in execution order: when a pair merges, the readers
    # of every tensor still to be checked are already counted.
    removed = set()
    for index, first in enumerate(subgraph.operators):
        first_weights = _pointwise(model, subgraph, first)
        if first_weights is None or first.builtinOptions.fusedActivationFunction != _NO_ACTIVATION:
            continue
        middle = int(first.outputs[0])
        readers = consumers.get(middle, [])
        if middle in graph_outputs or len(readers) != 1:
            continue
        second = subgraph.operators[readers[0]]
        second_weights = _pointwise(model, subgraph, second)
        if second_weights is None or second.inputs[0] != middle:
            continue
        (w1, b1), (w2, b2) = first_weights, second_weights  # w1 [C1, C0], w2 [C2, C1]
        c1, c0 = w1.shape
        c2 = w2.shape[0]
        if c0 * c2 > c1 * (c0 + c2):  # a bottleneck: merged would cost more MACs
            continue
        name = subgraph.tensors[int(second.inputs[1])].name
        name = name.decode() if isinstance(name, bytes) else str(name)
        kernel = _add_constant(model, subgraph, (w2 @ w1)[:, None, None, :], f"{name}/merged_kernel")
        bias = _add_constant(model, subgraph, w2 @ b1 + b2, f"{name}/merged_bias")
        inputs = np.array(second.inputs, np.int32)  # the object API may hand a read-only view
        inputs[:3] = (first.inputs[0], kernel, bias)
        second.inputs = inputs
        removed.add(index)

    subgraph.operators = [op for i, op in enumerate(subgraph.operators) if i not in removed]
    return len(removed)


def _drop_unused_buffers(model):
    """Empties buffers that only unreferenced tensors point to (the old
    kernels and biases), so the merged model is not larger than the input."""
    used = set()
    for subgraph in model.subgraphs:
        referenced = {int(t) for op in subgraph.operators for t in op.inputs if t >= 0}
        referenced |= {int(t) for op in subgraph.operators for t in op.outputs}
        referenced |= {int(t) for t in subgraph.inputs} | {int(t) for t in subgraph.outputs}
        for index, tensor in enumerate(subgraph.tensors):
            if index in referenced:
                used.add(tensor.buffer)
    used |= {int(entry.buffer) for entry in model.metadata or []}
    used |= {int(index) for index in (model.metadataBuffer if model.metadataBuffer is not None else [])}
    for index, buffer in enumerate(model.buffers):
        if index not in used and buffer.data is not None and len(buffer.data) > 0:
            buffer.data = None


def merge_linear_pointwise_pairs(flatbuffer):
    """Returns `(flatbuffer, merged_count)`: every float 1x1 stride-1
    CONV_2D without activation whose output feeds only another such
    convolution (any activation) is merged into it.

    A model stored with external buffers (over 2 GB, `offset` set) is
    returned unchanged.
    """
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    if any(getattr(buffer, "offset", 0) for buffer in model.buffers):
        return flatbuffer, 0
    merged = sum(_merge_in_subgraph(model, subgraph) for subgraph in model.subgraphs)
    if not merged:
        return flatbuffer, 0
    _drop_unused_buffers(model)
    builder = flatbuffers.Builder(len(flatbuffer) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), merged
