"""The one reader of TFLite flatbuffers in this project.

Every tool that looks inside a converted model (the audit, the Android GPU,
TFLite Micro and Edge TPU checks, the pointwise merge) reads it here, with
TFLite's own schema and without an interpreter: `read_graph(flatbuffer)`
parses one subgraph once into immutable records,

    Graph     tensors, operators (in execution order), inputs, outputs
              (tensor indices), subgraph (which one), subgraph_count;
    Tensor    index, name, dtype ("INT8"), shape, shape_signature,
              quantization (a `Quantization` or None), data (the constant,
              a read-only numpy array, or None), buffer_size;
    Operator  index, name ("CONV_2D", "CUSTOM:<code>"), version, options
              (the builtin options as {snake_case field: value}), inputs and
              outputs (tensor indices, -1 for an omitted optional input).

Option values are the schema's: enums stay integers
(`schema.ActivationFunctionType.RELU`), vectors become tuples. A tool that
needs another view (a report's dicts, a target's rules) builds it from these
records instead of reading the flatbuffer again; one that rewrites a model
(`merge_pointwise`) reads through here and writes with the schema's object API.
"""

import dataclasses
import functools
import types

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema

TENSOR_TYPE_NAMES = {value: name for name, value in vars(schema.TensorType).items() if not name.startswith("_")}
FLOAT_TYPES = ("FLOAT32", "FLOAT16", "FLOAT64")
_OP_NAMES = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
_OPTIONS_NAMES = {value: name for name, value in vars(schema.BuiltinOptions).items() if not name.startswith("_")}
_OPTIONS2_NAMES = {value: name for name, value in vars(schema.BuiltinOptions2).items() if not name.startswith("_")}
# Little-endian explicitly: the flatbuffer is, whatever the host is.
_NUMPY_TYPES = {
    "FLOAT16": "<f2",
    "FLOAT32": "<f4",
    "FLOAT64": "<f8",
    "INT8": "i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "BOOL": "?",
    "COMPLEX64": "<c8",
    "COMPLEX128": "<c16",
}
_IDENTIFIER_ERROR = "not a TFLite flatbuffer (the 'TFL3' identifier is missing)"


def _read_only(array):
    array.flags.writeable = False
    return array


@dataclasses.dataclass(frozen=True, eq=False)
class Quantization:
    """Affine quantization: real = scale * (q - zero_point), per tensor (one
    scale) or per channel along `quantized_dimension`. `zero_point` has one
    entry per scale (zeros where the file omits it)."""

    scale: np.ndarray  # float32, read-only
    zero_point: np.ndarray  # int64, read-only
    quantized_dimension: int

    @property
    def per_channel(self):
        return len(self.scale) > 1


@dataclasses.dataclass(frozen=True, eq=False)
class Tensor:
    index: int
    name: str
    dtype: str  # the schema's TensorType name: "FLOAT32", "INT8", ...
    shape: tuple
    shape_signature: tuple  # -1 for a dynamic dimension; `shape` when the file has none
    quantization: object  # a Quantization, or None when the tensor has no scale
    data: object = dataclasses.field(repr=False)  # the constant as a read-only array of `shape`, or None
    buffer_size: int  # bytes of constant data (0: computed at run time)

    @property
    def rank(self):
        return len(self.shape)

    @property
    def is_constant(self):
        """Whether the file holds the tensor's values (a weight, a shape, axes).
        True also where `data` is None because numpy has no such type (INT4,
        STRING)."""
        return self.buffer_size > 0


