"""`kdprobe cache list|clear`: what kdprobe's cache folder holds (extracted archives, decoded images); removing it."""
from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from cli.common import handle_errors, table

cache_app = typer.Typer(
    no_args_is_help=True,
    help="kdprobe's cache folder ($KDPROBE_CACHE or ~/.cache/kdprobe): extracted image archives and decoded image "
         "folders. Entries are rebuilt when needed, so clearing only costs time.",
)


def list_entries():
    """List every cache entry: its name (what `kdprobe cache clear` takes), kind, size, last use and source."""
    from kdprobe.data.cache import human, list_cache, since

    listing = list_cache()
    if not listing.entries:
        typer.echo(f"cache {listing.root} is empty")
        return
    rows = [{"entry": e.name, "kind": e.kind, "size": human(e.bytes), "last used": since(e.last_used),
             "source": e.source or "(not recorded)"} for e in listing.entries]
    typer.echo(table(rows))
    typer.echo(f"{len(rows)} entries, {human(listing.bytes)} in {listing.root}")


def clear(
    entries: Annotated[Optional[List[str]], typer.Argument(metavar="[ENTRY]...", help="Entries to remove, as "
                                                           "`kdprobe cache list` names them (or their key).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Remove every entry that no other process is using now.")] = False,
):
    """Remove cache entries. An entry another kdprobe process is extracting or reading is never removed: a named one
    makes the command refuse (nothing removed), --all leaves it and says so. Links inside the cache are removed
    as links; what they point at is never touched."""
    from kdprobe.data.cache import clear_cache, human

    result = clear_cache(entries or (), everything=all_)
    for e in result.removed:
        typer.echo(f"removed {e.name} ({e.kind}, {human(e.bytes)})")
    for e in result.in_use:
        typer.echo(f"kept {e.name}: in use by another kdprobe process")
    typer.echo(f"removed {len(result.removed)} entries, freed {human(result.freed)}"
               + (f"; {len(result.in_use)} in use kept (clear again later)" if result.in_use else ""))


cache_app.command("list")(handle_errors(list_entries))
cache_app.command("clear")(handle_errors(clear))
