"""Every layer inside a model, found through public Python attributes.

Keras' own walk (`Layer._flatten_layers`) is private and may change without
notice; a layer keeps its sublayers as attributes (alone, or in lists, tuples
and dicts), and that is what `nested_layers` follows.
"""


def _is_layer(value):
    # By class name, so that tf_keras layers (benchmarks' competitor models)
    # count too without importing tf_keras.
    return any(
        cls.__name__ == "Layer" and cls.__module__.split(".")[0] in ("keras", "tf_keras") for cls in type(value).__mro__
    )


def nested_layers(layer, include_self=True):
    """`layer` and every layer nested in it at any depth, each once, outer
    layers before the layers they hold (Keras 3 or tf_keras)."""
    found, seen = [], set()

    def visit(value):
        if isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif _is_layer(value) and id(value) not in seen:
            seen.add(id(value))
            found.append(value)
            for attribute in vars(value).values():
                visit(attribute)

    visit(layer)
    return found if include_self else found[1:]
