"""The sweep's storage: a folder in any file system pyarrow knows, with atomic writes, sha256 sidecars and a
per-node cache."""
from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from pathlib import Path

from fmvae import provenance
from fmvae.data import sha256_file
from fmvae.io import CorruptCheckpoint, cache_root


class Storage:
    """A folder in any file system pyarrow knows (a local path, file://, s3://, gs://): the sweep's
    published files and records. Writes are atomic (a temporary name, then a move: a reader never
    sees half a file), and a file's sha256 sidecar is written after it and fetched with it."""

    def __init__(self, uri: str):
        from pyarrow import fs
        self.uri = uri if "://" in uri else str(Path(uri).resolve())
        self.fs, self.root = fs.FileSystem.from_uri(self.uri)

    def _path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"

    def exists(self, key: str) -> bool:
        from pyarrow import fs
        return self.fs.get_file_info(self._path(key)).type != fs.FileType.NotFound

    def _put(self, key: str, source) -> None:
        path = self._path(key)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as out:
            shutil.copyfileobj(source, out)
        self.fs.move(tmp, path)

    def write_json(self, key: str, obj) -> None:
        self._put(key, io.BytesIO(json.dumps(obj, indent=2, sort_keys=True).encode()))

    def read_json(self, key: str):
        if not self.exists(key):
            return None
        with self.fs.open_input_stream(self._path(key)) as f:
            return json.loads(f.read())

    def publish(self, local: Path, key: str) -> None:
        """local (and its .sha256 sidecar, last) -> key: a key with a sidecar is complete."""
        for src, dst in ((local, key), (Path(f"{local}.sha256"), f"{key}.sha256")):
            with open(src, "rb") as f:
                self._put(dst, f)

    def published(self, key: str) -> bool:
        return self.exists(f"{key}.sha256")

    def cache_path(self, key: str) -> Path:
        """Where fetch puts key on this node (one cache per storage)."""
        return cache_root() / "sweep" / provenance.fingerprint(self.uri) / key

    def fetch(self, key: str) -> Path:
        """key, copied into this node's cache unless the cache already holds exactly the bytes the
        storage's sidecar names (a stale copy of a file republished under the same key is replaced),
        checked against that sidecar on arrival; locked, so a node copies each file once."""
        from filelock import FileLock
        with self.fs.open_input_stream(self._path(f"{key}.sha256")) as f:
            digest = f.read().decode()
        local, sidecar = self.cache_path(key), Path(f"{self.cache_path(key)}.sha256")
        local.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{local}.lock"):
            if not (local.exists() and sidecar.exists() and sidecar.read_text() == digest):
                tmp = local.with_name(f"{local.name}.tmp-{uuid.uuid4().hex}")
                with self.fs.open_input_stream(self._path(key)) as f, open(tmp, "wb") as out:
                    shutil.copyfileobj(f, out)
                if sha256_file(tmp) != digest.strip():
                    tmp.unlink()
                    raise CorruptCheckpoint(f"{self.uri}/{key} does not match its sha256 sidecar")
                os.replace(tmp, local)
                sidecar.write_text(digest)
        return local
