"""Writing files and folders so that a reader never sees half of one, a failed command leaves
nothing behind, and no folder of the user's is ever replaced by accident.

Rules (every output path bdp writes goes through here):

* a file output (``-o out.npz``, ``--json``, ``--chart``, ``export -o``) is written to a
  temporary file beside it and renamed into place; an existing *file* of that name is replaced,
  an existing folder is refused, and so is a path whose parent is a file or cannot be written;
* a folder output (a bundle, ``--viz``, ``--dump-after``'s ``OUT.passes/``) is built in a
  temporary folder beside it and renamed into place. An existing folder is replaced only when
  it is empty or holds nothing but what bdp would have written there (``owned``: a bundle by its
  manifest, pictures by their names); anything else is refused with exit code 2 unless the
  user passes ``--force``;
* temporary names carry the writing process's id (``.NAME.tmp-PID-XXXX``), so that one left by
  a killed process (SIGKILL; SIGTERM is turned into a clean exit by the CLI) is removed by the
  next command that writes NAME, once that process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile

from bdp.errors import InputError


def _os_error(path, e: OSError, doing="write"):
    why = e.strerror or type(e).__name__
    return InputError(f"{path}: cannot {doing} ({why})")


def _check_parent(path):
    """The parent folder of PATH exists (or can be made) and is a folder we may write to."""
    parent = os.path.dirname(path)
    probe = parent
    while probe and not os.path.exists(probe):
        nxt = os.path.dirname(probe)
        if nxt == probe:
            break
        probe = nxt
    if probe and not os.path.isdir(probe):
        raise InputError(f"{path}: cannot write here, {probe} is a file, not a folder")
    if probe and not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{path}: cannot write here, {probe} is not writable")


def check_output_file(path, what="output file") -> str:
    """Raise InputError unless PATH can be written as a file; returns its absolute path."""
    if path is None or str(path) == "":
        raise InputError(f"{what}: empty path")
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, expected a file name for the {what}")
    _check_parent(path)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise InputError(f"{path}: exists and is not writable")
    return path


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# tempfile's random part: 8 characters of this set (tempfile._RandomNameSequence)
_RANDOM = r"[a-z0-9_]{8}"


def _stale_pattern(path):
    """The exact names bdp gives its temporaries beside PATH: ``.NAME.tmp-PID-XXXXXXXX`` plus
    NAME's extension (a file, :func:`atomic_path`) or nothing (a folder), ``.NAME.old-PID-XXXXXXXX``
    (a folder being replaced); XXXXXXXX is tempfile's random part."""
    base = os.path.basename(path)
    ext = re.escape(os.path.splitext(path)[1])
    return re.compile(rf"\.{re.escape(base)}\.(?:tmp-(\d+)-{_RANDOM}(?:{ext})?|old-(\d+)-{_RANDOM})")


