"""Name -> implementation registries for the algorithm core (losses, advantages, aggregations)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A write-once mapping from names to implementations, filled by a decorator.

    POLICY_LOSSES = Registry[PolicyLossFn]("policy loss")

    @POLICY_LOSSES.register("dapo")
    def dapo_policy_loss(...): ...

    POLICY_LOSSES.get("dapo")   # ValueError listing the valid names if unknown
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding an implementation under `name`, which must be new."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        """The implementation registered as `name`; ValueError listing the valid names otherwise."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {sorted(self._entries)}")
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
