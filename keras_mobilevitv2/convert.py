"""`mobilevitv2-convert`: an official PyTorch MobileViTv2 checkpoint to Keras.

Command line (writes a Keras `.weights.h5`):

    python -m keras_mobilevitv2.convert --checkpoint mobilevitv2-1.0.pt \
        --output mobilevitv2_100.weights.h5

The loading itself is `keras_mobilevitv2.pytorch_weights` (the models use it
for their `weights` argument, and this command line uses the models); its
names stay importable from here.
"""

import os
import sys

from keras_mobilevitv2.checkpoint_io import read_checkpoint
from keras_mobilevitv2.pytorch_weights import NAMINGS
from keras_mobilevitv2.pytorch_weights import detect_naming
from keras_mobilevitv2.pytorch_weights import infer_architecture
from keras_mobilevitv2.pytorch_weights import load_pytorch_weights
from keras_mobilevitv2.pytorch_weights import strip_wrapper_prefix

# The library names this module has always offered.
__all__ = ["NAMINGS", "detect_naming", "infer_architecture", "load_pytorch_weights", "main"]


def main(argv=None):
    """`mobilevitv2-convert`: PyTorch checkpoint -> Keras `.weights.h5`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="mobilevitv2-convert",
        description=(
            "Convert an official MobileViTv2 PyTorch checkpoint (ml-cvnets .pt, "
            "timm or Hugging Face .safetensors/.bin) to a Keras .weights.h5 "
            "file for keras_mobilevitv2."
        ),
    )
    parser.add_argument("--checkpoint", required=True, help="Input checkpoint file.")
    parser.add_argument("--output", required=True, help="Output file; must end in .weights.h5.")
    parser.add_argument(
        "--width",
        type=float,
        default=None,
        help="Width multiplier (0.5 ... 2.0); inferred from the checkpoint if omitted.",
    )
    parser.add_argument(
        "--no_top",
        action="store_true",
        help="Write the weights of the model without its classifier.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output file.")
    args = parser.parse_args(argv)

    if not args.output.endswith(".weights.h5"):
        parser.error(f"--output must end in .weights.h5; got {args.output!r}.")
    if os.path.exists(args.output) and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it.")

    from keras_mobilevitv2.mobilevitv2 import MobileViTv2

    state_dict = strip_wrapper_prefix(read_checkpoint(args.checkpoint))
    width, num_classes = infer_architecture(state_dict)
    if args.width is not None and args.width != width:
        parser.error(f"--width {args.width} does not match the checkpoint, which is MobileViTv2-{width}.")
    include_top = not args.no_top and num_classes is not None
    model = MobileViTv2(
        width,
        include_top=include_top,
        weights=None,
        classes=num_classes or 1000,
    )
    naming = load_pytorch_weights(model, state_dict)
    model.save_weights(args.output)
    print(
        f"Converted {args.checkpoint} ({naming} naming, MobileViTv2-{width}, "
        f"{'with' if include_top else 'without'} classifier) -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
