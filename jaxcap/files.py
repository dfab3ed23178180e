"""Files written whole: a reader, or a run killed while writing, sees the old file or the new,
never a part of one.

Every file jaxcap rewrites in place (a run's ``config.json``, ``run_info.json`` and
``metrics.jsonl``, the vocabulary, an extraction's record, an evaluation's results)
goes through ``write_text_atomic``: the text is written beside the file and renamed
over it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replaces ``path`` whole with ``text`` (UTF-8)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf8")
    os.replace(partial, path)


def write_json_atomic(path: str | os.PathLike, record, indent: int = 1) -> None:
    write_text_atomic(path, json.dumps(record, indent=indent) + "\n")
