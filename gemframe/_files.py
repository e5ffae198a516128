"""Writing a file whole or not at all, without ever following a planted symlink.

Every file gemframe writes (``gemframe run``'s output, the manifest sidecar, the HTML report, a
cache export, the Batch Mode state file, generated images) is written to a temp file and renamed
into place. A fixed temp name (``OUT.parquet.partial``) would be a trap: anyone who can write to
the directory could plant a symlink there, and opening it for writing would overwrite whatever
it points to. So the temp file is created under a random name with ``O_CREAT | O_EXCL`` (a new
file, never an existing one or a link) in the target's directory (the rename stays on one
file system, hence atomic), written through that descriptor, fsynced, then `os.replace`d over
the target, which replaces a symlink at the target itself rather than following it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import IO, Any

# The temp file is created with mode 0666 and the kernel takes the process's umask (or the
# directory's default ACL) away at that moment, so an output gets the permissions an ordinary
# open() would give it. (`tempfile.mkstemp` creates 0600 files, and widening them meant reading
# the umask, which can only be read by setting it, so it was read once, at import: a program
# that set its umask after importing gemframe got its files under the old one.)
_EXCLUSIVE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


def _create_exclusive(directory: str, prefix: str, suffix: str) -> tuple[int, str]:
    """A new file ``directory/prefix<random>suffix``, opened for writing: its descriptor and path.
    ``O_EXCL`` makes the open fail on any existing name, a symlink included (then another random
    name is tried), so nobody can plant the file or a link in its place."""
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(8)}{suffix}")
        try:
            return os.open(path, _EXCLUSIVE, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name in {directory}")


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
        fd, self.temp = _create_exclusive(directory, f".{os.path.basename(self.path)}.", ".partial")
        try:
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
