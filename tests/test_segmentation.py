"""Multi-scale features, dilated backbones and DeepLabV3 segmentation."""

import math
import os
import sys

import keras
import numpy as np
import pytest
from checkpoint_names import hf_segmentation_head_to_cvnets  # noqa: E402  (tests/ is on sys.path)
from checkpoint_names import timm_to_cvnets  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)  # benchmarks/ (not installed), after the installed packages
from benchmarks.random_weights import randomize_keras_weights  # noqa: E402
from keras_mobilevitv2 import MobileViTv2
from keras_mobilevitv2 import feature_extractor
from keras_mobilevitv2 import load_pytorch_weights
from keras_mobilevitv2.layers import InvertedResidual
from keras_mobilevitv2.segmentation import DeepLabV3

# ml-cvnets model zoo, DeepLabV3-MobileViTv2 parameters in millions (without
# the auxiliary head): PASCAL VOC (21 classes, output stride 16, rates
# 6/12/18) and ADE20K (150 classes, output stride 8, rates 12/24/36).
PUBLISHED_VOC = {0.5: 6.2, 1.0: 13.3, 1.25: 17.7, 1.5: 22.6}
PUBLISHED_ADE20K = {0.5: 6.3, 0.75: 9.6, 1.0: 13.4, 1.25: 17.7, 1.5: 22.6, 1.75: 28.1, 2.0: 34.0}


def _parameters(model):
    # PyTorch's `parameters()`: BatchNorm running statistics are buffers.
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("size", [(224, 227), (33, 33), (64, 97), (256, 256)], ids=str)
@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_feature_maps_nest_for_every_input_size(size, output_stride):
    backbone = MobileViTv2(0.5, weights=None, include_top=False, input_shape=size + (3,), output_stride=output_stride)
    features = feature_extractor(backbone, out_strides=(2, 4, 8, 16, 32))
    maps = features.predict_on_batch(np.random.RandomState(0).rand(1, *size, 3).astype("float32") * 255)
    assert list(maps) == ["P1", "P2", "P3", "P4", "P5"]
    channels = {"P1": 32, "P2": 64, "P3": 128, "P4": 192, "P5": 256}
    for k in range(1, 6):
        stride = min(2**k, output_stride)
        expected = (1, math.ceil(size[0] / stride), math.ceil(size[1] / stride), channels[f"P{k}"])
        assert maps[f"P{k}"].shape == expected, (k, maps[f"P{k}"].shape)


def test_features_equal_the_backbone_where_no_resizing_happens():
    backbone = MobileViTv2(0.5, weights=None, include_top=False, input_shape=(128, 128, 3))
    features = feature_extractor(backbone, out_strides=(32,))
    x = np.random.RandomState(1).rand(2, 128, 128, 3).astype("float32") * 255
    np.testing.assert_array_equal(features.predict_on_batch(x)["P5"], backbone.predict_on_batch(x))
    assert features.count_params() == backbone.count_params()  # the same layers, shared


def test_odd_level_is_the_blocks_output_mapped_back():
    # At 224 the stride-32 map is 7x7; the block works on it enlarged to 8x8
    # (align_corners resize, as ml-cvnets); the feature is that output mapped
    # back to 7x7, whose corners are the enlarged map's corners.
    backbone = MobileViTv2(0.5, weights=None, include_top=False, input_shape=(224, 224, 3))
    p5 = feature_extractor(backbone, out_strides=(32,)).predict_on_batch(np.full((1, 224, 224, 3), 100.0, "float32"))
    enlarged = backbone.predict_on_batch(np.full((1, 224, 224, 3), 100.0, "float32"))
    assert enlarged.shape[1:3] == (8, 8) and p5["P5"].shape[1:3] == (7, 7)
    for i, j in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        np.testing.assert_allclose(p5["P5"][0, i, j], enlarged[0, i, j], atol=1e-5)


def test_dilated_backbone_keeps_the_weights_and_the_resolution():
    standard = MobileViTv2(0.5, weights=None, include_top=False, input_shape=(64, 64, 3))
    dilated = MobileViTv2(0.5, weights=None, include_top=False, input_shape=(64, 64, 3), output_stride=8)
    assert [w.shape for w in standard.weights] == [w.shape for w in dilated.weights]
    assert dilated.output.shape[1:3] == (8, 8)
    assert dilated.get_layer("stage5_ir").dilation_rate == 2
    assert dilated.get_layer("stage5_mvit").dilation == 4
    assert dilated.get_layer("stage4_ir").dilation_rate == 1 and dilated.get_layer("stage4_mvit").dilation == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output_stride": 4}, "`output_stride` must be one of (8, 16, 32)"),
        ({"output_stride": True}, "`output_stride` must be one of (8, 16, 32)"),
    ],
)
def test_backbone_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        MobileViTv2(0.5, weights=None, include_top=False, **kwargs)


