"""A small trained diffusion model to measure DeepCache's quality cost on: DDPM on scikit-learn's digits.

No checkpoint can be downloaded here, so the project trains its own: a diffusers `UNet2DModel` (1.6 M
parameters, three levels 16->8->4 px, nine skip branches) on the 1,797 handwritten digits that ship inside
scikit-learn (8x8, 17 grey levels), upsampled bilinearly to 16x16 and scaled to [-1, 1]. The noise schedule is
DDPM's (1,000 steps, linear betas 1e-4..0.02, epsilon prediction); the shipped scheduler config is a
`DDIMScheduler` over that schedule. Weights are the EMA of the training weights.

A digit classifier (a small CNN, trained on 80 % of the digits, tested on the rest) gives the feature space
for the Frechet distance and the accuracy/confidence of generated digits (see `quality.py`).

`bench/train_digits.py` runs `train_ddpm` and `train_classifier` with the shipped settings and writes
`deepcache_compile/eval/assets/digits/`; `load_digits_model()` loads it back with `from_pretrained`.

The transformer yardstick is a class-conditional DiT on the same digits and noise schedule (diffusers'
`DiTTransformer2DModel`: patch 2, so 64 tokens; 8 blocks of width 96; adaLN-zero conditioning on the timestep and
the digit class, which is dropped 10 % of the time in training as DiT does, class 10 being "no class").
`bench/train_digits.py --model dit` trains it into `assets/digits_dit/`; `load_digits_dit()` loads it.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from ..serve.service import load_pixel_model

logger = logging.getLogger(__name__)

__all__ = [
    "ASSETS", "DIT_ASSETS", "DigitClassifier", "TrainOptions", "digit_images", "digit_labels", "load_classifier",
    "load_digits_dit", "load_digits_model", "new_digits_dit", "new_digits_unet", "train_classifier", "train_ddpm",
]

ASSETS = Path(__file__).parent / "assets" / "digits"
DIT_ASSETS = Path(__file__).parent / "assets" / "digits_dit"
NO_CLASS = 10  # the DiT's "no class" label (its label table has one row more than there are digits)
SIZE = 16


def digit_images(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 scikit-learn digits as `(N, 1, size, size)` floats in [-1, 1], with their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits dataset comes from scikit-learn: pip install 'deepcache_compile[quality]'") from e
    data = load_digits()
    images = torch.from_numpy(data.images).float().unsqueeze(1) / 16.0  # 0..16 grey levels -> [0, 1]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.from_numpy(data.target).long()


def new_digits_unet(seed: int = 0) -> UNet2DModel:
    """The untrained architecture: 32/64/64 channels, two layers per block, attention at 8x8."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=16, attention_head_dim=32,
    )


def new_digits_dit(seed: int = 0) -> DiTTransformer2DModel:
    """The untrained transformer: patch 2 (64 tokens), 8 blocks, width 96 (4 heads of 24), class-conditional."""
    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=24, in_channels=1, out_channels=1,
                                 num_layers=8, sample_size=SIZE, patch_size=2, num_embeds_ada_norm=10)


def digit_labels(n: int) -> torch.Tensor:
    """The class labels the DiT is sampled with in evaluations: 0..9 in turn."""
    return torch.arange(n) % 10


def ddim_scheduler() -> DDIMScheduler:
    """DDIM over the training schedule (DDPM, 1,000 linear betas); clip_sample keeps x0 in [-1, 1]."""
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         clip_sample=True, set_alpha_to_one=True, prediction_type="epsilon")


@dataclass(frozen=True)
class TrainOptions:
    iterations: int = 2400
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.995
    seed: int = 0
    model: str = "unet"  # "unet" (the DDPM's U-Net) or "dit" (the class-conditional transformer)


DIT_TRAINING = TrainOptions(iterations=4000, batch=64, lr=6e-4, warmup=200, ema_decay=0.999, model="dit")


