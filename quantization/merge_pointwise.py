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
DEQUANTIZE ops. What to merge is decided on the `quantization.tflite_graph`
records; the rewrite goes through the schema's object API.
"""

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema

from quantization.tflite_graph import load_object_model
from quantization.tflite_graph import pack_object_model
from quantization.tflite_graph import read_graph

_NO_ACTIVATION = schema.ActivationFunctionType.NONE


def _float_constant(graph, index, added):
    """The unquantized float32 constant at tensor `index`, or None. `added`
    holds the constants earlier merges created: the records describe the
    model as it was read."""
    if index in added:
        return added[index]
    tensor = graph.tensor(index)
    if tensor is None or tensor.dtype != "FLOAT32" or tensor.quantization is not None or tensor.data is None:
        return None
    return tensor.data


def _pointwise(graph, operator, inputs, added):
    """(kernel [Cout, Cin], bias [Cout]) in float64 of a float 1x1 stride-1
    CONV_2D whose current inputs are `inputs`, else None."""
    if operator.name != "CONV_2D" or len(inputs) < 3:
        return None
    if operator.option("stride_h") != 1 or operator.option("stride_w") != 1:
        return None
    kernel = _float_constant(graph, inputs[1], added)
    bias = _float_constant(graph, inputs[2], added)
    if kernel is None or bias is None or kernel.shape[1:3] != (1, 1):
        return None
    if any(graph.tensors[t].dtype != "FLOAT32" for t in (inputs[0], operator.outputs[0])):
        return None
    return kernel[:, 0, 0, :].astype(np.float64), bias.astype(np.float64)


def _add_constant(model, subgraph, value, name):
    """Appends a float32 constant to the model object; returns its tensor index
    and the value as the merged model stores it (rounded to float32)."""
    stored = value.astype(np.float32)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(stored.tobytes(), np.uint8)
    model.buffers.append(buffer)
    tensor = schema.TensorT()
    tensor.shape = np.array(value.shape, np.int32)
    tensor.type = schema.TensorType.FLOAT32
    tensor.buffer = len(model.buffers) - 1
    tensor.name = name
    subgraph.tensors.append(tensor)
    return len(subgraph.tensors) - 1, stored


def _merge_in_subgraph(model, subgraph, graph):
    """Merges the pairs of one subgraph: decides on `graph` (its records),
    rewrites `subgraph` (its object API twin). Returns the merge count."""
    consumers = graph.consumers()
    graph_outputs = set(graph.outputs)
    inputs = [list(op.inputs) for op in graph.operators]  # as rewired by the merges so far
    added = {}
    # Operators are stored in execution order: when a pair merges, the readers
    # of every tensor still to be checked are already counted, and a merged
    # convolution can merge again with the next one (a chain).
    removed = set()
    for first in graph.operators:
        first_weights = _pointwise(graph, first, inputs[first.index], added)
        if first_weights is None or first.option("fused_activation_function") != _NO_ACTIVATION:
            continue
        middle = first.outputs[0]
        readers = consumers.get(middle, ())
        if middle in graph_outputs or len(readers) != 1:
            continue
        second = graph.operators[readers[0]]
        second_weights = _pointwise(graph, second, inputs[second.index], added)
        if second_weights is None or inputs[second.index][0] != middle:
            continue
        (w1, b1), (w2, b2) = first_weights, second_weights  # w1 [C1, C0], w2 [C2, C1]
        c1, c0 = w1.shape
        c2 = w2.shape[0]
        if c0 * c2 > c1 * (c0 + c2):  # a bottleneck: merged would cost more MACs
            continue
        name = graph.tensors[inputs[second.index][1]].name
        kernel, added_kernel = _add_constant(model, subgraph, (w2 @ w1)[:, None, None, :], f"{name}/merged_kernel")
        bias, added_bias = _add_constant(model, subgraph, w2 @ b1 + b2, f"{name}/merged_bias")
        added[kernel], added[bias] = added_kernel, added_bias
        inputs[second.index][:3] = (inputs[first.index][0], kernel, bias)
        # The object API may hand a read-only view: replace the array.
        subgraph.operators[second.index].inputs = np.array(inputs[second.index], np.int32)
        removed.add(first.index)

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
    model = load_object_model(flatbuffer)
    if any(getattr(buffer, "offset", 0) for buffer in model.buffers):
        return flatbuffer, 0
    merged = sum(
        _merge_in_subgraph(model, subgraph, read_graph(flatbuffer, index))
        for index, subgraph in enumerate(model.subgraphs)
    )
    if not merged:
        return flatbuffer, 0
    _drop_unused_buffers(model)
    return pack_object_model(model, len(flatbuffer) + 1024), merged
