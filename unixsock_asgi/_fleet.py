"""Fleets of workers: socket directories, fan-out, aggregation and durable overrides.

Under ``uvicorn --workers N`` or gunicorn every worker is its own process with
its own control socket. In socket-directory mode each worker binds
``<dir>/<name>-<pid>.sock``; this module discovers them from the directory
alone (no master process), cleans up sockets that nothing answers any more,
and keeps the overrides file that later workers apply during startup.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime
import errno
import json
import logging
import math
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TextIO

from . import _compat
from ._checks import is_seconds
from ._client import BACKLOG_FULL, AsyncClient
from ._exceptions import BindError, ConnectError, TimeoutException, TransportError
from ._protocol import HARD_MAX_MESSAGE_SIZE, STATUS_OK, STOPPING_PAYLOAD, check_unicode
from ._sockets import check_private_directory, directory_lock, peer_credentials, probe
from ._stats import GAMMA, histogram_problem, merge_histograms

__all__ = [
    "BACK_TO_DEFAULT",
    "LONE_SURROGATES",
    "OVERRIDES_FILENAME",
    "PERSISTABLE_COMMANDS",
    "TERMINAL_CONTROLS",
    "AskedWorkers",
    "FanOutResult",
    "OverrideError",
    "OverridesFileError",
    "Target",
    "TargetError",
    "UntrustedDirectory",
    "WorkerResult",
    "aggregate",
    "aggregate_stats",
    "check_can_persist",
    "clear_overrides",
    "fan_out",
    "is_stats_snapshot",
    "load_overrides",
    "mark_foreign_stats",
    "mark_unusable_stats",
    "open_checked_directory",
    "override_key",
    "overrides_path",
    "persist_override",
    "read_overrides_document",
    "remove_stale_sockets",
    "render_prometheus",
    "replace_file",
    "resolve_target",
    "stats_problem",
    "untrusted_overrides_file",
    "untrusted_peer",
    "walk_path",
    "well_formed_override",
    "workers_owner",
    "write_overrides",
]

logger = logging.getLogger("unixsock_asgi.fleet")

OVERRIDES_FILENAME = "overrides.json"


def _socket_files(directory: str) -> list[str]:
    """Every ``*.sock`` entry of ``directory`` that is a socket, sorted by name."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    paths = []
    for name in names:
        if not name.endswith(".sock"):
            continue
        path = os.path.join(directory, name)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                paths.append(path)
        except OSError:
            continue  # vanished between listdir and lstat
    return paths


def remove_stale_sockets(directory: str) -> list[str]:
    """Remove the socket files in ``directory`` that nothing answers; return their paths.

    Only sockets whose connection is refused (or that vanish while probed) are
    removed; regular files and anything that is not a socket are never touched,
    and a socket that cannot be probed (permission denied) is left alone. It
    runs under the directory's lock, which a server binding there holds while
    it replaces a stale socket: it never removes the live one just put in place.
    """
    removed: list[str] = []
    # Opened once and worked in through its descriptor: the name may be a link
    # someone swaps between the probe of a socket and its removal, to have a
    # live socket elsewhere removed in place of a stale one here.
    try:
        dir_fd = open_checked_directory(directory)
    except FileNotFoundError:
        return removed
    try:
        pinned = f"/proc/self/fd/{dir_fd}" if _PROC_FDS else directory
        with directory_lock(pinned, required=False):
            for path in _socket_files(pinned):
                shown = os.path.join(directory, os.path.basename(path))
                if _remove_if_stale(path, shown):
                    removed.append(shown)
    finally:
        os.close(dir_fd)
    for path in removed:
        logger.info("removed stale socket %r", path)  # (a name the workers' user chose: repr)
    return removed


def _remove_if_stale(path: str, shown: str) -> bool:
    try:
        if probe(path) is not None:
            return False
    except OSError as exc:
        logger.debug("not removing %r: cannot probe it (%s)", shown, exc.strerror)
        return False
    try:
        # Re-check right before unlinking: never remove something that is not a socket.
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.warning("cannot remove stale socket %r: %s", shown, exc.strerror)
        return False
    return True


def overrides_path(directory: str) -> str:
    """Where the overrides file of a socket directory lives."""
    return os.path.join(directory, OVERRIDES_FILENAME)


def load_overrides(directory: str) -> list[dict[str, Any]]:
    """The persisted overrides of ``directory``, in the order to apply them.

    Each entry is ``{"cmd": str, "args": dict}``. A missing file yields ``[]``;
    an unreadable or corrupt file is logged as a warning and also yields ``[]``,
    because a bad overrides file must never stop a worker from starting.
    """
    path = overrides_path(directory)
    try:
        fh = _open_overrides_file(directory)
        if fh is None:
            return []
        with fh:
            problem = untrusted_overrides_file(os.fstat(fh.fileno()), os.geteuid())
            if problem:
                logger.warning("ignoring overrides file %s: %s", path, problem)
                return []
            document = _parse_overrides(fh)
    except (OSError, ValueError) as exc:
        logger.warning("ignoring overrides file %s: %s", path, exc)
        return []
    entries = document.get("overrides") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        logger.warning("ignoring overrides file %s: no 'overrides' list", path)
        return []
    result: list[dict[str, Any]] = []
    for entry in entries:
        override = well_formed_override(entry)
        if override is None:
            logger.warning("ignoring malformed entry in overrides file %s: %r", path, entry)
        else:
            result.append(override)
    return result


def _parse_overrides(fh: TextIO) -> Any:
    """The overrides file's JSON; nesting too deep for the parser is a ValueError, like any
    corrupt file (it was a RecursionError: no socket, and a traceback from the CLI)."""
    try:
        return json.load(fh)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _open_overrides_file(directory: str, dir_fd: int | None = None) -> TextIO | None:
    """The overrides file opened for reading, None when there is none.

    Never through a symbolic link (root would read where the directory's
    owner points it) and never a FIFO or device (whose open or read blocks):
    a regular file only. With ``dir_fd``, relative to that open directory.
    """
    name = OVERRIDES_FILENAME if dir_fd is not None else overrides_path(directory)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "it is a symbolic link, which is not followed") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "it is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def _socket_directory(directory: str, asked: AskedWorkers | None = None) -> Iterator[int]:
    """The socket directory opened once, to work in relative to it; as root, with its owner's rights.

    The directory's owner (the workers' user) may swap it, or a directory
    above it, for a link at any moment. Done through the descriptor with that
    user's rights, whatever root does there is what the user could do anyway:
    no file of root's is read, written or handed over. A directory of root's
    must be one nobody else can redirect (see ``check_private_directory``).
    """
    try:
        dir_fd = open_checked_directory(directory)
    except UntrustedDirectory as exc:
        raise OverridesFileError(exc.strerror) from None
    try:
        st = os.fstat(dir_fd)
        if asked is not None:
            asked.check(directory, st)
        if os.geteuid() != 0:
            yield dir_fd
            return
        if st.st_uid == 0:
            try:
                check_private_directory(directory, shared_ok=False)
            except BindError as exc:
                raise OverridesFileError(f"{directory}: not touched as root: {exc}") from None
            yield dir_fd
            return
        groups, egid = os.getgroups(), os.getegid()
        try:
            os.setgroups([st.st_gid])
            os.setegid(st.st_gid)
            os.seteuid(st.st_uid)
            yield dir_fd
        finally:  # given back however far the drop went
            os.seteuid(0)
            os.setegid(egid)
            os.setgroups(groups)
    finally:
        os.close(dir_fd)


