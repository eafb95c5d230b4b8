"""argparse that forgives: a mistake is one line, and a misspelled flag gets the closest one.

    bigbatch train: error: unknown flag --acum-freq: did you mean --accum-freq? (see bigbatch train --help)

instead of argparse's usage block (the whole list of flags) before the error. Imports
nothing heavy: every command parses its flags before torch is imported.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import NoReturn, Sequence


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the fix (exit status 2)."""

    def parse_args(self, args: Sequence[str] | None = None, namespace=None) -> argparse.Namespace:
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self.unknown(extras))
        return namespace

    def unknown(self, extras: list[str]) -> str:
        """The first unknown flag and the closest known one; else the stray value."""
        flag = next((a.split("=", 1)[0] for a in extras if a.startswith("-")), None)
        if flag is None:
            return f"unexpected argument {extras[0]!r}"
        known = [s for s in self._option_string_actions if s.startswith("--")]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        return f"unknown flag {flag}" + (f": did you mean {close[0]}?" if close else "")

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)
