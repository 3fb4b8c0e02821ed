"""Loading official PyTorch MobileViTv2 checkpoints into the Keras models.

ml-cvnets, timm and Hugging Face name the same 269 tensors differently. Each
Keras layer below is listed once with its name in all three conventions;
the convention of a checkpoint is detected from its stem tensor. The task
heads (DeepLabV3 segmentation, SSDLite detection) follow the backbone. The
command line is `keras_mobilevitv2.convert`.
"""

import os
import re

import numpy as np

from keras_mobilevitv2.checkpoint_io import read_checkpoint
from keras_mobilevitv2.checkpoint_io import unwrap_state_dict

NAMINGS = ("cvnets", "timm", "hf")
_STEM_KEYS = {
    "cvnets": "conv_1.block.conv.weight",
    "timm": "stem.conv.weight",
    "hf": "mobilevitv2.conv_stem.convolution.weight",
}
# Tensors that carry no model state.
_IGNORED_SUFFIXES = ("num_batches_tracked",)

# Keras variable attribute <- (checkpoint parameter name, layout transform).
_PARAMETERS = {
    "conv": {"kernel": ("weight", (2, 3, 1, 0)), "bias": ("bias", None)},
    "depthwise": {"kernel": ("weight", (2, 3, 0, 1))},
    "batchnorm": {
        "gamma": ("weight", None),
        "beta": ("bias", None),
        "moving_mean": ("running_mean", None),
        "moving_variance": ("running_var", None),
    },
    "groupnorm": {"gamma": ("weight", None), "beta": ("bias", None)},
    "linear": {"kernel": ("weight", (1, 0)), "bias": ("bias", None)},
}


def _names(cvnets, timm, hf):
    return {"cvnets": cvnets, "timm": timm, "hf": hf}


def _inverted_residual_entries(layer, names):
    subs = (
        ("expand_conv", "expand_bn", "exp_1x1", "conv1_1x1", "expand_1x1"),
        ("depthwise_conv", "depthwise_bn", "conv_3x3", "conv2_kxk", "conv_3x3"),
        ("project_conv", "project_bn", "red_1x1", "conv3_1x1", "reduce_1x1"),
    )
    for conv_attr, bn_attr, cvnets, timm, hf in subs:
        conv = getattr(layer, conv_attr)
        if conv is None:
            continue
        kind = "depthwise" if conv_attr == "depthwise_conv" else "conv"
        yield (
            conv,
            kind,
            _names(
                f"{names['cvnets']}.block.{cvnets}.block.conv",
                f"{names['timm']}.{timm}.conv",
                f"{names['hf']}.{hf}.convolution",
            ),
        )
        yield (
            getattr(layer, bn_attr),
            "batchnorm",
            _names(
                f"{names['cvnets']}.block.{cvnets}.block.norm",
                f"{names['timm']}.{timm}.bn",
                f"{names['hf']}.{hf}.normalization",
            ),
        )


def _norm_kind(layer):
    # attention_norm="batch_norm_2d" puts a BatchNormalization here: its
    # running statistics must come from the checkpoint too (ml-cvnets stores
    # them under the same prefix), not stay at their initial values.
    return "batchnorm" if hasattr(layer, "moving_mean") else "groupnorm"


