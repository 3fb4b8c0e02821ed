"""Our QAT export against tensorflow-model-optimization's, where tfmot can act.

tfmot only wraps tf_keras (legacy Keras) models and switches the whole
process to legacy Keras when imported, so its side runs in a subprocess
(tfmot_reference.py) on a small conv/BN/ReLU model; the same float weights
go through `quantize_model` here.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from quantization import calibrate
from quantization import export_tflite
from quantization import quantize_model
from quantization.audit import make_interpreter
from quantization.audit import read_structure
from quantization.audit import run_tflite

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import small_model  # noqa: E402

REFERENCE = os.path.join(os.path.dirname(__file__), "tfmot_reference.py")


def test_export_matches_tfmot_default_8bit_scheme(tmp_path):
    pytest.importorskip("tensorflow_model_optimization")
    pytest.importorskip("tf_keras")
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
    result = subprocess.run(
        [sys.executable, REFERENCE, str(tmp_path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]

    float_weights = np.load(tmp_path / "float_weights.npz")
    images = np.load(tmp_path / "images.npy")
    model = small_model.build(keras)
    model.set_weights([float_weights[f"arr_{i}"] for i in range(len(float_weights.files))])
    qat = calibrate(quantize_model(model), images)
    ours_path = tmp_path / "ours.tflite"
    export_tflite(qat, str(ours_path), "qat_int8", io_type="int8", verbose=False)

    ours = ours_path.read_bytes()
    theirs = (tmp_path / "tfmot_int8.tflite").read_bytes()
    ours_structure, theirs_structure = read_structure(ours), read_structure(theirs)
    assert sorted({op for op, _ in ours_structure["ops"]}) == sorted({op for op, _ in theirs_structure["ops"]})
    assert {t["dtype"] for t in ours_structure["tensors"]} == {t["dtype"] for t in theirs_structure["tensors"]}

    their_interpreter = make_interpreter(theirs)
    step = their_interpreter.get_output_details()[0]["quantization"][0]
    difference = np.abs(run_tflite(make_interpreter(ours), images) - run_tflite(their_interpreter, images))
    print(
        f"ours vs tfmot: max {difference.max() / step:.1f} steps, mean {difference.mean() / step:.2f} steps; "
        f"ops {sorted({op for op, _ in ours_structure['ops']})}"
    )
    assert difference.max() <= 4 * step, difference.max() / step
