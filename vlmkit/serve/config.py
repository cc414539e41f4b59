"""The server's settings, each with one default and one line of documentation. `vlmkit serve` builds its
flags from these fields (`add_flags`), and `serve()` / `Engine` / `create_app` take the dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from vlmkit.generation import DEFAULT_MAX_NEW_TOKENS


def setting(default: Any, help: str, **flag: Any) -> Any:
    """A dataclass field with its --flag help (and extra argparse options such as `metavar`)."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class EngineConfig:
    """How the continuous-batching engine runs."""

    max_batch: int = setting(16, "sequences decoded together")
    max_seq_len: int = setting(1024, "prompt + completion tokens per sequence")
    max_queue: int = setting(64, "waiting requests before 429")
    max_images: int = setting(4, "images per request")
    feature_cache: int = setting(256, "images whose vision features are kept")
    prefix_cache_mb: float = setting(
        1024,
        "memory for keys/values of prompt blocks kept for reuse by prompts that start the same way "
        "(a repeated picture, a follow-up turn); 0 turns it off",
    )
    prefix_block: int = setting(16, "tokens per prefix-cache block")


@dataclass
class ServerConfig:
    """What the HTTP layer accepts and how it answers."""

    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "port to listen on")
    api_key: str | None = setting(
        None, "require 'Authorization: Bearer KEY' on every route but /health and /"
    )
    allow_remote_images: bool = setting(False, "accept http(s) image URLs")
    max_body_bytes: int = setting(20 * 2**20, "largest request body")
    max_image_pixels: int = setting(4096 * 4096, "largest image (width x height)")
    max_tokens_default: int = setting(DEFAULT_MAX_NEW_TOKENS, "completion tokens when a request sets none")
    request_timeout: float = setting(120.0, "seconds per request", flag="--timeout")
    retry_after: int = setting(1, "seconds a 429 answer asks the client to wait")
    drain_seconds: float = setting(30.0, "seconds in-flight requests get to finish on SIGTERM")


def add_flags(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One --flag per field of dataclass `cls`, with the field's default and help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = dict(f.metadata)
        name = meta.pop("flag", "--" + f.name.replace("_", "-"))
        meta["help"] += " (default: %(default)s)"
        kind = hints[f.name]
        if kind is bool:
            action = argparse.BooleanOptionalAction
            parser.add_argument(name, dest=f.name, action=action, default=f.default, **meta)
            continue
        if kind == (str | None):
            kind = str
        meta.setdefault("metavar", name.removeprefix("--").upper().replace("-", "_"))
        parser.add_argument(name, dest=f.name, type=kind, default=f.default, **meta)


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """The dataclass `cls` from the parsed flags that `add_flags` made."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})
