"""Safe file writing: temporary name then rename, and locks that do not outlive their process.

Every output MedTuning writes (model folders, .seg.nrrd, reports, manifests) goes through these
helpers, so that a crash or a kill never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from MedTuningLib.errors import MedTuningError

try:  # POSIX advisory locks are released by the kernel when the process dies.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _not_writable(path: Path, what: str, exc: OSError | None) -> MedTuningError:
    """OUTPUT_NOT_WRITABLE saying why: a part of the path that is a file, or the system's reason."""
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        reason = f"{blocker} is a file, not a folder"
    else:
        reason = (exc.strerror or str(exc)) if exc is not None else "permission denied"
    return MedTuningError(
        "OUTPUT_NOT_WRITABLE", f"cannot write the {what} folder {path}: {reason}",
        "choose a folder you can write to (check permissions, free space, and that no part of the path is a file)",
        path=str(path))


# errno values of "the disk is full" (ENOSPC; EDQUOT: a quota) and "the name is too long".
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}


def error_number(exc: BaseException) -> int | None:
    """The errno behind ``exc``: an OSError's, or the "(os error N)" that Rust libraries (safetensors) report."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    match = re.search(r"os error (\d+)", str(exc))
    return int(match.group(1)) if match else None


def os_failure(exc: BaseException, path: Path, what: str = "output") -> MedTuningError | None:
    """The coded error for an operating-system failure while writing ``path`` (None when ``exc`` is not one
    MedTuning can name: disk full, permission, path too long)."""
    number = error_number(exc)
    reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc))
    if number in _DISK_FULL:
        return MedTuningError("DISK_FULL", f"the disk holding {path} is full (or your quota is used up) while writing "
                              f"the {what}; the partly written file was removed",
                              "free some space (or write to another disk) and run the command again; an interrupted "
                              "training run continues with --resume", path=str(path))
    if number == errno.ENAMETOOLONG:
        return MedTuningError("PATH_TOO_LONG", f"the {what} path {path} is longer than the file system allows",
                              "choose a shorter name or a folder nearer the root", path=str(path))
    if number in _PERMISSION:
        return MedTuningError("OUTPUT_NOT_WRITABLE", f"cannot write the {what} {path}: {reason}",
                              "choose a folder you can write to, or ask for write permission", path=str(path))
    return None


def ensure_writable_dir(path: Path, what: str = "output") -> Path:
    """Create ``path`` (and parents) or raise OUTPUT_NOT_WRITABLE with a hint."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise (os_failure(exc, path, f"{what} folder") if error_number(exc) in _DISK_FULL | {errno.ENAMETOOLONG}
               else _not_writable(path, what, exc)) from exc
    return path


def check_writable_dir(path: Path, what: str = "output") -> Path:
    """Like :func:`ensure_writable_dir` but creates nothing: the folder, or the nearest part of it that
    exists, must be a folder this process can write into (checked before a long run, so that a refusal
    leaves no empty folders behind)."""
    path = Path(path).absolute()
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise _not_writable(path, what, None)
    try:
        probe = tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise _not_writable(path, what, exc) from exc
    return path


def is_pickle_file(path: Path) -> bool:
    """Whether ``path`` holds a pickle (plain, or ``torch.save``'s zip archive) rather than safetensors.

    Looks at bytes only; nothing is unpickled or imported. A safetensors file starts with the 8-byte
    length of its JSON header followed by ``{`` — checked first, since that length's first byte may be
    anything (0x80, pickle's PROTO opcode, included).
    """
    import pickletools
    import struct

    with open(path, "rb") as fh:
        head = fh.read(9)
        if len(head) == 9 and head[8:9] == b"{":
            size = os.fstat(fh.fileno()).st_size
            if 0 < struct.unpack("<Q", head[:8])[0] <= size - 8:
                return False  # a safetensors header
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
            return True  # torch.save's zip archive; pickle protocol 2+
        fh.seek(0)
        try:  # protocol 0 / 1: a well-formed opcode stream ending in STOP (parsed, never executed)
            for opcode, _arg, _pos in pickletools.genops(fh):
                if opcode.name == "STOP":
                    return True
        except Exception:  # noqa: BLE001 - not a pickle opcode stream
            return False
    return False


