"""Per-width architecture of MobileViTv2, from ml-cvnets' config formulas."""

import dataclasses

from keras_mobilevitv2.layers.inverted_residual import make_divisible

# Widths with released ImageNet-1k checkpoints, keyed by timm's suffix.
WIDTHS = {
    "050": 0.5,
    "075": 0.75,
    "100": 1.0,
    "125": 1.25,
    "150": 1.5,
    "175": 1.75,
    "200": 2.0,
}


@dataclasses.dataclass(frozen=True)
class MobileViTStage:
    """One stride-2 inverted residual followed by a MobileViTv2 block."""

    channels: int
    attn_dim: int
    num_blocks: int


@dataclasses.dataclass(frozen=True)
class MobileViTv2Config:
    width_multiplier: float
    stem_channels: int
    stage1_channels: int
    stage2_channels: int
    vit_stages: tuple  # Stages 3, 4 and 5, each a MobileViTStage.

    @property
    def last_channels(self):
        return self.vit_stages[-1].channels


def _bound(low, high, value):
    return max(low, min(high, value))


def config_for_width(width_multiplier):
    """The channel plan of ml-cvnets for `width_multiplier` (alpha).

    ml-cvnets rounds with `make_divisible` (divisor 16 for stage 1, else 8);
    timm uses `int(c * alpha)`. Both agree on the seven released widths.
    """
    alpha = width_multiplier
    stem = int(make_divisible(_bound(16, 64, 32 * alpha), divisor=8, min_value=16))

    def stage(channels, attn_dim, num_blocks):
        return MobileViTStage(
            channels=int(make_divisible(channels * alpha, 8)),
            attn_dim=int(make_divisible(attn_dim * alpha, 8)),
            num_blocks=num_blocks,
        )

    return MobileViTv2Config(
        width_multiplier=alpha,
        stem_channels=stem,
        stage1_channels=int(make_divisible(64 * alpha, divisor=16)),
        stage2_channels=int(make_divisible(128 * alpha, divisor=8)),
        vit_stages=(stage(256, 128, 2), stage(384, 192, 4), stage(512, 256, 3)),
    )
