"""`shadowgate keys add | list | remove`: the key file of salted hashes (serving/api/auth.py).

`add` prints the new key once, on stdout, and stores only its salted hash; a running
gateway picks the change up within seconds (it re-reads the file when it changes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from serving.cli.common import ConfigOpt, console, err, fail, settings_or_exit

keys_app = typer.Typer(no_args_is_help=True, help="API keys: salted hashes in the key file.")


def key_path(config: Optional[Path]) -> Path:
    from serving.api.auth import default_key_file

    return default_key_file(settings_or_exit(config))


@keys_app.command("add")
def add(
    name: str = typer.Argument(..., help="Shown in audit records and metrics instead of the key."),
    admin: bool = typer.Option(False, "--admin", help="An admin key: the /admin API and every state change."),
    rate: Optional[int] = typer.Option(None, "--rate", min=1, help="Prompts per minute."),
    tokens_per_min: Optional[int] = typer.Option(None, "--tokens-per-min", min=1),
    max_prompts: Optional[int] = typer.Option(None, "--max-prompts", min=1, help="Prompts per request."),
    max_request_tokens: Optional[int] = typer.Option(None, "--max-request-tokens", min=1),
    max_sparsity: Optional[float] = typer.Option(None, "--max-sparsity", min=0.0, max=0.99),
    no_shadow: bool = typer.Option(False, "--no-shadow", help="Never sample this key's requests."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Make a key, store its salted hash, print the key once."""
    from pydantic import ValidationError

    from serving.api.auth import KeyFileError, add_key
    from serving.settings import KeyPolicy

    fields = {"rate_limit_per_min": rate, "tokens_per_min": tokens_per_min, "max_prompts": max_prompts,
              "max_request_tokens": max_request_tokens, "max_sparsity": max_sparsity}
    fields = {k: v for k, v in fields.items() if v is not None}
    if no_shadow:
        fields["shadow"] = False
    try:
        policy = KeyPolicy(**fields) if fields else None
        path = key_path(config)
        plain = add_key(path, name, "admin" if admin else "client", policy)
    except (KeyFileError, ValidationError) as exc:
        fail(str(exc))
    err.print(f"key {name!r} ({'admin' if admin else 'client'}) stored as a salted hash in {path}; it is shown once:")
    print(plain)


@keys_app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json"), config: Optional[Path] = ConfigOpt) -> None:
    """Names, ids, roles and policies (never keys, never hashes)."""
    from serving.api.auth import list_keys

    rows = list_keys(key_path(config))
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(title=str(key_path(config)))
    for col in ("name", "id", "role", "policy"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["id"], r["role"], json.dumps(r["policy"] or {}))
    console.print(table)


@keys_app.command("remove")
def remove(name: str = typer.Argument(...), config: Optional[Path] = ConfigOpt) -> None:
    """Remove a key: a running gateway refuses it within seconds."""
    from serving.api.auth import remove_key

    if not remove_key(key_path(config), name):
        fail(f"no key named {name!r} in {key_path(config)}", 1)
    print(f"removed {name}")
