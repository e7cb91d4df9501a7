"""Atomic file writes: a file is either its old self or complete, never half written.

The one implementation every writer of the package uses (models, reports, caches, alphas):
write a temporary file in the target's folder, then rename it over the target.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from gdws_onnx.errors import GDWSError


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", fsync: bool = False) -> Iterator[IO[Any]]:
    """Open a fresh temporary file beside `path` (its name is the file object's `.name`); when the
    block ends without an error the file is closed (flushed to disk first with `fsync`) and renamed
    over `path`, else it is removed and `path` is left as it was. `mode` is "w" or "wb".
    An OSError becomes GDWSError('cannot write PATH: ...'); other errors pass through."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.gdws-tmp")
    try:
        # mode "x": created here, with the permissions the umask gives (mkstemp would make it 0600)
        with open(tmp, mode.replace("w", "x")) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise GDWSError(f"cannot write {path}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (`atomic_write`)."""
    with atomic_write(path) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_options: Any) -> None:
    """Write `obj` as JSON to `path` atomically; `dump_options` go to json.dump (indent, default, ...)."""
    with atomic_write(path) as f:
        json.dump(obj, f, **dump_options)
