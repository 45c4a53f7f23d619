"""Named things looked up by a string (optimizers, schedules, augmentations): adding one is one function.

A registry is how a config value such as `schedule = "cosine"` becomes code without an if-chain, and how
the option schema knows which names are allowed (the CLI lists them in `--help`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from cnnkit.errors import CnnkitError

T = TypeVar("T")


def did_you_mean(word: str, known: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest known name, or '' when nothing is close."""
    close = difflib.get_close_matches(word, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(Generic[T]):
    """A name -> object map filled by a decorator, with errors that list the known names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = item
            return item

        return decorate

    def get(self, name: str) -> T:
        if name not in self._items:
            raise CnnkitError(f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}; "
                              f"known: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