@contextlib.contextmanager
def atomic_path(final: Path, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds."""
    final = Path(final)
    ensure_writable_dir(final.parent, what)
    suffix = "".join(final.suffixes)  # keep ".seg.nrrd" so writers pick the right format
    try:
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp" + suffix)
    except OSError as exc:
        raise (os_failure(exc, final, what) or exc) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600 and some writers (safetensors) recreate the file: outputs get the usual
        # permissions, so the users of a shared model folder can read all of it.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        mapped = os_failure(exc, final, what) if isinstance(exc, Exception) and not isinstance(exc, MedTuningError) else None
        if mapped is not None:
            raise mapped from exc
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(final: Path, data: bytes, what: str = "output") -> None:
    with atomic_path(final, what) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def write_json_atomic(final: Path, obj: Any, what: str = "output") -> None:
    """Strict JSON (no NaN / Infinity, which strict readers reject): a non-finite number here is a bug
    upstream, where numbers enter, and nothing is written."""
    try:
        text = json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False, allow_nan=False) + "\n"
    except ValueError as exc:
        raise MedTuningError("INTERNAL_ERROR", f"refusing to write a NaN or infinite number into {final} ({exc})",
                             "this is a bug in MedTuning; please report it with the command", path=str(final)) from exc
    write_bytes_atomic(final, text.encode("utf-8"), what)


def read_json(path: Path, code: str, what: str) -> Any:
    """Read JSON metadata (never pickle) or raise ``code`` saying which file is broken."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MedTuningError(code, f"{what} {path} is missing", "check the path", path=str(path)) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedTuningError(code, f"{what} {path} cannot be read as JSON: {exc}",
                             "restore it from a backup or recreate it", path=str(path)) from exc


def publish_dir(work_dir: Path, final_dir: Path) -> None:
    """Rename a completed ``X.partial`` folder to ``X`` (atomic on one file system)."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        raise MedTuningError("OUTPUT_EXISTS", f"{final_dir} already exists",
                             "choose another --out, or remove the old folder yourself", path=str(final_dir))
    os.replace(work_dir, final_dir)


def replace_dir(work_dir: Path, final_dir: Path) -> None:
    """Publish ``work_dir`` as ``final_dir``, replacing an earlier ``final_dir`` (already checked to be
    replaceable): the old one is moved aside under a fresh hidden name, never onto a name that may hold
    someone's files, and deleted only once the new one is in place."""
    final_dir = Path(final_dir)
    aside = None
    if final_dir.exists() or final_dir.is_symlink():
        aside = Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=f".{final_dir.name}.replaced-"))
        os.replace(final_dir, aside / final_dir.name)
    try:
        publish_dir(work_dir, final_dir)
    except BaseException:
        if aside is not None and not final_dir.exists():
            os.replace(aside / final_dir.name, final_dir)  # put the old one back
            shutil.rmtree(aside, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def copy_file_atomic(src: Path, dst: Path, what: str = "output") -> None:
    with atomic_path(dst, what) as tmp:
        shutil.copyfile(src, tmp)


class FileLock:
    """An exclusive lock on ``path`` held by this process (``fcntl.flock``).

    The kernel drops it when the process dies, so a killed run never leaves a stale lock. The
    lock file also records the pid of the holder, for the error message.
    """

    def __init__(self, path: Path, code: str = "OUTPUT_LOCKED", what: str = "output") -> None:
        self.path = Path(path)
        self.code = code
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "FileLock":
        ensure_writable_dir(self.path.parent, self.what)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fd, 32, 0).decode().strip()
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise MedTuningError(
                    self.code, f"the {self.what} {self.path.parent} is in use by another MedTuning process"
                    + (f" (pid {holder})" if holder else ""),
                    "wait for that run to finish or cancel it, then try again", path=str(self.path)) from exc
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def sha256_file(path: Path, chunk: int = 1 << 20, progress: Callable[[int], None] | None = None) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# replacing an earlier output (--force): only an artefact of the same kind that MedTuning wrote
# ------------------------------------------------------------------------------------------------

