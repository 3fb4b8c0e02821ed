"""DeepLabV3-MobileViTv2 logits against Hugging Face transformers.

    python -m benchmarks.segmentation_parity [--output segmentation_parity.md]

For each (width, output stride, input size) builds transformers'
`MobileViTV2ForSemanticSegmentation` with random, non-degenerate weights
(BatchNorm statistics included), loads its state dict into
`keras_mobilevitv2.segmentation.DeepLabV3` and prints the max abs difference
of the low-resolution logits (the Keras layer "classifier"; transformers does
not upsample). transformers leaves the MobileViTv2 block's 3x3 convolution
undilated in dilated stages, where ml-cvnets dilates it; the reference here
sets that attribute as ml-cvnets has it (column "HF patched").
"""

import argparse
import sys

CASES = ((0.5, 32, 256), (0.5, 16, 256), (0.5, 16, 512), (0.5, 8, 128), (1.0, 32, 256), (1.0, 16, 512), (1.0, 8, 128))
# transformers encoder layer index -> dilation of its block's 3x3 conv in ml-cvnets
ML_CVNETS_DILATIONS = {32: {}, 16: {4: 2}, 8: {3: 2, 4: 4}}


def reference_model(width, output_stride, num_classes=21, seed=0, dilate_like_ml_cvnets=True):
    """transformers' segmenter with random weights; `dilate_like_ml_cvnets`
    sets the one attribute in which it departs from ml-cvnets."""
    import transformers

    from benchmarks.random_weights import randomize_torch_weights

    config = transformers.MobileViTV2Config(
        width_multiplier=width,
        num_labels=num_classes,
        output_stride=output_stride,
        atrous_rates=[6, 12, 18],
        aspp_out_channels=512,
    )
    model = transformers.MobileViTV2ForSemanticSegmentation(config)
    for index, dilation in ML_CVNETS_DILATIONS[output_stride].items() if dilate_like_ml_cvnets else ():
        conv = model.mobilevitv2.encoder.layer[index].conv_kxk.convolution
        conv.dilation = conv.padding = (dilation, dilation)
    randomize_torch_weights(model, seed=seed)
    return model.eval()


def measure(width, output_stride, size):
    import numpy as np
    import torch

    reference = reference_model(width, output_stride)
    import keras

    from keras_mobilevitv2 import load_pytorch_weights
    from keras_mobilevitv2.segmentation import DeepLabV3

    model = DeepLabV3(width, num_classes=21, output_stride=output_stride, include_preprocessing=False)
    load_pytorch_weights(model, reference.state_dict())
    x = np.random.RandomState(size).rand(1, size, size, 3).astype("float32")
    with torch.no_grad():
        expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy().transpose(0, 2, 3, 1)
    logits = keras.Model(model.inputs, model.get_layer("classifier").output).predict_on_batch(x)
    return expected.shape[1:3], float(np.abs(logits - expected).max()), float(np.abs(expected).max())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="", help="Also write the table to this markdown file.")
    args = parser.parse_args(argv)
    import torch  # noqa: F401  (PyTorch before TensorFlow: the other order segfaults here)

    lines = [
        "| width | output stride | input | logits | max abs difference (HF patched) | max abs logit |",
        "|---|---|---|---|---|---|",
    ]
    for width, output_stride, size in CASES:
        shape, difference, scale = measure(width, output_stride, size)
        lines.append(
            f"| {width} | {output_stride} | {size}x{size} | {shape[0]}x{shape[1]} | {difference:.2e} | {scale:.1f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
