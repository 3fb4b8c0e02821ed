"""Quantization-aware training and TFLite export for keras_mobilevitv2.

Never imports tensorflow-model-optimization (it switches the process to
legacy Keras); the QAT scheme is re-implemented on Keras 3.
"""

from quantization.quantize import calibrate
from quantization.quantize import quantize_model
from quantization.tflite_export import MODES
from quantization.tflite_export import export_tflite

__all__ = ["MODES", "calibrate", "export_tflite", "quantize_model"]
