import numpy as np
import pytest
import torch
from PIL import Image

from edge_runtime.data import ImageDataset, load_dataset
from models.errors import DataError


def _save_npz(path, **arrays):
    np.savez_compressed(path, **arrays)
    return str(path)


def test_builtin_digits_sample_is_real_and_labelled():
    data = load_dataset("sklearn-digits")
    assert len(data) == 1797
    assert data.images.shape[1:] == (32, 32, 3)
    assert data.num_classes == 10
    assert sorted(set(data.labels.tolist())) == list(range(10))


def test_real_cifar10_sample_loads(shared_data):
    data = load_dataset(str(shared_data / "images" / "cifar10.npz"))
    assert len(data) == 5000
    assert data.num_classes == 10
    mean, _ = data.channel_stats()
    assert mean[0] * 255 == pytest.approx(125.62, abs=0.05)  # SOURCE.md: mean pixel 125.62, 123.10, 113.71


def test_probe_batch_is_seeded_normalised_and_resized():
    rng = np.random.default_rng(0)
    data = ImageDataset(rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), np.arange(40) % 4)
    first, labels = data.probe_batch(16, seed=3)
    again, _ = data.probe_batch(16, seed=3)
    other, _ = data.probe_batch(16, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.shape == (16, 3, 8, 8)
    assert labels.dtype == torch.int64
    full = data.to_tensor()
    assert full.mean(dim=(0, 2, 3)).abs().max() < 1e-5  # normalised with the data's own statistics
    assert data.probe_batch(4, seed=0, size=16)[0].shape == (4, 3, 16, 16)


def test_image_folder_loads_one_class_per_subfolder(tmp_path):
    for label, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("RGB", (20, 20), colour).save(tmp_path / label / f"{i}.png")
    data = load_dataset(str(tmp_path), image_size=16)
    assert data.classes == ["cat", "dog"]
    assert data.images.shape == (6, 16, 16, 3)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images[0, 0, 0].tolist() == [255, 0, 0]


def test_grayscale_images_become_rgb(tmp_path):
    path = _save_npz(tmp_path / "g.npz", x=np.zeros((5, 8, 8), np.uint8), y=np.zeros(5, np.int64))
    assert load_dataset(path).images.shape == (5, 8, 8, 3)


@pytest.mark.parametrize(
    "arrays,fragment",
    [
        ({"x": np.zeros((4, 8, 8, 3), np.float32), "y": np.zeros(4, np.int64)}, "uint8"),
        ({"x": np.zeros((4, 8, 8, 5), np.uint8), "y": np.zeros(4, np.int64)}, "N x H x W x 3"),
        ({"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.zeros(3, np.int64)}, "one entry per image"),
        ({"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.full(4, -1)}, "non-negative"),
        ({"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.zeros(4, np.float32)}, "integers"),
        ({"x": np.zeros((4, 8, 8, 3), np.uint8)}, "missing array y"),
    ],
)
def test_bad_arrays_are_rejected(tmp_path, arrays, fragment):
    path = _save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=fragment):
        load_dataset(path)


def test_corrupt_and_missing_files_are_rejected(tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip file")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset(str(corrupt))
    text = tmp_path / "text.npz"
    text.write_text("garbage")
    with pytest.raises(DataError, match="not an .npz archive"):
        load_dataset(str(text))
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "absent.npz"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported"):
        load_dataset(str(tmp_path / "notes.txt"))


def test_too_few_images_and_labels_out_of_range():
    data = ImageDataset(np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 2, 3]))
    with pytest.raises(DataError, match="fewer than the batch size 8"):
        data.probe_batch(8)
    with pytest.raises(DataError, match="label 3, out of range for 3 classes"):
        data.check_labels(3)


def test_huge_label_is_not_a_class_index(tmp_path):
    path = _save_npz(tmp_path / "big.npz", x=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([0, 1, 2, 3 * 10**12]))
    with pytest.raises(DataError, match="not a class index"):
        load_dataset(path)


def test_label_beyond_class_names_is_rejected(tmp_path):
    path = _save_npz(tmp_path / "c.npz", x=np.zeros((4, 8, 8, 3), np.uint8), y=np.array([0, 1, 2, 5]),
                     classes=np.array(["a", "b", "c"]))
    with pytest.raises(DataError, match="out of range for its 3 class names"):
        load_dataset(path)


def test_label_gaps_are_reported():
    images = np.zeros((5, 8, 8, 3), dtype=np.uint8)
    gappy = ImageDataset(images, np.array([0, 1, 2, 3, 1000]), [], name="gappy")
    assert "largest is 1000" in gappy.label_gap_warning()
    dense = ImageDataset(images, np.array([0, 1, 2, 3, 4]), [], name="dense")
    assert dense.label_gap_warning() is None
    named = ImageDataset(images, np.array([0, 1, 2, 3, 1000]), [str(i) for i in range(1001)], name="named")
    assert named.label_gap_warning() is None