class UntrustedDirectory(OSError):
    """A directory the CLI does not work in: another user could have redirected the way to it."""


def open_checked_directory(directory: str) -> int:
    """Open ``directory`` (``O_RDONLY``) as the walk to it reached it, unless others could have redirected it.

    Like a peer's socket (see :func:`untrusted_peer`), with the directory's
    owner in the peer's place: every entry on the way (every link, at any
    depth) belongs to root, this user or that owner and sits in a directory
    others may not write. Else :class:`UntrustedDirectory`: another user's
    link in ``/tmp`` could lead root into a third user's directory, or into
    one of root's.
    """
    walk = walk_path(directory)
    try:
        owner = os.fstat(walk.fd).st_uid
        why = walk.who_else(owner)
        if why:
            raise UntrustedDirectory(
                errno.EPERM, f"not touched: {directory} belongs to uid {owner}, and {why}", directory
            )
        try:
            return os.open(
                f"/proc/self/fd/{walk.fd}" if _PROC_FDS else directory,
                os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
            )
        except OSError as exc:  # named as the caller gave it, not as /proc/self/fd/N
            raise OSError(exc.errno, _access_text(exc, os.fstat(walk.fd)), directory) from None
    finally:
        os.close(walk.fd)


def _access_text(exc: OSError, st: os.stat_result) -> str:
    """``exc``'s words, and for a refusal, who owns the directory, its mode and who asked."""
    text = exc.strerror or str(exc)
    if isinstance(exc, PermissionError):
        text += f" (owner uid {st.st_uid}, group {st.st_gid}, mode {stat.S_IMODE(st.st_mode):04o}; this is uid {os.geteuid()})"
    return text


@dataclass(frozen=True)
class AskedWorkers:
    """The workers a persisted command was applied to: where their sockets were, whom they run as.

    The overrides file goes into that directory, and only if it belongs to
    them or root: the directory's name may lead elsewhere by the time the
    file is written (a link swapped meanwhile), and the command's arguments
    must not end up in another user's directory.
    """

    homes: frozenset[tuple[int, int]]
    uids: frozenset[int]

    @classmethod
    def of(cls, results: Iterable[WorkerResult]) -> AskedWorkers:
        results = list(results)
        return cls(
            frozenset(r.home for r in results if r.home is not None),
            frozenset(r.peer_uid for r in results if r.peer_uid is not None),
        )

    def check(self, directory: str, st: os.stat_result) -> None:
        """Raise OverridesFileError unless ``st`` is the workers' directory, theirs or root's."""
        if (st.st_dev, st.st_ino) not in self.homes:
            raise OverridesFileError(
                f"{directory} is no longer the directory whose workers were asked (replaced meanwhile?)"
            )
        if st.st_uid != 0 and st.st_uid not in self.uids:
            raise OverridesFileError(
                f"{directory} belongs to uid {st.st_uid}, neither root nor the workers' user"
                f" (uid {', '.join(map(str, sorted(self.uids)))})"
            )


def untrusted_overrides_file(st: os.stat_result, workers_uid: int) -> str:
    """Why workers running as ``workers_uid`` ignore an overrides file with this stat, or "".

    Whoever may write the file chooses what every worker runs at startup: it
    must be the workers' user's or root's, and no one else may write it.
    """
    if st.st_uid not in (workers_uid, 0) or st.st_mode & 0o022:
        return (
            f"it is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}; only a file of the"
            " workers' user or root that no one else may write is applied"
        )
    return ""


def well_formed_override(entry: Any) -> dict[str, Any] | None:
    """``{"cmd": str, "args": dict}`` for an entry workers apply (``args`` may be left out), else None.

    Workers skip other entries with a warning; a rewrite keeps them as they are.
    """
    if isinstance(entry, dict) and isinstance(entry.get("cmd"), str):
        args = entry.get("args", {})
        if isinstance(args, dict):
            try:
                check_unicode(entry)  # a hand-edited "\\ud800": no request could carry it
            except ValueError:
                return None
            return {"cmd": entry["cmd"], "args": dict(args)}
    return None


# --------------------------------------------------------------------------- targets


class TargetError(Exception):
    """A target that names nothing to talk to (missing path, no sockets, not a socket)."""


@dataclass(frozen=True)
class Target:
    """What the operator pointed at: one socket file, or a directory of worker sockets."""

    path: str
    is_directory: bool

    def sockets(self) -> list[str]:
        """The socket files to talk to now (a directory is listed afresh on every call)."""
        if self.is_directory:
            return _socket_files(self.path)
        return [self.path]


def resolve_target(path: str) -> Target:
    """Check that ``path`` is a socket file or a directory; raise :class:`TargetError` if not."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TargetError(f"{path}: no such socket or directory") from None
    except OSError as exc:
        raise TargetError(f"{path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        try:
            os.listdir(path)
        except OSError as exc:
            raise TargetError(f"{path}: cannot list the directory: {_access_text(exc, st)}") from None
        return Target(path, True)
    if stat.S_ISSOCK(st.st_mode):
        return Target(path, False)
    raise TargetError(f"{path}: neither a socket nor a directory")


def pid_from_socket_name(path: str) -> int | None:
    """The pid in a ``<name>-<pid>.sock`` or ``<pid>.sock`` file name, or None."""
    match = _SOCKET_NAME.search(os.path.basename(path))
    return int(match.group(1)) if match else None


_SOCKET_NAME = re.compile(r"(?:^|-)(\d+)\.sock$")


# --------------------------------------------------------------------------- fan-out

STATUS_TIMEOUT = "timeout"
"""The worker did not answer within the timeout."""
STATUS_ERROR = "error"
"""Talking to the worker failed (permission denied, protocol error, connection reset)."""
STATUS_STALE = "stale"
"""Nothing listens on the socket any more: its process is gone."""
STATUS_GONE = "gone"
"""The worker's process exited while it was asked: the command may have run there."""

MAX_CONCURRENT_WORKERS = 256
"""Workers asked at once; keeps file descriptors bounded on very large hosts."""


@dataclass
class WorkerResult:
    """One worker's answer to a fanned-out command (or why there is none)."""

    socket: str
    pid: int | None
    status: str
    error: str = ""
    payload: Any = None
    elapsed_s: float = 0.0
    peer_uid: int | None = None
    """The uid the server runs as (``SO_PEERCRED``), once connected."""
    home: tuple[int, int] | None = None
    """(st_dev, st_ino) of the directory the socket was found in, as the connection reached it."""
    answered_at: float | None = None
    """``time.monotonic()`` when its answer arrived (rates between two answers: a fan-out
    lasts as long as its slowest worker)."""
    sent: bool = False
    """The command reached a connection the worker's server accepted (and trusted): without
    an answer, it may have run there all the same."""

    @property
    def ok(self) -> bool:
        """True when the worker answered success."""
        return self.status == STATUS_OK

    def to_dict(self) -> dict[str, Any]:
        """The JSON form used by ``send --json``."""
        return {
            "socket": self.socket,
            "pid": self.pid,
            "status": self.status,
            "error": self.error,
            "payload": self.payload,
        }


