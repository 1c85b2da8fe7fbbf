"""What ``badexpert evaluate`` reads: the target class as given, the clean folder's labels, and the
triggered folder's layout (one folder per source class, or flat)."""

from __future__ import annotations

from pathlib import Path

import torch

from defense.errors import UserError


def resolve_target_class(text: str | None, class_names: list[str]) -> int | None:
    """--target-class as an index or a class name; None when not given."""
    if text is None:
        return None
    if text in class_names:
        return class_names.index(text)
    try:
        index = int(text)
    except ValueError:
        raise UserError(f"--target-class {text}: not a class of this bundle ({_shown(class_names)}) nor an index")
    if not 0 <= index < len(class_names):
        raise UserError(f"--target-class {text}: out of range; the bundle's model has {len(class_names)} classes "
                        f"(0 to {len(class_names) - 1})")
    return index


def _shown(class_names: list[str]) -> str:
    return ", ".join(class_names[:12]) + (", ..." if len(class_names) > 12 else "")


def check_clean_folder(root: Path, class_names: list[str]) -> None:
    """The clean images need labels: one sub-folder per class, named as the bundle's classes."""
    from defense.data import IMAGE_SUFFIXES

    def has_images(folder: Path) -> bool:
        return any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())

    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and has_images(p))
    unknown = [name for name in folders if name not in class_names]
    if unknown:
        raise UserError(f"--clean {root}: folder {unknown[0]!r} is not a class of the bundle ({_shown(class_names)}); "
                        "put the clean images in one folder per class, named as the bundle's classes")
    if not folders:
        raise UserError(f"--clean {root}: no class sub-folders with images; the clean images need labels: one folder "
                        f"per class, named as the bundle's classes ({_shown(class_names)})")


def triggered_sources(root: Path, paths: list[Path], class_names: list[str]) -> tuple[torch.Tensor, str]:
    """Source class of each triggered image from its first-level folder, or -1 (flat folder).

    Layout ``by_source_class``: every image sits in a folder named after a class of the bundle.
    Layout ``flat``: no image does; all count as inputs from a non-target source.
    """
    folders = [path.relative_to(root).parts[0] if len(path.relative_to(root).parts) > 1 else None for path in paths]
    known = [name in class_names for name in folders]
    if not any(known):
        return torch.full((len(paths),), -1, dtype=torch.long), "flat"
    for path, folder, is_class in zip(paths, folders, known):
        if not is_class:
            where = f"folder {folder!r}" if folder is not None else f"loose image {path.name!r}"
            raise UserError(f"--triggered {root}: {where} is not a class of the bundle; use one folder per source "
                            "class (named as in the bundle's class names) or a flat folder of images")
    return torch.tensor([class_names.index(folder) for folder in folders], dtype=torch.long), "by_source_class"
