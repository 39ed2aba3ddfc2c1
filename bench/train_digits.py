"""Trains the shipped digits DDPM and digit classifier; writes deepcache_compile/assets/digits/.

    python bench/train_digits.py                  # the shipped run: 2,400 iterations, seed 0 (~25 min, 2 CPU cores)
    python bench/train_digits.py --iterations 5 --out /tmp/digits   # a smoke run

Writes unet/ and scheduler/ (save_pretrained), classifier.safetensors, loss.csv, training.json under --out,
and the loss curve to bench/results/digits_loss.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from deepcache_compile.eval.digits import ASSETS, TrainOptions, save_assets, train_classifier, train_ddpm, training_record


def plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = 50
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.3, label="per iteration")
    ax.plot(smooth, label=f"mean of last {window}")
    ax.set(xlabel="iteration (batch 128)", ylabel="epsilon MSE", yscale="log", title="digits DDPM training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=TrainOptions.iterations)
    parser.add_argument("--seed", type=int, default=TrainOptions.seed)
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument("--plot", type=Path, default=Path("bench/results/digits_loss.png"))
    args = parser.parse_args()
    opts = TrainOptions(iterations=args.iterations, seed=args.seed)
    start = time.perf_counter()
    unet, losses = train_ddpm(opts)
    seconds = time.perf_counter() - start
    classifier, accuracy = train_classifier(seed=args.seed)
    print(f"trained {opts.iterations} iterations in {seconds:.0f} s; classifier held-out accuracy {accuracy:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    save_assets(args.out, unet, classifier)
    with open(args.out / "loss.csv", "w", newline="") as f:
        csv.writer(f).writerows([("iteration", "loss"), *enumerate(losses)])
    (args.out / "training.json").write_text(json.dumps(training_record(opts, losses, seconds, accuracy), indent=2))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot_losses(losses, args.plot)


if __name__ == "__main__":
    main()