@dataclass
class FanOutResult:
    """Answers of every live worker, the stale sockets that were skipped, and the workers that exited
    while they were asked (a deploy, a recycled worker: gone, not failed, but the command may have run)."""

    results: list[WorkerResult] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    directory_gone: bool = False
    """The directory asked is no longer there (``top`` goes on watching for it)."""

    @property
    def all_ok(self) -> bool:
        """True when there was at least one worker and every one answered success."""
        return bool(self.results) and all(r.ok for r in self.results)

    @property
    def successes(self) -> list[WorkerResult]:
        """The results of the workers that answered success."""
        return [r for r in self.results if r.ok]


def untrusted_peer(path: str, peer_uid: int) -> str:
    """Why the CLI sends nothing to the server of ``path`` running as ``peer_uid``, or "".

    A server of this user or root is trusted; one of another user only when
    nobody but root, this user or that one could have put the socket there:
    every entry the kernel looks up to reach it (see :func:`walk_path`:
    every symlink met, and every entry of where each one leads) belongs to one
    of them and sits in a directory others may not write, or, in one they may
    write that is sticky (``/tmp``), belongs to root or this user (there
    anyone could have taken the name first).
    """
    if peer_uid in (os.geteuid(), 0):
        return ""
    try:
        walk = walk_path(path)
    except OSError as exc:
        return _refusal(peer_uid, f"{exc.filename or path} cannot be inspected ({exc.strerror})")
    os.close(walk.fd)
    return walk.untrusted(peer_uid)


def _refusal(peer_uid: int, why: str) -> str:
    return (
        f"not asked: uid {peer_uid} serves this socket, and {why}; to talk to it anyway,"
        f" run as that user (sudo -u '#{peer_uid}' ...)"
    )


class Lookup(NamedTuple):
    """One name the kernel looks up: in ``directory`` (its mode), ``entry``, which belongs to ``uid``."""

    directory: str
    directory_mode: int
    entry: str
    uid: int


@dataclass
class PathWalk:
    """What :func:`walk_path` met on the way to a path, and an ``O_PATH`` descriptor of where it led."""

    lookups: list[Lookup]
    fd: int
    root_uid: int
    home: tuple[int, int] | None = None
    """(st_dev, st_ino) of the directory the last name was looked up in."""
    magic: str = ""
    """A link met on /proc (``/proc/self/cwd``, ``/dev/fd/N``...): the kernel follows it to an
    object, not as the text it reads as, so the way it leads is not one this walk can judge."""
    shells_way: list[Lookup] = field(default_factory=list)
    """For a relative path: the lookups of ``$PWD``, the way the operator's shell came to the
    working directory (through links the kernel no longer sees), which must pass too."""
    moved: str = ""
    """For a relative path: why ``$PWD`` does not tell the way to the working directory, if it does not."""

    def untrusted(self, peer_uid: int) -> str:
        """Why a server of ``peer_uid`` at the end of this walk is not asked, or "" (see :func:`untrusted_peer`)."""
        why = "" if peer_uid in (os.geteuid(), 0) else self.who_else(peer_uid)
        return _refusal(peer_uid, why) if why else ""

    def who_else(self, uid: int) -> str:
        """Why others than root, this user and ``uid`` could have made an entry met, or ""."""
        if self.root_uid != 0:
            return f"/ belongs to uid {self.root_uid}"
        if self.moved:
            return self.moved
        if self.magic:
            return f"{self.magic} is a /proc link, whose way cannot be judged: give the path itself"
        why = _who_else_could_have_made(self.lookups, uid)
        if not why and self.shells_way:
            why = _who_else_could_have_made(self.shells_way, uid)
            if why:
                why += " (on the way the shell came to its working directory, $PWD)"
        return why


def _who_else_could_have_made(lookups: Iterable[Lookup], peer_uid: int) -> str:
    euid = os.geteuid()
    for directory, mode, entry, uid in lookups:
        shared = bool(mode & 0o022)
        if shared and not mode & stat.S_ISVTX:
            return f"{directory} is writable by others"
        if uid not in ((0, euid) if shared else (0, euid, peer_uid)):
            where = f", in {directory}, where any user may make names" if shared else ""
            return f"{entry} belongs to uid {uid}{where}"
    return ""


_MAX_SYMLINKS = 40  # Linux's MAXSYMLINKS: more on one path, and the kernel gives ELOOP
try:
    _PROC_DEV: int | None = os.stat("/proc/self").st_dev
except OSError:
    _PROC_DEV = None


def walk_path(path: str) -> PathWalk:
    """Resolve ``path`` one name at a time as the kernel does, noting every lookup; hold where it leads.

    Each name is opened (``O_PATH | O_NOFOLLOW``) relative to the directory
    descriptor reached so far, and its owner read from that descriptor: a
    symlink is replaced by its target (from ``/`` when absolute) wherever
    it is met, at any depth, and ``..`` is the parent of the directory
    actually reached, not of the text. A relative path starts, as the
    kernel starts it, from the working directory itself, whose way down
    from ``/`` is found going up through ``..``; the way the operator's
    shell came there (``$PWD``, through links the kernel no longer sees)
    is walked too and must lead to the same directory: both must pass. The caller
    connects through ``/proc/self/fd/<fd>`` and closes ``fd``: what it
    talks to is what was walked, whatever is renamed meanwhile. Raises
    OSError where a name cannot be looked up (missing, a loop, no permission).
    """
    absolute = path.startswith("/")
    fd = os.open("/" if absolute else ".", os.O_PATH | os.O_DIRECTORY)
    shells_way: list[Lookup] = []
    moved = ""
    try:
        lookups: list[Lookup]
        if absolute:
            current, lookups, root_uid = "/", [], os.fstat(fd).st_uid
        else:
            current, lookups, root_uid = _way_down_to(fd)
            shells_way, moved = _shells_way_to(fd)
        pending = path.split("/")
        pending.reverse()  # a stack: the next name last
        links, home, magic = 0, None, ""
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                parent = os.open("..", os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                current, fd = os.path.dirname(current), parent
                continue
            directory_st = os.fstat(fd)
            directory_mode, home = directory_st.st_mode, (directory_st.st_dev, directory_st.st_ino)
            if not stat.S_ISDIR(directory_mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), current)
            entry = os.path.join(current, name)
            try:
                entry_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:  # named in full: the name alone says little
                raise OSError(exc.errno, exc.strerror, entry) from None
            try:
                st = os.fstat(entry_fd)
            except BaseException:
                os.close(entry_fd)
                raise
            lookups.append(Lookup(current, directory_mode, entry, st.st_uid))
            if stat.S_ISLNK(st.st_mode):
                if st.st_dev == _PROC_DEV:
                    magic = magic or entry
                try:
                    target = os.readlink("", dir_fd=entry_fd)
                finally:
                    os.close(entry_fd)
                links += 1
                if links > _MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                if target.startswith("/"):
                    os.close(fd)
                    current, fd = "/", os.open("/", os.O_PATH | os.O_DIRECTORY)
                pending.extend(reversed(target.split("/")))
            else:
                os.close(fd)
                current, fd = entry, entry_fd
    except BaseException:
        os.close(fd)
        raise
    return PathWalk(lookups, fd, root_uid, home, magic, shells_way, moved)


