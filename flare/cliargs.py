"""CLI flags derived from dataclass fields, so each default is defined once (in the dataclass), and argument types."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def _base_type(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, help: dict[str, str] | None = None) -> None:
    """One ``--field-name`` flag per field of ``cls``, defaulting to the dataclass default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        tp = _base_type(hints[f.name])
        text = (help or {}).get(f.name, "") + f" (default: {default})"
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif typing.get_origin(tp) is list:
            parser.add_argument(flag, type=_int_list, default=default, help=text, metavar="ID,ID")
        else:
            parser.add_argument(flag, type=tp, default=default, help=text)


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def token_ids(text: str) -> list[int]:
    """``--prompt-ids``: comma-separated token ids."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None
