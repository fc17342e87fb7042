"""What every command line shares (the `genrec` verbs, `genrec serve`, the benchmarks): flags to typed configs, and
help that shows each default."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

Config = TypeVar("Config")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, unless the help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def config_from_args(config: type[Config], args: argparse.Namespace, **values: Any) -> Config:
    """`config` from the flags named like its fields (`--max-len` fills `max_len`); `values` give the fields
    that have no flag of their name, or that a flag of their name does not fill directly."""
    if not dataclasses.is_dataclass(config):  # also narrows the type for dataclasses.fields
        raise TypeError(f"{config.__name__} is not a dataclass")
    taken = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if f.init and hasattr(args, f.name)}
    return config(**(taken | values))
