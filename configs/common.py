"""The one variant parser of every config file (big_vision's `parse_arg` idea, with names only)."""
from __future__ import annotations


def parse_arg(arg: str | None, allowed: tuple[str, ...], config: str) -> set[str]:
    """'demo,vitdet' -> {'demo', 'vitdet'}; refuses names outside `allowed`, naming the config file."""
    chosen = {a.strip() for a in (arg or "").split(",") if a.strip()}
    unknown = sorted(chosen - set(allowed))
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)} of {config}; choose from {', '.join(allowed)}")
    return chosen