@dataclasses.dataclass(frozen=True, eq=False)
class Operator:
    index: int  # position in execution order
    name: str  # "CONV_2D", or "CUSTOM:<custom code>"
    version: int
    options_type: object  # the schema's options table name ("Conv2DOptions"), or None
    options: types.MappingProxyType  # read-only {snake_case field: value}; empty without options
    inputs: tuple  # tensor indices; -1 marks an omitted optional input
    outputs: tuple

    def option(self, field, default=None):
        return self.options.get(field, default)

    @property
    def present_inputs(self):
        """`inputs` without the omitted optional ones."""
        return tuple(index for index in self.inputs if index >= 0)


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    tensors: tuple  # Tensor records, by index
    operators: tuple  # Operator records, in execution order
    inputs: tuple  # tensor indices of the graph's inputs
    outputs: tuple
    subgraph: int  # which subgraph these records describe
    subgraph_count: int

    def tensor(self, index):
        """The Tensor at `index`, or None for -1 (an omitted optional input)."""
        return self.tensors[index] if index >= 0 else None

    def input_tensors(self, operator):
        """`operator`'s inputs as Tensor records (None where omitted)."""
        return tuple(self.tensor(index) for index in operator.inputs)

    def output_tensors(self, operator):
        return tuple(self.tensors[index] for index in operator.outputs)

    def consumers(self):
        """{tensor index: the indices of the operators that read it, one entry
        per input slot (an operator reading a tensor twice is listed twice)}."""
        readers = {}
        for operator in self.operators:
            for index in operator.present_inputs:
                readers.setdefault(index, []).append(operator.index)
        return {index: tuple(ops) for index, ops in readers.items()}


def op_name(builtin_code, custom_code=None):
    """The project's name of an operator code: the schema's BuiltinOperator
    name, `CUSTOM:<custom code>` for custom ops, `BUILTIN_<n>` when the
    schema is older than the model."""
    if builtin_code == schema.BuiltinOperator.CUSTOM:
        code = custom_code.decode() if isinstance(custom_code, bytes) else custom_code
        return f"CUSTOM:{code}"
    return _OP_NAMES.get(builtin_code, f"BUILTIN_{builtin_code}")


def operator_codes(model):
    """[(op name, version)] per operator code of a parsed `schema.Model`."""
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        # Codes above 127 live only in BuiltinCode; older files fill only the
        # deprecated field.
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        codes.append((op_name(builtin, code.CustomCode()), code.Version()))
    return codes


def _snake(name):
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def _plain(value):
    if isinstance(value, np.ndarray):
        return tuple(value.tolist())
    if isinstance(value, list):
        return tuple(value)
    return value


def _options(operator):
    """(options table name, read-only {snake_case field: value}); the
    second union holds the options of the StableHLO ops."""
    for type_of, table_of, names, create in (
        (operator.BuiltinOptionsType, operator.BuiltinOptions, _OPTIONS_NAMES, schema.BuiltinOptionsCreator),
        (operator.BuiltinOptions2Type, operator.BuiltinOptions2, _OPTIONS2_NAMES, schema.BuiltinOptions2Creator),
    ):
        options_type = type_of()
        table = table_of()
        if options_type and table is not None:
            parsed = create(options_type, table)
            fields = {_snake(key): _plain(value) for key, value in vars(parsed).items()} if parsed else {}
            return names.get(options_type), types.MappingProxyType(fields)
    return None, types.MappingProxyType({})


def _buffer(flatbuffer, model, buffer_index):
    """(the buffer's bytes as a read-only uint8 array or None, its size).
    Models over 2 GB keep the data after the flatbuffer (offset/size); its
    size counts even when those bytes were not passed in."""
    if buffer_index >= model.BuffersLength():
        return None, 0
    buffer = model.Buffers(buffer_index)
    if buffer.DataLength() > 0:
        return buffer.DataAsNumpy(), buffer.DataLength()  # a view of `flatbuffer`: read-only, no copy
    if buffer.Offset() > 1:
        inside = buffer.Offset() + buffer.Size() <= len(flatbuffer)
        return (np.frombuffer(flatbuffer, np.uint8, buffer.Size(), buffer.Offset()) if inside else None), buffer.Size()
    return None, 0


def _quantization(tensor):
    params = tensor.Quantization()
    if params is None or not params.ScaleLength():
        return None
    scale = params.ScaleAsNumpy().astype(np.float32)
    if params.ZeroPointLength():
        zero_point = params.ZeroPointAsNumpy().astype(np.int64)
    else:
        zero_point = np.zeros(len(scale), np.int64)
    return Quantization(_read_only(scale), _read_only(zero_point), int(params.QuantizedDimension()))


