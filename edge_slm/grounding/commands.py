"""`edge-slm index`: build, list and search the index of manuals."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import click

from .index import Index, IndexReport
from .prompt import source_label


@click.command("index")
@click.argument("folder", required=False, type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--collection", help="The collection to fill or search (one per machine type, say).")
@click.option("--index", "index_path", type=click.Path(path_type=Path, dir_okay=False),
              help="The index file [default: $EDGE_SLM_HOME/index.sqlite3].")
@click.option("--list", "list_only", is_flag=True, help="List the collections in the index.")
@click.option("--search", "query", metavar="QUERY", help="Show the passages that best match QUERY.")
@click.option("--limit", type=click.IntRange(1, 100), default=5, show_default=True,
              help="How many passages --search shows.")
@click.option("--replace", is_flag=True, help="Let FOLDER's manuals replace a collection made from another folder.")
def index(folder: Path | None, collection: str | None, index_path: Path | None, list_only: bool,
          query: str | None, limit: int, replace: bool) -> None:
    """Index the manuals in FOLDER (Markdown, text, PDF) for grounded answers.

    Run again after the folder changes: only changed files are read again,
    and deleted ones are dropped."""
    if sum((folder is not None, list_only, query is not None)) != 1:
        raise click.UsageError("give exactly one of FOLDER, --list or --search QUERY")
    if folder is not None:
        with Index.open(index_path) as idx:
            report = _add_with_progress(idx, folder, collection or "default", replace)
        for rel, reason in report.skipped:
            click.echo(f"edge-slm: skipped {rel}: {reason}", err=True)
        click.echo(f"{collection or 'default'}: {report.added} added, {report.changed} changed, "
                   f"{report.removed} removed, {report.unchanged} unchanged, {len(report.skipped)} skipped")
        return
    with Index.open(index_path, create=False) as idx:
        if list_only:
            infos = idx.collections()
            if not infos:
                click.echo("no collections yet; run `edge-slm index DIR`")
            for c in infos:
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.indexed_at))
                click.echo(f"{c.name}\t{c.files} files\t{c.passages} passages\tindexed {when}")
            return
        hits = idx.search(query, collection, limit)
        if not hits:
            click.echo("no passage matches")
        for n, hit in enumerate(hits, 1):
            click.echo(f"[{n}] {hit.score:.2f} {hit.collection}: {source_label(hit)}")
            click.echo("    " + hit.text.replace("\n", "\n    "))


def _add_with_progress(idx: Index, folder: Path, collection: str, replace: bool) -> IndexReport:
    """add_folder, with a progress bar on a terminal (the count of files is
    known only once the folder has been walked, so the bar starts then)."""
    if not sys.stderr.isatty():
        return idx.add_folder(folder, collection, replace=replace)
    with contextlib.ExitStack() as stack:
        bar = None

        def progress(done: int, total: int, rel: str) -> None:
            nonlocal bar
            if bar is None:
                bar = stack.enter_context(click.progressbar(length=total, label="indexing", file=sys.stderr,
                                                            item_show_func=lambda item: item))
            bar.update(1, rel)

        return idx.add_folder(folder, collection, progress, replace=replace)
