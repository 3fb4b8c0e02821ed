"""ml-cvnets SSDLite checkpoints (`SingleShotMaskDetector`) in the Keras SSDLite.

The reference is ml-cvnets' detector rebuilt here in PyTorch under its module
names (cvnets/models/detection/ssd.py, cvnets/modules/ssd_heads.py,
cvnets/layers/conv_layer.py), on timm's MobileViTv2 as the encoder, whose
tensors get ml-cvnets' names from the independent table in checkpoint_names.
"""

import numpy as np
import pytest
from checkpoint_names import timm_to_cvnets
from conftest import randomize_torch_model

from keras_mobilevitv2 import MobileViTv2
from keras_mobilevitv2 import load_pytorch_weights
from keras_mobilevitv2.detection import SSDLite

torch = pytest.importorskip("torch")
nn = torch.nn

NUM_CLASSES = 5  # background included
# ml-cvnets' config/detection/ssd_coco/mobilevit_v2.yaml
OUTPUT_STRIDES = (16, 32, 64, 128, 256, -1)
ASPECT_RATIOS = ([2, 3], [2, 3], [2, 3], [2, 3], [2, 3], [2])
PROJ_CHANNELS = (512, 256, 256, 128, 128, 64)
# (layer_4, layer_5) output channels of the MobileViTv2 encoder
ENCODER_CHANNELS = {0.5: (192, 256), 0.75: (288, 384)}


class ConvLayer2d(nn.Module):
    """ml-cvnets ConvLayer2d: `block` = conv, [norm], [act]; padding (k - 1) // 2."""

    def __init__(self, cin, cout, kernel_size, stride=1, groups=1, bias=False, use_norm=True, use_act=True):
        super().__init__()
        self.block = nn.Sequential()
        padding = (kernel_size - 1) // 2
        self.block.add_module("conv", nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=bias))
        if use_norm:
            self.block.add_module("norm", nn.BatchNorm2d(cout))
        if use_act:
            # ml-cvnets' general activation (relu); only the encoder uses swish.
            self.block.add_module("act", nn.ReLU())

    def forward(self, x):
        return self.block(x)


class SeparableConv2d(nn.Module):
    """ml-cvnets SeparableConv2d: depthwise + BN (no activation), then 1x1."""

    def __init__(self, cin, cout, stride=1, bias=False, use_norm=True, use_act=True):
        super().__init__()
        self.dw_conv = ConvLayer2d(cin, cin, 3, stride, groups=cin, use_act=False)
        self.pw_conv = ConvLayer2d(cin, cout, 1, bias=bias, use_norm=use_norm, use_act=use_act)

    def forward(self, x):
        return self.pw_conv(self.dw_conv(x))


class SSDHead(nn.Module):
    """ml-cvnets SSDHead (stride 1): [proj_layer], loc_cls_layer, then rows of
    (4 box offsets + classes) per anchor."""

    def __init__(self, cin, n_anchors, proj_channels, kernel_size):
        super().__init__()
        self.proj_layer = None
        if proj_channels != cin and kernel_size > 1:
            self.proj_layer = ConvLayer2d(cin, proj_channels, 1)
            cin = proj_channels
        out = n_anchors * (4 + NUM_CLASSES)
        if kernel_size == 1:
            self.loc_cls_layer = ConvLayer2d(cin, out, 1, bias=True, use_norm=False, use_act=False)
        else:
            self.loc_cls_layer = SeparableConv2d(cin, out, bias=True, use_norm=False, use_act=False)

    def forward(self, x):
        if self.proj_layer is not None:
            x = self.proj_layer(x)
        x = self.loc_cls_layer(x).permute(0, 2, 3, 1)
        x = x.reshape(x.shape[0], -1, 4 + NUM_CLASSES)
        return x[..., :4], x[..., 4:]


class SSDReference(nn.Module):
    """ml-cvnets SingleShotMaskDetector's `extra_layers` and `ssd_heads`."""

    def __init__(self, width):
        super().__init__()
        l4, l5 = ENCODER_CHANNELS[width]
        extra, level_channels, in_channels = {}, [], l5
        for os, proj in zip(OUTPUT_STRIDES, PROJ_CHANNELS):
            if os in (16, 32):
                level_channels.append(l4 if os == 16 else l5)
                continue
            if os == -1:
                extra["os_-1"] = nn.Sequential(
                    nn.AdaptiveAvgPool2d(1), ConvLayer2d(in_channels, proj, 1, use_norm=False)
                )
            else:
                extra[f"os_{os}"] = SeparableConv2d(in_channels, proj, stride=2)
            level_channels.append(proj)
            in_channels = proj
        self.extra_layers = nn.ModuleDict(extra)
        self.ssd_heads = nn.ModuleList(
            SSDHead(cin, 2 + 2 * len(set(ratios)), proj, 3 if os != -1 else 1)
            for os, cin, proj, ratios in zip(OUTPUT_STRIDES, level_channels, PROJ_CHANNELS, ASPECT_RATIOS)
        )

    def forward(self, os16, os32):
        features = [os16, os32]
        for os in OUTPUT_STRIDES[2:]:
            features.append(self.extra_layers[f"os_{os}"](features[-1]))
        boxes, scores = zip(*(head(x) for head, x in zip(self.ssd_heads, features)))
        return torch.cat(boxes, dim=1).numpy(), torch.cat(scores, dim=1).numpy()