#: Output folders a command replaces as a whole: (what it is called, the JSON file that identifies it and
#: keys it always has, every name MedTuning puts there). A folder holding anything else is someone's data and is never replaced.
OUTPUT_FOLDERS: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    "model": ("model folder", "medtuning.json", ("format_version", "architecture"),
              ("medtuning.json", "weights.safetensors", "curves.csv", "curves.png", "best.safetensors", "state.json",
               "state-e*.safetensors", "cache", "STOP", ".lock")),
    "demo": ("demo output", "demo-report.json", ("segments", "dice_held_out_slab"),
             ("demo-report.json", "demo-report.md", "CTChest4.seg.nrrd", "model", "library", "library-whole", "source",
              "report-held-out-slab", "report-whole-volume")),
    # A killed demo's working folder (regenerated from scratch): identified by the case library it made.
    "demo-partial": ("demo working folder", "library/cases.json", ("format_version", "cases"),
                     ("demo-report.json", "demo-report.md", "CTChest4.seg.nrrd", "model", "model.partial", "library",
                      "library-whole", "source", "report-held-out-slab", "report-whole-volume")),
}
# Files that mark folders MedTuning owns as something else: never a place to write another output into.
_OWNED_MARKERS = (("cases.json", "a case library"), ("medtuning.json", "a model folder"))


def _refuse(target: Path, option: str, is_what: str, hint: str = "") -> MedTuningError:
    return MedTuningError("OUTPUT_NOT_REPLACEABLE", f"{option} {target} {is_what}; MedTuning does not replace it, "
                          "with or without --force",
                          hint or f"give {option} a new name, or a folder MedTuning wrote as this kind of output",
                          path=str(target))


