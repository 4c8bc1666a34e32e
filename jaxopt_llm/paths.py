"""One small path layer: local paths stay `pathlib.Path`; a URL (gs://, s3://, ... any scheme `etils.epath` /
fsspec know) becomes an `epath.Path`, so that every file the project reads or writes -- workdirs,
checkpoints (orbax writes straight to the bucket), metrics, records, TensorBoard events, exports, data,
model references, stage and artifact folders -- may live in a bucket.

Object stores have no rename and no append: `write_text` is one object write (atomic per object), an
append rewrites the object, and a folder another library must read locally (a Hugging Face model) is
downloaded once into a cache, or written locally and uploaded whole.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Any

from jaxopt_llm.errors import UserError

_CLIENTS = {"gs": ("gcsfs", "gcsfs"), "s3": ("s3fs", "s3fs"), "az": ("adlfs", "adlfs"), "abfs": ("adlfs", "adlfs")}


class PathError(UserError):
    """A path cannot be used (a missing client library, a folder that is not there)."""


def is_remote(path: Any) -> bool:
    return "://" in str(path)


def Path(path: Any):  # noqa: N802 - a constructor, like pathlib.Path
    """pathlib.Path for local paths, epath.Path for URLs (after checking the scheme's client is installed)."""
    if isinstance(path, pathlib.Path) or not is_remote(path):
        return pathlib.Path(path)
    scheme = str(path).split("://", 1)[0]
    if scheme in _CLIENTS:
        module, package = _CLIENTS[scheme]
        try:
            __import__(module)
        except ImportError:
            raise PathError(f"{path!s}: {scheme}:// paths need the package {package!r}; install it with "
                            f"`pip install {package}`.") from None
    logging.getLogger("gcsfs").setLevel(logging.ERROR)  # credential fallbacks are not news
    _register_tensorboard()
    from etils import epath

    return epath.Path(str(path))


def sha256(file: Any) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(file).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text(path: Any, text: str) -> None:
    """Write a whole file: locally to a temporary name, synced and renamed; remotely as one object."""
    path = Path(path)
    if is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make every record private
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def append_text(path: Any, text: str) -> None:
    """Append (locally, synced); an object store rewrites the object with the line added."""
    path = Path(path)
    if is_remote(path):
        old = path.read_text() if path.exists() else ""
        path.write_text(old + text)
        return
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def rmtree(path: Any) -> None:
    """Remove a folder and everything under it, if it is there."""
    path = Path(path)
    if is_remote(path):
        if path.exists():
            path.rmtree()
        return
    shutil.rmtree(path, ignore_errors=True)


def copy(source: Any, target: Any) -> None:
    """Copy a file, or a folder with everything under it, between any two places (local or remote)."""
    source, target = Path(source), Path(target)
    if not is_remote(source) and not is_remote(target):
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        return
    files = [source] if source.is_file() else (_files(source) if is_remote(source) else
                                               [p for p in sorted(source.rglob("*")) if p.is_file()])
    for p in files:
        rel = str(p)[len(str(source)):].lstrip("/")
        out = target / rel if rel else target
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(p.read_bytes())


def cache_root() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(os.environ.get("JAXOPT_LLM_CACHE_DIR_REMOTE") or os.path.join(base, "jaxopt_llm", "remote"))


def local_copy(path: Any) -> pathlib.Path:
    """A remote folder (or file) downloaded into the cache, re-downloaded when its listing changes; a local
    path as it is."""
    if not is_remote(path):
        return pathlib.Path(path)
    source = Path(path)
    if not source.exists():
        raise PathError(f"{path!s} does not exist.")
    files = [source] if source.is_file() else _files(source)
    listing = "\n".join(sorted(f"{p}:{getattr(p.stat(), 'length', '')}:{getattr(p.stat(), 'mtime', '')}"
                               for p in files))
    target = cache_root() / hashlib.sha1(f"{path}\n{listing}".encode()).hexdigest()[:20] / source.name
    if not target.exists():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        copy(source, tmp)
        tmp.rename(target)
    return target


def _files(folder) -> list:
    """Every file under a remote folder (epath has no recursive glob on buckets)."""
    out, todo = [], [folder]
    while todo:
        for p in todo.pop().iterdir():
            (todo if p.is_dir() else out).append(p)
    return out


class _RecordWriter:
    """TensorBoard events to an object store: buffered, the whole object rewritten on flush."""

    def __init__(self, path: str):
        self.path, self.buffer = path, io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        Path(self.path).write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _RecordWriterFactory:
    def open(self, path: str) -> _RecordWriter:
        return _RecordWriter(path)

    def directory_check(self, path: str) -> None:
        """Object stores need no folders."""


def _register_tensorboard() -> None:
    from tensorboardX import record_writer

    for scheme in _CLIENTS:
        record_writer.register_writer_factory(scheme, _RecordWriterFactory())