def _encoder_levels(encoder, images):
    """timm MobileViTv2's stage 4 and 5 outputs: ml-cvnets' out_l4, out_l5."""
    x = encoder.stem(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    levels = []
    for stage in encoder.stages:
        x = stage(x)
        levels.append(x)
    return levels[3], levels[4]


_REFERENCES = {}


def _reference(timm_reference, width):
    """(encoder, SSD part, ml-cvnets state dict), random weights and statistics."""
    if width not in _REFERENCES:
        encoder = timm_reference(f"{int(width * 100):03d}")
        torch.manual_seed(0)
        ssd = randomize_torch_model(SSDReference(width), seed=int(width * 100) + 1)
        # SSD sets encoder.classifier = None: no classifier tensors.
        state = {
            f"encoder.{timm_to_cvnets(k)}": v for k, v in encoder.state_dict().items() if not k.startswith("head.")
        }
        state.update(ssd.state_dict())
        _REFERENCES[width] = encoder, ssd, state
    return _REFERENCES[width]


def _ssdlite(width, size, **kwargs):
    kwargs.setdefault("num_classes", NUM_CLASSES)
    return SSDLite(width, input_shape=(size, size, 3), include_preprocessing=False, **kwargs)


@pytest.mark.parametrize(
    "width, size, projected_os32",
    [(0.5, 256, False), (0.75, 128, True)],
    ids=["0.5-no-os32-projection", "0.75-os32-projection"],
)
def test_outputs_match_ml_cvnets(timm_reference, tmp_path, width, size, projected_os32):
    encoder, ssd, state = _reference(timm_reference, width)
    assert "extra_layers.os_-1.1.block.conv.weight" in state
    assert ("ssd_heads.1.proj_layer.block.conv.weight" in state) == projected_os32
    path = tmp_path / "coco-ssd-mobilevitv2.pt"
    torch.save(state, path)  # a plain state_dict, read with weights_only=True
    model = _ssdlite(width, size)
    assert load_pytorch_weights(model, str(path)) == "cvnets"

    images = np.random.RandomState(int(width * 100)).rand(2, size, size, 3).astype("float32")
    with torch.no_grad():
        boxes, scores = ssd(*_encoder_levels(encoder, images))
    outputs = model.predict_on_batch(images)
    assert outputs["box_deltas"].shape == boxes.shape and outputs["class_logits"].shape == scores.shape
    assert np.abs(scores).max() > 1.0  # the weights are not degenerate
    np.testing.assert_allclose(outputs["box_deltas"], boxes, rtol=0, atol=1e-4)
    np.testing.assert_allclose(outputs["class_logits"], scores, rtol=0, atol=1e-4)


def test_incomplete_checkpoint_names_the_tensors_and_loads_nothing(timm_reference):
    state = dict(_reference(timm_reference, 0.5)[2])
    del state["ssd_heads.5.loc_cls_layer.block.conv.bias"]
    del state["extra_layers.os_128.dw_conv.block.norm.running_var"]
    state["ssd_heads.6.loc_cls_layer.block.conv.weight"] = torch.zeros(36, 64, 1, 1)
    model = _ssdlite(0.5, 128)
    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(ValueError, match="nothing was loaded") as error:
        load_pytorch_weights(model, state)
    message = str(error.value)
    assert "2 Keras weights have no tensor" in message
    assert "'ssd_heads.5.loc_cls_layer.block.conv.bias'" in message
    assert "'extra_layers.os_128.dw_conv.block.norm.running_var'" in message
    assert "ssd_heads.6.loc_cls_layer.block.conv.weight" in message
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())

    with pytest.raises(ValueError, match=r"'ssd_heads\.0\.loc_cls_layer\.pw_conv\.block\.conv\.weight' has shape"):
        load_pytorch_weights(_ssdlite(0.5, 128, num_classes=81), _reference(timm_reference, 0.5)[2])


def test_task_mismatch_says_what_the_checkpoint_is(timm_reference):
    encoder, _, detection = _reference(timm_reference, 0.5)
    backbone = MobileViTv2(0.5, weights=None, include_top=False, input_shape=(128, 128, 3))
    with pytest.raises(ValueError, match=r"SSDLite detection checkpoint.*fits keras_mobilevitv2\.detection\.SSDLite"):
        load_pytorch_weights(backbone, detection)

    classifier = {timm_to_cvnets(k): v for k, v in encoder.state_dict().items()}
    with pytest.raises(ValueError, match=r"classification checkpoint.*backbone_weights.*is an SSDLite detector"):
        load_pytorch_weights(_ssdlite(0.5, 128), classifier)
