"""Filesystem errors that are the user's to fix (a path too long, no permission, a full disk), in one sentence."""

from __future__ import annotations

import errno

_FIXES = {
    errno.ENAMETOOLONG: "use a shorter name (at most 255 bytes per path component)",
    errno.EACCES: "choose a place you can write to or fix its permissions",
    errno.EPERM: "choose a place you can write to or fix its permissions",
    errno.EROFS: "the filesystem is read-only; choose a writable place",
    errno.ENOSPC: "the disk is full; free space or choose another place",
    errno.EDQUOT: "the disk quota is used up; free space or choose another place",
    errno.ELOOP: "the path loops through symbolic links; fix the links",
}


def user_os_error(e: OSError) -> str | None:
    """One sentence for an OSError a user can fix by choosing another path, or None (then it is a bug)."""
    fix = _FIXES.get(e.errno)
    if fix is None or e.filename is None:
        return None
    name = str(e.filename)
    shown = name if len(name) <= 80 else f"{name[:40]}...{name[-30:]}"
    return f"cannot use {shown!r} ({e.strerror}); {fix}"
