"""Named choices: one registry dict per family (samplers, schedules, objectives, ...).

The implementing module owns the dict; `config.py` validates a setting against the same
dict's keys, so a name exists exactly where its implementation does and an unknown name is
an error that lists the valid ones, at validation and at lookup alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, TypeVar

from pydantic import AfterValidator

__all__ = ["Choices", "choice_of"]

T = TypeVar("T")


class Choices(dict[str, T]):
    """A dict of named implementations whose failed lookups name the family and the options."""

    def __init__(self, family: str, entries: Mapping[str, T]):
        super().__init__(entries)
        self.family = family

    def __missing__(self, name: str) -> T:
        raise ValueError(f"unknown {self.family} {name!r}; choose one of: {', '.join(self)}")

    def check(self, name: str) -> str:
        """`name` if it is registered, else the ValueError of a failed lookup."""
        self[name]
        return name


def choice_of(choices: Choices, *extra: str) -> type[str]:
    """A pydantic string type valid for the keys of `choices` (and the `extra` names)."""

    def check(name: str) -> str:
        if name in extra or name in choices:
            return name
        options = ", ".join([*extra, *choices])
        raise ValueError(f"unknown {choices.family} {name!r}; choose one of: {options}")

    return Annotated[str, AfterValidator(check)]  # type: ignore[return-value]
