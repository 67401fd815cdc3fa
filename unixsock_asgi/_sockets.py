"""Socket files: safe binding, liveness probes and peer credentials (Linux SO_PEERCRED)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ._exceptions import BindError

__all__ = [
    "BoundSocket",
    "PeerCredentials",
    "bind_unix_socket",
    "check_private_directory",
    "directory_lock",
    "ensure_private_directory",
    "peer_credentials",
    "probe",
]

_UCRED = struct.Struct("3i")
_SUN_PATH_MAX = 107  # 108 bytes including the terminating NUL


@dataclass(frozen=True)
class PeerCredentials:
    """Who is on the other end of a UNIX socket, as the kernel reports it."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """Read SO_PEERCRED from a connected UNIX socket."""
    so_peercred = getattr(socket, "SO_PEERCRED", 17)
    raw = sock.getsockopt(socket.SOL_SOCKET, so_peercred, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


_SO_PEERGROUPS = 59  # Linux 4.13+; not in the socket module
_GETSOCKOPT_MAX = 1024  # the most CPython's getsockopt reads: 256 groups


def peer_groups(sock: socket.socket, pid: int) -> frozenset[int]:
    """The supplementary groups the peer had when it connected (``SO_PEERGROUPS``).

    More than 256 do not fit what Python's ``getsockopt`` reads: then those of
    the peer's process ``pid`` now (``/proc/<pid>/status``; it is connected,
    so it is that process). Empty where the kernel cannot say.
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _GETSOCKOPT_MAX)
    except OSError as exc:
        if exc.errno != errno.ERANGE:
            return frozenset()
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
                for line in status:
                    if line.startswith("Groups:"):
                        return frozenset(int(g) for g in line.split()[1:])
        except (OSError, ValueError):
            pass
        return frozenset()
    return frozenset(struct.unpack(f"={len(raw) // 4}I", raw[: len(raw) // 4 * 4]))


def probe(path: str, timeout: float = 1.0) -> PeerCredentials | None:
    """Connect to ``path`` and return the listener's credentials, or None if nothing answers.

    Only a refused connection (``ECONNREFUSED``) or a vanished file counts as
    "nothing answers"; a full backlog still means a live server.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        return peer_credentials(sock)
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    except (BlockingIOError, TimeoutError):
        return PeerCredentials(0, -1, -1)  # alive, but its backlog is full
    finally:
        sock.close()


@dataclass(frozen=True)
class BoundSocket:
    """A listening socket and the identity of the file it is bound to."""

    sock: socket.socket
    path: str
    dev: int
    ino: int

    def still_ours(self) -> bool:
        """True while ``path`` is still the socket file this server bound."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (self.dev, self.ino)

    def unlink_if_ours(self) -> bool:
        """Remove the socket file if it is still ours; never touch anything else."""
        if self.still_ours():
            try:
                os.unlink(self.path)
                return True
            except FileNotFoundError:
                pass
        return False


def _ensure_parent(parent: str) -> None:
    """Create ``parent`` and any missing directory above it, each 0700."""
    missing = []
    directory = parent
    while not os.path.isdir(directory):
        missing.append(directory)
        above = os.path.dirname(directory)
        if above == directory:
            break
        directory = above
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise BindError(
                    f"cannot create socket directory {directory!r}: a file is in the way"
                ) from None
            continue  # made by someone else meanwhile: theirs, left as it is
        except OSError as exc:
            raise BindError(f"cannot create socket directory {directory!r}: {exc.strerror}") from None
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask


def check_private_directory(directory: str, *, shared_ok: bool = True, socket_dir: bool = True) -> None:
    """Raise :class:`BindError` unless only this user (or root) can change what ``directory`` holds.

    Another user who could create, rename or remove files in it, or rename it
    (write access to a directory above it), could swap the control socket for
    their own and answer the CLI in its place, or plant an overrides file.
    Like ssh's StrictModes: the directory, every directory above it, and any
    symlink among them must belong to this user or root, and none may be
    writable by group or others unless it is sticky, as ``/tmp`` is. Unless
    ``shared_ok``, the directory itself must not be writable by others even
    when sticky: in a socket directory, others could add sockets of their own
    that the CLI would talk to. ``socket_dir=False``: ``directory`` is where
    a missing socket directory will be made, and messages call it so.
    """
    # The path as written (a symlink on it must be this user's or root's) and where it
    # leads, which is what the kernel uses: its every directory.
    written, real = _physical(directory), os.path.realpath(directory)
    if written != real:
        _check_chain(written, shared_ok, socket_dir)
    _check_chain(real, shared_ok, socket_dir)


def _physical(path: str) -> str:
    """``path`` made absolute; with a ``..`` in it, resolved as the kernel resolves it (after
    a symlink, ``..`` leads to the parent of where it points, not back to where it was written)."""
    return os.path.realpath(path) if ".." in path.split(os.sep) else os.path.abspath(path)


def _check_chain(directory: str, shared_ok: bool, socket_dir: bool) -> None:
    euid = os.geteuid()
    above = directory
    while True:
        try:
            link = os.lstat(above)
            st = os.stat(above)
        except OSError as exc:
            raise BindError(f"cannot inspect {above!r}: {exc.strerror}") from None
        what = (
            "socket directory"
            if above == directory and socket_dir
            else "directory above the socket directory"
        )
        checks = [("a symlink owned by", link)] if stat.S_ISLNK(link.st_mode) else []
        for kind, info in (*checks, ("owned by", st)):
            if info.st_uid not in (euid, 0):
                raise BindError(
                    f"{what} {above!r} is {kind} uid {info.st_uid}, not this user (uid {euid}) or root:"
                    " its owner could replace the control socket; use a directory of this user's"
                )
        writable = st.st_mode & 0o022
        sticky = st.st_mode & stat.S_ISVTX
        mode = f"{stat.S_IMODE(st.st_mode):04o}"
        if writable and not sticky:
            # Sticky is enough above the sockets, not where they are (see shared_ok).
            shared = ", or sticky (chmod +t) if it must be shared," if above != directory or shared_ok else ""
            raise BindError(
                f"{what} {above!r} is writable by other users (mode {mode}) and not sticky: they could"
                " replace the control socket (or rename the directory that holds it); make it"
                f" writable by its owner only (chmod go-w){shared or ','}"
                " or put the sockets in a directory of this user's"
            )
        if writable and above == directory and not shared_ok:
            raise BindError(
                f"socket directory {directory!r} is writable by other users (mode {mode}): they could"
                " add sockets of their own, which the CLI would talk to; use a directory only this"
                " user can write (a missing one is created 0700, inside a shared one too)"
            )
        parent = os.path.dirname(above)
        if parent == above:
            return
        above = parent


def ensure_private_directory(directory: str) -> str:
    """Create ``directory`` (0700, and any missing above it) unless it exists, check it strictly,
    and return its real path (symlinks and ``..`` resolved), the one to use from then on.

    What exists above it is checked before anything is created in it.
    """
    existing = os.path.realpath(directory)
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    itself = existing == os.path.realpath(directory)  # else where the missing ones will be made
    check_private_directory(existing, shared_ok=not itself, socket_dir=itself)
    _ensure_parent(os.path.realpath(directory))
    check_private_directory(directory, shared_ok=False)
    return os.path.realpath(directory)


@contextlib.contextmanager
def directory_lock(directory: str, *, required: bool = True, patience: float = 2.0) -> Iterator[None]:
    """Hold an exclusive flock on ``directory`` (between processes of this host).

    Binders of sockets in it take it to check and replace a stale socket as
    one step, and so does the removal of stale sockets; the fleet's overrides
    file is rewritten under it. Whoever may read the directory may hold its
    lock, so it is waited for ``patience`` seconds at most: then, unless
    ``required``, the directory is used without it (and so is one that cannot
    be locked: not readable, or no flock there); if ``required``, TimeoutError.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        if required:
            raise
        yield
        return
    try:
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    if required:
                        raise TimeoutError(
                            f"{directory} stayed locked by another process for {patience:g}s"
                            " (another unixsock-asgi writing its overrides, or a process holding it)"
                        ) from None
                    break  # go on without it
                time.sleep(0.01)
            except OSError:
                if required:
                    raise
                break  # no locks on this file system
        yield
    finally:
        os.close(fd)  # releases the lock, if taken


def bind_unix_socket(path: str, *, mode: int = 0o600, backlog: int = 128) -> BoundSocket:
    """Bind and listen on ``path`` without ever exposing a socket wider than ``mode``.

    The socket is bound inside a fresh 0700 directory beside ``path``, given
    ``mode`` there, and only then linked into place, so no other user can
    connect during a chmod-after-bind window. An existing regular file (or
    anything but a socket) at ``path`` is never removed; a socket that a live
    server answers on is refused with that server's pid; a stale socket that
    nothing answers is replaced.
    """
    path = os.path.join(_physical(os.path.dirname(path) or "."), os.path.basename(path))
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise BindError(f"socket path {path!r} is longer than the {_SUN_PATH_MAX} bytes UNIX sockets allow")
    parent = os.path.dirname(path)
    _ensure_parent(parent)
    check_private_directory(parent)
    _check_existing(path)  # fail early, before binding anything
    try:
        tmpdir = tempfile.mkdtemp(prefix=".", dir=parent)
    except OSError as exc:
        raise BindError(f"cannot bind {path!r}: {exc.strerror} in {parent!r}") from None
    tmp_path = os.path.join(tmpdir, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(tmp_path)
        except OSError as exc:
            if len(os.fsencode(tmp_path)) > _SUN_PATH_MAX:
                raise BindError(
                    f"socket path {path!r} is too long to bind safely; use a shorter path"
                ) from None
            raise BindError(f"cannot bind {path!r}: {exc.strerror}") from None
        os.chmod(tmp_path, mode)
        sock.listen(backlog)
        try:
            # Checked again and put in place under the directory's lock: of two
            # servers that found the same stale socket, the second finds the
            # first one live instead of replacing it.
            with directory_lock(parent, required=False):
                if _check_existing(path):
                    # Replace the stale socket atomically; it was checked to be a socket.
                    os.rename(tmp_path, path)
                else:
                    # link() fails if anything appeared at ``path`` meanwhile.
                    os.link(tmp_path, path)
                    os.unlink(tmp_path)
        except FileExistsError:
            raise BindError(f"cannot bind {path!r}: something was created there while binding") from None
        except OSError as exc:
            raise BindError(f"cannot bind {path!r}: {exc.strerror}") from None
        st = os.lstat(path)
    except BaseException:
        sock.close()
        raise
    finally:
        try:
            os.unlink(tmp_path)
        except OSError:
            pass
        try:
            os.rmdir(tmpdir)
        except OSError:
            pass
    sock.setblocking(False)
    return BoundSocket(sock, path, st.st_dev, st.st_ino)


def _check_existing(path: str) -> bool:
    """Return True for a stale socket to replace, False for a free path; raise otherwise."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise BindError(f"cannot inspect {path!r}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise BindError(f"{path!r} exists and is not a socket; refusing to replace it")
    try:
        creds = probe(path)
    except PermissionError:
        raise BindError(
            f"{path!r} is a socket this user may not connect to; refusing to replace it"
        ) from None
    except OSError as exc:
        if exc.errno == errno.EACCES:
            raise BindError(f"{path!r}: permission denied") from None
        if exc.errno == errno.EPROTOTYPE:  # a datagram or seqpacket socket: not ours, and maybe live
            raise BindError(
                f"{path!r} is a socket of another type (datagram or seqpacket); refusing to replace it"
            ) from None
        raise BindError(f"cannot probe {path!r}: {exc.strerror}") from None
    if creds is not None:
        if creds.pid == os.getpid():
            raise BindError(
                f"this process already serves {path!r} (is ControlSocketMiddleware on the app twice,"
                " or do two apps share a path or a socket_dir and name?)"
            )
        who = f"pid {creds.pid}" if creds.pid > 0 else "an unknown pid"
        raise BindError(f"a live server ({who}) already answers on {path!r}")
    return True
