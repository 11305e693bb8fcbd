"""Every user path (workdir, init_from, data, weight files, exports) goes through here, so that a
local path and a `gs://` URL behave alike.

Paths are `etils.epath` paths, as orbax uses. `gs://` goes through gcsfs (`pip install
'asymvq-jax[gcs]'`) rather than tf.io.gfile: gcsfs is the backend the emulator tests cover
(tf.io.gfile cannot be pointed at an emulator). EPATH_USE_TF=true selects tf.io.gfile instead.
Object stores have no append and no atomic folder rename: `LineLog` and `atomic_output` say how
each is done there.
"""

import contextlib
import fnmatch
import importlib.util
import io
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("EPATH_USE_TF", "false")  # before epath picks a gs:// backend (it caches the choice)
# gcsfs would ask the storage-control API for each bucket's layout, on every call where that API
# is not allowed; the workdir, data and weights live in plain buckets.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from etils import epath  # noqa: E402

PathLike = str | os.PathLike


def is_remote(p: PathLike) -> bool:
    return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
    """An epath for `p`; local paths are made absolute (orbax wants them so), `~` expanded."""
    s = os.fspath(p)
    if not is_remote(s):
        return epath.Path(os.path.abspath(os.path.expanduser(s)))
    if s.startswith("gs://") and os.environ["EPATH_USE_TF"].lower() in ("false", "no", "f", "0"):
        _configure_gcsfs(s)
    return epath.Path(s)


def _configure_gcsfs(url: str) -> None:
    if importlib.util.find_spec("gcsfs") is None:
        raise ImportError(f"{url}: gs:// paths need gcsfs: pip install 'asymvq-jax[gcs]'")
    import fsspec  # comes with the optional gcsfs
    # No cached listings: other hosts and tensorstore (orbax's arrays) write into the same folders.
    fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def cached_file(env_var: str, name: str) -> str:
    """`$env_var` if set, else `name` in ~/.cache/asymvq_jax (`$XDG_CACHE_HOME` honoured)."""
    if os.environ.get(env_var):
        return os.fspath(path(os.environ[env_var]))
    return join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "asymvq_jax", name)


def join(p: PathLike, *names: str) -> str:
    return os.fspath(path(p).joinpath(*names))


def exists(p: PathLike) -> bool:
    return path(p).exists()


def isdir(p: PathLike) -> bool:
    return path(p).is_dir()


def isfile(p: PathLike) -> bool:
    q = path(p)
    return q.exists() and not q.is_dir()


def makedirs(p: PathLike) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


def read_text(p: PathLike) -> str:
    return path(p).read_text()


def write_bytes(p: PathLike, data: bytes) -> None:
    """Whole or not at all: locally a temporary file renamed into place; an object upload is
    already atomic."""
    with atomic_output(p, is_dir=False) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(p: PathLike, text: str) -> None:
    write_bytes(p, text.encode())


@contextlib.contextmanager
def local_copy(p: PathLike):
    """A local file with the content of `p` (`p` itself when local), for readers that want a file."""
    if not is_remote(p):
        yield os.fspath(path(p))
        return
    with tempfile.NamedTemporaryFile(suffix=path(p).suffix) as f:
        f.write(read_bytes(p))
        f.flush()
        yield f.name


def walk_files(root: PathLike) -> list[str]:
    """Every file under `root`, recursively (local symlinks followed), sorted."""
    top = path(root)
    if not is_remote(root):
        return sorted(os.path.join(d, f) for d, _, files in os.walk(top, followlinks=True) for f in files)
    scheme = os.fspath(root).split("://")[0] + "://"  # epath's fsspec walk drops it
    return sorted(f"{scheme}{os.fspath(d).split('://')[-1]}/{f}" for d, _, files in top.walk() for f in files)


class DestinationError(ValueError):
    """A write that would overlap its source or replace something it did not make."""


def resolved(p: PathLike) -> str:
    """One spelling per place: local paths absolute with links resolved, URLs normalised."""
    s = os.fspath(p)
    if is_remote(s):
        scheme, rest = s.split("://", 1)
        return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"
    return os.path.realpath(os.path.expanduser(s))


def overlaps(a: PathLike, b: PathLike) -> str | None:
    """How `a` stands to `b` ("the same place as", "inside", "a folder holding"), or None."""
    a, b = resolved(a), resolved(b)
    if a == b:
        return "the same place as"
    if a.startswith(b.rstrip("/") + "/"):
        return "inside"
    if b.startswith(a.rstrip("/") + "/"):
        return "a folder holding"
    return None