def _mobilevit_block_entries(layer, names):
    c, t, h = names["cvnets"], names["timm"], names["hf"]
    yield (
        layer.local_depthwise_conv,
        "depthwise",
        _names(f"{c}.local_rep.0.block.conv", f"{t}.conv_kxk.conv", f"{h}.conv_kxk.convolution"),
    )
    yield (
        layer.local_bn,
        "batchnorm",
        _names(f"{c}.local_rep.0.block.norm", f"{t}.conv_kxk.bn", f"{h}.conv_kxk.normalization"),
    )
    yield (
        layer.local_pointwise_conv,
        "conv",
        _names(f"{c}.local_rep.1.block.conv", f"{t}.conv_1x1", f"{h}.conv_1x1.convolution"),
    )
    for j, block in enumerate(layer.transformer_blocks):
        cj, tj, hj = f"{c}.global_rep.{j}", f"{t}.transformer.{j}", f"{h}.transformer.layer.{j}"
        yield (
            block.attn_norm,
            _norm_kind(block.attn_norm),
            _names(f"{cj}.pre_norm_attn.0", f"{tj}.norm1", f"{hj}.layernorm_before"),
        )
        yield (
            block.attention.qkv_proj,
            "conv",
            _names(
                f"{cj}.pre_norm_attn.1.qkv_proj.block.conv",
                f"{tj}.attn.qkv_proj",
                f"{hj}.attention.qkv_proj.convolution",
            ),
        )
        yield (
            block.attention.out_proj,
            "conv",
            _names(
                f"{cj}.pre_norm_attn.1.out_proj.block.conv",
                f"{tj}.attn.out_proj",
                f"{hj}.attention.out_proj.convolution",
            ),
        )
        yield (
            block.ffn_norm,
            _norm_kind(block.ffn_norm),
            _names(f"{cj}.pre_norm_ffn.0", f"{tj}.norm2", f"{hj}.layernorm_after"),
        )
        yield (
            block.ffn_expand,
            "conv",
            _names(f"{cj}.pre_norm_ffn.1.block.conv", f"{tj}.mlp.fc1", f"{hj}.ffn.conv1.convolution"),
        )
        yield (
            block.ffn_project,
            "conv",
            _names(f"{cj}.pre_norm_ffn.3.block.conv", f"{tj}.mlp.fc2", f"{hj}.ffn.conv2.convolution"),
        )
    yield layer.final_norm, "groupnorm", _names(f"{c}.global_rep.{layer.num_blocks}", f"{t}.norm", f"{h}.layernorm")
    yield (
        layer.project_conv,
        "conv",
        _names(f"{c}.conv_proj.block.conv", f"{t}.conv_proj.conv", f"{h}.conv_projection.convolution"),
    )
    yield (
        layer.project_bn,
        "batchnorm",
        _names(f"{c}.conv_proj.block.norm", f"{t}.conv_proj.bn", f"{h}.conv_projection.normalization"),
    )


def _model_entries(model):
    """Yields (keras layer, kind, {naming: tensor-name prefix}) for `model`."""
    layer_names = {layer.name for layer in model.layers}
    if "stem_conv" not in layer_names:
        raise ValueError(
            f"Model {model.name!r} is not a keras_mobilevitv2 MobileViTv2 model (it has no 'stem_conv' layer)."
        )
    hf_encoder = "mobilevitv2.encoder.layer"
    yield (
        model.get_layer("stem_conv"),
        "conv",
        _names("conv_1.block.conv", "stem.conv", "mobilevitv2.conv_stem.convolution"),
    )
    yield (
        model.get_layer("stem_bn"),
        "batchnorm",
        _names("conv_1.block.norm", "stem.bn", "mobilevitv2.conv_stem.normalization"),
    )
    # (keras layer, ml-cvnets stage, index within the stage)
    inverted_residuals = [("stage1_ir1", 1, 0), ("stage2_ir1", 2, 0), ("stage2_ir2", 2, 1)]
    inverted_residuals += [(f"stage{s}_ir", s, 0) for s in (3, 4, 5)]
    for layer_name, stage, index in inverted_residuals:
        hf = f"{hf_encoder}.{stage - 1}.layer.{index}" if stage <= 2 else f"{hf_encoder}.{stage - 1}.downsampling_layer"
        names = _names(f"layer_{stage}.{index}", f"stages.{stage - 1}.{index}", hf)
        yield from _inverted_residual_entries(model.get_layer(layer_name), names)
    for stage in (3, 4, 5):
        names = _names(f"layer_{stage}.1", f"stages.{stage - 1}.1", f"{hf_encoder}.{stage - 1}")
        yield from _mobilevit_block_entries(model.get_layer(f"stage{stage}_mvit"), names)
    if "logits" in layer_names:
        yield model.get_layer("logits"), "linear", _classifier_names()
    if "aspp_in_conv" in layer_names:
        yield from _deeplabv3_entries(model, layer_names)
    if "head0_conv" in layer_names:
        yield from _ssdlite_entries(model, layer_names)


