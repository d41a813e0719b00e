"""Writing files safely: whole or not at all, never into a folder another program is writing, a full disk named.

``atomic_write`` writes a temporary file in the same folder, fsyncs it, then ``os.replace``s it over the target, so
a crash leaves either the old file or the new one, never half of one; every file of the package that must be whole
goes through it (checkpoints, inference outputs, run files, the preprocessing cache). A full disk is a
``DiskFullError`` naming the file and its file system; a writer killed mid-write leaves its temporary, which
``remove_dead_temporaries`` clears; ``lock_folder`` keeps a second program from writing a folder that one is writing;
``folder_problem`` says why a folder cannot be written, before any work.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
from pathlib import Path
from typing import IO, Callable

from mulmodseg.errors import DiskFullError, UserError

# atomic_write's temporaries: ".PID.8HEX.NAME" (the tail of NAME where the whole would be too long).
TEMPORARY = re.compile(r"^\.(\d+)\.[0-9a-f]{8}\..")
LOCK_FILE = ".mulmodseg.lock"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class FolderInUseError(UserError):
    """Another live process holds the folder's lock (``lock_folder``); the message names it and its PID."""


def existing_parent(path: str | Path) -> Path:
    """``path`` itself when it exists, else its nearest parent that does."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def name_max(folder: str | Path) -> int:
    """The longest file name, in bytes, that the file system of ``folder`` (or of its nearest existing parent)
    takes; 255, the common limit, where it does not say."""
    try:
        return os.pathconf(existing_parent(folder), "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def temporary_path(path: Path) -> Path:
    """A hidden name beside ``path`` unique to this process and call: ``.PID.HEX.`` and ``path``'s name, cut from
    the front where the whole would exceed the file system's name limit, so that any name legal for ``path`` is
    legal for its temporary too. The tail kept holds the extension, by which writers pick the format (nibabel's
    ``.nii.gz``, numpy's ``.npy``)."""
    prefix = f".{os.getpid()}.{secrets.token_hex(4)}."
    room = name_max(path.parent) - len(prefix.encode())
    name = path.name.encode()[-room:].decode(errors="ignore")  # a character cut in two is dropped
    return path.with_name(prefix + name)


def mount_point(path: str | Path) -> Path:
    """The mount point of the file system that holds ``path`` (or its nearest existing parent)."""
    path = existing_parent(Path(path).absolute()).resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def no_space_errno(error: BaseException, folder: Path) -> int | None:
    """``ENOSPC`` or ``EDQUOT`` when ``error`` says that no space is left for writing in ``folder``, else None: the
    system's error, or one raised while handling it (torch's zip writer, closing after the failed write, raises
    "unexpected pos" over it), or an ``OSError`` without a code (numpy's "4096 requested and 992 written") where
    ``folder``'s file system has (almost) no space left."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in NO_SPACE:
            return cause.errno
        if isinstance(cause, OSError) and cause.errno is None:
            try:
                stat = os.statvfs(existing_parent(folder))
            except OSError:
                return None
            return errno.ENOSPC if stat.f_bavail * stat.f_frsize < 1 << 20 else None
        cause = cause.__cause__ or cause.__context__
    return None


def raise_if_no_space(error: BaseException, path: str | Path, unchanged: bool = False) -> None:
    """Raise ``DiskFullError`` "no space left on MOUNT while writing PATH" (or the quota used up) when ``error``
    says so (``no_space_errno``); ``unchanged``: add that ``path`` is as it was. Any other error: nothing."""
    code = None if isinstance(error, DiskFullError) else no_space_errno(error, Path(path).parent)
    if code is None:
        return
    what = "the disk quota is used up" if code == errno.EDQUOT else "no space left"
    message = f"{what} on {mount_point(Path(path).parent)} while writing {path}"
    raise DiskFullError(f"{message}; {path} is unchanged" if unchanged else message, code) from error


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Make ``path`` whole or not at all: ``write(tmp)`` writes a temporary file beside it, which is synced to
    disk and renamed onto ``path``; on any error (Ctrl-C too) the temporary is removed and ``path`` is as it was.
    A full disk (or quota) raises ``DiskFullError`` naming ``path`` and its file system.

    ``tmp`` is hidden and ends in ``path``'s own name (``temporary_path``), so writers that go by the extension
    (nibabel's ``.nii.gz``, numpy's ``.npy`` and ``.npz``) write the same format, and folder listings skip it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per process and call, not mkstemp: mkstemp's files are 0o600, and ours should get the umask's mode
    # like any file the user makes (a lab shares runs, outputs and caches between accounts).
    tmp = temporary_path(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as error:
        try:
            raise_if_no_space(error, path, unchanged=True)  # while the temporary still takes its space
        finally:
            tmp.unlink(missing_ok=True)
        raise


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_temporaries(folder: str | Path) -> list[Path]:
    """``atomic_write``'s temporaries directly in ``folder`` whose writer no longer runs: the remains of a write
    killed midway (kill -9, a crash). A live writer's are never listed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = TEMPORARY.match(path.name)
        if match and path.is_file() and not process_alive(int(match.group(1))):
            found.append(path)
    return sorted(found)


def remove_dead_temporaries(folder: str | Path) -> str | None:
    """Delete ``dead_temporaries(folder)``; a line saying what was removed (None when nothing was)."""
    removed, size = [], 0
    for path in dead_temporaries(folder):
        try:
            size += path.stat().st_size
            path.unlink()
        except FileNotFoundError:  # another program cleared it first
            continue
        removed.append(path.name)
    if not removed:
        return None
    return (f"removed {len(removed)} temporary file(s) ({size / 1e6:.1f} MB) that killed writes left in {folder}: "
            + ", ".join(removed))


class FolderLock:
    """An ``flock`` on a folder's lock file, held until ``release`` (or the process ends: the kernel releases it
    then, so a killed program never blocks the next one)."""

    def __init__(self, file: IO[str], path: Path):
        self.file, self.path = file, path

    def release(self) -> None:
        """Let another program write the folder; the last holder removes the lock file (which a killed program
        leaves behind, harmless: the next one locks it)."""
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.path.unlink(missing_ok=True)
        except BlockingIOError:  # parts of one inference still share it
            pass
        finally:
            self.file.close()


def lock_folder(folder: str | Path, program: str, *, create: bool = True, shared: bool = False,
                name: str = LOCK_FILE) -> FolderLock | None:
    """Take ``folder``'s lock (the file ``name`` in it, which holds the PID of the last taker), creating the
    folder when ``create``; None when it does not exist (or cannot be written: the caller's checks say so) and not
    ``create``. ``shared``: a lock that other shared takers (parts of one inference writing one folder) may hold at
    the same time, but no exclusive one. Raises ``FolderInUseError`` naming ``program`` and the holder's PID when
    another process holds it."""
    folder = Path(folder)
    if not create and not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    while True:
        file = open(path, "a+")  # held open past this function: the lock lives as long as the file
        try:
            fcntl.flock(file, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            pid = file.read().strip() or "unknown"
            file.close()
            raise FolderInUseError(f"{folder} is being written by another {program} (PID {pid}); wait for it to "
                                   "end, or choose another folder") from None
        try:
            if os.stat(path).st_ino == os.fstat(file.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        file.close()  # its last holder removed the file between our open and our lock: lock the new one
    file.seek(0)
    file.truncate()
    file.write(f"{os.getpid()}\n")
    file.flush()
    return FolderLock(file, path)


def folder_problem(folder: str | Path, flag: str, writable: bool = True) -> str | None:
    """Why files cannot be written into ``folder`` (None when they can), said about the option ``flag``:
    a file in its place or on its path, or (when ``writable``) a folder, or its nearest existing parent,
    that cannot be written."""
    folder = Path(folder)
    existing = existing_parent(folder)
    if not existing.is_dir():
        return f"{flag} {folder}: {existing} is a file, not a folder; choose another {flag}"
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag} {folder}: cannot write in {existing}; choose another {flag}"
    return None