def clean_stale_temps(path):
    """Remove temporary files and folders that a killed bdp left beside PATH whose process no
    longer runs. Only what bdp can tell it made: a name of exactly the pattern bdp writes
    (:func:`_stale_pattern`), a plain file or folder (no link), owned by this user; a user's
    file whose name merely resembles it (``.out.npz.tmp-4000000-notes.txt``) is left alone."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    pat = _stale_pattern(path)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for n in names:
        m = pat.fullmatch(n)
        if not m or _pid_alive(int(m.group(1) or m.group(2))):
            continue
        full = os.path.join(parent, n)
        try:
            st = os.lstat(full)
        except OSError:
            continue
        if st.st_uid != os.getuid():
            continue
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(full, ignore_errors=True)
        elif stat.S_ISREG(st.st_mode) and m.group(1):
            with contextlib.suppress(OSError):
                os.remove(full)
        else:
            continue
        removed.append(full)
    return removed


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _tmp_prefix(path, kind="tmp"):
    return f".{os.path.basename(path)}.{kind}-{os.getpid()}-"


def _write_target(path):
    """(where to write, in place?) for the output file PATH. A symbolic link is followed to the
    path it names (the link stays a link); a link through /proc or /dev/fd (``/dev/stdout``) and
    anything that exists and is not a regular file (a device, a FIFO) is written in place, never
    replaced by a rename."""
    seen = 0
    while os.path.islink(path):
        seen += 1
        if seen > 40:
            raise InputError(f"{path}: too many levels of symbolic links")
        try:
            dest = os.readlink(path)
        except OSError as e:
            raise _os_error(path, e, "read") from None
        path = os.path.normpath(os.path.join(os.path.dirname(path), dest))
        if path.startswith(("/proc/", "/dev/fd/")):
            return path, True
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path, False
    except OSError as e:
        raise _os_error(path, e, "reach") from None
    return path, not stat.S_ISREG(st.st_mode)


LOW_SPACE = 1 << 20  # a write that failed with less than this free beside it failed for lack of space


def _disk_fault(path, e):
    """An InputError naming PATH when E, raised while PATH was being written, is the user's
    machine's doing: an OSError of :data:`USER_ERRNOS`, or any error (a library that reports a
    failed write in its own words: torch's "unexpected pos", TVM's "Compilation error") while the
    file system PATH is on is full or read-only. None when it is not (a fault of bdp itself).
    Call it before removing the temporaries: they hold the space that ran out."""
    if isinstance(e, InputError):
        return None
    if is_user_os_error(e):
        return _os_error(path, e)
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return InputError(f"{path}: cannot write (read-only file system)")
    free = st.f_bavail * st.f_frsize
    if free < LOW_SPACE or (st.f_files and not st.f_favail):
        what = f"{free // 1024} KiB free" if free < LOW_SPACE else "no free inodes"
        return InputError(f"{path}: cannot write (no space left on device: {what} on its file system); "
                          "free some space or write elsewhere")
    return None


def _user_fault(path, e):
    """E (raised while writing PATH) as an InputError naming PATH when the user's machine caused it
    (disk full, no permission, read-only file system); else E itself."""
    return _disk_fault(path, e) or e


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside PATH; on success it replaces PATH in one rename, on any
    error it is removed and PATH is left as it was. PATH that is a device or a FIFO (or a link to
    one) is yielded itself, to be written in place; a link to a file is followed, and the file it
    names replaced. A disk that is full or read-only while writing is an InputError naming PATH."""
    path = check_output_file(path)
    path, in_place = _write_target(path)
    if in_place:
        try:
            yield path
        except OSError as e:
            raise _user_fault(path, e) from None
        return
    d = os.path.dirname(path)
    clean_stale_temps(path)
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=os.path.splitext(path)[1], dir=d)
    except OSError as e:
        raise _os_error(path, e) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual mode
    try:
        try:
            yield tmp
        except Exception as e:
            fault = _disk_fault(path, e)
            if fault is None:
                raise
            raise fault from None
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise _os_error(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _listing(folder):
    """(files, dirs, others) relative to FOLDER ('/'-separated); others: links, sockets, ..."""
    files, dirs, others = set(), set(), set()
    for root, dnames, fnames in os.walk(folder):
        for n in list(dnames):
            full = os.path.join(root, n)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            if os.path.islink(full):
                others.add(rel)
                dnames.remove(n)
            else:
                dirs.add(rel)
        for n in fnames:
            full = os.path.join(root, n)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            (files if os.path.isfile(full) and not os.path.islink(full) else others).add(rel)
    return files, dirs, others


def only_these_files(folder, allowed) -> tuple[bool, str]:
    """(True, "") when FOLDER holds no file outside ALLOWED (relative '/' paths) and no folder
    that none of them is in; else (False, what is extra)."""
    files, dirs, others = _listing(folder)
    allowed = set(allowed)
    need_dirs = {"/".join(a.split("/")[:i]) for a in allowed for i in range(1, a.count("/") + 1)}
    extra = sorted((files - allowed) | (dirs - need_dirs) | others)
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        return False, f"it holds {shown}"
    return True, ""


def check_output_folder(path, owned=None, force=False, what="folder") -> str:
    """Raise InputError unless PATH may be (re)placed by a folder bdp writes: it does not exist,
    is an empty folder, or OWNED(path) -> (True, "") says it holds only what bdp writes there.
    FORCE allows replacing any folder (never a file). Returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    if os.path.islink(path):
        raise InputError(f"{path}: is a symbolic link; give the {what} a path of its own")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{path}: exists and is a file, not a {what}; choose another path")
    _check_parent(path)
    if os.path.isdir(path) and not force:
        try:
            empty = not os.listdir(path)
        except OSError as e:
            raise _os_error(path, e, "read") from None
        if not empty:
            ok, why = owned(path) if owned else (False, "")
            if not ok:
                raise InputError(f"{path}: exists and is not a {what} bdp wrote ({why or 'not empty'}); "
                                 f"choose another path, or pass --force to replace it and everything in it")
    return path


@contextlib.contextmanager
def atomic_folder(path, owned=None, force=False, what="folder"):
    """Yield a temporary folder beside PATH; on success it replaces PATH (checked with
    :func:`check_output_folder` before and again at the rename), on failure it vanishes."""
    path = check_output_folder(path, owned, force, what)
    parent = os.path.dirname(path)
    clean_stale_temps(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=parent)
    except OSError as e:
        raise _os_error(path, e) from None
    try:
        yield tmp
        check_output_folder(path, owned, force, what)  # it may have changed while we worked
        old = None
        try:
            if os.path.lexists(path):
                old = tempfile.mkdtemp(prefix=_tmp_prefix(path, "old"), dir=parent)
                os.rmdir(old)
                os.rename(path, old)
            os.rename(tmp, path)
        except OSError as e:
            if old and not os.path.lexists(path) and os.path.lexists(old):
                os.rename(old, path)
            raise _os_error(path, e) from None
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        fault = _disk_fault(path, e) if isinstance(e, Exception) else None  # before the space is freed
        shutil.rmtree(tmp, ignore_errors=True)
        if fault is None:
            raise
        raise fault from None


def is_inside(path, folder) -> bool:
    """True when PATH is FOLDER itself or lies below it (both resolved: links followed)."""
    try:
        p, f = os.path.realpath(os.fspath(path)), os.path.realpath(os.fspath(folder))
    except (OSError, ValueError):
        return False
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def refuse_inside(path, folder, what, of_what):
    """InputError when output PATH (the WHAT) would be written inside FOLDER, which this command
    reads (OF_WHAT): bdp never writes into its own input."""
    if path is not None and is_inside(path, folder):
        raise InputError(f"{path}: the {what} lies inside the {of_what} {folder}, which this command reads; "
                         f"write it elsewhere")


def remove_quietly(path):
    """Remove a file or folder bdp made (undoing a partial command); no error when absent."""
    if path is None:
        return
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


# errors of the user's environment when bdp writes or reads a path the user named
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
               errno.ENAMETOOLONG, errno.ELOOP, errno.EEXIST, errno.ENOTEMPTY, errno.EXDEV}


def is_user_os_error(e: BaseException) -> bool:
    """An OSError that the user's paths or machine caused (disk full, no permission, a file where
    a folder should be, ...), not bdp."""
    return isinstance(e, OSError) and getattr(e, "errno", None) in USER_ERRNOS


def read_limited(path, limit: int, too_large: str) -> bytes:
    """The bytes of the file PATH, at most LIMIT of them; InputError when it cannot be read or is
    larger (TOO_LARGE: what the message says after the path)."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > limit:
        raise InputError(f"{path}: {too_large}")
    return data

