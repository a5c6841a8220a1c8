"""The ImageFolder tree (root/train/<class>/<image>, root/val/<class>/<image>): listing, checks and bad-file diagnosis.

Both loaders read the same listing, so they see the same files with the same labels in the same order.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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


def image_problem(path: str, *, full: bool = False) -> str | None:
    """Why `path` can't be read as an image, in a few words; None when it can.

    full=True decodes the image, as the loaders will. The fast check (full=False) decodes only the files that look
    broken: it parses the header, checks a JPEG's last bytes for the end-of-image marker and every chunk of a PNG
    (PIL's verify: checksums, and the end chunk a cut-off file lacks). That finds empty files, files that are no
    image (text named .JPEG) and cut-off files at a fraction of a decode's cost, but not damage inside a complete
    JPEG. Formats other than JPEG and PNG are rare, and always decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            decode = full or not _looks_complete(image, path)
        if decode:  # verify() leaves an image unusable: decode from a fresh open
            with Image.open(path) as image:
                image.load()
    except UnidentifiedImageError:
        return "not an image (no image format recognises its contents)"
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error, ...)
        message = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        if "truncated" in message.lower():
            return f"truncated: the file ends before its image data does ({message})"
        return message or type(error).__name__
    return None


def _looks_complete(image, path: str) -> bool:
    if image.format == "JPEG":  # the end-of-image marker (FF D9) among the last bytes (some writers pad after it)
        with open(path, "rb") as file:
            file.seek(max(0, os.path.getsize(path) - 1024))
            return b"\xff\xd9" in file.read()
    if image.format == "PNG":
        try:
            image.verify()
        except Exception:  # noqa: BLE001  (the decode that follows says what is wrong)
            return False
        return True
    return False


class UnreadableImage(NamedTuple):
    path: str
    reason: str


def default_check_workers() -> int:
    """Threads for find_unreadable_images: reading headers waits on storage more than on the CPU."""
    return min(32, 4 * (os.cpu_count() or 1))


def find_unreadable_images(paths: list[str], *, full: bool = False, workers: int | None = None,
                           progress: Callable[[int, int], None] | None = None) -> list[UnreadableImage]:
    """Every file of `paths` that image_problem finds unreadable, with the reason, in the order of `paths`.

    Checked by `workers` threads (default: default_check_workers()); PIL and file reads release the GIL.
    `progress(done, bad)` is called from this thread after each batch of files.
    """
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    workers = workers or default_check_workers()
    # Batches of files rather than one task per file: ImageNet's 1.3 million would be as many futures in memory.
    size = max(1, min(256, len(paths) // (4 * workers)))
    batches = [range(start, min(start + size, len(paths))) for start in range(0, len(paths), size)]

    def check(batch: range) -> list[tuple[int, str]]:
        found = ((index, image_problem(paths[index], full=full)) for index in batch)
        return [(index, problem) for index, problem in found if problem is not None]

    unreadable: list[tuple[int, str]] = []
    done = 0
    with ThreadPoolExecutor(workers) as pool:
        for batch, found in zip(batches, pool.map(check, batches)):
            unreadable += found
            done += len(batch)
            if progress is not None:
                progress(done, len(unreadable))
    return [UnreadableImage(paths[index], problem) for index, problem in sorted(unreadable)]


# The loaders read only files with an image extension, so a rename takes a file out of the data set.
EXCLUDE_HINT = ("To exclude a file, rename it (mv FILE FILE.unreadable: the loaders skip names without an image "
                "extension) or move it out of the tree")


def check_images(paths: list[str], *, what: str, workers: int | None = None) -> None:
    """Raise a BadImageError naming the unreadable files among `paths` (image_problem's fast check) and how to
    exclude them, unless all are readable. `what` names the files in the message ("the validation set")."""
    unreadable = find_unreadable_images(paths, workers=workers)
    if not unreadable:
        return
    shown = "; ".join(f"{image.path} ({image.reason})" for image in unreadable[:3])
    more = f"; and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
    scan = f"python -m rankkd.data.scan {os.path.commonpath([os.path.dirname(path) for path in paths])}"
    raise BadImageError(f"{len(unreadable)} unreadable image file(s) in {what}: {shown}{more}. {EXCLUDE_HINT}; "
                        f"`{scan}` lists every unreadable image", path=unreadable[0].path)


def find_undecodable(paths: list[str]) -> BadImageError | None:
    """The first of `paths` that PIL cannot fully decode, as an error naming it; None when all decode.

    DALI reports a decoding failure without the file's name, so the loaders re-decode the batches that were in
    flight with PIL to name the culprit.
    """
    for path in paths:
        problem = image_problem(path, full=True)
        if problem is not None:
            return BadImageError(f"cannot decode image file {path}: {problem}", path=path)
    return None
