"""File-system details every writer shares: the umask's file mode, disk-full errors, stale temp dirs.

- ``safetensors.torch.save_file`` (0.8; ``transformers.save_pretrained`` uses it) creates its files with
  mode 0600 whatever the umask (measured: the JSON written next to them is 0644), so a serving
  container or another user cannot read an exported model. :func:`apply_default_modes` gives every
  file of an output directory the mode ``open()`` would have given it (0644 under umask 022) and runs
  once, where output directories are published (:func:`debias_export.export.manifest.atomic_output_dir`, the recipe runner's final rename).
- A full disk surfaces as ``OSError(ENOSPC)`` from Python writes but as ``SafetensorError("... No space
  left on device (os error 28)")`` from safetensors: :func:`disk_full` recognises both.
- Temp dirs carry their owner (host + pid) in a sibling owner file, so a later run can tell a
  temp dir left behind by a killed process (:func:`remove_stale_temp_dirs`) from one still being written.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import stat
import threading
import time
import uuid
from pathlib import Path

from .errors import DebiasError

# temp dirs of the format before owner files (".NAME.tmp-1a2b3c4d"): removed only when clearly abandoned
LEGACY_STALE_SECONDS = 24 * 3600
_UMASK_LOCK = threading.Lock()


class DiskFullError(DebiasError):
    """The file system ran out of space (or quota) while an output was written; nothing was published."""

    def __init__(self, target: str | os.PathLike):
        self.target = str(target)
        super().__init__(f"no space left on device while writing {self.target}; nothing was changed")


def current_umask() -> int:
    """The process umask: from ``/proc/self/status`` (Linux), else by setting and restoring it under a lock
    (that briefly changes it for other threads, hence the preference for reading it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)  # the stricter value while it is away
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def apply_default_modes(root: str | os.PathLike) -> None:
    """Give every regular file under ``root`` (and ``root`` itself, if a file) the umask's default mode."""
    mode = default_file_mode()
    root = Path(root)
    paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    for p in paths:
        if stat.S_IMODE(p.stat().st_mode) != mode:
            os.chmod(p, mode)


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the user's quota) is full, whichever library raised it."""
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if type(exc).__name__ == "SafetensorError":  # safetensors wraps the Rust io::Error in its message
        text = str(exc)
        return "No space left" in text or "os error 28" in text or "StorageFull" in text or "os error 122" in text
    return False


# ----- temp dirs owned by a process ----------------------------------------------------------------
def temp_names(out_dir: Path) -> tuple[Path, Path, Path]:
    """``(temp dir, moved-aside old dir, owner file)`` for writing ``out_dir`` atomically from this process.

    All three share ``<pid>-<random tag>``; the owner file records host and pid so that a later run can
    tell a temp dir left behind by a killed process from one still being written.
    """
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    base = out_dir.parent / f".{out_dir.name}"
    return Path(f"{base}.tmp-{tag}"), Path(f"{base}.old-{tag}"), Path(f"{base}.owner-{tag}")


def claim(owner_file: Path) -> None:
    """Record this process (host, pid) as the owner of the temp dirs named like ``owner_file``."""
    owner_file.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "created": time.time()}))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _owner_dead(owner_file: Path) -> bool:
    try:
        owner = json.loads(owner_file.read_text())
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # unreadable: not provably abandoned
    # a process on another machine (shared file system) cannot be checked from here: leave its files alone
    return host == socket.gethostname() and pid != os.getpid() and not _pid_alive(pid)


def remove_stale_temp_dirs(out_dir: Path) -> list[Path]:
    """Delete the temp dirs a killed debias-export process left next to ``out_dir``; return them.

    Only names this package generates (``.<name>.tmp-<pid>-<tag>``, ``.<name>.old-<pid>-<tag>``) are
    considered, and only when their owner file names a dead process on this machine. A moved-aside old
    artifact is removed only when ``out_dir`` exists again (else it may be the only copy). Temp dirs of
    the format before owner files (``.<name>.tmp-<tag>``) count as abandoned after a day untouched.
    """
    parent = out_dir.parent
    if not parent.is_dir():
        return []
    name = re.escape(out_dir.name)
    owned = re.compile(rf"^\.{name}\.(tmp|old|owner)-(\d+-[0-9a-f]{{8}})$")
    legacy = re.compile(rf"^\.{name}\.tmp-[0-9a-f]{{8}}$")
    removed = []
    for p in sorted(parent.iterdir()):
        if p.is_symlink():
            continue
        m = owned.match(p.name)
        if m and m.group(1) != "owner" and p.is_dir():
            if m.group(1) == "old" and not out_dir.exists():
                continue
            if _owner_dead(parent / f".{out_dir.name}.owner-{m.group(2)}"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        elif legacy.match(p.name) and p.is_dir():
            try:
                abandoned = time.time() - p.stat().st_mtime > LEGACY_STALE_SECONDS
            except OSError:
                abandoned = False
            if abandoned:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    for marker in parent.glob(f".{out_dir.name}.owner-*"):  # owner files whose dirs are all gone
        m = owned.match(marker.name)
        tag = m.group(2) if m else None
        if tag and not any((parent / f".{out_dir.name}.{k}-{tag}").exists() for k in ("tmp", "old")) and _owner_dead(marker):
            marker.unlink(missing_ok=True)
    return removed


def refuse_existing(path: Path, overwrite: bool) -> None:
    """Output directories are never clobbered silently."""
    if path.exists() and not overwrite:
        raise DebiasError(f"output {path} already exists (pass --overwrite to replace it)")
