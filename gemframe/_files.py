"""Writing a file whole or not at all, without ever following a planted symlink.

Every file gemframe writes (``gemframe run``'s output, the manifest sidecar, the HTML report, a
cache export, the Batch Mode state file, generated images) is written to a temp file and renamed
into place. A fixed temp name (``OUT.parquet.partial``) would be a trap: anyone who can write to
the directory could plant a symlink there, and opening it for writing would overwrite whatever
it points to. So the temp file is created by `tempfile.mkstemp` (``O_CREAT | O_EXCL``: a new
file, never an existing one or a link) in the target's directory (the rename stays on one
file system, hence atomic), written through that descriptor, fsynced, then `os.replace`d over
the target, which replaces a symlink at the target itself rather than following it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

# mkstemp creates 0600 files; the outputs get the permissions an ordinary open() would give
# them. The umask can only be read by setting it, so it is read once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class AtomicFile:
    """A new, exclusively created temp file next to ``path``: write to ``file``, then `commit`
    (flush, fsync, rename to ``path``) or `discard` (remove it; a no-op after `commit`).

    ``mode`` is ``"wb"`` or ``"w"`` (text, with ``encoding``). The parent directory is made if
    missing.
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "wb", *, encoding: str | None = None) -> None:
        self.path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, self.temp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(self.path)}.", suffix=".partial")
        try:
            if hasattr(os, "fchmod"):  # POSIX
                os.fchmod(fd, 0o666 & ~_UMASK)
            self.file: IO[Any] = open(fd, mode, encoding=encoding)
        except BaseException:
            os.close(fd)
            os.unlink(self.temp)
            raise
        self._done = False

    def commit(self) -> None:
        """Make the written file ``path``: durable first, then renamed in one step."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.temp, self.path)
        self._done = True

    def discard(self) -> None:
        """Remove the temp file (after an error); nothing to do once committed."""
        if self._done:
            return
        self._done = True
        self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.temp)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """`AtomicFile` as a ``with`` block: committed if the block ends normally, else discarded."""
    target = AtomicFile(path, mode, encoding=encoding)
    try:
        yield target.file
        target.commit()
    finally:
        target.discard()
