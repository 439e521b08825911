"""Permissions of the files megacore writes through temporary files (data, caches, exports).

``tempfile.mkstemp``/``mkdtemp`` create 0600 files and 0700 folders whatever the umask; a file or
folder renamed into place from one would keep that. Writers chmod to what ``open``/``mkdir``
would have given: ``0o666 & ~umask`` for files, ``0o777 & ~umask`` for folders (0644 / 0755 under
the usual umask 022).
"""

from __future__ import annotations

import os


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``/proc/self/status``);
    elsewhere by setting and restoring it (not thread-safe, but brief)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
