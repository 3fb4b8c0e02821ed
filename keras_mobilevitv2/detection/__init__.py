"""Object detection with a MobileViTv2 backbone: SSDLite and its anchors."""

from keras_mobilevitv2.detection.anchors import ML_CVNETS_COCO
from keras_mobilevitv2.detection.anchors import AnchorConfig
from keras_mobilevitv2.detection.anchors import ssd_anchors
from keras_mobilevitv2.detection.ssdlite import SSDLite
from keras_mobilevitv2.detection.ssdlite import model_anchors

__all__ = ["ML_CVNETS_COCO", "AnchorConfig", "SSDLite", "model_anchors", "ssd_anchors"]
