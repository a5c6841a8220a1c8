"""A folder built whole or not at all: write it in a hidden temporary folder beside its place, flush its files to
disk, then rename it into place. An interrupted build leaves nothing behind, and builders racing for one folder (the
ranks of a run) settle on the first one renamed."""
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def build_folder(folder: Path, write: Callable[[Path], None], replace: Callable[[], bool] = lambda: False) -> Path:
    """write(staging) fills a temporary folder that then becomes `folder`. An existing `folder` is kept (and nothing
    is written) unless replace() says it is out of date: it is then set aside and removed."""
    folder = Path(folder)
    if folder.is_dir() and not replace():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        write(staging)
        for file in staging.rglob("*"):
            if file.is_file():
                with open(file, "rb") as written:
                    os.fsync(written.fileno())
        if folder.exists() and replace():  # out of date; one that another builder just renamed into place is kept
            retired = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            folder.rename(retired / folder.name)
            shutil.rmtree(retired)
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():  # not a lost race with another builder: a real failure
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder
