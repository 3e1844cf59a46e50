"""Atomic file writes and checksums: outputs are whole or absent, never half-written."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from slimkit.core.errors import OutputExistsError

try:
    import fcntl
except ImportError:  # Windows: no flock; a lock's owner is then taken to be alive
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialize {type(obj).__name__} to JSON")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only when the block succeeds.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output '{path}' already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        replace_dir(tmp, path, path.with_name(f".{path.name}.old"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: str | Path, path: str | Path, old: str | Path) -> None:
    """Put the directory ``new`` at ``path``, replacing what is there, by two renames.

    The previous ``path`` is parked at ``old`` between the renames and removed after them, so
    a crash in between leaves it whole at ``old`` (where a later run can put it back).
    ``new``, ``path`` and ``old`` must be on one filesystem (siblings are).
    """
    new, path, old = Path(new), Path(path), Path(old)
    if not path.exists():
        os.replace(new, path)
        return
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def lock_path(path: str | Path) -> Path:
    """The lock file of the output ``path``: ``.NAME.slimkit-lock`` beside it."""
    path = Path(path).resolve()
    return path.with_name(f".{path.name}.slimkit-lock")


@contextlib.contextmanager
def output_lock(path: str | Path, log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the lock on the output ``path`` for the block; refuse at once if a run holds it.

    The lock is a file beside ``path`` holding the owner's pid. It appears with ``O_EXCL``
    semantics (a private temporary file, already locked and holding the pid, is hard-linked
    into place; the link fails if a lock exists), so nobody ever sees it half-made. Where
    ``fcntl`` exists it is also held with ``flock``, which the kernel drops when the owner
    dies however it dies: a lock nobody holds is stale, is reported through ``log`` and is
    taken over. Without ``flock`` a lock is stale when its pid no longer runs.

    Raises:
        OutputExistsError: another live run holds the lock.

    Example:
        >>> with output_lock("runs/a"):  # doctest: +SKIP
        ...     write_outputs("runs/a")
    """
    path = Path(path)
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock, path, log or (lambda s: None))
    try:
        yield lock
    finally:
        if _same_file(fd, lock):
            lock.unlink(missing_ok=True)
        os.close(fd)  # releases the flock


def _acquire(lock: Path, path: Path, log: Callable[[str], None]) -> int:
    for _ in range(20):  # another try only when a release or takeover raced this one
        fd = _create_lock(lock)
        if fd is not None:
            return fd
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            pid = _read_pid(fd)
            if not _flock(fd) or (fcntl is None and pid is not None and _alive(pid)):
                raise OutputExistsError(
                    f"'{path}' is being written by another slimkit run (pid {pid or 'unknown'})"
                    "; wait for it or choose another --out")
            if not _same_file(fd, lock):  # released (and maybe re-made) since we opened it
                os.close(fd)
                continue
            who = f"slimkit run pid {pid}" if pid is not None else "a slimkit run"
            log(f"'{path}': taking over a stale lock '{lock}' left by {who}, which is no "
                "longer running")
            _write_pid(fd)
            return fd
        except BaseException:
            os.close(fd)
            raise
    raise OutputExistsError(f"could not lock '{path}': other runs keep taking '{lock}'; "
                            "choose another --out")


def _create_lock(lock: Path) -> int | None:
    """A new lock at ``lock`` (its descriptor, flocked, holding our pid), or None if one exists."""
    fd, tmp = tempfile.mkstemp(prefix=f"{lock.name}.", suffix=".tmp", dir=lock.parent)
    try:
        _flock(fd)
        _write_pid(fd)
        os.link(tmp, lock)
    except FileExistsError:
        os.close(fd)
        return None
    except OSError:  # a filesystem without hard links: create the lock itself, O_EXCL
        os.close(fd)
        return _create_lock_in_place(lock)
    except BaseException:
        os.close(fd)
        raise
    finally:
        os.unlink(tmp)
    return fd


def _create_lock_in_place(lock: Path) -> int | None:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    except FileExistsError:
        return None
    try:
        if not _flock(fd):  # another run saw it empty and took it over first: it is theirs
            os.close(fd)
            return None
        _write_pid(fd)
    except BaseException:
        os.close(fd)
        lock.unlink(missing_ok=True)
        raise
    return fd


def _flock(fd: int) -> bool:
    """Take an exclusive flock without waiting; False when someone holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _alive(pid: int) -> bool:
    if os.name != "posix":  # no safe liveness probe: take the owner to be alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        pass
    return True


def ensure_absent(path: str | Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite`` (checked before any work starts)."""
    if Path(path).exists() and not overwrite:
        raise OutputExistsError(f"output '{path}' already exists; pass --overwrite to replace it")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dir_size(path: str | Path) -> int:
    """Bytes on disk of a file, or of every file under a directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