def test_feature_extractor_argument_errors():
    backbone = MobileViTv2(0.5, weights=None, include_top=False)
    for bad in [(), 8, (8, 12), (8, 8), (True,)]:
        with pytest.raises(ValueError, match="out_strides"):
            feature_extractor(backbone, out_strides=bad)
    other = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3)], name="not_ours")
    with pytest.raises(ValueError, match="'not_ours' has no layer 'stage3_ir'"):
        feature_extractor(other)
    with pytest.raises(ValueError, match="`dilation_rate` > 1 needs `strides=1`"):
        InvertedResidual(32, strides=2, dilation_rate=2)


@pytest.mark.parametrize("width", sorted(PUBLISHED_ADE20K))
def test_parameter_counts_equal_the_model_zoo(width):
    ade20k = DeepLabV3(width, num_classes=150, output_stride=8, atrous_rates=(12, 24, 36))
    assert round(_parameters(ade20k) / 1e6, 1) == PUBLISHED_ADE20K[width]
    if width in PUBLISHED_VOC:
        voc = DeepLabV3(width, num_classes=21, output_stride=16)
        assert round(_parameters(voc) / 1e6, 1) == PUBLISHED_VOC[width]
    with_aux = DeepLabV3(width, num_classes=150, output_stride=8, atrous_rates=(12, 24, 36), aux_head=True)
    # the training-time auxiliary head is what the published count leaves out
    inner = max(_channels_of_stage4(width) // 4, 128)
    assert (
        _parameters(with_aux) - _parameters(ade20k)
        == 9 * _channels_of_stage4(width) * inner + 2 * inner + (inner + 1) * 150
    )


def _channels_of_stage4(width):
    from keras_mobilevitv2.config import config_for_width

    return config_for_width(width).vit_stages[1].channels


def _hf_logits(reference, x):
    import torch

    with torch.no_grad():
        return reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy().transpose(0, 2, 3, 1)


def _low_resolution_logits(model):
    return keras.Model(model.inputs, model.get_layer("classifier").output)


@pytest.mark.parametrize(
    ("width", "output_stride", "size"),
    [(0.5, 32, 256), (0.5, 16, 256), (0.5, 16, 512), (0.5, 8, 128), (1.0, 32, 256), (1.0, 16, 512)],
)
def test_logits_match_hugging_face(hf_segmentation_reference, width, output_stride, size):
    torch = pytest.importorskip("torch")
    reference = hf_segmentation_reference(width, output_stride)
    model = DeepLabV3(width, num_classes=21, output_stride=output_stride, include_preprocessing=False)
    assert load_pytorch_weights(model, reference.state_dict()) == "hf"
    x = np.random.RandomState(size).rand(1, size, size, 3).astype("float32")
    expected = _hf_logits(reference, x)
    assert np.abs(expected).max() > 1.0  # the weights are not degenerate
    low, full = keras.Model(model.inputs, [model.get_layer("classifier").output, model.output]).predict_on_batch(x)
    np.testing.assert_allclose(low, expected, rtol=0, atol=1e-4)
    # ml-cvnets upsamples the logits with align_corners=True
    upsampled = torch.nn.functional.interpolate(
        torch.from_numpy(expected.transpose(0, 3, 1, 2)), size=(size, size), mode="bilinear", align_corners=True
    )
    np.testing.assert_allclose(full, upsampled.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-4)


def test_stock_hugging_face_differs_where_it_skips_the_dilation(hf_segmentation_reference):
    # What the fixture's one-line patch is for: without it HF computes
    # something else than ml-cvnets (whose weights it publishes) at OS 16.
    stock = hf_segmentation_reference(0.5, 16, dilate_like_ml_cvnets=False)
    model = DeepLabV3(0.5, num_classes=21, output_stride=16, include_preprocessing=False)
    load_pytorch_weights(model, stock.state_dict())
    x = np.random.RandomState(5).rand(1, 256, 256, 3).astype("float32")
    difference = np.abs(_low_resolution_logits(model).predict_on_batch(x) - _hf_logits(stock, x)).max()
    assert difference > 1e-2


def _cvnets_checkpoint(reference, timm_reference, aux_rng=None, aux_channels=None):
    """The HF model's tensors under ml-cvnets' segmentation names."""
    hf_state = reference.state_dict()
    backbone = [name for name in hf_state if name.startswith("mobilevitv2.")]
    timm_names = [name for name in timm_reference("050").state_dict() if not name.startswith("head.")]
    assert len(backbone) == len(timm_names)  # the same tensors in the same order
    state = {f"encoder.{timm_to_cvnets(t)}": hf_state[h] for h, t in zip(backbone, timm_names)}
    state.update({hf_segmentation_head_to_cvnets(n): v for n, v in hf_state.items() if n.startswith("segmentation_")})
    if aux_rng is not None:
        import torch

        inner, in_channels = 128, aux_channels
        shapes = {
            "seg_head.aux_head.0.block.conv.weight": (inner, in_channels, 3, 3),
            "seg_head.aux_head.0.block.norm.weight": (inner,),
            "seg_head.aux_head.0.block.norm.bias": (inner,),
            "seg_head.aux_head.0.block.norm.running_mean": (inner,),
            "seg_head.aux_head.0.block.norm.running_var": (inner,),
            "seg_head.aux_head.2.block.conv.weight": (21, inner, 1, 1),
            "seg_head.aux_head.2.block.conv.bias": (21,),
        }
        state.update({k: torch.from_numpy(aux_rng.rand(*s).astype("float32") + 0.5) for k, s in shapes.items()})
    return state


def test_ml_cvnets_checkpoint_file_with_auxiliary_head(hf_segmentation_reference, timm_reference, tmp_path):
    torch = pytest.importorskip("torch")
    reference = hf_segmentation_reference(0.5, 16)
    state = _cvnets_checkpoint(reference, timm_reference, np.random.RandomState(7), aux_channels=192)
    path = tmp_path / "deeplabv3-mobilevitv2-0.5.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)

    # The deployed model leaves the training-time auxiliary head out ...
    model = DeepLabV3(0.5, num_classes=21, weights=str(path), include_preprocessing=False)
    x = np.random.RandomState(8).rand(1, 256, 256, 3).astype("float32")
    np.testing.assert_allclose(_low_resolution_logits(model).predict_on_batch(x), _hf_logits(reference, x), atol=1e-4)
    # ... and the training model takes it too, on the stage-4 features.
    training_model = DeepLabV3(0.5, num_classes=21, aux_head=True, include_preprocessing=False)
    assert load_pytorch_weights(training_model, state) == "cvnets"
    np.testing.assert_array_equal(
        training_model.get_layer("aux_classifier").bias.numpy(), state["seg_head.aux_head.2.block.conv.bias"].numpy()
    )
    outputs = training_model.predict_on_batch(x)
    assert set(outputs) == {"logits", "aux_logits"} and outputs["aux_logits"].shape == (1, 256, 256, 21)


def test_checkpoints_that_do_not_fit_are_refused(hf_segmentation_reference):
    reference = hf_segmentation_reference(0.5, 16)
    training_model = DeepLabV3(0.5, num_classes=21, aux_head=True)
    before = [w.numpy() for w in training_model.weights]
    with pytest.raises(ValueError, match="hf checkpoints have no such tensor") as error:
        load_pytorch_weights(training_model, reference.state_dict())
    assert "aux_conv" in str(error.value) and "nothing was loaded" in str(error.value)
    for a, b in zip(before, training_model.weights):
        np.testing.assert_array_equal(a, b.numpy())
    with pytest.raises(ValueError, match="wrong shape"):
        load_pytorch_weights(DeepLabV3(0.5, num_classes=150), reference.state_dict())
    classifier_only = {k: v for k, v in reference.state_dict().items() if k.startswith("mobilevitv2.")}
    with pytest.raises(ValueError, match="Keras weights have no tensor"):
        load_pytorch_weights(DeepLabV3(0.5, num_classes=21), classifier_only)


def test_backbone_model_is_shared_and_the_output_stride_read_from_it():
    backbone = MobileViTv2(0.5, weights=None, include_top=False, input_shape=(96, 96, 3), output_stride=8)
    model = DeepLabV3(backbone, num_classes=3)
    assert model.get_layer("stage5_mvit") is backbone.get_layer("stage5_mvit")
    assert model.get_layer("classifier").output.shape[1:3] == (12, 12)
    assert model.output.shape == (None, 96, 96, 3)
    with pytest.raises(ValueError, match="does not match the backbone, built with output_stride=8"):
        DeepLabV3(backbone, num_classes=3, output_stride=16)


def test_keras_weights_round_trip(tmp_path):
    model = DeepLabV3(0.5, num_classes=4, input_shape=(64, 64, 3))
    path = tmp_path / "seg.weights.h5"
    model.save_weights(path)
    copy = DeepLabV3(0.5, num_classes=4, input_shape=(64, 64, 3), weights=str(path))
    x = np.random.RandomState(3).rand(1, 64, 64, 3).astype("float32") * 255
    np.testing.assert_array_equal(model.predict_on_batch(x), copy.predict_on_batch(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 0}, "`num_classes` must be a positive integer"),
        ({"num_classes": True}, "`num_classes` must be a positive integer"),
        ({"output_stride": 4}, "`output_stride` must be one of (8, 16, 32) or None"),
        ({"atrous_rates": ()}, "`atrous_rates` must be a non-empty tuple"),
        ({"atrous_rates": (6, 0)}, "`atrous_rates` must be a non-empty tuple"),
        ({"aspp_channels": 0}, "`aspp_channels` must be a positive integer"),
        ({"aspp_dropout": 1.0}, "`aspp_dropout` must be a number in [0, 1)"),
        ({"backbone": "big"}, "`backbone` must be a width multiplier"),
        ({"backbone": -1.0}, "`backbone` must be a width multiplier"),
        ({"weights": "missing.pt"}, "`weights` must be `None` or the path"),
    ],
)
def test_argument_errors(kwargs, message):
    import re

    with pytest.raises(ValueError, match=re.escape(message)):
        DeepLabV3(**{"backbone": 0.5, **kwargs})


