"""Outputs that are never half-written: write beside the target, then rename over it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cadenza.errors import OutputError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(out: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``out``; it replaces ``out`` only if the block succeeds.

    Nothing half-written is ever left under the final name.
    """
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=suffix or out.suffix, dir=out.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600, and some writers (safetensors) recreate the file: give the output
        # the usual permissions once it is written.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, out)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and exc.filename in (str(tmp_path), str(out)):  # disk full, out is a folder...
            raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
        raise


def write_atomic(out: str | os.PathLike, data: bytes) -> None:
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
