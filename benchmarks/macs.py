"""Multiply-accumulates counted from a model's TensorFlow graph.

The model is traced once at batch 1 (`tf.function` -> concrete function) and
every op of the graph is read with its static shapes. Counted as MACs, the
convention of papers and of timm's GMACs figures (one MAC = one multiply and
one add):

* Conv2D: output elements x kernel height x width x input channels;
* DepthwiseConv2dNative: output elements x kernel height x width;
* MatMul / BatchMatMul: output elements x contracted dimension;
* Einsum: output elements x the product of the contracted index sizes.

Elementwise multiplies (`Mul`: SiLU's x*sigmoid(x), the norms, the
attention's key*score and value*context, and the BatchNorm scales that
inference folds into the kernels per call) are counted apart, one per output
element; additions, activations, softmax, means and resizes are not counted.

`count_torch_macs` cross-checks with PyTorch's own counter
(`torch.utils.flop_counter.FlopCounterMode`, FLOPs / 2) on the timm model.
"""

import numpy as np

MAC_OPS = ("Conv2D", "DepthwiseConv2dNative", "MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum")
# Ops whose body is another function: not followed, so they must not occur.
CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall", "While", "StatelessWhile", "If", "StatelessIf")


def _shape(tensor):
    shape = tensor.shape
    if shape.rank is None or None in shape.as_list():
        raise ValueError(f"{tensor.name} has no static shape ({shape}); trace with a fixed input shape.")
    return shape.as_list()


def _einsum_macs(equation, input_shapes, output_shape):
    inputs, output = equation.replace(" ", "").split("->")
    sizes = {}
    for term, shape in zip(inputs.split(","), input_shapes):
        if "..." in term:
            head, tail = term.split("...")
            labelled = list(zip(head, shape[: len(head)])) + list(zip(tail, shape[len(shape) - len(tail) :]))
        else:
            labelled = list(zip(term, shape))
        for label, size in labelled:
            sizes[label] = max(sizes.get(label, 1), size)
    contracted = set(sizes) - set(output.replace("...", ""))
    return int(np.prod(output_shape)) * int(np.prod([sizes[label] for label in contracted]))


def op_macs(op):
    """MACs of one graph op (0 when it is not a MAC op)."""
    kind = op.type
    if kind not in MAC_OPS:
        return 0
    output = _shape(op.outputs[0])
    if kind == "Conv2D":
        if op.get_attr("data_format") != b"NHWC":
            raise ValueError(f"{op.name}: only NHWC convolutions are counted")
        kh, kw, cin, _ = _shape(op.inputs[1])
        return int(np.prod(output)) * kh * kw * cin
    if kind == "DepthwiseConv2dNative":
        kh, kw, _, _ = _shape(op.inputs[1])
        return int(np.prod(output)) * kh * kw
    if kind == "MatMul":
        a = _shape(op.inputs[0])
        contracted = a[0] if op.get_attr("transpose_a") else a[1]
        return int(np.prod(output)) * contracted
    if kind.startswith("BatchMatMul"):
        a = _shape(op.inputs[0])
        contracted = a[-2] if op.get_attr("adj_x") else a[-1]
        return int(np.prod(output)) * contracted
    equation = op.get_attr("equation").decode()
    return _einsum_macs(equation, [_shape(t) for t in op.inputs], output)


def count_graph_macs(graph):
    """{"macs", "elementwise_multiplies", "by_op": {op type: MACs}} of a tf.Graph."""
    by_op = {}
    multiplies = 0
    for op in graph.get_operations():
        if op.type in CALL_OPS:
            raise ValueError(f"{op.name} ({op.type}) calls a nested function; its MACs would be missed")
        macs = op_macs(op)
        if macs:
            by_op[op.type] = by_op.get(op.type, 0) + macs
        elif op.type == "Mul":
            multiplies += int(np.prod(_shape(op.outputs[0])))
    return {"macs": sum(by_op.values()), "elementwise_multiplies": multiplies, "by_op": by_op}


def count_keras_macs(model, batch_size=1):
    """MACs of one forward pass of a Keras model (static input shape needed)."""
    import tensorflow as tf

    shape = (batch_size,) + tuple(model.inputs[0].shape[1:])
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(tf.TensorSpec(shape, tf.float32))
    return count_graph_macs(concrete.graph)


def count_torch_macs(model, image_size):
    """MACs of a PyTorch image model at batch 1, from FlopCounterMode (FLOPs / 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() // 2
