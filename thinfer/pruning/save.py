"""Writing a pruned model: an HF-format directory, complete or not at all.

The directory holds `model.safetensors`, `config.json` (the pruned shape: fewer layers, or
fewer heads and channels, `head_dim` kept explicit), the tokenizer files and
`thinfer_pruning.json` (method, what was removed, parameter counts, perplexities). It is
written next to its destination under a temporary name and renamed at the end, so a failure
leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from thinfer.pruning.hf_model import PruningModel

REPORT_FILE = "thinfer_pruning.json"


def check_output(output: str) -> None:
    """ValueError unless `output` is a path that does not exist yet in an existing folder."""
    if os.path.exists(output):
        raise ValueError(f"--output {output} already exists; choose a new directory")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise ValueError(f"--output {output}: folder {parent} does not exist")


def save_pruned(pruned: PruningModel, output: str, report: dict[str, Any]) -> None:
    """Write the pruned model, its tokenizer and `report` to `output` (see module doc)."""
    check_output(output)
    parent = os.path.dirname(os.path.abspath(output))
    staging = tempfile.mkdtemp(prefix=".thinfer-prune-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would hide the model from others
    try:
        pruned.model.save_pretrained(staging, safe_serialization=True)
        pruned.tokenizer.save(staging)
        with open(os.path.join(staging, REPORT_FILE), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
