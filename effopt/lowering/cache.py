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


def versions() -> dict:
    import torch
    import tvm

    from .. import __version__

    return {"effopt": __version__, "torch": torch.__version__, "tvm": tvm.__version__, "format": FORMAT}


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
        lib, meta_path = os.path.join(entry, "lib.so"), os.path.join(entry, "meta.json")
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

    def store(self, key: str, executable, meta: dict) -> None:
        entry, tmp = self._entry(key), None
        try:
            os.makedirs(os.path.dirname(entry), exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(entry))
            lib = os.path.join(tmp, "lib.so")
            executable.export_library(lib)
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
