"""Widen the int8 range of a norm's mean where XNNPACK would refuse its SUB.

XNNPACK runs an int8 SUB only while each input's scale is at least 2^-10 of
the output's. In a post-training int8 model the converter sets each norm's
mean range from the calibration images; where the norm's input has (almost)
zero mean, the mean gets a scale far below that, and the whole SUB runs on
TFLite's reference kernel instead: one such SUB (1x256x4x128) took 1.2 of
9.5 ms of MobileViTv2-1.0 int8 at 256x256, batch 1 (benchmarks.op_profile).

The QAT graph keeps the mean's range wide enough while it trains
(`quantization.layers.QuantizedNormalize`); this pass does the same to a
converted model. A MEAN output that only SUBs read, with a scale under
XNNPACK's limit, gets 2^-9 of their output's scale (the QAT floor,
`quantization.layers.MEAN_RANGE_FLOOR`), zero point kept. The range only
grows around the same zero, so nothing representable is clipped, and the
mean's step stays 1/512 of the output's, so the SUB's result moves by at
most one int8 step. MEAN requantizes to whatever output scale the file
gives it, so the graph stays consistent. Decided on the
`quantization.tflite_graph` records; the rewrite goes through the schema's
object API.
"""

import numpy as np

from quantization.layers import MEAN_RANGE_FLOOR
from quantization.tflite_graph import load_object_model
from quantization.tflite_graph import pack_object_model
from quantization.tflite_graph import read_graph

__all__ = ["widen_narrow_means"]

# XNNPACK's limit on an int8 SUB: each input scale at least this fraction
# of the output's. A mean under it is widened to MEAN_RANGE_FLOOR (a ratio of
# ranges, and so of scales: both span 255 steps), the QAT graph's floor.
XNNPACK_SUB_SCALE_RATIO = 2.0**-10


def _per_tensor_int8(tensor):
    quantization = tensor.quantization
    return tensor.dtype == "INT8" and quantization is not None and not quantization.per_channel


def _narrow_means(graph):
    """{tensor index: its new scale} for the MEAN outputs, read only by SUBs,
    that XNNPACK's SUB would refuse."""
    producers = {index: operator for operator in graph.operators for index in operator.outputs}
    operators, boundary = graph.operators, set(graph.inputs) | set(graph.outputs)
    needed = {}
    for index, readers in graph.consumers().items():
        tensor, producer = graph.tensors[index], producers.get(index)
        if producer is None or producer.name != "MEAN" or index in boundary or not _per_tensor_int8(tensor):
            continue
        subs = [operators[reader] for reader in readers]
        outputs = [graph.tensors[sub.outputs[0]] for sub in subs]
        if any(sub.name != "SUB" for sub in subs) or not all(_per_tensor_int8(out) for out in outputs):
            continue
        output_scale = max(float(out.quantization.scale[0]) for out in outputs)
        if float(tensor.quantization.scale[0]) < output_scale * XNNPACK_SUB_SCALE_RATIO:
            needed[index] = output_scale * MEAN_RANGE_FLOOR
    return needed


def widen_narrow_means(flatbuffer):
    """Returns `(flatbuffer, widened_count)`: every int8 MEAN output that only
    SUBs read, with a scale under 2^-10 of their output's, widened to 2^-9
    (see the module docstring). The model is returned unchanged when there
    is none, or when it is stored with external buffers (over 2 GB)."""
    # Decided on the records first: most models need nothing, and unpacking
    # the object tree copies every weight.
    subgraphs = read_graph(flatbuffer).subgraph_count
    narrow = [_narrow_means(read_graph(flatbuffer, index)) for index in range(subgraphs)]
    if not any(narrow):
        return flatbuffer, 0
    model = load_object_model(flatbuffer)
    if any(getattr(buffer, "offset", 0) for buffer in model.buffers):
        return flatbuffer, 0
    for subgraph, scales in zip(model.subgraphs, narrow):
        for index, scale in scales.items():
            subgraph.tensors[index].quantization.scale = np.asarray([scale], np.float32)
    return pack_object_model(model, len(flatbuffer) + 1024), sum(map(len, narrow))
