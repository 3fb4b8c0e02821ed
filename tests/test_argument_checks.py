"""Arguments are checked by what they mean: numpy integers are integers,
bools are not numbers, and a bad command-line width names the good ones."""

import numpy as np
import pytest

from keras_mobilevitv2 import MobileViTv2
from keras_mobilevitv2 import MobileViTv2_050
from keras_mobilevitv2 import demo


def test_numpy_numbers_are_accepted():
    model = MobileViTv2(
        np.float32(0.5),
        weights=None,
        classes=np.int64(10),
        input_shape=(np.int64(64), np.int32(64), 3),
        dropout=np.float64(0.1),
    )
    assert model.output_shape == (None, 10)
    assert model.input_shape == (None, 64, 64, 3)
    assert model.name == "mobilevitv2_050"
    model.to_json()  # plain Python numbers in the config: it serializes


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: MobileViTv2(True, weights=None), "width_multiplier=True"),
        (lambda: MobileViTv2(float("nan"), weights=None), "width_multiplier=nan"),
        (lambda: MobileViTv2_050(weights=None, classes=True), "classes=True"),
        (lambda: MobileViTv2_050(weights=None, classes=np.bool_(True)), r"classes=(np\.)?True"),
        (lambda: MobileViTv2_050(weights=None, classes=10.0), "classes=10.0"),
        (lambda: MobileViTv2_050(weights=None, input_shape=(64, 64, True)), "input_shape"),
        (lambda: MobileViTv2(0.5, weights=None, dropout=True), "dropout=True"),
        (lambda: MobileViTv2(0.5, weights=None, attn_dropout=1.0), "attn_dropout=1.0"),
        (lambda: MobileViTv2(0.5, weights=None, ffn_dropout=-0.1), "ffn_dropout=-0.1"),
    ],
    ids=[
        "width-bool",
        "width-nan",
        "classes-bool",
        "classes-numpy-bool",
        "classes-float",
        "shape-bool",
        "dropout-bool",
        "attn-dropout-one",
        "ffn-dropout-negative",
    ],
)
def test_bools_and_out_of_range_numbers_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_demo_unknown_width_lists_the_accepted_ones(capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--width", "0.6"])
    assert info.value.code == 2
    assert "0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0" in capsys.readouterr().err
