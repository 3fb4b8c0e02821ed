"""The implementations compared: how to build each one and in which process.

* `keras_mobilevitv2`: this package (Keras 3), converted with its own
  `quantization.export.convert`;
* `timm`: the PyTorch reference, `timm.create_model("mobilevitv2_XXX")`;
* `kimm`: Keras 3 MobileViTv2 of kimm (`kimm.models.MobileViTV2WXXX`);
* `kecam`: keras-cv-attention-models (`mobilevit.MobileViT_V2_XXX`), written
  for tf.keras / Keras 2. Measured twice: in a Keras 3 process (the setting
  of this package's users) and in a tf_keras process (TF_USE_LEGACY_KERAS=1);
* `keras.applications` MobileNetV2 and MobileNetV3Large (alpha 1.0) at their
  usual 224x224, as the mobile CNN baselines.

Every model is built with random weights (no download) and then given
well-scaled random values (`random_weights.py`). Models whose framework must
not share a process with Keras 3 (PyTorch, tf_keras) run in a worker process.
"""

import dataclasses

WIDTH_SUFFIXES = {0.5: "050", 0.75: "075", 1.0: "100", 1.25: "125", 1.5: "150", 1.75: "175", 2.0: "200"}


def width_suffix(width):
    if width not in WIDTH_SUFFIXES:
        raise ValueError(f"No published MobileViTv2 of width {width}; widths: {sorted(WIDTH_SUFFIXES)}")
    return WIDTH_SUFFIXES[width]


@dataclasses.dataclass(frozen=True)
class Implementation:
    key: str
    label: str
    framework: str  # "keras3", "tf_keras" or "torch"
    build: object  # build(width, image_size) -> model (random weights)
    input_range: tuple  # (low, high) of the pixels the model expects
    fixed_width: float = None  # the MobileNets exist at one width here
    reference_size: bool = False  # use Settings.reference_image_size (224)
    isolated: bool = False  # run in its own worker process
    ours: bool = False

    @property
    def runtimes(self):
        if self.framework == "torch":
            return ("torch",)
        tflite = ("tflite_float", "tflite_int8") + (("tflite_int8_qat",) if self.ours else ())
        return ("eager", "graph", "xla") + tflite

    def widths(self, settings):
        return (self.fixed_width,) if self.fixed_width is not None else tuple(settings.widths)

    def image_size(self, settings):
        return settings.reference_image_size if self.reference_size else settings.image_size


def _build_ours(width, image_size):
    import keras_mobilevitv2

    variant = getattr(keras_mobilevitv2, f"MobileViTv2_{width_suffix(width)}")
    return variant(weights=None, input_shape=(image_size, image_size, 3))


def _build_timm(width, image_size):
    import timm

    # timm models take any input size; image_size only sets the test tensor.
    return timm.create_model(f"mobilevitv2_{width_suffix(width)}", pretrained=False)


def _build_kimm(width, image_size):
    import kimm

    builder = getattr(kimm.models, f"MobileViTV2W{width_suffix(width)}")
    return builder(weights=None, input_shape=(image_size, image_size, 3))


def _build_kecam(width, image_size):
    from keras_cv_attention_models import mobilevit

    builder = getattr(mobilevit, f"MobileViT_V2_{width_suffix(width)}")
    return builder(pretrained=None, input_shape=(image_size, image_size, 3))


def _build_kecam_in_keras3(width, image_size):
    # Resolve tf.keras to Keras 3 before kecam loads, as in any process that
    # already uses Keras 3 (kecam would otherwise switch the process to
    # tf_keras through TF_USE_LEGACY_KERAS).
    import tensorflow as tf

    tf.keras.layers  # noqa: B018  (attribute access resolves the lazy module)
    return _build_kecam(width, image_size)


def _build_mobilenet_v2(width, image_size):
    import keras

    return keras.applications.MobileNetV2(alpha=width, weights=None, input_shape=(image_size, image_size, 3))


def _build_mobilenet_v3_large(width, image_size):
    import keras

    return keras.applications.MobileNetV3Large(alpha=width, weights=None, input_shape=(image_size, image_size, 3))


IMPLEMENTATIONS = (
    Implementation(
        "keras_mobilevitv2", "keras_mobilevitv2 (this package)", "keras3", _build_ours, (0.0, 255.0), ours=True
    ),
    Implementation("timm", "timm (PyTorch)", "torch", _build_timm, (-2.0, 2.0), isolated=True),
    Implementation("kimm", "kimm 0.2 (Keras 3)", "keras3", _build_kimm, (0.0, 255.0)),
    Implementation("kecam_keras3", "kecam (Keras 3)", "keras3", _build_kecam_in_keras3, (0.0, 1.0), isolated=True),
    Implementation("kecam", "kecam (tf_keras 2)", "tf_keras", _build_kecam, (0.0, 1.0), isolated=True),
    Implementation(
        "mobilenet_v2",
        "keras.applications MobileNetV2",
        "keras3",
        _build_mobilenet_v2,
        (-1.0, 1.0),
        fixed_width=1.0,
        reference_size=True,
    ),
    Implementation(
        "mobilenet_v3_large",
        "keras.applications MobileNetV3Large",
        "keras3",
        _build_mobilenet_v3_large,
        (0.0, 255.0),
        fixed_width=1.0,
        reference_size=True,
    ),
)
BY_KEY = {implementation.key: implementation for implementation in IMPLEMENTATIONS}


def selected(settings):
    """The implementations of this run, in table order."""
    keys = settings.implementations or tuple(BY_KEY)
    unknown = [key for key in keys if key not in BY_KEY]
    if unknown:
        raise ValueError(f"Unknown implementations {unknown}; choose from {list(BY_KEY)}")
    return [BY_KEY[key] for key in keys]


def library_versions():
    """Versions of what was measured (None when not installed)."""
    from importlib import metadata

    versions = {}
    for package in (
        "tensorflow",
        "keras",
        "tf_keras",
        "torch",
        "timm",
        "kimm",
        "keras-cv-attention-models",
        "ai-edge-litert",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions
