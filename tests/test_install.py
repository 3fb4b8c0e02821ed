"""The installed package: what `pip install` gives a user."""

import os
import shutil
import subprocess
import sys

import pytest

import keras_mobilevitv2
import quantization
import training

INSTALLED = os.environ.get("KERAS_MOBILEVITV2_TEST_INSTALLED") == "1"


@pytest.mark.skipif(not INSTALLED, reason="runs when testing the installed wheel (make test)")
def test_tests_import_the_installed_package_not_the_source_tree():
    for module in (keras_mobilevitv2, training, quantization):
        assert "site-packages" in module.__file__, module.__file__


def test_package_data_is_present():
    data = os.path.join(os.path.dirname(keras_mobilevitv2.__file__), "data", "imagenet_class_index.json")
    assert os.path.getsize(data) > 30_000


@pytest.mark.skipif(not INSTALLED, reason="console scripts exist once the wheel is installed")
@pytest.mark.parametrize(
    "script, expected",
    [
        ("mobilevitv2-convert", "--checkpoint"),
        ("mobilevitv2-train", "--strategy"),
        ("mobilevitv2-demo", "--weights"),
        ("mobilevitv2-qat", "--calibration_images"),
        ("mobilevitv2-export", "--mode"),
        ("mobilevitv2-pipeline", "--qat_epochs"),
    ],
)
def test_console_scripts_print_their_help(script, expected, tmp_path):
    path = shutil.which(script) or os.path.join(os.path.dirname(sys.executable), script)
    flag = "--helpfull" if script in ("mobilevitv2-train", "mobilevitv2-qat", "mobilevitv2-pipeline") else "--help"
    result = subprocess.run([path, flag], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode in (0, 1), result.stderr[-2000:]  # absl exits 1 after help
    assert expected in result.stdout
