"""On-disk cache of compiled kernels, so that a second process compiling the same graph skips TVM.

Each entry is a directory holding the shared library and a JSON sidecar (never a pickle), written to a
temporary name and renamed into place, so a crash leaves either the old entry or none. Any fault reading
an entry (truncated, foreign version, unreadable) is reported and the entry rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
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

    from .. import __version__

    return {"effopt": __version__, "source": source_digest(), "torch": torch.__version__, "tvm": tvm.__version__,
            "format": FORMAT}


def default_dir() -> str:
    return os.environ.get("EFFOPT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "effopt")


def make_key(*parts: str) -> str:
    h = hashlib.sha256(json.dumps(versions(), sort_keys=True).encode())
    for p in parts:
        h.update(b"\0" + p.encode())
    return h.hexdigest()


class KernelCache:
    def __init__(self, directory: str | None):
        self.dir = directory or default_dir()

    def _entry(self, key: str) -> str:
        return os.path.join(self.dir, key[:2], key)

    def load(self, key: str):
        """(tvm runtime module, meta dict) or None."""
        entry = self._entry(key)
        lib, meta_path = self.library(key), os.path.join(entry, "meta.json")
        if not os.path.isdir(entry):
            return None
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("versions") != versions() or meta.get("key") != key:
                raise ValueError("entry written by another effopt/torch/TVM version")
            if os.path.getsize(lib) != meta.get("lib_bytes"):
                raise ValueError("library file is truncated")
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
        try:
            os.makedirs(os.path.dirname(entry), exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(entry))
            lib = os.path.join(tmp, "lib.so")
            shutil.copyfile(lib_path, lib)
            meta = dict(meta, key=key, versions=versions(), lib_bytes=os.path.getsize(lib))
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
        self.path = os.path.join(directory or default_dir(), "decisions",
                                 make_key(json.dumps(target, sort_keys=True)) + ".json")

    def _read(self) -> dict:
        """The file's contents if written by this effopt/torch/TVM version, else {}; raises if damaged."""
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        return data if data.get("versions") == versions() else {}

    def load(self, kind: str) -> dict:
        try:
            section = self._read().get(kind, {})
            return section if isinstance(section, dict) else {}
        except Exception as e:  # noqa: BLE001 - damaged file: measure again and rewrite it
            warnings.warn(f"effopt: ignoring damaged decision file {self.path} ({e})", RuntimeWarning)
            return {}

    def save(self, kind: str, decisions: dict) -> None:
        tmp = None
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            data = {"versions": versions()}
            try:
                data.update(self._read())
            except Exception:  # noqa: BLE001 - damaged: start afresh
                pass
            data[kind] = {**data.get(kind, {}), **decisions}
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(self.path))
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except Exception as e:  # noqa: BLE001 - a read-only or full cache must not fail the compile
            warnings.warn(f"effopt: could not save kernel decisions to {self.path} ({e})", RuntimeWarning)
            if tmp and os.path.exists(tmp):
                os.unlink(tmp)
