"""Data modules on the real offline files: Debian's Fashion-MNIST IDX, the ImageNet sample, MedMNIST npz."""
import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recipes.data import (
    ImageFolderDataModule,
    ImageTensors,
    MedMNISTDataModule,
    NpzDataModule,
    TorchvisionDataModule,
)

SHARED = Path(os.environ.get("FIM_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist (.ci/run installs it)


def _idx(path: Path) -> np.ndarray:
    """An IDX file decoded by hand: big-endian dims after a 4-byte magic whose last byte is the rank."""
    raw = gzip.open(path).read()
    rank = raw[3]
    dims = np.frombuffer(raw[4 : 4 + 4 * rank], dtype=">u4")
    return np.frombuffer(raw[4 + 4 * rank :], dtype=np.uint8).reshape(dims)


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist (apt-get install "
                    "dataset-fashion-mnist; .ci/run installs it, so CI always runs this test)")
def test_fashion_mnist_from_debian_idx_files_through_torchvision(tmp_path):
    data = TorchvisionDataModule("FashionMNIST", num_classes=10, in_channels=1, root=str(tmp_path),
                                 idx_dir=str(FASHION), val_size=1000, limit_eval=500)
    data.prepare_data()
    data.setup()
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [59000, 500, 500]
    images, labels = _idx(FASHION / "t10k-images-idx3-ubyte.gz"), _idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    test_x, test_y = data.splits["test"].tensors
    np.testing.assert_array_equal((test_x[:, 0] * 255).round().byte().numpy(), images[:500])
    np.testing.assert_array_equal(test_y.numpy(), labels[:500])
    val_x, _ = data.splits["val"].tensors
    np.testing.assert_array_equal((val_x[0, 0] * 255).round().byte().numpy(),
                                  _idx(FASHION / "train-images-idx3-ubyte.gz")[59000])
    batch_x, batch_y = next(iter(data.test_dataloader()))
    assert batch_x.shape == (64, 1, 28, 28) and batch_x.dtype == torch.float32 and batch_y.dtype == torch.long


def test_idx_files_are_unpacked_whole_before_they_appear(tmp_path, monkeypatch):
    """Two processes that prepare at once (two benchmark jobs) must never read a half-written file: while a file is
    being unpacked its final name does not exist, and no partial file is left behind."""
    import recipes.data

    packed = tmp_path / "idx"
    packed.mkdir()
    labels = np.arange(10, dtype=np.uint8)
    with gzip.open(packed / "t10k-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(bytes([0, 0, 8, 1]) + np.array([10], dtype=">u4").tobytes() + labels.tobytes())
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    seen = []

    def copy(source, target, *args):
        seen.append(sorted(path.name for path in raw.iterdir()))
        return shutil_copyfileobj(source, target, *args)

    shutil_copyfileobj = recipes.data.shutil.copyfileobj
    monkeypatch.setattr(recipes.data.shutil, "copyfileobj", copy)
    TorchvisionDataModule("FashionMNIST", 10, 1, root=str(tmp_path / "root"), idx_dir=str(packed)).prepare_data()
    assert len(seen) == 1 and "t10k-labels-idx1-ubyte" not in seen[0]
    assert [path.name for path in raw.iterdir()] == ["t10k-labels-idx1-ubyte"]
    data = (raw / "t10k-labels-idx1-ubyte").read_bytes()
    np.testing.assert_array_equal(np.frombuffer(data[8:], dtype=np.uint8), labels)


def test_imagenet_sample_keeps_the_imagenet_class_indices():
    data = ImageFolderDataModule(str(SHARED / "imagenet_sample"), num_classes=1000, image_size=64, class_stride=16)
    data.setup()
    assert set(data.splits) == {"test", "val"} and len(data.splits["test"]) == 63
    images, labels = data.splits["test"].tensors
    assert images.shape == (63, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    assert labels.tolist() == [16 * k for k in range(63)]  # tench (n01440764) is ImageNet class 0
    first = sorted((SHARED / "imagenet_sample" / "n01440764").iterdir())[0]
    with Image.open(first) as photo:
        reference = photo.convert("RGB")
        scale = 64 / min(reference.size)
        reference = reference.resize((round(reference.width * scale), round(reference.height * scale)),
                                     Image.BILINEAR)
    reference = torch.from_numpy(np.asarray(reference)).permute(2, 0, 1).float() / 255
    top, left = (reference.shape[1] - 64) // 2, (reference.shape[2] - 64) // 2
    crop = reference[:, top : top + 64, left : left + 64]
    assert (images[0] - crop).abs().mean() < 0.03  # same photo, same crop; resampling filters differ slightly
    with pytest.raises(ValueError, match="num_classes"):
        ImageFolderDataModule(str(SHARED / "imagenet_sample"), num_classes=100, image_size=32, class_stride=16).setup()


def test_medmnist_module_reads_the_npz_layout_without_downloading():
    data = MedMNISTDataModule("pneumoniamnist", num_classes=2, in_channels=1, root=str(SHARED), download=False)
    data.prepare_data()
    data.setup()
    archive = np.load(SHARED / "pneumoniamnist.npz")
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [4707, 524, 624]
    x, y = data.splits["val"].tensors
    np.testing.assert_array_equal((x[:, 0] * 255).round().byte().numpy(), archive["val_images"])
    np.testing.assert_array_equal(y.numpy(), archive["val_labels"][:, 0])


def test_resizing_on_the_fly_and_channel_checks():
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    images[1] = 200
    resized = ImageTensors(images, torch.arange(3), image_size=16)
    assert resized[1][0].shape == (3, 16, 16)
    torch.testing.assert_close(resized[1][0], torch.full((3, 16, 16), 200 / 255))  # constant stays constant
    torch.testing.assert_close(ImageTensors(images, torch.arange(3))[2][0], images[2].float() / 255)
    with pytest.raises(ValueError, match="3 channels"):
        data = NpzDataModule(str(SHARED / "cifar10_subset.npz"), num_classes=10, in_channels=1)
        data.setup()
    with pytest.raises(ValueError, match="must be one of"):
        TorchvisionDataModule("SVHN", num_classes=10, in_channels=3)
