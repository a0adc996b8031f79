"""guided-diffusion checkpoints: a tiny random model written by OpenAI's own code (the PyPI `guided_diffusion_sdk`
package holds it), converted into diffusers, must predict the same noise and give the features the papers read."""

import json
import sys
from pathlib import Path

import pytest
import torch

from textdiff.model.backbone import load_diffusion, make_extractor
from textdiff.model.guided_diffusion import CheckpointError, load_guided_diffusion

sys.path.insert(0, str(Path(__file__).parent))
from app_fixtures import serve_a_mask_through  # noqa: E402

unet_module = pytest.importorskip("guided_diffusion.unet")

# The 256x256 model's flags in miniature: six levels (so the papers' output blocks 6, 8, 12, 16 exist), attention at
# the three coarsest, heads of fixed channels, scale-shift norm, ResBlock up/down sampling, learned variance
TINY = dict(image_size=64, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=2,
            attention_resolutions=(8, 16, 32), channel_mult=(1, 1, 2, 2, 4, 4), num_head_channels=16,
            use_scale_shift_norm=True, resblock_updown=True)


def original(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = unet_module.UNetModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # zero-initialised output convs would hide a wrong mapping: give every weight a value
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def write(model: torch.nn.Module, folder, flags: dict | None = None, name: str = "model.pt"):
    path = folder / name
    torch.save(model.state_dict(), path)
    if flags is not None:
        path.with_suffix(".json").write_text(json.dumps(flags))
    return path


@pytest.mark.parametrize("overrides", [
    {},  # as the ImageNet 256x256 model
    {"resblock_updown": False, "use_new_attention_order": True, "use_scale_shift_norm": False},
    # one head of all channels, attention at the two coarsest levels, fixed variance (as DPM-MedImgEnhance's CT model)
    {"num_heads": 1, "num_head_channels": -1, "attention_resolutions": (16, 32), "out_channels": 3},
], ids=["imagenet-256-like", "conv-resampling-new-attention-order", "one-head-fixed-variance"])
def test_converted_model_predicts_the_same_noise_as_the_original(tmp_path, overrides):
    model = original(**overrides)
    flags = {"image_size": 64, "num_head_channels": overrides.get("num_head_channels", 16),
             "num_heads": overrides.get("num_heads", 4),
             "use_new_attention_order": overrides.get("use_new_attention_order", False)}
    unet, scheduler = load_diffusion(str(write(model, tmp_path, flags)))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([50, 250])
    with torch.no_grad():
        expected = model(x, t)[:, :3]  # learn_sigma: the first three channels are the noise
        got = unet(x, t).sample
    assert got.shape == (2, 3, 64, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.beta_schedule == "linear"


def test_features_are_the_papers_output_blocks(tmp_path, h):
    """The extractor reads output blocks 6, 8, 12, 16 of the original UNet by default."""
    model = original()
    captured = {}
    for block in (6, 8, 12, 16):
        model.output_blocks[block].register_forward_hook(lambda m, i, o, b=block: captured.setdefault(b, o))
    path = write(model, tmp_path, {"image_size": 64, "num_head_channels": 16})
    extractor = make_extractor(h.tiny_backbone(feature_layers=None, timesteps=(50,)), weights=str(path))
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    features = extractor(image)
    noisy, t = extractor.noised(image)
    with torch.no_grad():
        model(noisy, t)
    assert [f.shape[1:] for f in features] == [(64, 8, 8), (64, 16, 16), (32, 32, 32), (32, 64, 64)]
    for feature, block in zip(features, (6, 8, 12, 16)):
        torch.testing.assert_close(feature, captured[block], rtol=0, atol=1e-4)


def test_flags_default_to_the_published_models(tmp_path):
    """Without a JSON beside it, the checkpoint is read with the 256x256 models' flags (64-channel heads)."""
    model = original(num_head_channels=64, channel_mult=(1, 2), attention_resolutions=(2,), model_channels=64,
                     image_size=32)
    unet, _ = load_guided_diffusion(write(model, tmp_path))
    assert unet.config.sample_size == 256 and unet.config.attention_head_dim == 64
    assert unet.paper_feature_layers is None  # two levels: no output block 16, the usual decoder read-out is used


def test_checkpoints_that_do_not_fit_say_why(tmp_path):
    with pytest.raises(CheckpointError, match="class-conditional"):
        load_guided_diffusion(write(original(num_classes=10), tmp_path))
    state = original().state_dict()
    state["output_blocks.3.0.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="'extra.weight' of 'up_blocks.1.resnets.0'"):
        load_guided_diffusion(tmp_path / "odd.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no 'input_blocks.0.0.weight'"):
        load_guided_diffusion(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch state dict"):
        load_guided_diffusion(tmp_path / "text.pt")
    (tmp_path / "model.json").write_text(json.dumps({"num_head_chanels": 32}))
    with pytest.raises(CheckpointError, match="unknown flag"):
        load_guided_diffusion(write(original(), tmp_path))


@pytest.fixture(scope="module")
def guided_checkpoint(tmp_path_factory):
    """A colour 32² guided-diffusion model with the 256x256 model's layout, written as the original code saves it."""
    folder = tmp_path_factory.mktemp("guided")
    model = original(image_size=32, channel_mult=(1, 1, 1, 1, 2, 2))
    return write(model, folder, {"image_size": 32, "num_head_channels": 16}, name="tiny_diffusion_uncond.pt")


def test_train_and_predict_on_a_guided_diffusion_checkpoint(guided_checkpoint, sample_dir, tmp_path, capsys):
    """Grey radiographs into a colour model: the channel is repeated; the head trains and masks come out."""
    from textdiff import cli

    model = tmp_path / "model.pt"
    head = ["--set", "head.dim=16", "head.heads=2", "head.head_channels=[8]", "backbone.max_windows=1",
            "backbone.timesteps=[50,150]"]
    assert cli.main(["train", "--data", str(sample_dir / "train"), "--out", str(model), "--backbone",
                     str(guided_checkpoint), "--epochs", "1", *head]) == 0
    state = torch.load(model, weights_only=True)
    assert list(state["config"]["backbone"]["feature_layers"]) == [
        "up_blocks.2.attentions.0", "up_blocks.2.upsamplers.0", "up_blocks.4.resnets.0", "up_blocks.5.resnets.1"]
    out = tmp_path / "masks"
    images = sorted((sample_dir / "test").glob("*.png"))
    assert cli.main(["predict", "--model", str(model), "--images", *map(str, images), "--out", str(out)]) == 0
    assert all((out / image.name).is_file() for image in images)


def test_the_app_serves_masks_through_a_guided_diffusion_checkpoint(guided_checkpoint, tmp_path):
    assert serve_a_mask_through(guided_checkpoint, tmp_path)["label_names"] == {"infection": 1}


def test_a_hub_file_is_downloaded_only_when_asked_with_its_flags(tmp_path, monkeypatch):
    """`hf:<org>/<name>/<file>.pt` asks the hub for the file and the flags JSON beside it; a plain path never does."""
    import huggingface_hub

    from textdiff import sources

    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, filename: asked.append((repo, filename)) or str(tmp_path / filename))
    assert sources.resolve_file("hf:openai/diffusion/ckpt/uncond.pt", "checkpoint") == tmp_path / "ckpt/uncond.pt"
    assert asked == [("openai/diffusion", "ckpt/uncond.json"), ("openai/diffusion", "ckpt/uncond.pt")]
    with pytest.raises(FileNotFoundError, match="no checkpoint file 'models/uncond.pt'"):
        sources.resolve_file("models/uncond.pt", "checkpoint")
    assert len(asked) == 2
