"""Object detection data: COCO-format folders and the embedded shapes with
their boxes.

A COCO-format folder holds, for a `train*` and a `val*` split,

    annotations/instances_<split>.json   COCO detection annotations
    <split>/                             the images, by the JSON's file_name

(e.g. COCO 2017 itself: instances_train2017.json with train2017/). The
categories, in ascending id order, become classes 1..K; 0 is the background
(ml-cvnets' numbering). Crowd boxes and boxes under one pixel are left out of
training, and training uses only images with a box (as ml-cvnets); the
evaluation uses every image, and pycocotools reads the JSON itself.
"""

import dataclasses
import glob
import json
import os

import numpy as np
import tensorflow as tf

from training.data import EMBEDDED_CLASSES
from training.data import EMBEDDED_NAME
from training.data import generated_folder
from training.data import paint_shape

__all__ = ["DetectionSource", "DetectionSplit", "coco_source", "embedded_detection_source", "resolve_detection_source"]


@dataclasses.dataclass
class DetectionSplit:
    """One split: its images and their boxes (normalised corner form)."""

    annotation_file: str
    image_ids: list
    image_paths: list
    sizes: list  # (height, width) of each image, from the JSON
    boxes: list  # [M, 4] float32 (x_min, y_min, x_max, y_max) in [0, 1], per image
    labels: list  # [M] int32 classes 1..K, per image

    @property
    def num_examples(self):
        return len(self.image_paths)

    def dataset(self, shuffle_seed=None, shard=(1, 0)):
        """(image bytes, boxes [M, 4], labels [M]) records, shuffled by
        `shuffle_seed` and restricted to shard `shard[1]` of `shard[0]`."""
        order = np.arange(self.num_examples)
        if shuffle_seed is not None:
            order = np.random.default_rng(list(shuffle_seed)).permutation(self.num_examples)
        order = order[shard[1] :: shard[0]]
        lengths = [len(self.labels[i]) for i in order]
        boxes = np.concatenate([np.zeros((0, 4), np.float32)] + [self.boxes[i] for i in order])
        labels = np.concatenate([np.zeros((0,), np.int32)] + [self.labels[i] for i in order])
        records = tf.data.Dataset.from_tensor_slices(
            (
                tf.constant([self.image_paths[i] for i in order]),
                tf.RaggedTensor.from_row_lengths(boxes, lengths),
                tf.RaggedTensor.from_row_lengths(labels, lengths),
            )
        )
        return records.map(lambda path, b, c: (tf.io.read_file(path), b, c))


@dataclasses.dataclass
class DetectionSource:
    name: str
    class_names: list  # class 0 is the background
    category_ids: list  # the JSON's category id of each class (None for the background)
    train: DetectionSplit
    eval: DetectionSplit

    @property
    def num_classes(self):
        return len(self.class_names)


def _split_files(root, split):
    """(annotation JSON, image folder) of a split of a COCO-format folder."""
    found = sorted(glob.glob(os.path.join(root, "annotations", f"instances_{split}*.json")))
    if len(found) != 1:
        raise ValueError(
            f"{root} is not a COCO-format folder: it needs exactly one annotations/instances_{split}*.json "
            f"(e.g. instances_{split}2017.json) with the images in a folder of the same suffix; found {found}."
        )
    suffix = os.path.basename(found[0])[len("instances_") : -len(".json")]
    images = os.path.join(root, suffix)
    if not os.path.isdir(images):
        raise ValueError(f"{root}: the images of {found[0]} belong in {images}/, which does not exist.")
    return found[0], images


def _categories(data, path):
    categories = sorted(data.get("categories", []), key=lambda c: c["id"])
    if not categories:
        raise ValueError(f"{path} lists no categories.")
    return categories


def _image_boxes(data, index, path):
    """{image id: ([boxes], [labels])} of the non-crowd boxes of >= 1 pixel."""
    images = {image["id"]: image for image in data["images"]}
    objects = {image_id: ([], []) for image_id in images}
    for annotation in data.get("annotations", []):
        if annotation.get("iscrowd", 0):
            continue
        x, y, w, h = annotation["bbox"]
        if w < 1 or h < 1:
            continue
        if annotation["category_id"] not in index:
            raise ValueError(f"{path}: annotation {annotation.get('id')} has an unknown category_id.")
        image = images[annotation["image_id"]]
        width, height = image["width"], image["height"]
        box = np.clip([x / width, y / height, (x + w) / width, (y + h) / height], 0.0, 1.0)
        objects[annotation["image_id"]][0].append(box)
        objects[annotation["image_id"]][1].append(index[annotation["category_id"]])
    return images, objects


