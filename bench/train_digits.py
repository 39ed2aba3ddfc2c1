"""Trains the shipped digits DDPM and digit classifier; writes deepcache_compile/assets/digits/.

    python bench/train_digits.py                  # the shipped run: 2,400 iterations, seed 0 (~25 min, 2 CPU cores)
    python bench/train_digits.py --iterations 5 --out /tmp/digits   # a smoke run
    python bench/train_digits.py --model dit      # the digits DiT: 4,000 iterations of batch 64 (~25 min)

Writes unet/ and scheduler/ (save_pretrained), classifier.safetensors, loss.csv, training.json under --out,
and the loss curve to bench/results/digits_loss.png. With --model dit: transformer/, scheduler/, loss.csv and
training.json under deepcache_compile/eval/assets/digits_dit/ (the classifier is the DDPM's), the curve to
bench/results/digits_dit_loss.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import replace
from pathlib import Path

from deepcache_compile.eval.digits import (ASSETS, DIT_ASSETS, DIT_TRAINING, TrainOptions, save_assets,
                                           save_dit, train_classifier, train_ddpm, training_record)


def plot_losses(losses: list[float], path: Path, title: str = "digits DDPM") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = 50
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.3, label="per iteration")
    ax.plot(smooth, label=f"mean of last {window}")
    ax.set(xlabel="iteration", ylabel="epsilon MSE", yscale="log", title=f"{title} training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("unet", "dit"), default="unet")
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--seed", type=int, default=TrainOptions.seed)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    base = TrainOptions() if args.model == "unet" else DIT_TRAINING
    opts = replace(base, iterations=args.iterations or base.iterations, seed=args.seed)
    out = args.out or (ASSETS if args.model == "unet" else DIT_ASSETS)
    plot = args.plot or Path(f"bench/results/digits{'' if args.model == 'unet' else '_dit'}_loss.png")
    start = time.perf_counter()
    model, losses = train_ddpm(opts)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    if args.model == "unet":
        classifier, accuracy = train_classifier(seed=args.seed)
        save_assets(out, model, classifier)
    else:  # judged by the DDPM's classifier
        save_dit(out, model)
        accuracy = None
    print(f"trained {opts.iterations} iterations in {seconds:.0f} s" +
          (f"; classifier held-out accuracy {accuracy:.3f}" if accuracy is not None else ""))
    with open(out / "loss.csv", "w", newline="") as f:
        csv.writer(f).writerows([("iteration", "loss"), *enumerate(losses)])
    (out / "training.json").write_text(json.dumps(training_record(opts, losses, seconds, accuracy), indent=2))
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot_losses(losses, plot, "digits DDPM" if args.model == "unet" else "digits DiT")


if __name__ == "__main__":
    main()