def _conv_bn_entries(model, name, cvnets, hf):
    """A conv + BatchNorm pair of the segmentation head (ml-cvnets ConvLayer2d)."""
    yield model.get_layer(f"{name}_conv"), "conv", _names(f"{cvnets}.block.conv", None, f"{hf}.convolution")
    yield model.get_layer(f"{name}_bn"), "batchnorm", _names(f"{cvnets}.block.norm", None, f"{hf}.normalization")


def _deeplabv3_entries(model, layer_names):
    """ml-cvnets `seg_head.*` and Hugging Face `segmentation_head.*` names."""
    c, h = "seg_head.aspp.aspp_layer.convs", "segmentation_head.aspp.convs"
    yield from _conv_bn_entries(model, "aspp_in", f"{c}.0", f"{h}.0")
    rates = sorted(
        int(n[len("aspp_atrous") : -len("_conv")])
        for n in layer_names
        if n.startswith("aspp_atrous") and n.endswith("_conv")
    )
    for index in rates:
        yield from _conv_bn_entries(model, f"aspp_atrous{index}", f"{c}.{index}", f"{h}.{index}")
    pool = len(rates) + 1
    yield from _conv_bn_entries(model, "aspp_pool", f"{c}.{pool}.aspp_pool.conv_1x1", f"{h}.{pool}.conv_1x1")
    yield from _conv_bn_entries(
        model, "aspp_project", "seg_head.aspp.aspp_layer.project", "segmentation_head.aspp.project"
    )
    yield (
        model.get_layer("classifier"),
        "conv",
        _names("seg_head.classifier.block.conv", None, "segmentation_head.classifier.convolution"),
    )
    if "aux_conv" in layer_names:
        # Hugging Face's model has no auxiliary head: an HF checkpoint cannot fill it.
        yield from _conv_bn_entries(model, "aux", "seg_head.aux_head.0", None)
        yield model.get_layer("aux_classifier"), "conv", _names("seg_head.aux_head.2.block.conv", None, None)


def _cvnets_only(name):
    # Only ml-cvnets publishes SSDLite: timm and Hugging Face have no such model.
    return _names(name, None, None)


# Keras SSDLite layer names that number the levels (keras_mobilevitv2.detection).
_EXTRA_LAYER = re.compile(r"^extra_os(\d+)_dw$")
_HEAD_LAYER = re.compile(r"^head(\d+)_conv$")


def _numbers(pattern, layer_names):
    return sorted(int(m.group(1)) for m in map(pattern.match, layer_names) if m)


def _separable_entries(model, depthwise, pointwise, cvnets, pointwise_bn=None):
    """ml-cvnets SeparableConv2d: `dw_conv` (depthwise + BN, always), then
    `pw_conv` (1x1, with BN only where the layer was built with use_norm)."""
    yield model.get_layer(depthwise), "depthwise", _cvnets_only(f"{cvnets}.dw_conv.block.conv")
    yield model.get_layer(f"{depthwise}_bn"), "batchnorm", _cvnets_only(f"{cvnets}.dw_conv.block.norm")
    yield model.get_layer(pointwise), "conv", _cvnets_only(f"{cvnets}.pw_conv.block.conv")
    if pointwise_bn is not None:
        yield model.get_layer(pointwise_bn), "batchnorm", _cvnets_only(f"{cvnets}.pw_conv.block.norm")


def _ssd_head_entries(model, level, layer_names):
    """ml-cvnets SSDHead `ssd_heads.{level}`: an optional 1x1 `proj_layer`,
    then `loc_cls_layer`, separable 3x3 or (global level) a plain 1x1."""
    name, cvnets = f"head{level}", f"ssd_heads.{level}"
    if f"{name}_proj" in layer_names:
        yield model.get_layer(f"{name}_proj"), "conv", _cvnets_only(f"{cvnets}.proj_layer.block.conv")
        yield model.get_layer(f"{name}_proj_bn"), "batchnorm", _cvnets_only(f"{cvnets}.proj_layer.block.norm")
    if f"{name}_dw" in layer_names:
        yield from _separable_entries(model, f"{name}_dw", f"{name}_conv", f"{cvnets}.loc_cls_layer")
    else:
        yield model.get_layer(f"{name}_conv"), "conv", _cvnets_only(f"{cvnets}.loc_cls_layer.block.conv")


