"""Personal image data: load it from `.npz`, an image folder or a built-in sample, and draw probe batches.

Images are kept as uint8 NHWC RGB. Probe batches are float32 NCHW, normalised with the
dataset's own per-channel mean and std (recorded so the exported model's users apply the
same preprocessing), resized to the network's input size when they differ.
"""
from __future__ import annotations

import hashlib
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from models.errors import DataError, UnknownNameError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

# Largest number of classes a classifier head is built for (ImageNet-21k has about 21,800).
MAX_CLASSES = 100_000

# Floor for a channel's std, so that a constant channel normalises to zeros, not inf.
MIN_CHANNEL_STD = 1e-3


@dataclass
class ImageDataset:
    """Labelled images: `images` uint8 N x H x W x 3, `labels` int64 N."""

    images: np.ndarray
    labels: np.ndarray
    classes: List[str] = field(default_factory=list)
    name: str = ""
    _stats: Optional[Tuple[List[float], List[float]]] = field(default=None, init=False, repr=False)
    _hash: Optional[str] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.images, self.labels = _checked_arrays(self.images, self.labels, self.name or "dataset")
        if self.classes and int(self.labels.max()) >= len(self.classes):
            raise DataError(
                f"{self.name or 'dataset'}: label {int(self.labels.max())} is out of range for its "
                f"{len(self.classes)} class names; fix the labels or the 'classes' array"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> Tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def num_classes(self) -> int:
        """The length of `classes` when the source names them, else the largest label + 1."""
        if self.classes:
            return len(self.classes)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def label_gap_warning(self) -> Optional[str]:
        """Return a warning when unnamed labels leave most class indices without an image, else None."""
        if self.classes or not len(self.labels):
            return None
        used = len(np.unique(self.labels))
        if 2 * used >= self.num_classes:
            return None
        return (
            f"{self.name or 'the data'}: the labels take {used} distinct values but the largest is "
            f"{self.num_classes - 1}, so the classifier gets {self.num_classes} outputs; relabel them 0..{used - 1}, "
            f"add a 'classes' array or pass --num-classes"
        )

    @property
    def data_hash(self) -> str:
        """SHA-256 of the pixels and labels (hex, first 16 digits), computed once: identifies the data in caches and results."""
        if self._hash is None:
            digest = hashlib.sha256()
            digest.update(str(self.images.shape).encode())
            digest.update(np.ascontiguousarray(self.images).tobytes())
            digest.update(np.ascontiguousarray(self.labels.astype(np.int64)).tobytes())
            self._hash = digest.hexdigest()[:16]
        return self._hash

    def channel_stats(self) -> Tuple[List[float], List[float]]:
        """Per-channel mean and std of the pixels scaled to [0, 1] (computed once)."""
        if self._stats is None:
            pixels = self.images.reshape(-1, 3).astype(np.float64) / 255.0
            mean = pixels.mean(axis=0)
            std = np.maximum(pixels.std(axis=0), MIN_CHANNEL_STD)
            self._stats = ([float(v) for v in mean], [float(v) for v in std])
        return self._stats

    def check_labels(self, num_classes: int) -> None:
        if num_classes < 1:
            raise DataError(f"the number of classes must be at least 1, got {num_classes}")
        if len(self.labels) and int(self.labels.max()) >= num_classes:
            raise DataError(
                f"{self.name or 'the data'} has label {int(self.labels.max())}, out of range for {num_classes} classes; "
                f"pass a larger --num-classes or fix the labels"
            )

    def probe_batch(self, batch_size: int, *, seed: int = 0, size: Optional[int] = None):
        """Draw `batch_size` distinct images with a seeded RNG; return (inputs, labels) tensors."""
        import torch

        if batch_size < 1:
            raise DataError(f"the batch size must be at least 1, got {batch_size}")
        if batch_size > len(self):
            raise DataError(
                f"{self.name or 'the data'} has {len(self)} images, fewer than the batch size {batch_size}; "
                f"use a smaller --batch-size or add images"
            )
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(len(self), size=batch_size, replace=False))
        return self.to_tensor(chosen, size=size), torch.from_numpy(self.labels[chosen].astype(np.int64))

    def to_tensor(self, indices: Optional[Sequence[int]] = None, *, size: Optional[int] = None):
        """Normalised float32 N x 3 x H x W tensor of the chosen images (all by default)."""
        import torch
        import torch.nn.functional as F

        images = self.images if indices is None else self.images[np.asarray(indices)]
        mean, std = self.channel_stats()
        tensor = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
        tensor = (tensor - torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)) / torch.tensor(
            std, dtype=torch.float32
        ).view(1, 3, 1, 1)
        if size is not None and tuple(tensor.shape[-2:]) != (size, size):
            shrinking = size < min(tensor.shape[-2:])
            tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
        return tensor

    def describe(self) -> Dict[str, object]:
        mean, std = self.channel_stats()
        return {
            "name": self.name,
            "images": len(self),
            "image_size": list(self.image_size),
            "num_classes": self.num_classes,
            "data_hash": self.data_hash,
            "mean": mean,
            "std": std,
        }