def train_ddpm(opts: TrainOptions = TrainOptions()) -> tuple[nn.Module, list[float]]:
    """Trains the digits DDPM (epsilon MSE, AdamW, warm-up + cosine LR); returns the EMA model and the losses.
    `opts.model` picks the U-Net or the DiT (which also learns the class, dropped 10 % of the time)."""
    images, labels = digit_images()
    if opts.model not in ("unet", "dit"):
        raise ValueError(f"model={opts.model!r} is unknown: 'unet' or 'dit'")
    model = new_digits_unet(opts.seed) if opts.model == "unet" else new_digits_dit(opts.seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    noise_schedule = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optim = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=0.0)
    lr_at = lambda i: min(1.0, (i + 1) / opts.warmup) * 0.5 * (1 + math.cos(math.pi * i / opts.iterations))
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
    gen = torch.Generator().manual_seed(opts.seed)
    losses = []
    for i in tqdm(range(opts.iterations), desc=f"train {opts.model}", mininterval=5):
        pick = torch.randint(len(images), (opts.batch,), generator=gen)
        x0 = images[pick]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(1000, (opts.batch,), generator=gen)
        noisy = noise_schedule.add_noise(x0, noise, t)
        out = model(noisy, t) if opts.model == "unet" else model(noisy, timestep=t, class_labels=labels[pick])
        loss = F.mse_loss(out.sample, noise)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        decay = min(opts.ema_decay, (1 + i) / (10 + i))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
    return ema.eval(), losses


class DigitClassifier(nn.Module):
    """A small CNN for 16x16 digits; `features` is the 128-d vector the Frechet distance is computed on."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(128, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


def _split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * n)
    return order[:cut], order[cut:]


def train_classifier(epochs: int = 30, seed: int = 0) -> tuple[DigitClassifier, float]:
    """Trains on 80 % of the digits (random 1-px shifts), returns the model and its held-out accuracy."""
    images, labels = digit_images()
    train_idx, test_idx = _split(len(images), seed)
    torch.manual_seed(seed)
    model = DigitClassifier()
    optim = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for batch in train_idx[torch.randperm(len(train_idx))].split(64):
            x = torch.roll(images[batch], shifts=tuple(torch.randint(-1, 2, (2,)).tolist()), dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[batch])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
    return model, accuracy


def save_assets(folder: Path, unet: UNet2DModel, classifier: DigitClassifier) -> None:
    """Writes `unet/`, `scheduler/` (save_pretrained) and `classifier.safetensors` under `folder`."""
    unet.save_pretrained(folder / "unet")
    ddim_scheduler().save_pretrained(folder / "scheduler")
    save_file(classifier.state_dict(), str(folder / "classifier.safetensors"))


def load_digits_model(folder: Path = ASSETS) -> tuple[UNet2DModel, DDIMScheduler]:
    """The shipped trained digits DDPM and its DDIM scheduler.

    Example:
        >>> unet, scheduler = load_digits_model()
        >>> unet.config.sample_size
        16
    """
    if not (folder / "unet" / "config.json").exists():
        raise FileNotFoundError(f"no trained digits model in {folder}: run `python bench/train_digits.py`")
    return load_pixel_model(folder)


def save_dit(folder: Path, model: DiTTransformer2DModel) -> None:
    """Writes `transformer/` and `scheduler/` (save_pretrained) under `folder`."""
    model.save_pretrained(folder / "transformer")
    ddim_scheduler().save_pretrained(folder / "scheduler")


def load_digits_dit(folder: Path = DIT_ASSETS) -> tuple[DiTTransformer2DModel, DDIMScheduler]:
    """The shipped trained digits DiT and its DDIM scheduler; call it with
    `model(sample, t, class_labels=digit_labels(batch))`.

    Example:
        >>> dit, scheduler = load_digits_dit()
        >>> dit.config.num_layers
        8
    """
    if not (folder / "transformer" / "config.json").exists():
        raise FileNotFoundError(f"no trained digits DiT in {folder}: run `python bench/train_digits.py --model dit`")
    model = DiTTransformer2DModel.from_pretrained(folder / "transformer").eval()
    return model, DDIMScheduler.from_pretrained(folder / "scheduler")


def load_classifier(folder: Path = ASSETS) -> DigitClassifier:
    """The shipped digit classifier (feature extractor for the Frechet distance)."""
    model = DigitClassifier()
    model.load_state_dict(load_file(str(folder / "classifier.safetensors")))
    return model.eval()


def training_record(opts: TrainOptions, losses: list[float], seconds: float, accuracy: float) -> dict:
    """What made the shipped weights: settings, seed, time, loss summary and classifier accuracy."""
    import diffusers

    tail = losses[-100:]
    return {"options": asdict(opts), "seconds": round(seconds, 1), "final_loss_mean_last_100": sum(tail) / len(tail),
            "classifier_test_accuracy": accuracy, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "threads": torch.get_num_threads(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
