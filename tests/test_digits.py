"""The shipped digits DDPM and classifier: loadable with from_pretrained, and the training code runs."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from deepcache_compile.eval.digits import (ASSETS, TrainOptions, digit_images, load_classifier,
                                      load_digits_model, save_assets, train_classifier, train_ddpm)


def test_dataset_is_all_digits_scaled_to_minus_one_one():
    images, labels = digit_images()
    assert images.shape == (1797, 1, 16, 16) and labels.shape == (1797,)
    assert images.min() == -1 and images.max() == 1 and set(labels.tolist()) == set(range(10))


def test_shipped_weights_load_with_from_pretrained():
    unet = UNet2DModel.from_pretrained(ASSETS / "unet")
    scheduler = DDIMScheduler.from_pretrained(ASSETS / "scheduler")
    assert unet.config.sample_size == 16 and unet.config.in_channels == 1
    trained_with = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")  # as in train_ddpm
    assert torch.equal(scheduler.alphas_cumprod, trained_with.alphas_cumprod)
    assert scheduler.config.prediction_type == "epsilon" and scheduler.config.clip_sample
    record = json.loads((ASSETS / "training.json").read_text())
    assert record["options"]["iterations"] >= 1000 and record["classifier_test_accuracy"] > 0.9
    assert (ASSETS / "loss.csv").read_text().count("\n") == record["options"]["iterations"] + 1


def test_shipped_classifier_recognizes_real_digits():
    images, labels = digit_images()
    with torch.no_grad():
        accuracy = (load_classifier()(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.95  # 80 % of these were its training data


def test_training_runs_and_its_output_round_trips(tmp_path):
    unet, losses = train_ddpm(TrainOptions(iterations=3, batch=8, warmup=1))
    classifier, _ = train_classifier(epochs=1)
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)
    # Epsilon-prediction MSE of an untrained model on unit-variance noise starts near 1.
    assert 0.5 < losses[0] < 2
    save_assets(tmp_path, unet, classifier)
    loaded, scheduler = load_digits_model(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), unet.state_dict().values()))
    assert isinstance(scheduler, DDIMScheduler)


def test_missing_model_names_the_training_script(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run `python bench/train_digits.py`"):
        load_digits_model(tmp_path)