def _ssdlite_entries(model, layer_names):
    """ml-cvnets SingleShotMaskDetector `extra_layers.*` and `ssd_heads.*`.

    The heads' output channels are anchor-major with 4 box offsets then the
    classes in both frameworks, so the tensors need no reordering."""
    for stride in _numbers(_EXTRA_LAYER, layer_names):
        name = f"extra_os{stride}"
        yield from _separable_entries(
            model, f"{name}_dw", f"{name}_pw", f"extra_layers.os_{stride}", pointwise_bn=f"{name}_pw_bn"
        )
    if "global_conv" in layer_names:
        # nn.Sequential(AdaptiveAvgPool2d, ConvLayer2d): the conv is item 1.
        yield model.get_layer("global_conv"), "conv", _cvnets_only("extra_layers.os_-1.1.block.conv")
    for level in _numbers(_HEAD_LAYER, layer_names):
        yield from _ssd_head_entries(model, level, layer_names)


def _classifier_names():
    return _names("classifier.1", "head.fc", "classifier")


def detect_naming(state_dict):
    """'cvnets', 'timm' or 'hf', from the name of the stem convolution."""
    found = [naming for naming, key in _STEM_KEYS.items() if key in state_dict]
    if len(found) != 1:
        sample = ", ".join(sorted(state_dict)[:5])
        raise ValueError(
            "Could not recognise the checkpoint's tensor names as ml-cvnets, "
            "timm or Hugging Face MobileViTv2 (looked for one of "
            f"{sorted(_STEM_KEYS.values())}). First names in the checkpoint: {sample}"
        )
    return found[0]


def strip_wrapper_prefix(state_dict):
    """`state_dict` without the "module." prefix of a wrapped model, and with
    an ml-cvnets segmentation model's `encoder.` backbone prefix removed."""
    # DistributedDataParallel saves every name with a "module." prefix.
    if state_dict and all(name.startswith("module.") for name in state_dict):
        state_dict = {name[len("module.") :]: value for name, value in state_dict.items()}
    if "encoder." + _STEM_KEYS["cvnets"] in state_dict:
        # ml-cvnets' SegEncoderDecoder: `encoder.*` is the classifier's
        # backbone under its usual names, `seg_head.*` the head.
        state_dict = {name.removeprefix("encoder."): value for name, value in state_dict.items()}
    return state_dict


def load_pytorch_weights(model, state_dict_or_path):
    """Assigns an official PyTorch MobileViTv2 checkpoint to a Keras model.

    Args:
        model: A model built by `keras_mobilevitv2` (any width): a
            `MobileViTv2` with or without the top, a `DeepLabV3` or an
            `SSDLite` on a MobileViTv2 backbone.
        state_dict_or_path: A path to a `.safetensors`, `.pt`, `.pth` or
            `.bin` checkpoint, or a mapping of tensor name -> array (numpy or
            torch), named as ml-cvnets, timm or Hugging Face name them. The
            task is read from the names: a classifier, a DeepLabV3
            segmenter (ml-cvnets or Hugging Face) or an SSDLite detector
            (ml-cvnets `SingleShotMaskDetector`) takes only its own task's
            checkpoints.

    Both sides are checked before anything is assigned: every Keras weight
    must get a tensor of its shape and every checkpoint tensor must be used.
    Only classifier tensors (when the model has no top) and BatchNorm's
    `num_batches_tracked` counters may be left over. Otherwise `ValueError`
    lists what is missing, unused or of the wrong shape, and the model is
    left untouched.

    Returns:
        The naming convention found: "cvnets", "timm" or "hf".
    """
    state_dict = _as_state_dict(state_dict_or_path)
    naming = detect_naming(state_dict)
    match = _match_weights(model, state_dict, naming)
    match["task"] = _task_mismatch(model, state_dict)
    _raise_if_incomplete(model, naming, match)
    # Assign only after every tensor was checked, so a checkpoint that does
    # not fit leaves the model untouched.
    for variable, value in match["assignments"]:
        variable.assign(value.astype(variable.dtype))
    return naming


