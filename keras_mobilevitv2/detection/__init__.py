"""Object detection with a MobileViTv2 backbone: SSDLite, its anchors, and
the SSD box coding (matching, deltas, detections)."""

from keras_mobilevitv2.detection.anchors import ML_CVNETS_COCO
from keras_mobilevitv2.detection.anchors import AnchorConfig
from keras_mobilevitv2.detection.anchors import input_anchors
from keras_mobilevitv2.detection.anchors import ssd_anchors
from keras_mobilevitv2.detection.box_coding import Detections
from keras_mobilevitv2.detection.box_coding import decode_boxes
from keras_mobilevitv2.detection.box_coding import detect
from keras_mobilevitv2.detection.box_coding import encode_boxes
from keras_mobilevitv2.detection.box_coding import match_anchors
from keras_mobilevitv2.detection.ssdlite import MOBILENET_V2_LEVELS
from keras_mobilevitv2.detection.ssdlite import MOBILEVITV2_LEVELS
from keras_mobilevitv2.detection.ssdlite import SSDLite
from keras_mobilevitv2.detection.ssdlite import model_anchors

__all__ = [
    "ML_CVNETS_COCO",
    "MOBILENET_V2_LEVELS",
    "MOBILEVITV2_LEVELS",
    "AnchorConfig",
    "Detections",
    "SSDLite",
    "decode_boxes",
    "detect",
    "encode_boxes",
    "input_anchors",
    "match_anchors",
    "model_anchors",
    "ssd_anchors",
]
