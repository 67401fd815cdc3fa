"""``unixsock-asgi shell``: an interactive prompt for one worker or a whole directory.

Lines are ``cmd key=value ...`` (values are JSON literals when they parse,
quoted strings, 'single-quoted' values and JSON objects may contain spaces) and run on every live
worker at once. Tab completes command names and ``argname=`` from the
workers' ``help``; history is kept with readline. ``quit``, ``exit`` or EOF
(Ctrl-D) leave. With stdin not a terminal, lines are read without a prompt
and the exit status says whether every command succeeded.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

from ._fleet import Target, fan_out
from ._protocol import Close, ProtocolViolation, parse_line
from .cli import (
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    failure_summary,
    gone_text,
    help_topic,
    no_sockets,
    nobody_answered,
    one_line,
    render_answers,
    reply_timeout,
    stale_note,
    terminal_safe,
)

__all__ = ["CommandCatalog", "completions", "run_shell"]

_LOCAL_WORDS = ("quit", "exit")


class CommandCatalog:
    """Command names and their argument names, from the workers' ``help`` payloads."""

    def __init__(self, commands: Mapping[str, Sequence[str]] | None = None) -> None:
        self.commands: dict[str, list[str]] = {name: list(args) for name, args in (commands or {}).items()}

    @classmethod
    def from_help(cls, payloads: Sequence[Any]) -> CommandCatalog:
        """The union of several workers' ``help`` answers."""
        catalog = cls()
        for payload in payloads:
            commands = payload.get("commands") if isinstance(payload, Mapping) else None
            for command in commands if isinstance(commands, list) else []:
                # Names readline would put on the terminal as they are: none that drive it.
                if not isinstance(command, Mapping) or not _plain_word(command.get("name")):
                    continue
                known = catalog.commands.setdefault(command["name"], [])
                args = command.get("args")
                for arg in args if isinstance(args, list) else []:
                    name = arg.get("name") if isinstance(arg, Mapping) else None
                    if _plain_word(name) and name not in known:
                        known.append(name)
        return catalog


def _plain_word(name: object) -> TypeGuard[str]:
    """A name the shell offers to complete: a string a terminal shows as it is."""
    return (
        isinstance(name, str)
        and bool(name)
        and terminal_safe(name) == name
        and not any(c.isspace() for c in name)
    )


def completions(catalog: CommandCatalog, before: str, text: str) -> list[str]:
    """Candidates for the word ``text`` when the line up to it is ``before``.

    The first word completes to a command name followed by a space; later
    words complete to ``argname=`` for arguments of that command not given yet.
    """
    words = before.split()
    if not words:
        names = sorted([*catalog.commands, *_LOCAL_WORDS])
        return [f"{name} " for name in names if name.startswith(text)]
    used = {w.partition("=")[0] for w in words[1:] if "=" in w}
    return [f"{a}=" for a in catalog.commands.get(words[0], []) if a.startswith(text) and a not in used]


class _Completer:
    """readline's completer protocol: called with state 0, 1, ... until it returns None."""

    def __init__(self, catalog: CommandCatalog, readline: Any) -> None:
        self.catalog = catalog
        self.readline = readline
        self._matches: list[str] = []

    def __call__(self, text: str, state: int) -> str | None:
        if state == 0:
            line = self.readline.get_line_buffer()
            before = line[: self.readline.get_begidx()]
            self._matches = completions(self.catalog, before, text)
        return self._matches[state] if state < len(self._matches) else None


def _setup_readline(catalog: CommandCatalog, history_file: str) -> Any:
    try:
        import readline
    except ImportError:  # pragma: no cover - Python built without readline
        return None
    readline.set_completer(_Completer(catalog, readline))
    readline.set_completer_delims(" \t\n")
    if "libedit" in (readline.__doc__ or ""):
        readline.parse_and_bind("bind ^I rl_complete")  # macOS's readline
    else:
        readline.parse_and_bind("tab: complete")
    if history_file:
        try:
            readline.read_history_file(history_file)
        except OSError:
            pass  # first run, or unreadable: start with no history
        readline.set_history_length(1000)
    return readline