def _as_state_dict(state_dict_or_path):
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state_dict = read_checkpoint(state_dict_or_path)
    else:
        state_dict = unwrap_state_dict(dict(state_dict_or_path), source="state_dict")
    return strip_wrapper_prefix(state_dict)


def _match_weights(model, state_dict, naming):
    """Pairs Keras variables with checkpoint tensors; collects every misfit."""
    assignments, missing, mismatched, used, covered = [], [], [], set(), set()
    for layer, kind, prefixes in _model_entries(model):
        for attribute, (parameter, permutation) in _PARAMETERS[kind].items():
            variable = getattr(layer, attribute, None)
            if variable is None:  # e.g. a conv without bias
                continue
            covered.add(id(variable))
            if prefixes[naming] is None:
                missing.append(f"{variable.path} {tuple(variable.shape)}: {naming} checkpoints have no such tensor")
                continue
            key = f"{prefixes[naming]}.{parameter}"
            shape = tuple(variable.shape)
            if key not in state_dict:
                missing.append(f"no tensor {key!r} for {variable.path} {shape}")
                continue
            used.add(key)
            value = np.asarray(state_dict[key])
            converted = value.transpose(permutation) if permutation else value
            if tuple(converted.shape) != shape:
                mismatched.append(
                    f"{key!r} has shape {tuple(value.shape)} (PyTorch layout; "
                    f"{tuple(converted.shape)} after conversion) but the Keras "
                    f"weight {variable.path} has shape {shape}"
                )
                continue
            assignments.append((variable, converted))
    return {
        "assignments": assignments,
        "missing": missing,
        "mismatched": mismatched,
        "unused": sorted(_expected_tensors(model, state_dict, naming) - used),
        "uncovered": [v.path for v in _network_weights(model) if id(v) not in covered],
    }


def _network_weights(model):
    """The weights of the stem and everything after it. Layers before the
    stem (in topological order) preprocess a user's `input_tensor`: no
    checkpoint has them, and they are the user's, not ours to load."""
    layers = model.layers
    first = next(i for i, layer in enumerate(layers) if layer.name == "stem_conv")
    return [w for layer in layers[first:] for w in layer.weights]


def _expected_tensors(model, state_dict, naming):
    """Checkpoint tensors that must all find a Keras weight."""
    names = {name for name in state_dict if not name.endswith(_IGNORED_SUFFIXES)}
    layer_names = {layer.name for layer in model.layers}
    if "logits" not in layer_names:
        # A model without top takes the backbone of a classifier checkpoint.
        prefix = _classifier_names()[naming] + "."
        names = {name for name in names if not name.startswith(prefix)}
    if "aux_conv" not in layer_names:
        # The auxiliary head is for training only: a segmenter without it
        # takes a checkpoint saved with it.
        names = {name for name in names if not name.startswith("seg_head.aux_head.")}
    return names


_MAX_LISTED = 10
# Running statistics of the attention/FFN norms, in all three namings: only a
# model built with attention_norm="batch_norm_2d" asks for them.
_ATTENTION_NORM_STATS = tuple(
    f".{norm}.running_"
    for norm in (
        "pre_norm_attn.0",
        "pre_norm_ffn.0",
        "norm1",
        "norm2",
        "layernorm_before",
        "layernorm_after",
    )
)


