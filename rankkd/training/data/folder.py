"""The ImageFolder tree (root/train/<class>/<image>, root/val/<class>/<image>): listing, checks and bad-file diagnosis.

Both loaders read the same listing, so they see the same files with the same labels in the same order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Extensions both DALI's decoders and PIL read. Other files in a class folder (READMEs, .txt) are ignored, like
# torchvision's ImageFolder does; hidden entries (".ipynb_checkpoints", ".DS_Store") are ignored too.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm")


class ImageFolderError(ValueError):
    """The tree does not have the ImageFolder layout: an empty class folder, or train/ and val/ disagreeing."""


class BadImageError(RuntimeError):
    """A file in the tree could not be decoded as an image; the message names it.

    `path` is the file, except when the error was re-raised from a torch DataLoader worker: torch rebuilds the
    exception from its message alone (which still names the file), so `path` is None there.
    """

    def __init__(self, message: str, *, path: str | None = None):
        super().__init__(message)
        self.path = path

    @classmethod
    def for_file(cls, path: str, cause: BaseException) -> BadImageError:
        return cls(f"cannot decode image file {path}: {type(cause).__name__}: {cause}", path=path)


@dataclass(frozen=True)
class SplitListing:
    """One split's files, sorted by class then file name, with their class indices."""

    files: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class ImageFolderListing:
    root: Path
    classes: list[str]
    train: SplitListing
    val: SplitListing


def _visible_entries(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as entries:
        return sorted((entry for entry in entries if not entry.name.startswith(".")), key=lambda entry: entry.name)


def _class_names(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise FileNotFoundError(f"ImageFolder tree: missing folder {split_dir} (expected <root>/train and <root>/val, "
                                "each with one sub-folder per class)")
    classes = [entry.name for entry in _visible_entries(split_dir) if entry.is_dir()]
    if not classes:
        raise ImageFolderError(f"ImageFolder tree: {split_dir} has no class sub-folders")
    return classes


def _list_split(split_dir: Path, classes: list[str]) -> SplitListing:
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        images = [entry.path for entry in _visible_entries(class_dir)
                  if entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file()]
        if not images:
            raise ImageFolderError(f"ImageFolder tree: class folder {class_dir} holds no image files "
                                   f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
        files.extend(images)
        labels.extend([label] * len(images))
    return SplitListing(files, labels)


def list_image_folder(root: str | os.PathLike) -> ImageFolderListing:
    """Lists root/train and root/val, checking the layout; errors name the offending path."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder tree: root {root} is not a directory")
    train_dir, val_dir = root / "train", root / "val"
    train_classes = _class_names(train_dir)
    val_classes = _class_names(val_dir)
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise ImageFolderError(f"ImageFolder tree: class folders differ between {train_dir} and {val_dir}: "
                               f"only in train: {only_train[:10]}, only in val: {only_val[:10]}")
    return ImageFolderListing(root, train_classes, _list_split(train_dir, train_classes),
                              _list_split(val_dir, train_classes))


def find_undecodable(paths: list[str]) -> BadImageError | None:
    """The first of `paths` that PIL cannot fully decode, as an error naming it; None when all decode.

    DALI reports a decoding failure without the file's name, so the loaders re-decode the batches that were in
    flight with PIL to name the culprit.
    """
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as error:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
            return BadImageError.for_file(path, error)
    return None
