"""Grounding: a site's manuals indexed in SQLite FTS5, the passages that best
answer a question, and the prompt that holds them."""

from .index import CollectionInfo, Hit, Index, IndexFileError, IndexReport
from .prompt import grounded_messages

__all__ = ["CollectionInfo", "Hit", "Index", "IndexFileError", "IndexReport", "grounded_messages"]
