"""Safe file writing: temporary name then rename, and locks that do not outlive their process.

Every output MedTuning writes (model folders, .seg.nrrd, reports, manifests) goes through these
helpers, so that a crash or a kill never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
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


def ensure_writable_dir(path: Path, what: str = "output") -> Path:
    """Create ``path`` (and parents) or raise OUTPUT_NOT_WRITABLE with a hint."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise _not_writable(path, what, exc) from exc
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
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp" + suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
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
    text = json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
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


def refuse_to_replace(folder: Path, names: Sequence[str], what: str, force: bool) -> None:
    """OUTPUT_EXISTS when ``folder`` already holds one of ``names`` (an earlier report) and not ``force``."""
    existing = [name for name in names if (folder / name).exists()]
    if existing and not force:
        raise MedTuningError("OUTPUT_EXISTS", f"{folder} already holds an earlier {what} ({', '.join(existing)})",
                             "pass --force to replace it, or choose another folder", path=str(folder))