def _checked_arrays(images: np.ndarray, labels: np.ndarray, name: str) -> Tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8:
        raise DataError(f"{name}: images must be uint8 (0..255), got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"{name}: images must have shape N x H x W x 3 (NHWC, RGB) or N x H x W, got {tuple(images.shape)}"
        )
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.shape[0] == 0:
        raise DataError(f"{name}: contains no images")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{name}: labels must be a 1-D array with one entry per image, got shape {tuple(labels.shape)} "
            f"for {images.shape[0]} images"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{name}: labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0:
        raise DataError(f"{name}: labels must be non-negative, found {int(labels.min())}")
    if labels.max() >= MAX_CLASSES:
        raise DataError(
            f"{name}: label {int(labels.max())} is not a class index; labels must be 0..N-1 with N at most {MAX_CLASSES}"
        )
    return images, labels.astype(np.int64)


def load_npz(path: Path) -> ImageDataset:
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
    if magic != b"PK\x03\x04":
        # numpy would try to read any other file as a pickle and report that, which misleads.
        raise DataError(f"{path}: not an .npz archive (numpy.savez writes a zip file); re-create it with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                raise DataError(
                    f"{path}: missing array {', '.join(missing)}; expected 'x' (uint8 NHWC images) and 'y' (int labels)"
                )
            images, labels = archive["x"], archive["y"]
            classes = [str(c) for c in archive["classes"]] if "classes" in archive.files else []
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as error:
        raise DataError(f"{path}: not a readable .npz file ({error}); re-create it with numpy.savez") from None
    return ImageDataset(images, labels, classes, name=str(path))


def load_image_folder(path: Path, image_size: int = 32) -> ImageDataset:
    """Load `path/<class name>/<image>`; every image is converted to RGB and resized to image_size."""
    from PIL import Image, UnidentifiedImageError

    class_dirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{path}: an image folder needs one sub-folder per class, found none")
    images: List[np.ndarray] = []
    labels: List[int] = []
    for label, class_dir in enumerate(class_dirs):
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as image:
                    rgb = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                    images.append(np.asarray(rgb, dtype=np.uint8))
            except (UnidentifiedImageError, OSError) as error:
                raise DataError(f"{file}: cannot be read as an image ({error}); remove or replace it") from None
            labels.append(label)
    if not images:
        raise DataError(f"{path}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} in the class sub-folders)")
    return ImageDataset(np.stack(images), np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs], name=str(path))


def _sklearn_digits() -> ImageDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8 x 8 grey levels 0..16, scaled to 0..255 and enlarged 4x (nearest) to the 32 x 32 RGB that CIFAR-sized networks take.
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    enlarged = grey.repeat(4, axis=1).repeat(4, axis=2)
    images = np.repeat(enlarged[..., None], 3, axis=-1)
    return ImageDataset(images, digits.target.astype(np.int64), [str(i) for i in range(10)], name="sklearn-digits")


# Real image sets that an installed package ships inside its wheel, so a fresh install has data to run on.
BUILTIN_SAMPLES: Dict[str, Tuple[Callable[[], ImageDataset], str]] = {
    "sklearn-digits": (
        _sklearn_digits,
        "1,797 real handwritten digits (UCI optical recognition set, 10 classes) shipped inside scikit-learn; "
        "8x8 grey, enlarged to 32x32 RGB",
    ),
}


def load_dataset(source: str, *, image_size: int = 32) -> ImageDataset:
    """Load a built-in sample by name, an `.npz` file, or an image folder."""
    if source in BUILTIN_SAMPLES:
        return BUILTIN_SAMPLES[source][0]()
    path = Path(source).expanduser()
    if not path.exists():
        known = ", ".join(BUILTIN_SAMPLES)
        raise DataError(f"data not found: {source!r} is neither an existing path nor a built-in sample ({known})")
    if path.is_dir():
        return load_image_folder(path, image_size=image_size)
    if path.suffix.lower() == ".npz":
        return load_npz(path)
    raise DataError(f"{source}: unsupported data file; give an .npz file, an image folder or a built-in sample name")


def builtin_sample_names() -> List[str]:
    return list(BUILTIN_SAMPLES)


def describe_sample(name: str) -> str:
    if name not in BUILTIN_SAMPLES:
        raise UnknownNameError(f"unknown built-in sample {name!r}; known: {', '.join(BUILTIN_SAMPLES)}")
    return BUILTIN_SAMPLES[name][1]
