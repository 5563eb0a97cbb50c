"""One writer per shard of an output folder: an advisory lock held for the whole run (no torch).

Two runs of the same shard on one output.path (a double submission, a requeued SLURM task whose
predecessor still runs) would each treat the other's in-flight temporaries and renamed-but-not-
yet-committed parts as leftovers of a kill and delete them: the other run then dies mid-commit,
or leaves a manifest entry whose part file is gone. The second run therefore refuses to start.

The lock is flock() on `_lock-SSSSS` at the top of the output folder; the kernel drops it when
the holder exits, SIGKILL included, so a killed run never leaves a stale lock. The name starts
with "_" (readers of the folder skip it) and matches none of the patterns `Manifest.clear` and
`Manifest.recover` delete. Where the file system has no flock (some Lustre mounts: ENOSYS,
EOPNOTSUPP), the run goes on without the lock, as before.
"""

from __future__ import annotations

import errno
import os
from typing import Optional

from llmbatch.jobs.errors import InvalidJobError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None


def lock_name(shard: int) -> str:
    return f"_lock-{shard:05d}"


class ShardLock:
    def __init__(self, out_dir: str, shard: int) -> None:
        self.path = os.path.join(out_dir, lock_name(shard))
        self.shard = shard
        self._fd: Optional[int] = None

    def acquire(self) -> "ShardLock":
        """Take the lock or raise InvalidJobError (exit 2) naming the holder's pid."""
        if fcntl is None:
            return self
        fd, writable = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                by = f" (pid {holder})" if holder else ""
                raise InvalidJobError(
                    f"output.path {os.path.dirname(self.path)}: shard {self.shard} is being "
                    f"written by another run{by}; wait for it to end or stop it") from None
            return self          # no flock on this file system: run unlocked
        if writable:   # for the message of a run that finds the lock taken (the lock is flock)
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def _open(self) -> tuple[int, bool]:
        """(descriptor, writable). Created with mode 0o666 so the umask decides, as for the
        parts: on a group-shared folder a teammate's resume must open it too. A lock file this
        user may not write (another user's, stricter umask) is opened read-only: flock does
        not need write access; only the holder's pid is then not recorded."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666), True
        except PermissionError:
            pass
        try:
            return os.open(self.path, os.O_RDONLY), False
        except OSError as exc:
            raise InvalidJobError(f"output.path {os.path.dirname(self.path)}: cannot open the "
                                  f"lock file {os.path.basename(self.path)}: "
                                  f"{exc.strerror or exc}") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)       # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "ShardLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> Optional[str]:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return text if text.isdigit() else None