@pytest.fixture(scope="module")
def small_segmenter():
    model = DeepLabV3(0.5, num_classes=11, input_shape=(64, 64, 3), aspp_channels=128)
    images = np.random.RandomState(0).rand(12, 64, 64, 3).astype("float32") * 255
    return randomize_keras_weights(model, seed=1), images


def test_post_training_int8_segmenter_is_fully_int8(small_segmenter, tmp_path):
    from quantization import export_tflite

    model, images = small_segmenter
    report = export_tflite(
        model,
        str(tmp_path / "seg.tflite"),
        "ptq_int8",
        representative_images=images[:8],
        sample_images=images[8:],
        verbose=False,
    )
    assert report["errors"] == [] and report["float_tensors_inside"] == []
    assert set(report["tensor_dtypes"]) <= {"INT8", "INT32"} and report["max_tensor_rank"] <= 4
    # dilated convolutions stay CONV_2D / DEPTHWISE_CONV_2D; the upsampling is one builtin op
    op_names = {version.rsplit(" v", 1)[0] for version in report["ops"]}
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "RESIZE_BILINEAR", "CONCATENATION", "MEAN"} <= op_names
    # argmax over the last axis: the fraction of pixels whose class TFLite and Keras agree on
    assert report["agreement"]["top1_agreement"] >= 0.8


