"""Error messages that tell the user which option to change, spelled the way the user sets it.

A Python user sets `skip_bad_lines=True`; a command-line user passes `--skip-bad-lines`. The library
cannot know which one is reading, so a message that names an option holds it as a `Setting`, and
`SettingError` renders the message in Python spelling by default (`str(e)`). The command line
knows its flags and asks for its own spelling with `e.render(flags)`, where `flags` maps a
keyword to the flag that sets it (`{"skip_bad_lines": "--skip-bad-lines", "warmup_steps": "--warmup"}`),
or `keyword=value` to a switch that sets that one value (`{"missing_targets=drop": "--allow-missing-targets"}`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Setting", "SettingError"]

_NO_VALUE = object()  # a Setting that names the option without a value: `text_column`


@dataclass(frozen=True)
class Setting:
    """One option inside a message: its keyword and, when the message suggests one, a value."""

    keyword: str
    value: Any = _NO_VALUE

    def python(self) -> str:
        """`skip_bad_lines=True`, `format='jsonl'`, `lr=-1.0`, or the bare keyword `text_column`."""
        return self.keyword if self.value is _NO_VALUE else f"{self.keyword}={self.value!r}"

    def command_line(self, flag: str) -> str:
        """`--skip-bad-lines` (a true switch), `--format jsonl`, `--lr -1.0`, or the bare `--text-column`.

        A false switch has no flag of its own (`--chat-template` is off unless given), so it reads
        `no --chat-template`.
        """
        if self.value is _NO_VALUE or self.value is True:
            return flag
        if self.value is False:
            return f"no {flag}"
        return f"{flag} {self.value}"


class SettingError(ValueError):
    """A ValueError whose message names options; `parts` are its text pieces and `Setting`s in order.

    Parts are joined rather than formatted, so a path or a value with braces in it is never misread.
    """

    def __init__(self, *parts: str | Setting) -> None:
        self.parts: tuple[str | Setting, ...] = parts
        super().__init__(self.render())

    def render(self, flags: Mapping[str, str] | None = None) -> str:
        """The message; each Setting whose keyword is in `flags` is spelled as that flag, the others
        as Python keywords."""
        return "".join(_spell(p, flags or {}) for p in self.parts)

    @classmethod
    def joined(cls, problems: Sequence[Sequence[str | Setting]], prefix: str = "",
               separator: str = "; ") -> SettingError:
        """One error for several problems (each a sequence of parts), one sentence per problem."""
        parts: list[str | Setting] = [prefix] if prefix else []
        for n, problem in enumerate(problems):
            parts += ([separator] if n else []) + list(problem)
        return cls(*parts)


def _spell(part: str | Setting, flags: Mapping[str, str]) -> str:
    if isinstance(part, str):
        return part
    if part.value is not _NO_VALUE and f"{part.keyword}={part.value}" in flags:  # a switch for one value
        return flags[f"{part.keyword}={part.value}"]
    flag = flags.get(part.keyword)
    return part.command_line(flag) if flag else part.python()
