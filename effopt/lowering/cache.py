"""On-disk cache of compiled kernels, so that a second process compiling the same graph skips TVM.

Each entry is a directory holding the shared library and a JSON sidecar (never a pickle), written to a
temporary name and renamed into place, so a crash leaves either the old entry or none. Any fault reading
an entry (truncated, flipped bytes: the library's SHA-256 is checked before it is loaded; foreign
version; unreadable) is reported and the entry rebuilt. The cache directory is created private to the
user (0700), and one that other users can write is refused (compilation goes on uncached, with a
warning): a library loaded from it would run their code. Decision files are read-modified-written
under a file lock, so concurrent processes lose no records.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
import warnings

FORMAT = 1


_SOURCE: list = []


def source_digest() -> str:
    """A digest of effopt's own source files: kernels and measured choices made by other effopt code (an
    edited checkout, not only another release) are not reused."""
    if not _SOURCE:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        h = hashlib.sha256()
        for d, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            for name in sorted(files):
                if name.endswith(".py"):
                    with open(os.path.join(d, name), "rb") as f:
                        h.update(name.encode() + b"\0" + f.read())
        _SOURCE.append(h.hexdigest()[:16])
    return _SOURCE[0]


def versions() -> dict:
    import torch
    import tvm

    from ..version import __version__

    return {"effopt": __version__, "source": source_digest(), "torch": torch.__version__, "tvm": tvm.__version__,
            "format": FORMAT}


def default_dir() -> str:
    return os.environ.get("EFFOPT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "effopt")


_refused: set = set()


def unsafe(directory: str) -> str | None:
    """Why `directory` (the cache root) must not be used, or None; creates it private (0700) if missing."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.stat(directory)
    except OSError as e:
        return f"cannot create it ({e})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "other users can write it (chmod go-w, or choose another cache_dir)"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return "it belongs to another user"
    return None


def checked(directory: str) -> bool:
    """Whether the cache root can be used; warns once per directory when it cannot."""
    why = unsafe(directory)
    if why and directory not in _refused:
        _refused.add(directory)
        warnings.warn(f"effopt: not using the cache directory {directory}: {why}; compiling without a cache",
                      RuntimeWarning, stacklevel=3)
    return why is None


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_key(*parts: str) -> str:
    h = hashlib.sha256(json.dumps(versions(), sort_keys=True).encode())
    for p in parts:
        h.update(b"\0" + p.encode())
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive lock (fcntl) on `path` + ".lock" for the block: other processes wait."""
    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class KernelCache:
    def __init__(self, directory: str | None):
        self.dir = directory or default_dir()

    def _entry(self, key: str) -> str:
        return os.path.join(self.dir, key[:2], key)

    def load(self, key: str):
        """(tvm runtime module, meta dict) or None."""
        entry = self._entry(key)
        lib, meta_path = self.library(key), os.path.join(entry, "meta.json")
        if not os.path.isdir(entry) or not checked(self.dir):
            return None
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("versions") != versions() or meta.get("key") != key:
                raise ValueError("entry written by another effopt/torch/TVM version")
            if os.path.getsize(lib) != meta.get("lib_bytes"):
                raise ValueError("library file is truncated")
            if _sha256(lib) != meta.get("lib_sha256"):
                raise ValueError("library file does not match its checksum")
            import tvm

            return tvm.runtime.load_module(lib), meta
        except Exception as e:  # any fault: report, drop the entry, rebuild
            warnings.warn(f"effopt: ignoring damaged cache entry {entry} ({e}); recompiling", RuntimeWarning)
            shutil.rmtree(entry, ignore_errors=True)
            return None

    def library(self, key: str) -> str:
        """Path of the entry's shared library (valid after a successful load)."""
        return os.path.join(self._entry(key), "lib.so")

    def store(self, key: str, lib_path: str, meta: dict) -> None:
        """Keep a copy of the exported kernel library `lib_path` and its meta under `key`."""
        entry, tmp = self._entry(key), None
        if not checked(self.dir):
            return
        try:
            os.makedirs(os.path.dirname(entry), mode=0o700, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(entry))
            lib = os.path.join(tmp, "lib.so")
            shutil.copyfile(lib_path, lib)
            meta = dict(meta, key=key, versions=versions(), lib_bytes=os.path.getsize(lib), lib_sha256=_sha256(lib))
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=1)
            shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
        except Exception as e:  # a full disk or a read-only cache must not fail the compile
            warnings.warn(f"effopt: could not write the kernel cache at {self.dir} ({e}); continuing without it",
                          RuntimeWarning)
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)


class DecisionStore:
    """Measured kernel decisions (for example MKL vs oneDNN per GEMM shape) for one target, kept in one
    JSON file so that later processes reuse them instead of timing again. Faults are survived: an
    unreadable file counts as empty and is rewritten."""

    def __init__(self, directory: str | None, target: dict):
        self.root = directory or default_dir()
        self.path = os.path.join(self.root, "decisions", make_key(json.dumps(target, sort_keys=True)) + ".json")

    def _locked(self):
        """An exclusive lock on the decision file for a read-modify-write (other processes wait)."""
        return file_lock(self.path)

    def _read(self) -> dict:
        """The file's contents if written by this effopt/torch/TVM version, else {}; raises if damaged."""
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        return data if data.get("versions") == versions() else {}

    def load(self, kind: str) -> dict:
        if not checked(self.root):
            return {}
        try:
            section = self._read().get(kind, {})
            return section if isinstance(section, dict) else {}
        except Exception as e:  # noqa: BLE001 - damaged file: measure again and rewrite it
            warnings.warn(f"effopt: ignoring damaged decision file {self.path} ({e})", RuntimeWarning)
            return {}

    def save(self, kind: str, decisions: dict) -> None:
        tmp = None
        if not checked(self.root):
            return
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            with self._locked():
                data = {"versions": versions()}
                try:
                    data.update(self._read())
                except Exception as e:  # noqa: BLE001 - damaged: start afresh, and say so
                    warnings.warn(f"effopt: the decision file {self.path} was damaged ({e}); its earlier "
                                  "decisions are lost and it is rewritten with this compile's", RuntimeWarning)
                data[kind] = {**data.get(kind, {}), **decisions}
                fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(self.path))
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
        except Exception as e:  # noqa: BLE001 - a read-only or full cache must not fail the compile
            warnings.warn(f"effopt: could not save kernel decisions to {self.path} ({e})", RuntimeWarning)
            if tmp and os.path.exists(tmp):
                os.unlink(tmp)
