"""Pretraining the diffusion backbone on unlabeled images."""

import json

import pytest
import torch

from textdiff.model.backbone import load_diffusion, make_extractor
from textdiff.data.studies import DataError
from textdiff.training.pretrain import PretrainSettings, load_unlabeled_images, pretrain


def test_load_unlabeled_images_uses_every_image_and_skips_broken_ones(sample_dir, h, tmp_path):
    images = load_unlabeled_images([sample_dir / "train", sample_dir / "test"], h.tiny_backbone())
    assert images.shape == (9, 1, h.size, h.size)
    assert images.min() >= -1 and images.max() <= 1
    broken = tmp_path / "broken"
    h.random_png(broken / "ok.png", 40, 40)
    (broken / "bad.png").write_bytes(b"garbage")
    assert load_unlabeled_images([broken], h.tiny_backbone()).shape == (1, 1, h.size, h.size)
    (broken / "ok.png").unlink()
    with pytest.raises(DataError, match="no readable images"):
        load_unlabeled_images([broken], h.tiny_backbone())


def test_the_blank_slices_of_a_volume_do_not_pretrain(h, tmp_path):
    import nibabel as nib
    import numpy as np

    volume = np.random.default_rng(0).uniform(0, 100, (40, 40, 5)).astype(np.float32)
    volume[..., [0, 4]] = 0  # outside the body
    folder = tmp_path / "studies"
    folder.mkdir()
    nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / "scan.nii.gz")
    assert load_unlabeled_images([folder], h.tiny_backbone()).shape == (3, 1, h.size, h.size)


def test_pretrain_writes_a_loadable_backbone(sample_dir, h, tmp_path):
    out = tmp_path / "backbone"
    cfg = h.tiny_backbone()
    history = pretrain([sample_dir / "train"], out, cfg, PretrainSettings(epochs=2, batch_size=4, save_every=1),
                       progress=False)
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(row["loss"] > 0 for row in history)
    assert (out / "unet").is_dir() and (out / "scheduler").is_dir()
    assert json.loads((out / "history.json").read_text()) == history
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone"]  # atomic: nothing else left behind
    unet, scheduler = load_diffusion(str(out))
    assert unet.config.sample_size == h.size and unet.config.in_channels == 1
    assert scheduler.config.num_train_timesteps == cfg.num_train_timesteps
    # the weights did change from the random initialisation, and features can be read from them
    from textdiff.model.backbone import build_unet

    init = build_unet(cfg).state_dict()
    assert any(not torch.equal(v, init[k]) for k, v in unet.state_dict().items())
    features = make_extractor(cfg, weights=str(out))(torch.zeros(1, 1, h.size, h.size))
    assert [f.shape[1] for f in features] == [48, 24]

    # continuing from it extends the history and still writes a loadable model, here in half precision
    more = pretrain([sample_dir / "train"], out, cfg,
                    PretrainSettings(epochs=1, batch_size=4, history=history, save_half=True), init=str(out), progress=False)
    assert [row["epoch"] for row in more] == [1, 2, 3]
    assert json.loads((out / "history.json").read_text()) == more
    from safetensors import safe_open

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as stored:
        assert all(stored.get_tensor(k).dtype == torch.float16 for k in stored.keys())
    unet, _ = load_diffusion(str(out))
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    # and continuing from half-precision weights trains in float32
    pretrain([sample_dir / "train"], tmp_path / "again", cfg, PretrainSettings(epochs=1, batch_size=4), init=str(out),
             progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "backbone"]


def test_continuing_uses_the_size_of_the_model_it_continues(sample_dir, h, tmp_path):
    """A config asking for 64 px does not break continuing a 32 px model: the model's own size wins."""
    out = tmp_path / "b32"
    pretrain([sample_dir / "train"], out, h.tiny_backbone(), PretrainSettings(epochs=1, batch_size=8), progress=False)
    pretrain([sample_dir / "train"], tmp_path / "more", h.tiny_backbone(image_size=64),
             PretrainSettings(epochs=1, batch_size=8), init=str(out), progress=False)
    unet, _ = load_diffusion(str(tmp_path / "more"))
    assert unet.config.sample_size == 32


@pytest.mark.parametrize("settings, reason, epochs", [
    (PretrainSettings(epochs=3, batch_size=4), "epochs", 3),
    (PretrainSettings(epochs=50, batch_size=4, max_minutes=1e-6), "budget", 1),  # stops after its first batch
    # no epoch can lower the loss by 99 %: the plateau ends the run once `patience` epochs have passed
    (PretrainSettings(epochs=50, batch_size=4, patience=2, min_improvement=0.99), "converged", 3),
])
def test_pretraining_ends_at_its_epochs_its_time_budget_or_a_loss_plateau_and_says_which(sample_dir, h, tmp_path,
                                                                                         settings, reason, epochs):
    out = tmp_path / "backbone"
    history = pretrain([sample_dir / "train"], out, h.tiny_backbone(), settings, progress=False)
    assert len(history) == epochs
    assert history[-1]["stopped"] == reason and all("stopped" not in row for row in history[:-1])
    assert json.loads((out / "history.json").read_text()) == history  # saved when it stopped


def test_pretrain_settings_refuse_an_impossible_budget():
    with pytest.raises(ValueError, match="max_minutes"):
        PretrainSettings(max_minutes=0)
    with pytest.raises(ValueError, match="patience"):
        PretrainSettings(patience=0)


@pytest.mark.parametrize("native", [True, False])
def test_pretraining_in_bfloat16_computes_in_it_only_on_a_cpu_that_does_so_natively(sample_dir, h, tmp_path,
                                                                                   monkeypatch, caplog, native):
    """bfloat16 autocast takes a CPU epoch in about 4/5 of the time where the CPU computes it (AVX512-BF16, AMX);
    elsewhere it is emulated and slower, so the run stays float32 and says so. The weights stay float32 either way."""
    from textdiff.training import pretrain as pretraining
    from diffusers import UNet2DModel

    monkeypatch.setattr(pretraining, "native_bfloat16", lambda: native)
    seen = []
    original = UNet2DModel.forward
    monkeypatch.setattr(UNet2DModel, "forward", lambda self, *a, **k: (
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))), original(self, *a, **k))[1])
    out = tmp_path / "backbone"
    with caplog.at_level("WARNING", logger="textdiff.training.pretrain"):
        pretrain([sample_dir / "train"], out, h.tiny_backbone(), PretrainSettings(epochs=1, batch_size=8, bfloat16=True),
                 progress=False)
    assert seen and {enabled for enabled, _ in seen} == {native} and {dtype for _, dtype in seen} == {torch.bfloat16}
    assert ("pretraining in float32" in caplog.text) != native
    unet, _ = load_diffusion(str(out))
    assert all(p.dtype == torch.float32 for p in unet.parameters())
