"""LightningDataModules for the recipes. Images are float tensors in [0, 1], (N, C, H, W); normalisation
belongs to the model, so Fisher scores and attacks live in pixel space.

Every module keeps its splits in memory as uint8 (or float) tensors and converts (and, with `image_size`,
resizes) one sample at a time, so a 224 px protocol never holds the enlarged set. Sources:
`DigitsDataModule` (scikit-learn's digits, the embedded default), `NpzDataModule` (any MedMNIST-layout npz),
`MedMNISTDataModule` (the `medmnist` package's files, downloaded for users), `TorchvisionDataModule`
(CIFAR-10/100, MNIST, Fashion-MNIST; downloaded, or read from local IDX files such as Debian's
`dataset-fashion-mnist`) and `ImageFolderDataModule` (ImageNet, Tiny-ImageNet, an X-ray set).
"""
from __future__ import annotations

import gzip
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset


def _channels_first(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) -> (N, C, H, W), dtype kept."""
    array = torch.as_tensor(np.ascontiguousarray(images))
    return array[:, None] if array.ndim == 3 else array.permute(0, 3, 1, 2)


def _resolve(path: str | Path) -> Path:
    """`path`, or `$FIM_DATA_DIR/path` for a relative path when that variable is set."""
    path = Path(path).expanduser()
    if not path.is_absolute() and "FIM_DATA_DIR" in os.environ:
        path = Path(os.environ["FIM_DATA_DIR"]) / path
    return path


class ImageTensors(Dataset):
    """(image, label) pairs from (N, C, H, W) images, uint8 (pixels / 255) or float in [0, 1]; resized on the
    fly to `image_size` x `image_size` (bilinear, antialiased) when given."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: Optional[int] = None) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.image_size = images, labels.long(), image_size

    def __len__(self) -> int:
        return len(self.labels)

    def _convert(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if self.image_size is not None and tuple(images.shape[-2:]) != (self.image_size,) * 2:
            images = torch.nn.functional.interpolate(images, size=(self.image_size,) * 2, mode="bilinear",
                                                     antialias=True, align_corners=False).clamp(0, 1)
        return images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._convert(self.images[index : index + 1])[0], self.labels[index]

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples as one (images, labels) batch, converted like single items."""
        return self._convert(self.images), self.labels


class ArrayDataModule(pl.LightningDataModule):
    """Train / val / test splits held in memory; subclasses fill `splits` in `setup` through `_store`.

    Args:
        num_classes, in_channels: describe the data for the model configs.
        batch_size, num_workers: of every dataloader.
        image_size: resize every image to image_size x image_size (e.g. 224 for torchvision's native models).
        limit_train, limit_eval: keep the first samples of the train / of the val and test splits.
    """

    def __init__(self, num_classes: int, in_channels: int, batch_size: int = 64, num_workers: int = 0,
                 image_size: Optional[int] = None, limit_train: Optional[int] = None,
                 limit_eval: Optional[int] = None) -> None:
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        self.batch_size, self.num_workers, self.image_size = batch_size, num_workers, image_size
        self.limit_train, self.limit_eval = limit_train, limit_eval
        self.splits: dict[str, Dataset] = {}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def _store(self, split: str, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.shape[1] != self.in_channels:
            raise ValueError(f"{split} images have {images.shape[1]} channels, the data config says "
                             f"in_channels={self.in_channels}")
        labels = labels.reshape(-1)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"{split} labels run from {labels.min().item()} to {labels.max().item()}, but the data "
                             f"config says num_classes={self.num_classes}: set data.num_classes to the data's")
        limit = self.limit_train if split == "train" else self.limit_eval
        self.splits[split] = ImageTensors(images[:limit], labels.reshape(-1)[:limit], self.image_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class DigitsDataModule(ArrayDataModule):
    """scikit-learn's 8x8 handwritten digits (shipped inside the wheel): the embedded default, no download."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, batch_size: int = 64, **kwargs) -> None:
        super().__init__(num_classes, in_channels, batch_size, **kwargs)

    def setup(self, stage: Optional[str] = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).float()[:, None] / 16.0
        labels = torch.from_numpy(digits.target)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        images, labels = images[order], labels[order]
        self._store("train", images[:1200], labels[:1200])
        self._store("val", images[1200:1500], labels[1200:1500])
        self._store("test", images[1500:], labels[1500:])


class NpzDataModule(ArrayDataModule):
    """Any MedMNIST-layout `.npz` ({train,val,test}_images uint8, {train,val,test}_labels): PneumoniaMNIST,
    the offline CIFAR-10 subset, or a MedMNIST download. A relative `path` is resolved against
    $FIM_DATA_DIR."""

    def __init__(self, path: str, num_classes: int, in_channels: int, batch_size: int = 64, **kwargs) -> None:
        super().__init__(num_classes, in_channels, batch_size, **kwargs)
        self.path = path

    def resolved_path(self) -> Path:
        path = _resolve(self.path)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: set FIM_DATA_DIR to the folder holding it, or pass data.path=/absolute/path.npz"
            )
        return path

    def setup(self, stage: Optional[str] = None) -> None:
        path = self.resolved_path()
        try:
            archive = np.load(path)
        except (ValueError, OSError, EOFError) as error:
            raise ValueError(f"{path}: not a NumPy .npz archive ({error})") from error
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: a single array, not a .npz archive of the MedMNIST layout")
        missing = [f"{split}_{kind}" for split in ("train", "val", "test") for kind in ("images", "labels")
                   if f"{split}_{kind}" not in archive.files]
        if missing:
            raise ValueError(f"{path}: not of the MedMNIST layout, missing arrays {missing} (it has {archive.files})")
        for split in ("train", "val", "test"):
            self._store(split, _channels_first(archive[f"{split}_images"]),
                        torch.from_numpy(archive[f"{split}_labels"].reshape(-1)))


class MedMNISTDataModule(NpzDataModule):
    """A MedMNIST v2 data set by its flag (`pneumoniamnist`, `chestmnist`, `dermamnist`, ...): the file
    `<root>/<flag>.npz` (`<flag>_<size>.npz` for size 64/128/224), downloaded by the `medmnist` package
    (`pip install medmnist`) when missing and `download` is true."""

    def __init__(self, flag: str, num_classes: int, in_channels: int, root: str = "~/.medmnist", size: int = 28,
                 download: bool = True, batch_size: int = 64, **kwargs) -> None:
        file = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
        super().__init__(str(Path(root) / file), num_classes, in_channels, batch_size, **kwargs)
        self.flag, self.root, self.size, self.download = flag, root, size, download

    def prepare_data(self) -> None:
        if _resolve(self.path).exists() or not self.download:
            return
        try:
            import medmnist
        except ImportError as error:
            raise ImportError(f"{self.path} is missing and downloading it needs `pip install medmnist`") from error
        info = medmnist.INFO[self.flag]
        root = _resolve(self.root)
        root.mkdir(parents=True, exist_ok=True)
        getattr(medmnist, info["python_class"])(split="train", root=str(root), download=True, size=self.size)


TORCHVISION_SETS = {"CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "KMNIST"}


class TorchvisionDataModule(ArrayDataModule):
    """A torchvision data set (`name` in CIFAR10, CIFAR100, MNIST, FashionMNIST, KMNIST), downloaded into
    `root` when `download`. The last `val_size` training images form the validation split. For the MNIST
    family `idx_dir` may point at local IDX `.gz` files (Debian's `dataset-fashion-mnist` installs them in
    /usr/share/datasets/fashion-mnist): they are unpacked into torchvision's layout and read by torchvision."""

    def __init__(self, name: str, num_classes: int, in_channels: int, root: str = "~/.cache/fim_lightning",
                 download: bool = True, val_size: int = 5000, idx_dir: Optional[str] = None, batch_size: int = 64,
                 **kwargs) -> None:
        if name not in TORCHVISION_SETS:
            raise ValueError(f"name must be one of {sorted(TORCHVISION_SETS)}, got {name!r}")
        super().__init__(num_classes, in_channels, batch_size, **kwargs)
        self.name, self.root, self.download, self.val_size, self.idx_dir = name, root, download, val_size, idx_dir

    def _dataset(self, train: bool, download: bool):
        import torchvision

        return getattr(torchvision.datasets, self.name)(str(_resolve(self.root)), train=train, download=download)

    def _unpack_idx(self) -> None:
        raw = _resolve(self.root) / self.name / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        sources = sorted(_resolve(self.idx_dir).glob("*-ubyte.gz"))
        if not sources:
            raise FileNotFoundError(f"no IDX *-ubyte.gz files in {_resolve(self.idx_dir)}; Fashion-MNIST installs "
                                    "offline from Debian: apt-get install dataset-fashion-mnist")
        for source in sources:  # unpacked whole, then renamed: two processes that prepare at once both read whole files
            target = raw / source.name.removesuffix(".gz")
            if not target.exists():
                partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
                with gzip.open(source, "rb") as packed, open(partial, "wb") as unpacked:
                    shutil.copyfileobj(packed, unpacked)
                partial.replace(target)

    def prepare_data(self) -> None:
        if self.idx_dir is not None:
            self._unpack_idx()
        else:
            for train in (True, False):
                self._dataset(train, self.download)

    def setup(self, stage: Optional[str] = None) -> None:
        train, test = self._dataset(True, False), self._dataset(False, False)
        images, labels = _channels_first(train.data), torch.as_tensor(train.targets)
        cut = len(labels) - self.val_size
        self._store("train", images[:cut], labels[:cut])
        self._store("val", images[cut:], labels[cut:])
        self._store("test", _channels_first(test.data), torch.as_tensor(test.targets))


class FolderImages(Dataset):
    """(image in [0, 1], label) from a torchvision `ImageFolder`, decoded one sample at a time: only the file
    list is held, so ImageNet's 50,000 validation photos cost no memory until a batch asks for them."""

    def __init__(self, folder: Path, mode: str, image_size: int, class_stride: int, class_offset: int) -> None:
        import torchvision
        from torchvision.transforms import v2

        transform = v2.Compose([v2.PILToTensor(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
        self.folder = torchvision.datasets.ImageFolder(str(folder), loader=partial(_open_image, mode=mode),
                                                       transform=transform)
        self.labels = torch.tensor(self.folder.targets) * class_stride + class_offset

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.folder[index][0].float() / 255.0, self.labels[index]

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples as one (images, labels) batch (decodes everything: for small folders)."""
        return torch.stack([self[i][0] for i in range(len(self))]), self.labels


class ImageFolderDataModule(ArrayDataModule):
    """Images in ImageFolder layout (`<root>/<split>/<class>/<image>`; a `root` without split folders is the
    test split alone), RGB or grey, resized to `image_size` (shorter side, then centre crop). Class k in
    sorted folder order gets index `class_offset + k * class_stride`: the default 0, 1, 2, ...; ImageNet-1k
    weights need each folder's index in the full sorted list of 1,000 wnids (the offline sample in
    ../shared/data holds every 16th class: stride 16). Images are decoded when a batch asks for them
    (`FolderImages`), so memory does not grow with the folder."""

    def __init__(self, root: str, num_classes: int, in_channels: int = 3, image_size: int = 224,
                 class_stride: int = 1, class_offset: int = 0, batch_size: int = 32, **kwargs) -> None:
        super().__init__(num_classes, in_channels, batch_size, image_size=image_size, **kwargs)
        self.root, self.class_stride, self.class_offset = root, class_stride, class_offset

    def _open(self, split: str, folder: Path) -> None:
        images = FolderImages(folder, "RGB" if self.in_channels == 3 else "L", self.image_size, self.class_stride,
                              self.class_offset)
        if images.labels.max() >= self.num_classes:
            raise ValueError(f"{folder}: class index {images.labels.max().item()} >= num_classes={self.num_classes}")
        limit = self.limit_train if split == "train" else self.limit_eval
        self.splits[split] = images if limit is None else torch.utils.data.Subset(images,
                                                                                  range(min(limit, len(images))))

    def setup(self, stage: Optional[str] = None) -> None:
        root = _resolve(self.root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder: set FIM_DATA_DIR or data.root")
        present = {split: root / split for split in ("train", "val", "test") if (root / split).is_dir()}
        if not present:
            present = {"test": root}
        for split, folder in present.items():
            self._open(split, folder)
        for split, fallback in (("test", "val"), ("val", "test")):
            if split not in self.splits and fallback in self.splits:
                self.splits[split] = self.splits[fallback]


def _open_image(path: str, mode: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert(mode)