def _read_split(path, folder, index, training):
    with open(path) as f:
        data = json.load(f)
    images, objects = _image_boxes(data, index, path)
    ids = [i for i in sorted(images) if objects[i][1] or not training]
    if not ids:
        raise ValueError(f"{path}: no image with a box to {'train' if training else 'evaluate'} on.")
    return DetectionSplit(
        path,
        ids,
        [os.path.join(folder, images[i]["file_name"]) for i in ids],
        [(images[i]["height"], images[i]["width"]) for i in ids],
        [np.asarray(objects[i][0], np.float32).reshape(-1, 4) for i in ids],
        [np.asarray(objects[i][1], np.int32) for i in ids],
    )


def coco_source(root):
    """A COCO-format folder (see the module docstring) -> DetectionSource."""
    train_file, train_images = _split_files(root, "train")
    val_file, val_images = _split_files(root, "val")
    with open(train_file) as f:
        categories = _categories(json.load(f), train_file)
    with open(val_file) as f:
        if [c["id"] for c in _categories(json.load(f), val_file)] != [c["id"] for c in categories]:
            raise ValueError(f"{train_file} and {val_file} list different categories.")
    index = {c["id"]: k + 1 for k, c in enumerate(categories)}
    return DetectionSource(
        f"COCO format ({root})",
        ["background"] + [c["name"] for c in categories],
        [None] + [c["id"] for c in categories],
        _read_split(train_file, train_images, index, training=True),
        _read_split(val_file, val_images, index, training=False),
    )


# ------------------------------------------------------------ embedded data


def _canvas(rng, size):
    """A background of a random colour, a gradient and noise, in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    colour = rng.uniform(0.0, 0.6, 3)[None, None] + 0.25 * rng.uniform(-1, 1, 3)[None, None] * y[..., None]
    return np.clip(colour + rng.normal(0, 0.06, (size, size, 3)), 0, 1)


def _place(rng, size, span, placed):
    """A top-left corner for a `span`-pixel object that overlaps no box of
    `placed`; None after 20 tries."""
    for _ in range(20):
        top, left = rng.randint(0, size - span + 1, 2)
        if all(left >= x1 or left + span <= x0 or top >= y1 or top + span <= y0 for x0, y0, x1, y1 in placed):
            return top, left
    return None


def _paint_objects(rng, size, classes):
    """An image holding one shape of each of `classes` (where it fits), and
    their COCO boxes [x, y, w, h] in pixels and class indices."""
    image, boxes, painted = _canvas(rng, size), [], []
    for class_index in classes:
        span = int(rng.randint(size * 0.3, size * 0.6))
        corner = _place(rng, size, span, [(x, y, x + w, y + h) for x, y, w, h in boxes])
        if corner is None:
            continue
        patch, mask = paint_shape(rng, span, class_index)
        top, left = corner
        window = image[top : top + span, left : left + span]
        window[mask] = patch[mask] / 255.0
        rows, columns = np.nonzero(mask)
        x0, y0 = left + columns.min(), top + rows.min()
        boxes.append([x0, y0, left + columns.max() + 1 - x0, top + rows.max() + 1 - y0])
        painted.append(class_index)
    return (image * 255).astype(np.uint8), boxes, painted


def _write_split(staging, split, count, size, rng):
    os.makedirs(os.path.join(staging, split))
    images, annotations = [], []
    for image_id in range(1, count + 1):
        classes = rng.randint(0, len(EMBEDDED_CLASSES), rng.randint(1, 4))
        image, boxes, painted = _paint_objects(rng, size, classes)
        file_name = f"{split}_{image_id:05d}.png"
        tf.io.write_file(os.path.join(staging, split, file_name), tf.io.encode_png(image))
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for box, class_index in zip(boxes, painted):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(class_index) + 1,
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(EMBEDDED_CLASSES)]
    with open(os.path.join(staging, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def embedded_detection_source(dataset_dir=None, image_size=96, train_images=800, eval_images=200, seed=2468):
    """Generates (once) and returns the embedded detection dataset: one to
    three of the classifier's shapes per image, apart, with their boxes (10
    classes and the background), written as a COCO-format folder so that it
    runs the same pipeline and evaluator as real data."""
    name = f"mobilevitv2_shapes_coco_{image_size}px_{train_images}_{eval_images}_v1"

    def write(staging):
        rng = np.random.RandomState(seed)  # paint_shape's generator
        os.makedirs(os.path.join(staging, "annotations"))
        _write_split(staging, "train", train_images, image_size, rng)
        _write_split(staging, "val", eval_images, image_size, rng)

    root = generated_folder(dataset_dir, name, write)
    source = coco_source(root)
    source.name = f"embedded detection ({root})"
    return source


def resolve_detection_source(data, dataset_dir=None):
    """`--data` value of `--task detection` -> DetectionSource."""
    if data == EMBEDDED_NAME:
        return embedded_detection_source(dataset_dir)
    if not os.path.isdir(data):
        raise ValueError(
            f"--data {data!r} is not a folder. With --task detection give a COCO-format folder "
            f"(annotations/instances_train*.json and instances_val*.json, with the images in train*/ and "
            f"val*/) or '{EMBEDDED_NAME}'."
        )
    return coco_source(data)
