"""Images as a Python user has them, made into what the guard reads: one (N, 3, H, W) uint8 tensor at
the bundle's input size, decoded and resized by the bundle's own :class:`~defense.preprocessing.Preprocessing`.

Accepted: a uint8 tensor (N, 3, H, W) or (3, H, W) already at the input size; a PIL image; a path
to an image file, or to a folder (every image under it, in sorted order); a list of PIL images or
paths.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from defense.data import ImageSet, decode_paths, scan_flat_folder
from defense.errors import UserError
from defense.preprocessing import Preprocessing

ImagesLike = torch.Tensor | Image.Image | str | Path | list  # what image_batch takes


def image_batch(images: ImagesLike, preprocessing: Preprocessing, option: str = "images") -> torch.Tensor:
    """``images`` as a (N, 3, H, W) uint8 tensor at ``preprocessing.input_size``."""
    if isinstance(images, torch.Tensor):
        return _checked_tensor(images, preprocessing, option)
    if isinstance(images, Image.Image):
        return preprocessing.image_to_uint8(images).unsqueeze(0)
    if isinstance(images, (str, Path)):
        path = Path(images)
        if not path.exists():
            raise UserError(f"{option} {path}: no such file or folder")
        paths = scan_flat_folder(path, option=option) if path.is_dir() else [path]
        return decode_paths(paths, preprocessing, option)
    if isinstance(images, (list, tuple)):
        if not images:
            raise UserError(f"{option}: an empty list of images")
        return torch.cat([image_batch(image, preprocessing, option) for image in images])
    raise UserError(f"{option}: expected a uint8 tensor, a PIL image, a path or a list of them, "
                    f"got {type(images).__name__}")


def _checked_tensor(images: torch.Tensor, preprocessing: Preprocessing, option: str) -> torch.Tensor:
    if images.dtype != torch.uint8:
        raise UserError(f"{option}: expected uint8 pixels (0-255), got {images.dtype}; "
                        "for floats in [0, 1]: (images * 255).round().to(torch.uint8)")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    height, width = preprocessing.input_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, height, width):
        raise UserError(f"{option}: a tensor of shape {tuple(images.shape)}; expected (N, 3, {height}, {width}): "
                        "RGB at the bundle's input size (or pass PIL images or files, which are resized)")
    return images.cpu()


def labeled_image_set(images: ImagesLike, labels, preprocessing: Preprocessing, class_names: list[str] | None,
                      option: str = "--clean-data") -> ImageSet:
    """Clean images handed over in memory, with their labels (None: no labels, -1 each). They are
    named ``python-images/NNNNNN`` in the bundle's records, in the order given."""
    batch = image_batch(images, preprocessing, option=option)
    if labels is None:
        targets = torch.full((len(batch),), -1, dtype=torch.long)
    else:
        targets = torch.as_tensor(labels, dtype=torch.long).flatten()
        if len(targets) != len(batch):
            raise UserError(f"{option}: {len(batch)} images but {len(targets)} labels")
        if len(targets) and int(targets.min()) < 0:
            raise UserError(f"{option}: labels must be class indices (0, 1, ...)")
        class_names = class_names or [str(i) for i in range(int(targets.max()) + 1 if len(targets) else 0)]
        if len(targets) and int(targets.max()) >= len(class_names):
            raise UserError(f"{option}: label {int(targets.max())} but {len(class_names)} class names")
    paths = [Path(f"python-images/{index:06d}") for index in range(len(batch))]
    return ImageSet(batch, targets, list(class_names or []), paths)