def _listing(items):
    lines = [f"    {item}" for item in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        lines.append(f"    ... and {len(items) - _MAX_LISTED} more")
    return "\n".join(lines)


def _raise_if_incomplete(model, naming, match):
    problems = (
        ("missing", "Keras weights have no tensor in the checkpoint"),
        ("mismatched", "checkpoint tensors have the wrong shape"),
        ("unused", f"checkpoint tensors have no place in model {model.name!r}"),
        ("uncovered", "Keras weights belong to layers no MobileViTv2 checkpoint has"),
    )
    found = [(match[key], what) for key, what in problems if match[key]]
    if not found and not match["task"]:
        return
    report = "\n".join(f"  {len(items)} {what}:\n{_listing(items)}" for items, what in found)
    header = f"The checkpoint ({naming} naming) does not fit model {model.name!r}; nothing was loaded."
    if match["task"]:
        # The task difference is the cause; the lists only follow from it.
        raise ValueError(f"{header} {match['task']}\n{report}")
    hint = ""
    if any(stat in item for item in match["missing"] for stat in _ATTENTION_NORM_STATS):
        hint = (
            " A model built with attention_norm='batch_norm_2d' needs BatchNorm "
            "running statistics, which the published (GroupNorm) checkpoints "
            "do not have."
        )
    raise ValueError(
        f"{header}\n{report}\nIs it a MobileViTv2 checkpoint of the same task (classification, DeepLabV3 "
        f"segmentation or SSDLite detection), width, `classes` / `num_classes` and `attention_norm`?{hint}"
    )


# Names that only a task head's tensors start with, in every naming.
_TASK_PREFIXES = {
    "detection": ("ssd_heads.", "extra_layers."),
    "segmentation": ("seg_head.", "segmentation_head."),
}
# task -> (what a checkpoint of it is, the model it fits, what a model of it is)
_TASKS = {
    "classification": (
        "a MobileViTv2 classification checkpoint (it has no segmentation or detection head)",
        "keras_mobilevitv2.MobileViTv2, or the backbone alone as the `backbone_weights` of "
        "keras_mobilevitv2.detection.SSDLite / keras_mobilevitv2.segmentation.DeepLabV3",
        "a MobileViTv2 classifier or backbone",
    ),
    "segmentation": (
        "a DeepLabV3 segmentation checkpoint (it has `seg_head.*` / `segmentation_head.*` tensors)",
        "keras_mobilevitv2.segmentation.DeepLabV3",
        "a DeepLabV3 segmenter",
    ),
    "detection": (
        "an ml-cvnets SSDLite detection checkpoint (it has `ssd_heads.*` / `extra_layers.*` tensors)",
        "keras_mobilevitv2.detection.SSDLite",
        "an SSDLite detector",
    ),
}


def checkpoint_task(state_dict):
    """'detection', 'segmentation' or 'classification': what the head
    tensors of a (prefix-stripped, see `strip_wrapper_prefix`) state dict are."""
    for task, prefixes in _TASK_PREFIXES.items():
        if any(name.startswith(prefixes) for name in state_dict):
            return task
    return "classification"


def _model_task(model):
    layer_names = {layer.name for layer in model.layers}
    if "head0_conv" in layer_names:
        return "detection"
    if "aspp_in_conv" in layer_names:
        return "segmentation"
    return "classification"


def _task_mismatch(model, state_dict):
    """A sentence on which model the checkpoint fits when `model` is of
    another task; "" when the tasks agree."""
    found, model_task = checkpoint_task(state_dict), _model_task(model)
    if found == model_task:
        return ""
    what, fits, _ = _TASKS[found]
    return f"The checkpoint is {what} and fits {fits}, but model {model.name!r} is {_TASKS[model_task][2]}."


def infer_architecture(state_dict):
    """(width_multiplier, num_classes or None) of a checkpoint's tensors."""
    from keras_mobilevitv2.config import WIDTHS
    from keras_mobilevitv2.config import config_for_width

    naming = detect_naming(state_dict)
    stem_channels = np.shape(state_dict[_STEM_KEYS[naming]])[0]
    last_key = _classifier_names()[naming] + ".weight"
    num_classes = np.shape(state_dict[last_key])[0] if last_key in state_dict else None
    last_channels = np.shape(state_dict[last_key])[1] if last_key in state_dict else None
    for width in WIDTHS.values():
        config = config_for_width(width)
        if config.stem_channels == stem_channels and last_channels in (
            None,
            config.last_channels,
        ):
            return width, num_classes
    raise ValueError(
        f"No MobileViTv2 width has a {stem_channels}-channel stem; widths supported: {sorted(WIDTHS.values())}."
    )