def _shells_way_to(fd: int) -> tuple[list[Lookup], str]:
    """The lookups of ``$PWD`` when it leads to the directory of ``fd``; else why not.

    A shell that ``cd``-ed through another user's link in ``/tmp`` sits in
    wherever that link led: the link is nowhere on the kernel's way, but the
    operator went through it. Without a ``$PWD`` that says so, the way is
    unknown, and another user's server is not asked by a relative path.
    (A ``$PWD`` without links, from ``cd -P`` or a new shell, cannot be told
    from having come the kernel's way.)
    """
    pwd = os.environ.get("PWD", "")
    if not pwd.startswith("/"):
        return [], (
            "$PWD is not set, so how the shell came to its working directory is unknown: give the full path"
        )
    moved = f"$PWD ({pwd}) no longer leads to the working directory: give the full path"
    try:
        walk = walk_path(pwd)
    except OSError:
        return [], moved
    try:
        same = os.path.samestat(os.fstat(walk.fd), os.fstat(fd))
    finally:
        os.close(walk.fd)
    return (walk.lookups, "") if same else ([], moved)


_MAX_DEPTH = 4096  # directories above a working directory, at most (PATH_MAX allows about 2,048)


def _way_down_to(fd: int) -> tuple[str, list[Lookup], int]:
    """The directory of ``fd``: its path, the lookups that lead there from ``/``, and the uid of ``/``.

    Found going up through ``..`` from the descriptor, one directory at a time
    (each one's owner and its parent's mode read from descriptors, so that a
    rename meanwhile cannot mix two places); the names are for messages.
    """
    lookups: list[Lookup] = []
    child = os.open(".", os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
    try:
        for _ in range(_MAX_DEPTH):
            child_st = os.fstat(child)
            parent = os.open("..", os.O_PATH | os.O_DIRECTORY, dir_fd=child)
            parent_st = os.fstat(parent)
            if (parent_st.st_dev, parent_st.st_ino) == (child_st.st_dev, child_st.st_ino):  # at /
                os.close(parent)
                lookups.reverse()
                return _fd_name(fd), lookups, child_st.st_uid
            lookups.append(Lookup(_fd_name(parent), parent_st.st_mode, _fd_name(child), child_st.st_uid))
            os.close(child)
            child = parent
        raise OSError(errno.ELOOP, "too many directories above the working directory", ".")
    finally:
        os.close(child)


def _fd_name(fd: int) -> str:
    """Where a directory descriptor is now, as the kernel names it (for messages)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"(directory descriptor {fd})"


class _UntrustedPeer(Exception):
    """The socket's server is not one the CLI sends commands to (see :func:`untrusted_peer`)."""


class _OperatorClient(AsyncClient):
    """The CLI's client: the peer's credentials are checked before anything is sent.

    It connects to what :func:`walk_path` reached (through ``/proc/self/fd``),
    so that the socket it talks to is the one whose path was checked.
    """

    peer_uid: int | None = None
    peer_pid: int | None = None
    home: tuple[int, int] | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            walk: PathWalk | None = walk_path(str(self.path))
        except OSError as exc:  # connecting says why (no such socket...), or the check below does
            walk, unwalkable = None, f"{exc.filename or self.path} cannot be inspected ({exc.strerror})"
        try:
            address = f"/proc/self/fd/{walk.fd}" if walk is not None and _PROC_FDS else str(self.path)
            reader, writer = await self._open(address)
        finally:
            if walk is not None:
                os.close(walk.fd)
        sock = writer.get_extra_info("socket")
        if sock is None:  # asyncio's UNIX transports have one; nothing is sent without knowing who listens
            writer.close()
            raise _UntrustedPeer("not asked: the server's credentials cannot be read")
        credentials = peer_credentials(sock)
        uid = self.peer_uid = credentials.uid
        self.peer_pid = credentials.pid or None  # 0: in a pid namespace this process cannot see
        self.home = walk.home if walk is not None else None
        if walk is not None:
            problem = walk.untrusted(uid)
        else:
            problem = "" if uid in (os.geteuid(), 0) else _refusal(uid, unwalkable)
        if problem:
            writer.close()
            raise _UntrustedPeer(problem)
        return reader, writer


_PROC_FDS = os.path.isdir("/proc/self/fd")
"""Without /proc, the CLI connects by the path it checked, and a rename in between goes unseen."""


async def ask_worker(
    path: str, cmd: str, args: Mapping[str, Any], timeout: float, *, polling: bool = False
) -> WorkerResult:
    """Send one command to one socket; never raises for what the worker does (a ``timeout``
    that is not a positive number is a ValueError), never takes much longer than ``timeout``.

    ``polling``: the views' own ``stats`` (``ls``, ``top``, ``metrics``), which changes
    nothing and which the control thread answers even while the app's loop is blocked.
    """
    started = time.monotonic()
    # Our own workers: a stats reply with many routes may pass the client's 1 MiB default.
    client = _OperatorClient(path, timeout=timeout, max_message_size=HARD_MAX_MESSAGE_SIZE)
    result = WorkerResult(path, pid_from_socket_name(path), STATUS_ERROR)
    untrusted = False
    try:
        # One deadline for connect + write + read: the client bounds each step on its own.
        async with _compat.timeout(timeout):
            response = await client.send(cmd, dict(args))
    except (TimeoutError, TimeoutException):
        result.status = STATUS_TIMEOUT
        if client.peer_uid is None:  # never connected: the client was trying again all along
            result.error = f"no connection within {timeout:g}s: {BACKLOG_FULL}"
        elif polling:  # nothing to run twice; and its silence says something
            result.error = (  # what it means first: a row of top's shows little more
                f"no reply within {timeout:g}s: stopped, hung or starved of CPU ({cmd!r} is"
                " answered even while the app's loop is blocked)"
            )
        else:
            # It was sent: a stopped worker takes it when continued, a blocked loop may yet run it.
            result.error = (
                f"no reply within {timeout:g}s (it may still run there: check before sending it again)"
            )
    except _UntrustedPeer as exc:
        untrusted = True  # refused before anything was sent
        result.error = str(exc)
    except ConnectError as exc:
        if BACKLOG_FULL in str(exc):  # the client's own timeout came first (Python 3.10's shim)
            result.status = STATUS_TIMEOUT
            result.error = f"no connection within {timeout:g}s: {BACKLOG_FULL}"
        elif _nothing_listens(path):
            result.status = STATUS_STALE
            result.error = "nothing listens on this socket (its process is gone)"
        else:
            result.error = str(exc)
    except TransportError as exc:
        if _nothing_listens(path):
            # Reset or closed as its process shut down (a deploy, a recycled
            # worker): gone, not an error; but the command may have run.
            result.status = STATUS_GONE
            result.error = "its process exited while it was asked (the command may have run there)"
        else:
            result.error = str(exc)
    else:
        assert response is not None  # respond=True
        if not response.ok and _says_stopping(response.payload) and _nothing_listens(path):
            # Cut short as its worker shut down (a deploy, a recycled worker): gone, as when the
            # connection ends with no reply (an older version, a killed process). Only if nothing
            # listens any more: a live worker's handler may relay another server's such reply.
            result.status = STATUS_GONE
            result.error = f"its process shut down while it was asked ({response.error})"
            return result
        result.status = response.status
        result.error = response.error
        result.payload = response.payload
        result.answered_at = time.monotonic()
        if isinstance(response.payload, dict) and isinstance(response.payload.get("pid"), int):
            result.pid = response.payload["pid"]
    finally:
        if result.pid is None:  # its name has none: the process that listens there (answered or not)
            result.pid = client.peer_pid
        await client.aclose()
        result.elapsed_s = time.monotonic() - started
        result.peer_uid, result.home = client.peer_uid, client.home
        result.sent = client.peer_uid is not None and not untrusted
    return result


def _says_stopping(payload: Any) -> bool:
    """Whether a failure's payload is the one a server stopping gives a command it cuts short."""
    return (
        isinstance(payload, dict)
        and payload.keys() == STOPPING_PAYLOAD.keys()
        and all(payload[key] is value for key, value in STOPPING_PAYLOAD.items())  # True, not 1
    )


def _nothing_listens(path: str) -> bool:
    try:
        return probe(path, timeout=0.2) is None
    except OSError:
        return False  # permission denied and the like: something is there


async def fan_out(
    sockets: Iterable[str],
    cmd: str,
    args: Mapping[str, Any] | None = None,
    *,
    timeout: float = 5.0,
    polling: bool = False,
) -> FanOutResult:
    """Send ``cmd`` to every socket concurrently and collect every answer.

    Each worker gets its own ``timeout``; one that does not answer costs at
    most that and never holds back the others. Sockets that nothing listens on
    any more are reported in ``stale`` rather than as failures, and workers
    that exited while asked in ``gone``.
    """
    if not is_seconds(timeout):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    limit = asyncio.Semaphore(MAX_CONCURRENT_WORKERS)

    async def bounded(path: str) -> WorkerResult:
        async with limit:
            return await ask_worker(path, cmd, args or {}, timeout, polling=polling)

    answers = await asyncio.gather(*(bounded(p) for p in sockets))
    outcome = FanOutResult()
    for answer in answers:
        if answer.status == STATUS_STALE:
            outcome.stale.append(answer.socket)
        elif answer.status == STATUS_GONE:
            outcome.gone.append(answer.socket)
        else:
            outcome.results.append(answer)
    if cmd == "stats":
        mark_unusable_stats(outcome)
    return outcome


def is_stats_snapshot(payload: Any) -> bool:
    """Whether an answer to ``stats`` is a unixsock-asgi worker's snapshot.

    Other servers of the wire protocol (the Go library's, an app's own
    handler) may answer ``stats`` with anything: a string, another object.
    """
    requests_total = payload.get("requests_total") if isinstance(payload, Mapping) else None
    return isinstance(requests_total, int) and not isinstance(requests_total, bool)


FOREIGN_STATS = "its answer to 'stats' is not a unixsock-asgi stats snapshot (another kind of server?)"


def _is_count(value: Any) -> bool:
    # Within a double's exact integers: replies may carry bigger ones, which overflow a float.
    return isinstance(value, int) and not isinstance(value, bool) and -(2**53) <= value <= 2**53


def stats_problem(snapshot: Mapping[str, Any]) -> str:
    """Why a unixsock-asgi stats snapshot cannot be added into a fleet's figures, or "".

    Its histograms must merge with this version's (the same buckets: a worker of
    another version, mid-upgrade, may use others) and its counts be numbers.
    """
    for name in ("requests_total", "in_flight", "exceptions_total"):
        if not _is_count(snapshot.get(name, 0)):
            return f"its {name} is {snapshot.get(name)!r}, not a count"
    histograms = [snapshot.get("latency")]
    routes = snapshot.get("routes", {})
    if not isinstance(routes, Mapping):
        return "its 'routes' is not an object"
    for template, route in routes.items():
        if not isinstance(route, Mapping):
            return f"route {template!r} is not an object"
        for name in ("requests", "exceptions"):
            if not _is_count(route.get(name, 0)):
                return f"route {template!r}: {name} is {route.get(name)!r}, not a count"
        histograms.append(route.get("latency"))
    for histogram in histograms:
        problem = "" if histogram is None else histogram_problem(histogram)
        if problem:
            return f"a latency histogram cannot be merged: {problem}"
    return ""


def mark_unusable_stats(outcome: FanOutResult) -> FanOutResult:
    """Turn unixsock-asgi snapshots that cannot be merged (see :func:`stats_problem`) into errors."""
    for result in outcome.results:
        if result.ok and is_stats_snapshot(result.payload):
            problem = stats_problem(result.payload)
            if problem:
                result.status, result.error = STATUS_ERROR, f"its stats cannot be used: {problem}"
    return outcome


def mark_foreign_stats(outcome: FanOutResult) -> FanOutResult:
    """Turn successes whose payload is not a stats snapshot into errors, for the views built on stats.

    ``ls``, ``top`` and ``metrics`` would otherwise show such a worker as
    live with no figures, and count it neither as a worker nor as unreachable.
    """
    for result in outcome.results:
        if result.ok and not is_stats_snapshot(result.payload):
            result.status, result.error = STATUS_ERROR, FOREIGN_STATS
    return outcome


# --------------------------------------------------------------------------- aggregation


def _add_counts(into: dict[str, int], counts: Any) -> None:
    if isinstance(counts, Mapping):
        for key, n in counts.items():
            if _is_count(n):
                into[key] = into.get(key, 0) + n


def _count(value: Any) -> int:
    """A count from a reply, or 0 when it is none (a string, a float, beyond a double's integers)."""
    return value if _is_count(value) else 0


_NUMBER_LIMIT = 2.0**63
"""Figures beyond this are no process's: dropped rather than summed (two 1e308 make infinity)."""


def _number(value: Any) -> float | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond a double, from another kind of server
        return None
    return number if -_NUMBER_LIMIT < number < _NUMBER_LIMIT else None  # NaN fails this too


def _sum_or_none(values: Iterable[Any]) -> float | None:
    numbers = [n for n in map(_number, values) if n is not None]
    return sum(numbers) if numbers else None


def _max_or_none(values: Iterable[Any]) -> float | None:
    numbers = [n for n in map(_number, values) if n is not None]
    return max(numbers) if numbers else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _histograms(payloads: Iterable[Any]) -> list[Mapping[str, Any]]:
    return [p for p in payloads if isinstance(p, Mapping) and "buckets" in p]


def aggregate_stats(snapshots: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine several workers' ``stats`` payloads into one fleet-wide payload.

    Counters are summed; latency histograms (overall and per route) are merged
    bucket by bucket and their percentiles computed from the merge (averaging
    percentiles would be wrong); gauges that add up across processes
    (in-flight requests, RSS, file descriptors, threads, CPU time, active
    websockets) are summed; event-loop lag is the worst worker's.
    """
    snapshots = [s for s in snapshots if is_stats_snapshot(s) and not stats_problem(s)]
    by_status: dict[str, int] = {}
    by_method: dict[str, int] = {}
    routes: dict[str, dict[str, Any]] = {}
    route_latencies: dict[str, list[Mapping[str, Any]]] = {}
    for snap in snapshots:
        _add_counts(by_status, snap.get("by_status"))
        _add_counts(by_method, snap.get("by_method"))
        snap_routes = snap.get("routes")
        if not isinstance(snap_routes, Mapping):
            continue
        for template, route in snap_routes.items():
            if not isinstance(route, Mapping):
                continue
            merged = routes.setdefault(
                template, {"requests": 0, "exceptions": 0, "by_status": {}, "by_method": {}}
            )
            merged["requests"] += _count(route.get("requests", 0))
            merged["exceptions"] += _count(route.get("exceptions", 0))
            _add_counts(merged["by_status"], route.get("by_status"))
            _add_counts(merged["by_method"], route.get("by_method"))
            route_latencies.setdefault(template, []).extend(_histograms([route.get("latency")]))
    for template, merged in routes.items():
        merged["latency"] = merge_histograms(route_latencies.get(template, []), checked=True)

    processes = [_mapping(s.get("process")) for s in snapshots]
    websockets = [_mapping(s.get("websockets")) for s in snapshots]
    return {
        "workers": len(snapshots),
        "pids": [s.get("pid") for s in snapshots],
        "uptime_s": _max_or_none(s.get("uptime_s") for s in snapshots),
        "requests_total": int(_sum_or_none(s.get("requests_total") for s in snapshots) or 0),
        "in_flight": int(_sum_or_none(s.get("in_flight") for s in snapshots) or 0),
        "exceptions_total": int(_sum_or_none(s.get("exceptions_total") for s in snapshots) or 0),
        "by_status": by_status,
        "by_method": by_method,
        "latency": merge_histograms(_histograms(s.get("latency") for s in snapshots), checked=True),
        "routes": dict(sorted(routes.items())),
        "websockets": {
            "active": int(_sum_or_none(w.get("active") for w in websockets) or 0),
            "total": int(_sum_or_none(w.get("total") for w in websockets) or 0),
        },
        "process": {
            "rss_bytes": _sum_or_none(p.get("rss_bytes") for p in processes),
            "open_fds": _sum_or_none(p.get("open_fds") for p in processes),
            "threads": _sum_or_none(p.get("threads") for p in processes),
            "cpu_s": _sum_or_none(p.get("cpu_s") for p in processes),
            "loop_lag_s": _max_or_none(p.get("loop_lag_s") for p in processes),
            "loop_lag_max_s": _max_or_none(p.get("loop_lag_max_s") for p in processes),
            "loop_lag_total_s": _sum_or_none(p.get("loop_lag_total_s") for p in processes),
        },
        # How many workers an operator set so (each worker's own payload says whether it is).
        "control": {flag: sum(1 for s in snapshots if worker_flag(s, flag)) for flag in CONTROL_FLAGS},
    }


CONTROL_FLAGS = ("health_failing", "maintenance")


def worker_flag(snapshot: Mapping[str, Any], flag: str) -> bool:
    """Whether a worker's ``stats`` says ``flag`` (``health_failing``, ``maintenance``) is on."""
    control = snapshot.get("control")
    return isinstance(control, Mapping) and control.get(flag) is True


def group_identical(results: Iterable[WorkerResult]) -> list[dict[str, Any]]:
    """Group workers that gave the same answer: ``[{"status","error","payload","pids"}]``.

    Shows at a glance whether every worker agrees (one group) or which differ.
    """
    groups: dict[str, dict[str, Any]] = {}
    for r in results:
        key = json.dumps([r.status, r.error, r.payload], sort_keys=True, default=str)
        group = groups.setdefault(
            key, {"status": r.status, "error": r.error, "payload": r.payload, "pids": []}
        )
        group["pids"].append(r.pid)
    return list(groups.values())


def aggregate(cmd: str, outcome: FanOutResult) -> Any:
    """The fleet-wide ``total`` of a command's answers, or None when it has none.

    ``stats`` is summed and merged (see :func:`aggregate_stats`); commands that
    read a value (``get``, ``get_log_level``, ``settings``) report the distinct
    answers with the pids that gave each, so that drift between workers shows.
    """
    if cmd == "stats":
        return aggregate_stats([r.payload for r in outcome.successes])
    if cmd in _AGREEMENT_COMMANDS:
        return {"distinct": group_identical(outcome.successes)}
    return None


_AGREEMENT_COMMANDS = frozenset({"get", "get_log_level", "settings"})


# --------------------------------------------------------------------------- durable overrides

OVERRIDES_FORMAT_VERSION = 1


class OverrideError(ValueError):
    """A command that cannot be persisted (not persistable, or with a non-durable argument)."""


class OverridesFileError(Exception):
    """The overrides file exists but cannot be read or parsed, so it is not rewritten."""


def _log_level_key(args: Mapping[str, Any]) -> tuple[str, ...]:
    if "level" not in args:
        raise OverrideError("set_log_level needs level=... to be persisted")
    if args.get("ttl") is not None:
        raise OverrideError(
            "a set_log_level with ttl= is temporary by design and cannot be persisted; drop ttl or --persist"
        )
    logger_name = args.get("logger") or ""
    return ("log_level", "" if logger_name == "root" else str(logger_name))


def _setting_key(args: Mapping[str, Any]) -> tuple[str, ...]:
    if "name" not in args or "value" not in args:
        raise OverrideError("set needs name=... and value=... to be persisted")
    return ("setting", str(args["name"]))


PERSISTABLE_COMMANDS: dict[str, Callable[[Mapping[str, Any]], tuple[str, ...]]] = {
    "set_log_level": _log_level_key,
    "set": _setting_key,
    "health_fail": lambda args: ("health",),
    "health_ok": lambda args: ("health",),
    "maintenance_on": lambda args: ("maintenance",),
    "maintenance_off": lambda args: ("maintenance",),
}
"""Commands that ``--persist`` accepts, each with the key of the state it sets.

A new override replaces the persisted one with the same key: a log level per
logger (root is ``""``), a setting per name, one health state
(``health_fail``/``health_ok``) and one maintenance state
(``maintenance_on``/``maintenance_off``).
"""


def override_key(cmd: str, args: Mapping[str, Any]) -> tuple[str, ...]:
    """The state that ``cmd args`` sets; raise :class:`OverrideError` if it cannot be persisted."""
    key_of = PERSISTABLE_COMMANDS.get(cmd)
    if key_of is None:
        allowed = ", ".join(sorted(PERSISTABLE_COMMANDS))
        raise OverrideError(f"{cmd!r} cannot be persisted; persistable commands: {allowed}")
    return key_of(args)


def _entry_key(entry: Any) -> tuple[str, ...]:
    override = well_formed_override(entry)
    if override is not None:
        with contextlib.suppress(OverrideError):
            return override_key(override["cmd"], override["args"])
    return ("entry", json.dumps(entry, sort_keys=True, default=str))  # hand-edited: keep it


def read_overrides_document(directory: str, dir_fd: int | None = None) -> dict[str, Any]:
    """The whole overrides document; an empty one when there is no file.

    Unlike :func:`load_overrides` this raises :class:`OverridesFileError` on a
    corrupt file, so that a rewrite never silently drops what was in it.
    Without ``dir_fd`` it opens the directory itself (see ``_socket_directory``).
    """
    if dir_fd is None:
        with _socket_directory(directory) as opened:
            return read_overrides_document(directory, opened)
    path = overrides_path(directory)
    try:
        fh = _open_overrides_file(directory, dir_fd)
        if fh is None:
            return {"version": OVERRIDES_FORMAT_VERSION, "overrides": []}
        with fh:
            document = _parse_overrides(fh)
    except PermissionError:
        raise OverridesFileError(f"{path}: permission denied (run as the workers' user or root)") from None
    except (OSError, ValueError) as exc:
        raise OverridesFileError(f"{path}: cannot read overrides ({exc}); fix or clear it") from None
    if not isinstance(document, dict) or not isinstance(document.get("overrides"), list):
        raise OverridesFileError(f"{path}: not an overrides file (no 'overrides' list); fix or clear it")
    return document


def workers_owner(directory: str) -> tuple[int, int]:
    """The uid and gid the workers of ``directory`` run as: the owner of their socket files.

    Without any socket, the directory's owner (systemd's RuntimeDirectory= is
    created for the service's user).
    """
    for path in _socket_files(directory):
        try:
            st = os.lstat(path)
        except OSError:
            continue
        return st.st_uid, st.st_gid
    st = os.stat(directory)
    return st.st_uid, st.st_gid


def check_can_persist(directory: str) -> None:
    """Raise :class:`OverrideError` when an overrides file written now could not be used.

    The file is 0600, so it must belong to the workers' user: root may write
    it (it is handed over to that user), anyone else must be that user.
    """
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OverrideError(f"cannot write in {directory}: permission denied")
    uid, _ = workers_owner(directory)
    euid = os.geteuid()
    if euid not in (0, uid):
        raise OverrideError(
            f"the workers run as uid {uid} and could not read a 0600 overrides file written by uid {euid};"
            f" persist as their user (sudo -u '#{uid}' ...) or as root"
        )


def write_overrides(directory: str, entries: Sequence[Any], dir_fd: int | None = None) -> None:
    """Replace the overrides file atomically: a 0600 temp file in the same directory, then rename.

    A worker starting meanwhile reads either the old file or the new one,
    never a partial one; the rename is fsynced so it survives a power cut.
    Written by root, the file is given to the workers' user so they can read it.
    """
    document = {
        "version": OVERRIDES_FORMAT_VERSION,
        "updated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # A hand-edited entry that workers skip is kept as it is, for the operator to see and fix.
        "overrides": [well_formed_override(e) or e for e in entries],
    }
    if dir_fd is None:
        with _socket_directory(directory) as opened:
            write_overrides(directory, entries, opened)
        return
    owner = (
        workers_owner(directory) if os.geteuid() == 0 else None
    )  # root's own directory (see _socket_directory)
    replace_file(
        dir_fd, OVERRIDES_FILENAME, json.dumps(document, indent=2, sort_keys=True) + "\n", 0o600, owner
    )


def replace_file(dir_fd: int, name: str, text: str, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Replace ``name`` in the directory ``dir_fd`` atomically: readers see the old file or the new one.

    A temporary file is made beside it (never through a link), given ``mode``
    (and ``owner``, uid and gid), written and fsynced, then renamed over
    ``name``; the rename is fsynced too, so that it survives a power cut.
    """
    tmp_name = f".{name}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp_name, flags, mode, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), mode)  # os.open's mode passes the umask
            if owner is not None:
                os.fchown(fh.fileno(), *owner)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name, dir_fd=dir_fd)
        raise
    with contextlib.suppress(OSError):
        os.fsync(dir_fd)


_OVERRIDES_LOCK_PATIENCE = 10.0
"""Seconds a rewrite of the overrides file waits for the directory's lock (another writer
takes milliseconds; anyone who may read the directory can hold it)."""


def persist_override(
    directory: str, cmd: str, args: Mapping[str, Any], asked: AskedWorkers | None = None
) -> list[Any]:
    """Record ``cmd args`` in the directory's overrides file; return the new list.

    An earlier override of the same state is dropped and the new one goes
    last, so the file lists overrides in the order to apply them. ``asked``:
    the workers that applied it (see :class:`AskedWorkers`).
    """
    key = override_key(cmd, args)
    with (
        _socket_directory(directory, asked) as dir_fd,
        directory_lock(directory, patience=_OVERRIDES_LOCK_PATIENCE),
    ):
        document = read_overrides_document(directory, dir_fd)
        entries = [e for e in document["overrides"] if _entry_key(e) != key]
        if cmd in BACK_TO_DEFAULT:  # those only undo an earlier override: nothing is left to apply
            if len(entries) == len(document["overrides"]):
                return entries  # none to undo: the file stays as it is (or absent)
        else:
            entries.append({"cmd": cmd, "args": dict(args)})
        write_overrides(directory, entries, dir_fd)
    return entries


BACK_TO_DEFAULT = frozenset({"health_ok", "maintenance_off"})
"""Persisted, these remove the override of their state: a worker starts healthy and out of maintenance."""


def clear_overrides(directory: str) -> int | None:
    """Delete the overrides file; return how many overrides it held (0 when there was none,
    None when it could not be read: clearing is the way out of a corrupt file, a link, a FIFO).

    Running workers keep their current state; only workers started later are affected.
    """
    with _socket_directory(directory) as dir_fd, directory_lock(directory, patience=_OVERRIDES_LOCK_PATIENCE):
        count: int | None
        try:
            count = len(read_overrides_document(directory, dir_fd)["overrides"])
        except (OverridesFileError, OSError):
            count = None
        try:
            os.unlink(OVERRIDES_FILENAME, dir_fd=dir_fd)
        except FileNotFoundError:
            return 0
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
    return count


# --------------------------------------------------------------------------- Prometheus


def _escape_label(value: Any) -> str:
    # The format escapes only these three; other control characters (a route's, a
    # worker's) would reach whoever reads the text in a terminal: replaced.
    text = str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return text.translate(_CONTROL_CHARACTERS)


TERMINAL_CONTROLS = (
    *range(0x20),
    *range(0x7F, 0xA0),  # DEL and the C1 controls (0x9b is a CSI of its own)
    *range(0x202A, 0x202F),  # bidirectional overrides: text that reads other than it is
    *range(0x2066, 0x206A),
    0x2028,  # line and paragraph separators: a line break to some terminals
    0x2029,
)
"""Code points that drive a terminal (or make text read other than it is), tab and newline included."""
LONE_SURROGATES = range(0xD800, 0xE000)
"""Code points a JSON string can escape but no text can hold: shown as escapes, never written raw
(they cannot be encoded, and writing one would fail)."""
_CONTROL_CHARACTERS = dict.fromkeys((*TERMINAL_CONTROLS, *LONE_SURROGATES), "\ufffd")


def _format_value(value: Any) -> str:
    if value is None:
        return "NaN"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    return repr(number)


class _Exposition:
    """Prometheus text format 0.0.4: each family once, its HELP and TYPE, then its samples."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> str:
        full = f"{self.prefix}_{name}"
        self.lines.append(f"# HELP {full} {help_text}")
        self.lines.append(f"# TYPE {full} {kind}")
        return full

    def sample(self, name: str, value: Any, labels: Mapping[str, Any] | None = None) -> None:
        if labels:
            text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{text}}} {_format_value(value)}")
        else:
            self.lines.append(f"{name} {_format_value(value)}")

    def histogram(self, name: str, latency: Mapping[str, Any], labels: Mapping[str, Any]) -> None:
        buckets = latency.get("buckets", ())
        for bound, count in zip(LATENCY_BOUNDS, _counts_up_to(buckets, LATENCY_BOUNDS), strict=True):
            self.sample(f"{name}_bucket", count, {**labels, "le": _format_value(bound)})
        count = latency.get("count", 0)
        self.sample(f"{name}_bucket", count, {**labels, "le": "+Inf"})
        self.sample(f"{name}_sum", latency.get("sum_s", 0.0), labels)
        self.sample(f"{name}_count", count, labels)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""The ``le`` bounds of the Prometheus latency histogram, in seconds (and ``+Inf``)."""


def _counts_up_to(buckets: Iterable[Sequence[int]], bounds: Sequence[float]) -> list[int]:
    """How many latencies are at most each bound, from a histogram's ``[index, count]`` buckets.

    A bucket holds (GAMMA**(index-1), GAMMA**index]; one that straddles a
    bound is counted above it, so a count is off by at most the latencies
    within 4 % under its bound.
    """
    counts = [0] * len(bounds)
    for index, count in buckets:
        upper = GAMMA**index
        for k in range(bisect.bisect_left(bounds, upper), len(bounds)):
            counts[k] += count
    return counts


def render_prometheus(outcome: FanOutResult, *, prefix: str = "asgi") -> str:
    """The fleet's ``stats`` in the Prometheus text exposition format.

    Counters and the latency histogram are per worker (labelled ``pid``): a
    worker's counts only grow until it exits, restarts or is reset, which
    Prometheus reads as the end of a series or a reset of it, so ``rate()``
    and ``increase()`` are right however workers come and go; sum them in the
    query. (Sums over the workers that answered would drop whenever one is
    replaced or does not answer, and ``rate()`` would read each drop as a
    burst of requests.) Gauges are summed over the fleet as well.
    """
    snapshots = [r for r in outcome.successes if isinstance(r.payload, Mapping)]
    # Each worker's checked as the total is.
    workers = [(_pid_label(r.pid), aggregate_stats([r.payload])) for r in snapshots]
    total = aggregate_stats([r.payload for r in snapshots])
    out = _Exposition(prefix)

    name = out.family("workers", "gauge", "Workers that answered the stats command.")
    out.sample(name, len(snapshots))
    name = out.family("workers_unreachable", "gauge", "Workers that did not answer (timeout or error).")
    out.sample(name, len(outcome.results) - len(outcome.successes))
    name = out.family(
        "worker_up", "gauge", "1 for a worker that answered the stats command, 0 for one that did not."
    )
    answered = {id(r) for r in snapshots}
    for r in sorted(outcome.results, key=lambda r: (r.pid or 0, r.socket)):
        # Which one is silent, not just how many: its socket too, for a name without a pid.
        whose = {"pid": _pid_label(r.pid), "socket": os.path.basename(r.socket)}
        out.sample(name, int(id(r) in answered), whose)
    name = out.family("stale_sockets", "gauge", "Socket files that nothing listens on any more.")
    out.sample(name, len(outcome.stale))
    name = out.family(
        "workers_gone", "gauge", "Workers that exited while they were asked (a deploy, a recycled worker)."
    )
    out.sample(name, len(outcome.gone))

    per_route: list[tuple[str, str, Callable[[Mapping[str, Any]], list[tuple[dict[str, str], Any]]]]] = [
        (
            "requests_total",
            "Finished HTTP requests by route, status class and worker.",
            lambda figures: [({"status": k}, n) for k, n in sorted(figures["by_status"].items())],
        ),
        (
            "requests_by_method_total",
            "Finished HTTP requests by route, method and worker.",
            lambda figures: [({"method": k}, n) for k, n in sorted(figures["by_method"].items())],
        ),
        (
            "exceptions_total",
            "Requests that raised an exception, by route template and worker.",
            lambda figures: [({}, figures["exceptions"])],
        ),
    ]
    for family_name, help_text, samples_of in per_route:
        name = out.family(family_name, "counter", help_text)
        for pid, stats in workers:
            for route, figures in stats["routes"].items():
                for labels, n in samples_of(figures):
                    out.sample(name, n, {"route": route, **labels, "pid": pid})
    name = out.family("request_duration_seconds", "histogram", "Request latency by route and worker.")
    for pid, stats in workers:
        for route, figures in stats["routes"].items():
            out.histogram(name, figures["latency"], {"route": route, "pid": pid})
    name = out.family("in_flight_requests", "gauge", "HTTP requests being served now, all workers.")
    out.sample(name, total["in_flight"])
    name = out.family("websockets_active", "gauge", "Open websocket connections, all workers.")
    out.sample(name, total["websockets"]["active"])
    name = out.family("websockets_total", "counter", "Websocket connections accepted, by worker.")
    for pid, stats in workers:
        out.sample(name, stats["websockets"]["total"], {"pid": pid})

    per_worker: list[tuple[str, str, str, Callable[[Mapping[str, Any]], Any]]] = [
        ("worker_requests_total", "counter", "Finished HTTP requests of one worker.", _get("requests_total")),
        (
            "worker_in_flight_requests",
            "gauge",
            "HTTP requests one worker is serving.",
            _get("in_flight"),
        ),
        ("worker_uptime_seconds", "gauge", "Seconds since the worker started.", _get("uptime_s")),
        ("worker_rss_bytes", "gauge", "Resident memory of one worker.", _get("process", "rss_bytes")),
        ("worker_open_fds", "gauge", "Open file descriptors of one worker.", _get("process", "open_fds")),
        ("worker_threads", "gauge", "Threads of one worker.", _get("process", "threads")),
        ("worker_cpu_seconds_total", "counter", "CPU time of one worker.", _get("process", "cpu_s")),
        (
            "worker_event_loop_lag_seconds",
            "gauge",
            "Latest event-loop lag of one worker.",
            _get("process", "loop_lag_s"),
        ),
        (
            "worker_event_loop_lag_max_seconds",
            "gauge",
            "Longest event-loop lag of one worker since it started.",
            _get("process", "loop_lag_max_s"),
        ),
        (
            "worker_event_loop_lag_seconds_total",
            "counter",
            "Event-loop lag of one worker added up, measured every 0.5 s: its rate is the share"
            " of time the loop ran late (a stall shows between two scrapes).",
            _get("process", "loop_lag_total_s"),
        ),
        (
            "worker_health_failing",
            "gauge",
            "1 while an operator makes one worker's health check fail (health_fail).",
            _flag("health_failing"),
        ),
        (
            "worker_maintenance",
            "gauge",
            "1 while one worker is in maintenance (maintenance_on).",
            _flag("maintenance"),
        ),
    ]
    for family_name, kind, help_text, read in per_worker:
        name = out.family(family_name, kind, help_text)
        for r in snapshots:
            value = read(r.payload)
            if _number(value) is not None:
                out.sample(name, value, {"pid": _pid_label(r.pid)})
    return out.text()


def _pid_label(pid: int | None) -> str:
    """One spelling in every family, so that queries can join on it: "" when not known."""
    return "" if pid is None else str(pid)


def _flag(flag: str) -> Callable[[Mapping[str, Any]], Any]:
    def read(payload: Mapping[str, Any]) -> Any:
        control = payload.get("control")
        return int(worker_flag(payload, flag)) if isinstance(control, Mapping) else None

    return read


def _get(*keys: str) -> Callable[[Mapping[str, Any]], Any]:
    def read(payload: Mapping[str, Any]) -> Any:
        value: Any = payload
        for key in keys:
            value = value.get(key) if isinstance(value, Mapping) else None
        return value

    return read
