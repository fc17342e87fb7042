"""genrec's optional dependency groups, read from the installed package's metadata (pyproject.toml is the
one list): which modules an extra brings, and which extra a missing module belongs to."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, requires

_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_EXTRA = re.compile(r"""extra\s*==\s*['"]([^'"]+)['"]""")


def _requirements() -> list[tuple[str, str | None]]:
    """(top-level module name, extra or None) of every requirement of the installed genrec."""
    try:
        lines = requires("genrec") or []
    except PackageNotFoundError:
        return []
    found = []
    for line in lines:
        name, extra = _NAME.match(line), _EXTRA.search(line)
        if name is not None:
            found.append((name.group(0).lower().replace("-", "_"), extra.group(1) if extra else None))
    return found


def modules(extra: str) -> set[str]:
    """The modules an extra installs (by distribution name: pandas, pyarrow, onnx, ...)."""
    return {name for name, group in _requirements() if group == extra}


def extra_of(module: str) -> str | None:
    """The extra that installs ``module`` (``pandas.core`` counts as ``pandas``), or None."""
    top = module.split(".")[0].lower()
    return next((group for name, group in _requirements() if name == top and group is not None), None)


def missing_extra_message(error: ModuleNotFoundError, what: str) -> str | None:
    """The line to print when ``what`` (e.g. ``genrec train``) failed for want of an extra's module."""
    extra = extra_of(error.name or "")
    if extra is None:
        return None
    return f"{what} needs {error.name}, which comes with genrec's {extra!r} extra: pip install 'genrec[{extra}]'"
