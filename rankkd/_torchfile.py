"""Reading a torch.save file that a user pointed at, with one-line errors that say what is wrong with it.

torch.load reports a file cut short as "OSError: [Errno 22] Invalid argument" (it seeks before the start), an empty
file as a blank EOFError, text as a KeyError, and anything weights_only refuses with a page of advice to turn the
safety off. The file's first bytes tell most of these cases apart before torch.load runs, so the checks are done up
front and torch.load is left with well-formed files.

torch.load does not check the CRC-32 that torch.save's zip format records for every member either: bytes overwritten
inside a tensor load as wrong weights without a word. Every member is read and checked against its CRC first (about
a second per GB), so a damaged file is refused naming the member instead.
"""
import pickle
import re
import zipfile
from pathlib import Path

import torch

# torch.save's zip format (the default since torch 1.6) is a zip archive; its legacy format is a pickle stream that
# starts with this magic number, pickled with protocol 2 as a 10-byte LONG1.
_ZIP_SIGNATURE = b"PK\x03\x04"
_LEGACY_SIGNATURE = b"\x80\x02\x8a\x0a" + torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
_GIT_LFS_POINTER = b"version https://git-lfs"
_CORRUPT = "it is truncated or corrupt: not a complete torch.save file"


def load_torch_file(path, what="checkpoint"):
    """torch.load(path) on the CPU with weights_only=True (tensors and plain Python values, never code from the
    file). A ValueError of one line, starting "cannot read {what} '{path}':", says why the file can't be read:
    missing, a folder, empty, not a torch.save file, truncated or corrupt, or holding pickled Python objects."""
    path = Path(path)

    def unreadable(problem):
        return ValueError(f"cannot read {what} {str(path)!r}: {problem}")

    try:
        with path.open("rb") as file:
            head = file.read(64)
    except FileNotFoundError:
        raise unreadable("no such file") from None
    except IsADirectoryError:
        raise unreadable("it is a folder, not a file") from None
    except OSError as error:
        raise unreadable(error.strerror or str(error)) from None
    if not head:
        raise unreadable("it is empty (0 bytes)")
    if head.startswith(_ZIP_SIGNATURE):
        _check_zip_archive(path, unreadable)
    elif not head.startswith(_LEGACY_SIGNATURE):
        raise unreadable(_not_torch_file(head))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise unreadable(_refused_object(str(error))) from None
        raise unreadable(_CORRUPT) from None
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001
        # The header was a torch.save file's, so any failure past it (a short read, a bad CRC or offset, a pickle
        # stream ending mid-record) means the file was torn or damaged.
        raise unreadable(_CORRUPT) from None


def _check_zip_archive(path, unreadable):
    """A zip archive's directory sits at its end: a file cut short has none. Every member is then read whole and
    checked as zipfile's testzip does (its CRC-32, and its local header against the directory), naming the first
    damaged one."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist()):
                raise unreadable("it is a zip archive, but not one written by torch.save")
            for member in archive.infolist():
                problem = _member_problem(archive, member)
                if problem:
                    raise unreadable(f"member {member.filename!r} is damaged ({problem}): the file changed after "
                                     "it was written")
    except (zipfile.BadZipFile, OSError):
        raise unreadable(_CORRUPT) from None


def _member_problem(archive, member):
    try:
        with archive.open(member) as stream:
            while stream.read(1 << 20):
                pass
    except zipfile.BadZipFile as error:
        return "its CRC-32 does not match its bytes" if "CRC" in str(error) else "its header disagrees with the "\
            "directory"
    except EOFError:
        return "it reaches past the end of the file"
    return None


def _not_torch_file(head):
    if head.startswith(_GIT_LFS_POINTER):
        return "it is a Git LFS pointer, not the file itself (fetch it with `git lfs pull`)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # pickle's PROTO opcode
        return "it is a Python pickle, not a torch.save file"
    if all(32 <= byte < 127 or byte in b"\t\n\r" for byte in head):  # an error page, a path, a note
        first_line = head.decode().strip().split("\n")[0]
        return f"it is not a torch.save file but text, starting {first_line[:40]!r}"
    return "it is not a torch.save file"


def _refused_object(message):
    # torch names the first type it refused as "GLOBAL module.Name"; older formats only name a pickle opcode.
    found = re.search(r"GLOBAL (\S+)", message)
    kind = f"a pickled {found.group(1)} object" if found else "pickled Python objects"
    return (f"it holds {kind}, not only tensors and plain values, and loading that would run code from the file. "
            "A model saved whole must be re-saved as its weights: torch.save(model.state_dict(), path)")
