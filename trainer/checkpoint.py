"""Model export that never leaves a half-written folder behind.

A model folder (``best/``, ``final/``) is written into a hidden temp folder and swapped in
with renames only once complete, so a crash during a save keeps the previous best model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

COMMIT_MARKER = "COMMITTED"


def export_model(model: Any, tokenizer: Any, folder: str | Path, info: dict[str, Any]) -> Path:
    """Save ``model`` (an MCSEModel) + tokenizer in Hugging Face format, atomically."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tokenizer, extra=info)
    (tmp / COMMIT_MARKER).write_text(json.dumps(info) + "\n", encoding="utf-8")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def is_committed(folder: str | Path) -> bool:
    return (Path(folder) / COMMIT_MARKER).is_file()