def _save_history(readline: Any, history_file: str) -> None:
    if readline is None or not history_file:
        return
    try:
        # Made 0600 before anything is written to it: commands may carry settings values.
        os.close(os.open(history_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        readline.write_history_file(history_file)
    except OSError as exc:
        # Said, not swallowed: the next session would find nothing and nobody would know why.
        _note(f"history not saved to {history_file}: {exc.strerror or exc}")
        return
    try:
        st = os.stat(history_file)
        # Only a file of its own: --history-file /dev/null must not make /dev/null 0600 (as root).
        if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(history_file, 0o600)
    except OSError as exc:
        _note(f"history saved to {history_file}, but not made private (0600): {exc.strerror or exc}")


def _note(text: str) -> None:
    print(terminal_safe(one_line(f"note: {text}")), file=sys.stderr)


_CATALOG_TIMEOUT = 3.0
"""Seconds the shell waits for the workers' ``help`` before its first prompt."""


def run_shell(target: Target, *, timeout: float, history_file: str) -> int:
    """Read commands until ``quit``/EOF and run each on every live worker of ``target``."""
    sockets = target.sockets()
    if not sockets:
        raise no_sockets(target)
    interactive = sys.stdin.isatty()
    if interactive:
        # For completion. help answers on the control thread even while an app loop is blocked:
        # a worker silent for this long (stopped, say) is "not answering", not waited for.
        answers = asyncio.run(fan_out(sockets, "help", {}, timeout=min(timeout, _CATALOG_TIMEOUT)))
        if not answers.results:
            raise UsageError(f"nothing to talk to: no live worker at {target.path}")
        catalog = CommandCatalog.from_help([r.payload for r in answers.successes])
    else:  # piped commands complete nothing: none waits for a stopped worker's help first
        catalog = CommandCatalog.from_help([])
    readline = _setup_readline(catalog, history_file) if interactive else None
    prompt = f"{os.path.basename(target.path.rstrip('/')) or target.path}> " if interactive else ""
    if interactive:
        answered, live = len(answers.successes), len(answers.results)
        workers = (
            f"{live} worker(s)" if answered == live else f"{live} worker(s), {live - answered} not answering,"
        )
        print(f"{workers} at {target.path}. Tab completes; 'help' lists commands; 'quit' leaves.")
    any_failed = False
    reached = interactive  # some worker was asked a command (or, on a terminal, for its help)
    try:
        while True:
            try:
                line = input(prompt)
            except EOFError:
                if interactive:
                    print()
                break
            except KeyboardInterrupt:
                print("^C")
                continue
            try:
                words = line.split()
                if not words:
                    continue
                topic = help_topic(words[0], words[1:])
                if topic is not None:
                    line = f"help command={topic}"
                event = parse_line(line)
                if isinstance(event, Close):
                    break
                if isinstance(event, ProtocolViolation):
                    print(terminal_safe(one_line(f"error: {event.error}")), file=sys.stderr)
                    any_failed = True
                    continue
                outcome = asyncio.run(
                    fan_out(
                        target.sockets(),
                        event.cmd,
                        event.args,
                        timeout=reply_timeout(event.args, timeout, event.cmd),
                    )
                )
            except KeyboardInterrupt:
                if not interactive:
                    raise
                # Ctrl-C gives up waiting for this command (workers may still run it) and
                # returns to the prompt, as it does while typing; Ctrl-D or quit leave.
                print("^C (stopped waiting; the workers may still run the command)", file=sys.stderr)
                any_failed = True
                continue
            if not outcome.results and not reached:
                # Nothing to talk to at the first command (only stale sockets): 2, as send
                # says, rather than a failure among others. No probe went first: a peer the
                # workers refuse would be logged as refused twice.
                error = nobody_answered(target, outcome)
                if isinstance(error, UsageError):
                    raise error
            reached = reached or bool(outcome.results or outcome.gone)
            if not outcome.results:
                nobody = gone_text(outcome) if outcome.gone else f"no live worker at {target.path}"
                print(terminal_safe(one_line(f"error: {nobody}")), file=sys.stderr)
                any_failed = True
                continue
            single = not target.is_directory
            try:
                for text in render_answers(event.cmd, outcome, single_target=single):
                    print(terminal_safe(text))
            except KeyboardInterrupt:
                if not interactive:
                    raise
                print("\n^C (the rest of the answer is not shown)", file=sys.stderr)  # tasks limit=10000, say
            stale_note(outcome)
            if not outcome.all_ok:
                summary = failure_summary(outcome, single_target=single)
                print(summary if single else f"error: {summary}", file=sys.stderr)
                any_failed = True
            if event.cmd == "help" and outcome.successes:
                catalog.commands.update(
                    CommandCatalog.from_help([r.payload for r in outcome.successes]).commands
                )
    finally:
        if interactive:
            _save_history(readline, history_file)
    return EXIT_FAILED if any_failed and not interactive else EXIT_OK
