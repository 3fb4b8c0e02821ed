"""Checkpoint tensor names of the reference implementations, written out
independently of keras_mobilevitv2.pytorch_weights (a shared test harness)."""

import re


def timm_to_cvnets(name, blocks_per_stage=None):
    """ml-cvnets names, from the reference table (independent of convert.py)."""
    blocks_per_stage = blocks_per_stage or {2: 2, 3: 4, 4: 3}
    rules = [
        (r"^stem\.conv\.", "conv_1.block.conv."),
        (r"^stem\.bn\.", "conv_1.block.norm."),
        (r"^head\.fc\.", "classifier.1."),
    ]
    for pattern, replacement in rules:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    m = re.match(r"^stages\.(\d)\.(\d)\.(.*)$", name)
    stage, index, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    prefix = f"layer_{stage + 1}.{index}"
    ir = {"conv1_1x1": "exp_1x1", "conv2_kxk": "conv_3x3", "conv3_1x1": "red_1x1"}
    m = re.match(r"^(conv1_1x1|conv2_kxk|conv3_1x1)\.(conv|bn)\.(.*)$", rest)
    if m:
        part = "conv" if m.group(2) == "conv" else "norm"
        return f"{prefix}.block.{ir[m.group(1)]}.block.{part}.{m.group(3)}"
    m = re.match(r"^conv_kxk\.(conv|bn)\.(.*)$", rest)
    if m:
        return f"{prefix}.local_rep.0.block.{'conv' if m.group(1) == 'conv' else 'norm'}.{m.group(2)}"
    if rest == "conv_1x1.weight":
        return f"{prefix}.local_rep.1.block.conv.weight"
    m = re.match(r"^conv_proj\.(conv|bn)\.(.*)$", rest)
    if m:
        return f"{prefix}.conv_proj.block.{'conv' if m.group(1) == 'conv' else 'norm'}.{m.group(2)}"
    m = re.match(r"^norm\.(.*)$", rest)
    if m:
        return f"{prefix}.global_rep.{blocks_per_stage[stage]}.{m.group(1)}"
    m = re.match(r"^transformer\.(\d)\.(.*)$", rest)
    block, leaf = m.group(1), m.group(2)
    leaf = (
        leaf.replace("norm1.", "pre_norm_attn.0.")
        .replace("attn.qkv_proj.", "pre_norm_attn.1.qkv_proj.block.conv.")
        .replace("attn.out_proj.", "pre_norm_attn.1.out_proj.block.conv.")
        .replace("norm2.", "pre_norm_ffn.0.")
        .replace("mlp.fc1.", "pre_norm_ffn.1.block.conv.")
        .replace("mlp.fc2.", "pre_norm_ffn.3.block.conv.")
    )
    return f"{prefix}.global_rep.{block}.{leaf}"


# Hugging Face segmentation head name -> ml-cvnets template (groups renamed
# by _CVNETS_PARTS): the reverse of transformers' conversion script's rules.
_HF_HEAD_RULES = (
    (
        r"^segmentation_head\.aspp\.convs\.(\d)\.conv_1x1\.(convolution|normalization)\.(.*)$",
        "seg_head.aspp.aspp_layer.convs.{0}.aspp_pool.conv_1x1.block.{1}.{2}",
    ),
    (
        r"^segmentation_head\.aspp\.convs\.(\d)\.(convolution|normalization)\.(.*)$",
        "seg_head.aspp.aspp_layer.convs.{0}.block.{1}.{2}",
    ),
    (
        r"^segmentation_head\.aspp\.project\.(convolution|normalization)\.(.*)$",
        "seg_head.aspp.aspp_layer.project.block.{0}.{1}",
    ),
    (r"^segmentation_head\.classifier\.(convolution)\.(.*)$", "seg_head.classifier.block.{0}.{1}"),
)
_CVNETS_PARTS = {"convolution": "conv", "normalization": "norm"}


def hf_segmentation_head_to_cvnets(name):
    """Hugging Face `segmentation_head.*` -> ml-cvnets `seg_head.*`."""
    for pattern, template in _HF_HEAD_RULES:
        m = re.match(pattern, name)
        if m:
            return template.format(*(_CVNETS_PARTS.get(group, group) for group in m.groups()))
    raise ValueError(f"not a segmentation head tensor: {name}")