def test_android_target_exports_the_segmenter(small_segmenter, tmp_path):
    from quantization import targets

    model, images = small_segmenter
    report = targets.export(
        "android", model, str(tmp_path), name="seg", calibration_images=images[:8], sample_images=images[8:]
    )
    assert os.path.exists(report["files"]["int8"]) and os.path.exists(report["files"]["float16"])


def test_quantization_aware_segmenter_with_its_auxiliary_head_is_the_float_function():
    from quantization import calibrate
    from quantization import quantize_model
    from quantization.quantize import quantizers

    model = randomize_keras_weights(
        DeepLabV3(0.5, num_classes=5, input_shape=(64, 64, 3), aspp_channels=32, aux_head=True), seed=2
    )
    images = np.random.RandomState(1).rand(4, 64, 64, 3).astype("float32") * 255
    qat = calibrate(quantize_model(model), images)
    assert set(qat.output) == {"logits", "aux_logits"}
    # The branches and the merge are rebuilt: ASPP's five branches, its concatenation, the auxiliary head.
    names = {layer.name for layer in qat.layers}
    assert {"aspp_in_conv", "aspp_atrous3_conv", "aspp_pool", "aspp_pool_resize", "aspp_concat", "aux_conv"} <= names
    assert not {"aspp_in_bn", "aspp_in_relu"} & names  # folded into the convolution
    for quantizer in quantizers(qat):
        quantizer.calibrating = True  # quantization off: the folded model must compute the float function
    try:
        folded = qat(images, training=False)
    finally:
        for quantizer in quantizers(qat):
            quantizer.calibrating = False
    expected = model(images, training=False)
    for key in ("logits", "aux_logits"):
        np.testing.assert_allclose(np.asarray(folded[key]), np.asarray(expected[key]), atol=1e-4)
        fake_quant = np.asarray(qat(images, training=False)[key])
        assert np.mean(fake_quant.argmax(-1) == np.asarray(expected[key]).argmax(-1)) > 0.8


def test_micro_target_runs_the_segmenter_and_compares_every_pixel(small_segmenter, tmp_path):
    """The target's own QAT conversion of the DeepLabV3 graph, run in the real
    TFLM interpreter; agreement is per pixel (argmax over the classes)."""
    from quantization import targets

    model, images = small_segmenter
    report = targets.export(
        "micro", model, str(tmp_path), name="seg", calibration_images=images[:8], sample_images=images[8:]
    )
    assert report["fits"] and report["problems"] == []
    agreement = report["agreement"]
    assert agreement["predictions"] == 4 * 64 * 64 and agreement["top1_agreement"] >= 0.95
    assert {"CONCATENATION", "RESIZE_BILINEAR", "CONV_2D"} <= {entry["op"] for entry in report["ops_to_register"]}
