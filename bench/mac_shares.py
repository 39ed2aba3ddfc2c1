"""The shallow step's share of a full step's MACs per branch (the paper's Figure 4), from our own graphs.

    python bench/mac_shares.py            # SD 1.5 at 512 px and SDXL at 1024 px, batch 1

The U-Nets are built on the meta device: tracing and FlopCounterMode need shapes only, not weights.
Writes bench/results/mac_shares.{json,md,png}.
"""

from __future__ import annotations

from pathlib import Path

import torch

from deepcache_compile import list_branches
from deepcache_compile.eval.presets import build_unet, example_call
from deepcache_compile.eval.report import write_report

OUT = Path(__file__).parent / "results"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    table = {}
    for preset in ("sd15", "sdxl"):
        with torch.device("meta"):
            unet = build_unet(preset)
            call = example_call(unet)
        rows = list_branches(unet, **call)
        table[preset] = [{"branch": r.index, "producer_module": r.producer_module,
                          "consumer_module": r.consumer_module, "full_gmacs": r.full_macs / 1e9,
                          "shallow_gmacs": r.shallow_macs / 1e9, "share": r.mac_share} for r in rows]
    lines = ["| preset | branch | producer module | consumer module | shallow GMACs | share of full |", "| --- " * 6 + "|"]
    for preset, rows in table.items():
        lines += [f"| {preset} | {r['branch']} | {r['producer_module']} | {r['consumer_module']} | "
                  f"{r['shallow_gmacs']:.1f} of {r['full_gmacs']:.1f} | {r['share']:.1%} |" for r in rows]
    write_report(OUT / "mac_shares", table, lines)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for preset, rows in table.items():
        ax.plot([r["branch"] for r in rows], [100 * r["share"] for r in rows], "o-", label=preset)
    ax.set_xlabel("branch")
    ax.set_ylabel("shallow MACs, % of full step")
    ax.set_title("SD 1.5 at 512 px, SDXL at 1024 px, batch 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "mac_shares.png", dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