def _tensor(flatbuffer, model, graph, index):
    tensor = graph.Tensors(index)
    dtype = TENSOR_TYPE_NAMES.get(tensor.Type(), str(tensor.Type()))
    shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
    signature = tuple(int(d) for d in tensor.ShapeSignatureAsNumpy()) if tensor.ShapeSignatureLength() else shape
    raw, size = _buffer(flatbuffer, model, tensor.Buffer())
    data = None
    if raw is not None and dtype in _NUMPY_TYPES:
        numpy_type = np.dtype(_NUMPY_TYPES[dtype])
        if raw.size == int(np.prod(shape, dtype=np.int64)) * numpy_type.itemsize:
            data = _read_only(raw.view(numpy_type).reshape(shape))
    return Tensor(
        index=index,
        name=(tensor.Name() or b"").decode(),
        dtype=dtype,
        shape=shape,
        shape_signature=signature,
        quantization=_quantization(tensor),
        data=data,
        buffer_size=int(size),
    )


def _operator(codes, graph, index):
    operator = graph.Operators(index)
    name, version = codes[operator.OpcodeIndex()]
    options_type, options = _options(operator)
    return Operator(
        index=index,
        name=name,
        version=int(version),
        options_type=options_type,
        options=options,
        inputs=tuple(int(t) for t in operator.InputsAsNumpy()) if operator.InputsLength() else (),
        outputs=tuple(int(t) for t in operator.OutputsAsNumpy()) if operator.OutputsLength() else (),
    )


@functools.lru_cache(maxsize=4)
def _read(flatbuffer, subgraph):
    if len(flatbuffer) < 8 or not schema.Model.ModelBufferHasIdentifier(flatbuffer, 0):
        raise ValueError(_IDENTIFIER_ERROR)
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    if not 0 <= subgraph < model.SubgraphsLength():
        raise ValueError(f"the model has {model.SubgraphsLength()} subgraph(s); there is no subgraph {subgraph}")
    codes = operator_codes(model)
    graph = model.Subgraphs(subgraph)
    return Graph(
        tensors=tuple(_tensor(flatbuffer, model, graph, i) for i in range(graph.TensorsLength())),
        operators=tuple(_operator(codes, graph, i) for i in range(graph.OperatorsLength())),
        inputs=tuple(int(t) for t in graph.InputsAsNumpy()) if graph.InputsLength() else (),
        outputs=tuple(int(t) for t in graph.OutputsAsNumpy()) if graph.OutputsLength() else (),
        subgraph=subgraph,
        subgraph_count=model.SubgraphsLength(),
    )


def read_graph(flatbuffer, subgraph=0):
    """The `Graph` of one subgraph (the main one by default) of a .tflite
    model (bytes-like). Parsed once per model: the checks of one export all
    read the same flatbuffer, and the records cannot change under them.

    Raises ValueError when `flatbuffer` is not a TFLite model.
    """
    return _read(bytes(flatbuffer), int(subgraph))


def load_object_model(flatbuffer):
    """The model as the schema's object API tree (a mutable `ModelT`), for the
    passes that rewrite a converted model; `pack_object_model` writes it back."""
    return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytes(flatbuffer), 0))


def pack_object_model(model, size_hint=1024):
    """The .tflite bytes of a schema `ModelT`; `size_hint`: the builder's
    starting size (the original model's length saves regrowing)."""
    import flatbuffers

    builder = flatbuffers.Builder(size_hint)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


# TFLite's detection post-processing (decoding + NMS), a custom op every
# runtime registers (TFLite, TFLite Micro, the Task library, pycoral).
DETECTION_POSTPROCESS = "CUSTOM:TFLite_Detection_PostProcess"


def postprocessing_ops(graph):
    """Indices of the detection post-processing at the end of a graph: the
    op, the DEQUANTIZE ops that only feed it, and the score conversion
    (SOFTMAX or LOGISTIC) that only feeds those. Runtimes run these on the
    CPU by design; empty for a model without the op."""
    readers = graph.consumers()
    producers = {index: op for op in graph.operators for index in op.outputs}
    tail = set()

    def only_feeds_tail(operator):
        return all(set(readers.get(index, ())) <= tail for index in operator.outputs)

    for operator in graph.operators:
        if operator.name != DETECTION_POSTPROCESS:
            continue
        tail.add(operator.index)
        frontier = [producers[i] for i in operator.present_inputs if i in producers]
        while frontier:
            producer = frontier.pop()
            if producer.name in ("DEQUANTIZE", "SOFTMAX", "LOGISTIC") and only_feeds_tail(producer):
                tail.add(producer.index)
                if producer.name == "DEQUANTIZE":
                    frontier += [producers[i] for i in producer.present_inputs if i in producers]
    return tail
