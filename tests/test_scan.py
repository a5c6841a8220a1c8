"""Unreadable images: found in parallel before training (rankkd.data.folder), and by
`python -m rankkd.data.scan`."""
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rankkd.data import folder, scan

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------------
# Unreadable images: found in parallel before training, and by `python -m rankkd.data.scan`.


def _image_bytes(rng, file_format):
    height, width = rng.integers(7, 40, size=2)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, file_format)
    return buffer.getvalue()


@pytest.fixture
def image_tree(tmp_path):
    """ROOT/{train,val}/<class>/ with readable JPEGs and PNGs (some in disguise, some padded) and four broken files;
    returns (root, {broken path: what its reason must say})."""
    rng = np.random.default_rng()
    root = tmp_path / "data"
    for split in ("train", "val"):
        for name in ("ant", "bee"):
            (root / split / name).mkdir(parents=True)
            for index in range(int(rng.integers(5, 9))):
                file_format = "PNG" if index % 3 == 0 else "JPEG"
                (root / split / name / f"{index:02d}.{file_format}").write_bytes(_image_bytes(rng, file_format))
    (root / "train" / "ant" / "png-named.JPEG").write_bytes(_image_bytes(rng, "PNG"))  # readable: PIL sniffs
    (root / "train" / "bee" / "padded.jpg").write_bytes(_image_bytes(rng, "JPEG") + b"\0" * 300)  # readable
    (root / "val" / ".cache").mkdir()
    (root / "val" / ".cache" / "junk.jpg").write_text("hidden folders are not read")
    jpeg, png = _image_bytes(rng, "JPEG"), _image_bytes(rng, "PNG")
    broken = {
        root / "train" / "bee" / "cut.JPEG": (jpeg[: int(rng.integers(len(jpeg) // 3, len(jpeg) - 2))], "truncated"),
        # Cut into the pixel data: a PNG without only its end chunk decodes, so it is readable.
        root / "train" / "ant" / "cut.png": (png[: int(rng.integers(len(png) // 3, len(png) - 20))], "truncated"),
        root / "val" / "ant" / "empty.jpeg": (b"", "empty file"),
        root / "val" / "bee" / "notes.JPEG": (b"these are notes, not pixels\n", "not an image"),
    }
    for path, (contents, _) in broken.items():
        path.write_bytes(contents)
    return root, {str(path): reason for path, (_, reason) in broken.items()}


def test_find_unreadable_images_lists_every_broken_file_in_order(image_tree):
    root, broken = image_tree
    paths = scan.list_images(root)
    assert not any("/." in path for path in paths)
    for workers in (1, 3):
        calls = []
        found = folder.find_unreadable_images(paths, workers=workers, progress=lambda *args: calls.append(args))
        assert [image.path for image in found] == [path for path in paths if path in broken]
        assert all(re.search(broken[image.path], image.reason) for image in found)
        assert calls[-1] == (len(paths), len(broken))
        assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    full = folder.find_unreadable_images(paths, full=True, workers=2)
    assert [image.path for image in full] == [path for path in paths if path in broken]


def test_check_images_names_the_files_and_the_way_out(image_tree):
    root, broken = image_tree
    val = scan.list_images(root / "val")
    with pytest.raises(folder.BadImageError) as refused:
        folder.check_images(val, what="the validation set", workers=2)
    message = str(refused.value)
    val_broken = sorted(path for path in broken if "/val/" in path)
    assert message.startswith("2 unreadable image file(s) in the validation set: ")
    assert all(path in message for path in val_broken) and refused.value.path == val_broken[0]
    assert "mv FILE FILE.unreadable" in message and f"python -m rankkd.data.scan {root / 'val'}" in message
    folder.check_images([path for path in val if path not in broken], what="the validation set")  # no error


def test_find_undecodable_names_the_first_broken_file(image_tree):
    root, broken = image_tree
    paths = scan.list_images(root / "train")
    first = next(path for path in paths if path in broken)
    error = folder.find_undecodable(paths)
    assert isinstance(error, folder.BadImageError) and error.path == first and first in str(error)
    assert folder.find_undecodable([path for path in paths if path not in broken]) is None


def test_scan_command_lists_unreadable_images_and_exits_1(image_tree, capsys):
    root, broken = image_tree
    assert scan.main([str(root), "--workers", "2"]) == 1
    out, err = capsys.readouterr()
    listed = dict(line.split("\t") for line in out.splitlines())
    assert sorted(listed) == sorted(broken)
    total = len(scan.list_images(root))
    assert f"checked {total:,}/{total:,} images, 4 unreadable" in err
    assert f"4 of {total:,} images are unreadable" in err and "while read -r f; do mv" in err

    for path in broken:
        os.rename(path, path + ".unreadable")  # the exclusion the summary suggests
    assert scan.main([str(root), "--full"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and f"all {total - 4:,} images are readable" in err


def test_scan_command_refuses_bad_arguments(tmp_path, capsys):
    for argv, message in (([str(tmp_path / "nowhere")], "is not a folder"), ([str(tmp_path)], "no image files"),
                          ([str(tmp_path), "--workers", "0"], "--workers must be at least 1")):
        with pytest.raises(SystemExit) as stopped:
            scan.main(argv)
        assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_scan_runs_as_a_module(image_tree):
    root, broken = image_tree
    done = subprocess.run([sys.executable, "-m", "rankkd.data.scan", str(root / "val")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert sorted(line.split("\t")[0] for line in done.stdout.splitlines()) == sorted(
        path for path in broken if "/val/" in path)