def _same_or_inside(inner: Path, outer: Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it (symbolic links resolved)."""
    try:
        inner, outer = Path(inner).resolve(), Path(outer).resolve()
    except OSError:
        return False
    return inner == outer or outer in inner.parents


def _check_inputs(target: Path, option: str, inputs: Sequence[tuple[str, Path | None]],
                  replaced: bool = True) -> None:
    """Refuse an output that is one of the command's inputs (``(what, path)`` pairs); one that holds an
    input when the output is ``replaced`` as a whole (the input would go with it), one inside an input
    folder when files are written into the output (the input would change)."""
    for name, path in inputs:
        if path is None or not Path(path).exists():
            continue
        if _same_or_inside(target, Path(path)) and _same_or_inside(Path(path), target):
            raise _refuse(target, option, f"is the {name} this command reads",
                          f"write the output somewhere else than the {name}")
        if replaced and _same_or_inside(Path(path), target):
            raise _refuse(target, option, f"is a folder holding the {name} this command reads ({path})",
                          f"write the output somewhere else than around the {name}")
        if not replaced and Path(path).is_dir() and _same_or_inside(target, Path(path)):
            raise _refuse(target, option, f"lies inside the {name} this command reads ({path})",
                          f"write the output outside the {name}")


def _owner_marker(folder: Path) -> str | None:
    for marker, what in _OWNED_MARKERS:
        if (folder / marker).exists():
            return what
    return None


def _listing(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output_folder(target: Path, kind: str, force: bool, option: str = "--out",
                        inputs: Sequence[tuple[str, Path | None]] = ()) -> bool:
    """Before a command writes the folder ``target`` as a whole (``kind``: a key of :data:`OUTPUT_FOLDERS`).

    Returns False when ``target`` does not exist, True when it is an earlier output of this kind that
    ``force`` lets the command replace (once the new one is complete). Raises OUTPUT_EXISTS for such an
    output without ``force``, and OUTPUT_NOT_REPLACEABLE (whatever ``force`` says) for anything else:
    one of the command's ``inputs``, a case library, a file, a folder of other files. Called before the
    work starts and again right before the old folder is replaced.
    """
    import fnmatch

    title, marker, keys, names = OUTPUT_FOLDERS[kind]
    target = Path(target)
    _check_inputs(target, option, inputs)
    if not target.exists() and not target.is_symlink():
        return False
    if not target.is_dir():
        raise _refuse(target, option, f"is a file, not a {title}")
    entries = [p.name for p in target.iterdir()]
    if not entries:
        if not force:
            raise MedTuningError("OUTPUT_EXISTS", f"{target} already exists (an empty folder)",
                                 f"pass --force to use it for the {title}, or choose another {option}", path=str(target))
        return True
    owner = _owner_marker(target)
    if (target / marker).is_file():
        data = None
        with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):
            data = json.loads((target / marker).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not all(k in data for k in keys):
            raise _refuse(target, option, f"holds a {marker} that MedTuning did not write")
        foreign = [n for n in entries if not any(fnmatch.fnmatchcase(n, pattern) for pattern in names)]
        if foreign:
            raise _refuse(target, option, f"is a {title} that also holds files MedTuning did not put there "
                          f"({_listing(foreign)})",
                          "move those files out of the folder first (they would be lost), or give another "
                          f"{option}")
    elif owner is not None:
        raise _refuse(target, option, f"is {owner}, not a {title}")
    else:
        raise _refuse(target, option, f"is a folder of other files ({len(entries)} entries: {_listing(entries)}), "
                      f"not a {title} MedTuning wrote")
    if not force:
        raise MedTuningError("OUTPUT_EXISTS", f"{title} {target} already exists",
                             f"choose another {option}, or pass --force to replace it once the new one is complete",
                             path=str(target))
    return True


def check_output_file(target: Path, force: bool, what: str = "result", option: str = "--out",
                      inputs: Sequence[tuple[str, Path | None]] = ()) -> bool:
    """Before a command writes the file ``target``: False when it is new, True when ``force`` replaces an
    earlier result. Never replaced, with or without ``force`` (OUTPUT_NOT_REPLACEABLE): a folder, one of
    the command's ``inputs``, a file of a case library or a model folder. A plain file at the result
    path that is none of these is taken as an earlier result (MedTuning cannot tell who wrote it):
    replaced with ``force``, OUTPUT_EXISTS without."""
    target = Path(target)
    for name, path in inputs:
        if path is not None and Path(path).exists() and target.exists() and _same_or_inside(Path(path), target):
            raise _refuse(target, option, f"is the {name} this command reads", f"write the {what} to another file")
    if not target.exists():
        return False
    if target.is_dir():
        raise _refuse(target, option, f"is a folder, not a {what} file", f"name a file for the {what}")
    for parent in list(target.absolute().parents)[:3]:
        owner = _owner_marker(parent)
        if owner is not None:
            raise _refuse(target, option, f"is a file of {owner} ({parent})", f"write the {what} outside {parent}")
    if not force:
        raise MedTuningError("OUTPUT_EXISTS", f"{target} already exists", f"choose another {option}, or pass --force",
                             path=str(target))
    return True


def refuse_to_replace(folder: Path, names: Sequence[str], what: str, force: bool,
                      inputs: Sequence[tuple[str, Path | None]] = (), option: str = "--report",
                      keys: Sequence[str] = ()) -> None:
    """Before writing the files ``names`` of a report (one of them its ``.json``) into ``folder``.

    The folder may hold other files (they are kept), but it must not be a case library, a model folder or
    one of the command's ``inputs``; an earlier report is replaced only with ``force`` and only when its
    JSON is one MedTuning wrote (a JSON object with ``keys``; OUTPUT_EXISTS / OUTPUT_NOT_REPLACEABLE otherwise).
    """
    folder = Path(folder)
    _check_inputs(folder, option, inputs, replaced=False)
    for parent in Path(folder).absolute().parents:  # a report written inside a library / model changes it
        owner = _owner_marker(parent)
        if owner is not None:
            raise _refuse(folder, option, f"lies inside {owner} ({parent})", f"write the {what} outside {parent}")
    if not folder.is_dir():
        return
    owner = _owner_marker(folder)
    if owner is not None:
        raise _refuse(folder, option, f"is {owner}", f"write the {what} into a folder of its own")
    existing = [name for name in names if (folder / name).exists()]
    if not existing:
        return
    if not force:
        raise MedTuningError("OUTPUT_EXISTS", f"{folder} already holds an earlier {what} ({', '.join(existing)})",
                             "pass --force to replace it, or choose another folder", path=str(folder))
    data = None
    with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):
        data = json.loads((folder / next(n for n in names if n.endswith(".json"))).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(k in data for k in keys) or any((folder / n).is_dir() for n in existing):
        raise _refuse(folder, option, f"holds {', '.join(existing)} that MedTuning did not write as a {what}",
                      f"move those files away first, or write the {what} into another folder")
