"""Guard against stale Numba caches when a shared helper module changes.

Numba keys each cached function on the modification time of *its own* source file, so
a kernel in ``quantize.py`` whose compiled code inlines a helper from ``_common.py``
keeps running the old helper after ``_common.py`` is edited (a silent wrong result in a
development checkout).  Before any kernel module is imported, this compares a digest of
every source file in this package with the one recorded beside the cache; when they
differ it drops the cache files, so everything recompiles once.  An installed wheel
never changes under its cache, and a read-only install is left alone.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_STAMP = "sparcomm-sources.sha256"


def drop_stale_caches(package_dir: Path) -> bool:
    """Delete ``package_dir/__pycache__/*.nbi|*.nbc`` if the sources changed; True if so."""
    digest = hashlib.sha256()
    for source in sorted(package_dir.glob("*.py")):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    cache = package_dir / "__pycache__"
    stamp = cache / _STAMP
    try:
        if stamp.read_text() == digest.hexdigest():
            return False
    except OSError:
        pass
    try:
        cache.mkdir(exist_ok=True)
        for stale in [*cache.glob("*.nbi"), *cache.glob("*.nbc")]:
            stale.unlink(missing_ok=True)
        stamp.write_text(digest.hexdigest())
    except OSError:  # read-only install: its sources cannot have changed either
        return False
    return True


# Kernels load their caches on first call, so running at package import is early enough.
drop_stale_caches(Path(__file__).parent)
