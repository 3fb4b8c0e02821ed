"""Multi-scale feature maps of a MobileViTv2, for dense prediction heads."""

import keras

from keras_mobilevitv2.layers.resize import ResizeLike

__all__ = ["FEATURE_LEVELS", "feature_extractor"]

# Pyramid level (keras-hub's names: P<k> is nominal stride 2**k) -> the layer
# whose output it is, as ml-cvnets' `extract_end_points_all` takes them.
FEATURE_LEVELS = {
    "P1": "stage1_ir1",
    "P2": "stage2_ir2",
    "P3": "stage3_mvit",
    "P4": "stage4_mvit",
    "P5": "stage5_mvit",
}
_LEVEL_OF_STRIDE = {2**k: f"P{k}" for k in range(1, 6)}


def _check_strides(out_strides):
    if isinstance(out_strides, int) or not isinstance(out_strides, (tuple, list)) or not out_strides:
        raise ValueError(
            "`out_strides` must be a non-empty tuple of strides from "
            f"{tuple(_LEVEL_OF_STRIDE)}. Received: out_strides={out_strides!r}"
        )
    unknown = [s for s in out_strides if isinstance(s, bool) or s not in _LEVEL_OF_STRIDE]
    if unknown or len(set(out_strides)) != len(out_strides):
        raise ValueError(
            f"`out_strides` must hold distinct strides from {tuple(_LEVEL_OF_STRIDE)}. "
            f"Received: out_strides={out_strides!r}"
        )
    return tuple(sorted(int(s) for s in out_strides))


def _layer(model, name):
    try:
        return model.get_layer(name)
    except ValueError:
        raise ValueError(
            f"{model.name!r} has no layer {name!r}: `feature_extractor` takes a model built by "
            "keras_mobilevitv2 (`MobileViTv2(...)` or a `MobileViTv2_*` variant, any `include_top`)."
        ) from None


def feature_extractor(model, out_strides=(8, 16, 32), name=None):
    """A Keras model that maps `model`'s input to its multi-scale features.

    Args:
        model: A MobileViTv2 classifier or backbone from this package (any
            width, `include_top`, weights or `output_stride`).
        out_strides: Nominal strides to return, from (2, 4, 8, 16, 32).
        name: The new model's name; defaults to `"<model name>_features"`.

    Returns:
        A functional `keras.Model` whose output is a dict `{"P<k>": map}` with
        one [B, H_k, W_k, C_k] map per stride 2**k, sharing `model`'s layers
        and weights. H_k = ceil(H / 2**k) for every input size >= 32, odd
        sizes included: where a MobileViTv2 block enlarged an odd map to an
        even one (as ml-cvnets and timm do internally), the returned map is
        resized back with the inverse grid mapping (bilinear,
        `align_corners=True`), so levels of one image always nest. With
        `output_stride=16` (or 8) the dilated levels keep stride 16 (or 8):
        P5 then has P4's size.
    """
    strides = _check_strides(out_strides)
    unpadded = {}
    for k in range(3, 6):
        # A stride-1 (dilated) stage starts from the previous block's
        # enlarged map: the size to restore is the previous level's.
        inverted_residual = _layer(model, f"stage{k}_ir")
        block = _layer(model, FEATURE_LEVELS[f"P{k}"])
        reference = block.input if inverted_residual.strides == 2 else unpadded[k - 1]
        unpadded[k] = ResizeLike(align_corners=True, name=f"P{k}_unpad")([block.output, reference])
    outputs = {}
    for stride in strides:
        level = _LEVEL_OF_STRIDE[stride]
        k = int(level[1:])
        outputs[level] = unpadded[k] if k in unpadded else _layer(model, FEATURE_LEVELS[level]).output
    return keras.Model(model.inputs, outputs, name=name or f"{model.name}_features")
