"""The one error every layer raises for bad input (config fields, dataset sizes): one line per problem,
naming the field, its value and what is allowed."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """One or more config values that are not allowed."""

    def __init__(self, field: str, value: Any, allowed: str, more: list[ConfigError] | None = None):
        self.problems = [(field, value, allowed)] + [p for e in more or [] for p in e.problems]
        lines = [f"{f} = {v!r} is not allowed: expected {a}" for f, v, a in self.problems]
        text = "invalid config:\n  " + "\n  ".join(lines) if len(lines) > 1 else "invalid config: " + lines[0]
        super().__init__(text)
