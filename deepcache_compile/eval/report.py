"""What every benchmark writes: the machine it ran on, and its results as JSON and a Markdown table."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["machine", "write_report"]


def machine() -> dict:
    """The CPU (its name and vector ISA, whether oneDNN has bf16 kernels on it), threads, library versions, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import diffusers

    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16_kernels": torch.ops.mkldnn._is_mkldnn_bf16_supported(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def write_report(stem: Path | str, data: Any, lines: list[str]) -> None:
    """Writes `data` to `<stem>.json` and `lines` to `<stem>.md` (folders made as needed) and prints the lines.

    Example:
        >>> write_report("bench/results/attention_forms", {"rows": rows}, ["| a | b |", "| --- | --- |"])
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(data, indent=2, default=str))
    text = "\n".join(lines)
    stem.with_name(stem.name + ".md").write_text(text + "\n")
    print(text)
