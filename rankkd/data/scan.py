"""Find every unreadable image in a data set before a training run meets one:

    python -m rankkd.data.scan ROOT [--workers N] [--full]

ROOT is an ImageFolder tree (ROOT/train, ROOT/val) or any folder of images. Every file with an image extension is
checked, in parallel; hidden files and folders are skipped, as the loaders skip them. The unreadable ones are
printed on stdout, one "PATH<TAB>REASON" line each, and progress and the summary on stderr, so the list can be piped
into a command that excludes them. Exit status: 0 when every image is readable, 1 when some are not, 2 for bad
arguments.
"""
import argparse
import os
import shlex
import sys
import time

from rankkd.data.folder import EXCLUDE_HINT, IMAGE_EXTENSIONS, default_check_workers, find_unreadable_images


def list_images(root):
    """Every file under `root` with an image extension, sorted, following symbolic links as the loaders do."""
    images = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        images += [os.path.join(folder, name) for name in sorted(files)
                   if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)]
    return images


class ProgressLine:
    """`checked D/N images, B unreadable, R images/s` on stderr: redrawn in place a few times a second on a
    terminal, a new line every ten seconds in a log file."""

    def __init__(self, total, stream=None):
        self.total, self.stream = total, stream or sys.stderr
        self.in_place = self.stream.isatty()
        self.start = self.shown = time.monotonic()

    def __call__(self, done, unreadable):
        now = time.monotonic()
        if done < self.total and now - self.shown < (0.25 if self.in_place else 10.0):
            return
        self.shown = now
        text = (f"checked {done:,}/{self.total:,} images, {unreadable:,} unreadable, "
                f"{done / max(now - self.start, 1e-9):,.0f} images/s")
        end = "" if self.in_place and done < self.total else "\n"
        print(f"\r{text}" if self.in_place else text, end=end, file=self.stream, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rankkd.data.scan",
                                     description="List every image file under ROOT that cannot be read.")
    parser.add_argument("root", metavar="ROOT", help="an ImageFolder tree (ROOT/train, ROOT/val) or any folder of "
                        "images")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"threads reading files (default: {default_check_workers()} on this machine)")
    parser.add_argument("--full", action="store_true",
                        help="decode every image as the loaders will, which also finds damage inside complete JPEG "
                             "files (several times slower than the default check of headers and file ends)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if not os.path.isdir(args.root):
        parser.error(f"{args.root} is not a folder")
    images = list_images(args.root)
    if not images:
        parser.error(f"no image files under {args.root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    workers = args.workers or default_check_workers()
    print(f"checking {len(images):,} images under {args.root} with {workers} threads "
          f"({'decoding every image' if args.full else 'headers and file ends'})", file=sys.stderr, flush=True)
    unreadable = find_unreadable_images(images, full=args.full, workers=workers, progress=ProgressLine(len(images)))
    for image in unreadable:
        print(f"{image.path}\t{image.reason}", flush=True)
    if not unreadable:
        print(f"all {len(images):,} images are readable", file=sys.stderr)
        return 0
    command = shlex.join(["python", "-m", "rankkd.data.scan", args.root] + ["--full"] * args.full)
    print(f"{len(unreadable):,} of {len(images):,} images are unreadable (listed above as PATH<TAB>REASON). "
          f"{EXCLUDE_HINT}. To rename all of them:\n"
          f"  {command} | cut -f1 | while read -r f; do mv \"$f\" \"$f.unreadable\"; done", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
