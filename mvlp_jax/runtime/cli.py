"""How every binary ends on bad input: one paragraph that names the problem and what to do, exit code 2,
no traceback. `MVLP_JAX_DEBUG=1` re-raises, so the traceback is there when a developer wants it.

Bad input reaches the user as ValueError (a value, a key, a record), OSError (a path that is missing,
a file, not writable, a full disk), UnicodeError (a file that is not UTF-8) or `UserError`; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import errno
import importlib.util
import os
import re
import sys
import textwrap
from collections.abc import Callable, Iterable

DEBUG_ENV = "MVLP_JAX_DEBUG"
EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Bad input or a refused action, with a message written for the user."""


EXTRAS = {"llm": ("torch", "transformers", "gguf", "accelerate"), "export": ("torch", "transformers", "safetensors")}


def require_extra(extra: str, purpose: str) -> None:
    """Raises UserError naming `pip install 'mvlp_jax[EXTRA]'` when a package of that extra is not installed
    (before anything imports it), so a core install says what `purpose` needs instead of a bare ImportError."""
    missing = [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"{purpose} needs {', '.join(missing)}, which the core install leaves out: "
            f"pip install 'mvlp_jax[{extra}]' (torch: the CPU wheel, torch==2.13.0 from "
            f"https://download.pytorch.org/whl/cpu, unless this machine has a GPU for it)"
        )


def message(error: BaseException) -> str:
    """The user-facing paragraph for `error` (an OSError names its path and the system's reason)."""
    if isinstance(error, OSError) and error.errno is not None:
        path = f"{error.filename}: " if error.filename else ""
        system = os.strerror(error.errno)
        if error.strerror and error.strerror != system:  # our own message, already saying what to do
            return f"{error.strerror} [{error.filename}]" if error.filename else error.strerror
        hint = {
            errno.ENOSPC: "free some space or choose another output folder, then rerun (finished work is kept)",
            errno.EACCES: "choose a folder you can write, or fix its permissions",
            errno.EROFS: "choose a writable folder",
            errno.ENOTDIR: "a path component is a file, not a folder: choose another path",
            errno.EEXIST: "it exists already: choose another path",
        }.get(error.errno, "check the path")
        return f"{system}: {path}{hint}"
    if isinstance(error, UnicodeDecodeError):
        return (
            f"a file is not UTF-8 text ({error.reason} at byte {error.start}): save it as UTF-8 "
            f"(e.g. `iconv -f latin1 -t utf-8`) and rerun"
        )
    text = str(error)
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    return text


def is_bad_input(error: BaseException) -> bool:
    return isinstance(error, (UserError, ValueError, OSError, UnicodeError))


def check_writable_dir(path: str, flag: str = "--output_dir") -> None:
    """`path` is a folder, or can be made one, that this process can write; creates nothing."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag}={path}: {existing} is a file, not a folder: choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag}={path}: {existing} is not writable: choose a folder you can write")


def output_dir(path: str, flag: str = "--output_dir") -> str:
    """Makes `path` a folder this process can write, or raises an error naming the flag and the problem."""
    check_writable_dir(path, flag)
    os.makedirs(path, exist_ok=True)
    return path


def report(program: str, error: BaseException) -> int:
    """Prints `program: error: ...` wrapped as one paragraph on stderr; returns the exit code."""
    body = textwrap.fill(
        f"{program}: error: {message(error)}", width=110, break_long_words=False, break_on_hyphens=False
    )
    print(body, file=sys.stderr)
    print(f"(set {DEBUG_ENV}=1 to see the traceback)", file=sys.stderr)
    return EXIT_BAD_INPUT


def guarded(program: str, main: Callable[[list[str]], int | None]) -> Callable[[list[str]], int | None]:
    """`main` for absl's app.run: bad input ends in `report`, not a traceback (unless MVLP_JAX_DEBUG)."""

    def wrapped(argv: list[str]) -> int | None:
        try:
            return main(argv)
        except Exception as error:  # noqa: BLE001 - sorted into bad input vs bug just below
            if os.environ.get(DEBUG_ENV) or not is_bad_input(error):
                raise
            sys.exit(report(program, error))

    return wrapped


def _name_the_override(detail: str, argv: list[str], keys: Iterable[str]) -> str:
    """ml_collections says only "'dataa'" or "'varaint' Did you mean ...": name the --config.KEY=VALUE flag it came
    from, as an unknown key, and the nearest known key."""
    match = re.match(r"^'([^']+)'\s*(.*)$", detail) or re.match(r"^([\w.]+)()$", detail)
    if not match:
        return detail
    key, rest = match.groups()
    flag = next((a for a in argv if a.startswith("--config.") and re.search(rf"\.{re.escape(key)}(\.|=|$)", a)), None)
    if flag is None:
        return detail
    full = flag.split("=")[0][len("--config.") :]
    close = difflib.get_close_matches(full, list(keys), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else (f": {rest}" if rest else "")
    return f"unknown config key {full!r} (in {flag}){hint}"


def run(program: str, main: Callable[[list[str]], int | None], config_keys: Iterable[str] = ()) -> None:
    """absl's app.run with flag-parsing errors (e.g. an unknown --config.key, with the nearest of `config_keys`)
    and bad input reported cleanly."""
    from absl import app, flags

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except Exception as error:  # noqa: BLE001 - flags wraps config-file and override errors
            if os.environ.get(DEBUG_ENV):
                raise
            cause = error.__cause__ or error.__context__ or error
            override = isinstance(cause, (KeyError, AttributeError)) and cause is not error
            detail = " ".join((message(cause) if override else str(error)).split())
            sys.exit(report(program, ValueError(_name_the_override(detail, argv, config_keys) if override else detail)))

    app.run(guarded(program, main), flags_parser=parse)