def check_destination(dst: PathLike, *, sources=(), ours: Callable[[str], bool], what: str,
                      force: bool = False) -> None:
    """Refuses, before anything is read or written, a destination that overlaps a source (even
    with `force`) or that exists and is not `what` (a previous output of the same kind, as `ours`
    recognises it) unless `force`; a forced write replaces only the files it writes."""
    dst = os.fspath(dst)
    for src in sources:
        if src and (how := overlaps(dst, src)):
            raise DestinationError(f"{dst} is {how} the source {os.fspath(src)}; write somewhere else")
    if exists(dst) and not force and not ours(dst):
        raise DestinationError(f"{dst} exists and is not {what}; nothing was written. Choose a new path, or "
                               "--force (force=True) to replace only the files this writes there")


def holds_only(folder: PathLike, patterns: tuple[str, ...], marker: str) -> bool:
    """Whether `folder` holds `marker` and nothing that none of `patterns` (fnmatch) names."""
    if not isdir(folder):
        return False
    names = [q.name for q in path(folder).iterdir()]
    return marker in names and all(any(fnmatch.fnmatch(n, pat) for pat in patterns) for n in names)


@contextlib.contextmanager
def atomic_output(dst: PathLike, is_dir: bool):
    """Yields a local temporary file or folder; when the block succeeds it becomes `dst`, with
    the permissions a new file gets (0o666 & ~umask, folders 0o777 & ~umask).

    A file, or a folder that does not exist yet, is renamed into place (uploaded on an object
    store). Into a folder that exists, only the written files go, one by one, and nothing else
    there is touched: the JSON files last, after the old ones of those names were removed
    (readers recognise a folder by its config), so a reader never pairs a config with the
    weights of another export, even on an object store, which cannot rename a folder.
    """
    if is_remote(dst):
        with tempfile.TemporaryDirectory() as tmp_root:
            tmp = os.path.join(tmp_root, "out")
            if is_dir:
                os.mkdir(tmp)
            yield tmp
            _upload(tmp, path(dst), is_dir)
        return
    dst = os.fspath(path(dst))
    parent, base = os.path.dirname(dst), os.path.basename(dst)
    os.makedirs(parent, exist_ok=True)
    if is_dir:
        tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=parent)
        os.close(fd)
    try:
        yield tmp
        _set_default_modes(tmp)  # mkstemp/mkdtemp make them private; a rename keeps that
        if is_dir and os.path.isdir(dst):
            names = _json_last(os.listdir(tmp))
            for name in names:
                if name.endswith(".json") and os.path.isfile(os.path.join(dst, name)):
                    os.remove(os.path.join(dst, name))
            for name in names:
                os.replace(os.path.join(tmp, name), os.path.join(dst, name))
        elif is_dir:
            os.replace(tmp, dst)
        else:
            if os.path.isdir(dst):
                raise IsADirectoryError(f"{dst} is a folder; this format writes a single file")
            os.replace(tmp, dst)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder, never `dst`
        elif os.path.exists(tmp):
            os.remove(tmp)


def _json_last(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: (n.endswith(".json"), n))


def _set_default_modes(top: str) -> None:
    mask = _umask()
    for d, dirs, files in os.walk(top):
        os.chmod(d, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(d, f), 0o666 & ~mask)
    if not os.path.isdir(top):
        os.chmod(top, 0o666 & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _upload(local: str, dst: epath.Path, is_dir: bool) -> None:
    if not is_dir:
        if dst.is_dir():
            raise IsADirectoryError(f"{dst} is a folder; this format writes a single file")
        dst.write_bytes(open(local, "rb").read())
        return
    names = _json_last(os.listdir(local))
    for name in names:
        if name.endswith(".json") and (dst / name).exists():
            (dst / name).unlink()
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        (dst / name).write_bytes(open(os.path.join(local, name), "rb").read())


class LineLog:
    """A text file that grows by lines (metrics.jsonl); a resumed run continues it.

    Object stores cannot append: there the text is kept and the whole object rewritten, at most
    every `every_s` seconds and on close.
    """

    def __init__(self, p: PathLike, every_s: float = 30.0):
        self.path, self.every_s = path(p), every_s
        self.remote = is_remote(p)
        if self.remote:
            self.text = io.StringIO()
            self.text.write(self.path.read_text() if self.path.exists() else "")
            self.written = time.monotonic()
        else:
            self.file = open(self.path, "a")

    def write(self, line: str) -> None:
        if not self.remote:
            self.file.write(line + "\n")
            self.file.flush()
            return
        self.text.write(line + "\n")
        if time.monotonic() - self.written >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.remote:
            self.path.write_text(self.text.getvalue())
            self.written = time.monotonic()

    def close(self) -> None:
        if self.remote:
            self.flush()
        else:
            self.file.close()
