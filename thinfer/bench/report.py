"""`write_result`: a benchmark's numbers as JSON (with the machine and command) and its plot."""

from __future__ import annotations

import json
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from thinfer.bench.machine import machine_info

if TYPE_CHECKING:
    from thinfer.llm import LLM

DEFAULT_OUTPUT_DIR = Path("bench") / "results"


def write_result(
    name: str, data: dict[str, object], fig: Figure, output_dir: str | Path | None = None
) -> tuple[Path, Path]:
    """Write `{output_dir}/{name}.json` and `{name}.png`; return both paths.

    The JSON is `data` plus `machine` (see `machine_info`), `timestamp_utc` and `command`
    (`sys.argv` as a list, and `command_line` as one shell-quoted string). `output_dir`
    defaults to `bench/results` under the current directory and is created when missing.
    """
    out = Path(output_dir) if output_dir is not None else DEFAULT_OUTPUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    record = dict(data)
    record["machine"] = machine_info()
    record["timestamp_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
    record["command"] = list(sys.argv)
    record["command_line"] = shlex.join(sys.argv)
    json_path = out / f"{name}.json"
    png_path = out / f"{name}.png"
    json_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    fig.savefig(png_path, dpi=120, bbox_inches="tight")
    return json_path, png_path


def safe_name(text: str) -> str:
    """`text` with characters unsafe in file names replaced by '-'."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in text)
    return cleaned.strip("-.") or "model"


def model_short_name(llm: LLM) -> str:
    """A short file-name-safe name of an LLM's model: file or folder name, or preset name."""
    source = llm.source.rstrip("/\\")
    base = Path(source).name or source
    if base.lower().endswith(".gguf"):
        base = base[: -len(".gguf")]
    return safe_name(base)
