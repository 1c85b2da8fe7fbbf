"""Reading the user's clean images: an ImageFolder tree (labels) or a flat folder (no labels)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from defense.errors import UserError
from defense.preprocessing import ImageDecodeError, Preprocessing
from defense.progress import progress_bar

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class ImageSet:
    """Images as one uint8 tensor (N, 3, H, W), with labels (or -1 where unknown)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        idx = indices.tolist()
        return ImageSet(self.images[indices], self.labels[indices], self.class_names, [self.paths[i] for i in idx])


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_class_names(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"--class-names {path}: no such file")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise UserError(f"--class-names {path}: the file lists no class names")
    if len(set(names)) != len(names):
        raise UserError(f"--class-names {path}: a class name appears twice")
    return names


def scan_image_folder(root: Path, class_names: list[str] | None = None, option: str = "--clean-data"):
    """List (path, label) pairs of an ImageFolder tree: one sub-folder per class.

    The class index is the sorted folder order, or the order of ``class_names`` when given.
    """
    if not root.is_dir():
        raise UserError(f"{option} {root}: no such folder")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if class_names is None:
        class_names = [name for name in folders if _image_files(root / name)]
    else:
        unknown = [name for name in folders if name not in class_names and _image_files(root / name)]
        if unknown:
            raise UserError(f"{option} {root}: folder {unknown[0]!r} is not in the class-names file")
    if not class_names:
        loose = _image_files(root)
        hint = " (it holds loose images: use --no-labels for an unlabeled folder)" if loose else ""
        raise UserError(f"{option} {root}: no class sub-folders with images{hint}")
    if len(class_names) < 2:
        raise UserError(f"{option} {root}: only one class ({class_names[0]!r}); a classifier's clean set needs at least two")
    items = []
    for label, name in enumerate(class_names):
        folder = root / name
        if folder.is_dir():
            items.extend((path, label) for path in _image_files(folder))
    return items, list(class_names)


def scan_flat_folder(root: Path, option: str = "--clean-data") -> list[Path]:
    if not root.is_dir():
        raise UserError(f"{option} {root}: no such folder")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"{option} {root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def decode_paths(paths: list[Path], preprocessing: Preprocessing, option: str) -> torch.Tensor:
    """(len(paths), 3, H, W) uint8 at the preprocessing's input size; a bad file is the user's error."""
    height, width = preprocessing.input_size
    images = torch.empty((len(paths), 3, height, width), dtype=torch.uint8)
    for index, path in enumerate(paths):
        try:
            images[index] = preprocessing.load(path)
        except ImageDecodeError as error:
            raise UserError(f"{option}: {path}: {error}; remove or replace this file")
    return images


def iter_image_batches(paths: list[Path], preprocessing: Preprocessing, batch_size: int = 256,
                       option: str = "--calibration-data", progress: bool = True, desc: str = "scoring"):
    """Decoded images in batches, so that a large folder is never held in memory at once."""
    with progress_bar(total=len(paths), desc=desc, unit="img", enabled=progress) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            yield decode_paths(chunk, preprocessing, option)
            bar.update(len(chunk))


def load_image_folder(
    root: Path,
    preprocessing: Preprocessing,
    class_names: list[str] | None = None,
    labeled: bool = True,
    option: str = "--clean-data",
    progress: bool = True,
) -> ImageSet:
    """Decode every image of a folder at the bundle's input size."""
    if labeled:
        items, class_names = scan_image_folder(root, class_names, option)
    else:
        items = [(path, -1) for path in scan_flat_folder(root, option)]
        class_names = class_names or []
    if not items:
        raise UserError(f"{option} {root}: no images")
    paths = [path for path, _ in items]
    images = torch.cat(list(iter_image_batches(paths, preprocessing, option=option, progress=progress,
                                               desc=f"reading {root.name}")))
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return ImageSet(images, labels, class_names, [path for path, _ in items])
