"""Local-folder backend: the embedded default of local mode (`kubetune run`).

Every write goes to a temporary file in the target folder, is fsync'ed, then renamed over the
final name, so a reader (or a resume after a crash) never sees a half-written object and a commit
marker is only visible after the data it describes is on disk.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .base import TMP_PREFIX, ObjectInfo, Storage, normalize_key, normalize_prefix
from .errors import StorageError, StorageNotFoundError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LocalStorage(Storage):
    """Objects as files under a root folder (created on first write).

    Args:
        root: the folder; keys map to ``root/<key>``.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri().rstrip("/") + "/"

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / normalize_key(key)

    def _err(self, what: str, key: str, exc: OSError) -> StorageError:
        if isinstance(exc, FileNotFoundError):
            return StorageNotFoundError(f"{self.url(key)} does not exist", uri=self.url(key))
        return StorageError(
            f"cannot {what} {self.url(key)}: {exc.strerror or exc} — check that the folder "
            f"{self.root} is writable and the disk is not full", uri=self.url(key))

    def _atomic_write(self, target: Path, fill) -> int:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(target.parent)
        return size

    # --- objects -----------------------------------------------------------------------------

    def put_file(self, local_path, key):
        target = self._path(key)
        try:
            with open(local_path, "rb") as src:
                return self._atomic_write(target, lambda f: shutil.copyfileobj(src, f, 1 << 20))
        except FileNotFoundError as e:
            if not Path(local_path).exists():
                raise StorageError(f"local file {local_path} to upload does not exist",
                                   uri=self.url(key)) from e
            raise self._err("write", key, e) from e
        except OSError as e:
            raise self._err("write", key, e) from e

    def get_file(self, key, local_path):
        src_path = self._path(key)
        local_path = Path(local_path)
        try:
            with open(src_path, "rb") as src:
                self._atomic_write(local_path, lambda f: shutil.copyfileobj(src, f, 1 << 20))
        except OSError as e:
            raise self._err("read", key, e) from e
        return local_path

    def write_bytes(self, key, data):
        try:
            self._atomic_write(self._path(key), lambda f: f.write(data))
        except OSError as e:
            raise self._err("write", key, e) from e

    def read_bytes(self, key):
        try:
            return self._path(key).read_bytes()
        except OSError as e:
            raise self._err("read", key, e) from e

    def stat(self, key):
        path = self._path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._err("stat", key, e) from e
        if not path.is_file():
            return None
        return ObjectInfo(key=normalize_key(key), size=st.st_size, last_modified=st.st_mtime)

    def delete(self, key):
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._err("delete", key, e) from e

    # --- prefixes ----------------------------------------------------------------------------

    def list(self, prefix=""):
        norm = normalize_prefix(prefix)
        base = self.root / norm if norm else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            for name in filenames:
                if name.startswith(TMP_PREFIX):
                    continue
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except FileNotFoundError:  # deleted while listing
                    continue
                key = path.relative_to(self.root).as_posix()
                out.append(ObjectInfo(key=key, size=st.st_size, last_modified=st.st_mtime))
        out.sort(key=lambda o: o.key)
        return out

    def list_dirs(self, prefix=""):
        norm = normalize_prefix(prefix)
        base = self.root / norm if norm else self.root
        try:
            return sorted(p.name for p in base.iterdir() if p.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete_prefix(self, prefix):
        norm = normalize_prefix(prefix)
        if not norm:
            raise ValueError("refusing to delete the whole storage root; give a prefix")
        base = self.root / norm
        count = len(self.list(norm))
        try:
            shutil.rmtree(base)
        except FileNotFoundError:
            return 0
        except OSError as e:
            raise self._err("delete", norm, e) from e
        # Remove parents left empty, up to the root, so list_dirs stays truthful.
        parent = base.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
        return count

    def check(self):
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create the storage folder {self.root}: "
                               f"{e.strerror or e}", uri=self.uri) from e
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"the storage folder {self.root} is not writable", uri=self.uri)
