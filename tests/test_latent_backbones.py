"""Latent backbones: a tiny Stable Diffusion pipeline saved with `save_pretrained` and a tiny MONAI generative bundle
in the model zoo's layout, each loaded, read for features, trained on and served."""

import json
import sys
from pathlib import Path

import pytest
import torch

from textdiff.config import BackboneConfig
from textdiff.model.backbone import load_diffusion, make_extractor
from textdiff.model.features import FeatureCache

sys.path.insert(0, str(Path(__file__).parent))
from app_fixtures import serve_a_mask_through  # noqa: E402


def _clip_tokenizer():
    """A byte-level CLIP tokenizer without merges (every character a token), as CLIP's vocabulary is laid out."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    characters = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(characters + [c + "</w>" for c in characters])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16), len(vocab)


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A colour 32² Stable Diffusion pipeline (4-channel latents at 16², cross-attention on a CLIP text encoder)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("sd")
    tokenizer, vocab_size = _clip_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=32, sample_size=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=16,
                                        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              clip_sample=False)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(root / "pipeline")
    return root / "pipeline"


@pytest.fixture(scope="module")
def bundle_folder(tmp_path_factory):
    """A grey 32² MONAI latent diffusion bundle in the zoo's layout (older MONAI Generative target names)."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    root = tmp_path_factory.mktemp("bundle") / "brats_like"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    config = {
        "imports": ["$import torch"], "spatial_dims": 2, "image_channels": 1, "latent_channels": 1,
        "train_patch_size": [32, 32],
        "autoencoder_def": {"_target_": "generative.networks.nets.AutoencoderKL", "spatial_dims": "@spatial_dims",
                            "in_channels": "@image_channels", "out_channels": "@image_channels",
                            "latent_channels": "@latent_channels", "num_channels": [32, 32], "num_res_blocks": 1,
                            "attention_levels": [False, False], "with_encoder_nonlocal_attn": False,
                            "with_decoder_nonlocal_attn": False},
        "network_def": {"_target_": "monai.networks.nets.diffusion_model_unet.DiffusionModelUNet",
                        "spatial_dims": "@spatial_dims", "in_channels": "@latent_channels",
                        "out_channels": "@latent_channels", "channels": [32, 64], "attention_levels": [False, True],
                        "num_head_channels": [0, 32], "num_res_blocks": 1},
        "load_diffusion": "$@network_def.load_state_dict(torch.load('models/model.pt'))",
        "noise_scheduler": {"_target_": "monai.networks.schedulers.ddim.DDIMScheduler", "num_train_timesteps": 1000,
                            "beta_start": 0.0015, "beta_end": 0.0195, "schedule": "scaled_linear_beta"},
    }
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, latent_channels=1, channels=(32, 32),
                                num_res_blocks=1, attention_levels=(False, False), with_encoder_nonlocal_attn=False,
                                with_decoder_nonlocal_attn=False)
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(32, 64),
                              attention_levels=(False, True), num_head_channels=(0, 32), num_res_blocks=1)
    torch.save(autoencoder.state_dict(), root / "models" / "model_autoencoder.pt")
    torch.save(unet.state_dict(), root / "models" / "model.pt")
    return root


def test_a_pipeline_reads_the_report_as_its_condition(pipeline_folder):
    extractor = make_extractor(BackboneConfig(timesteps=(50, 150)), weights=str(pipeline_folder))
    assert extractor.text_conditioned and extractor.cfg.image_size == 32 and extractor.cfg.in_channels == 3
    assert extractor.cfg.feature_layers == ("up_blocks.0.resnets.1", "up_blocks.1.attentions.1")
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    left, again = extractor(image, ["Opacity in the left lung."]), extractor(image, ["Opacity in the left lung."])
    right = extractor(image, ["Opacity in the right lung."])
    assert [tuple(f.shape[1:]) for f in left] == [(2 * 64, 8, 8), (2 * 32, 16, 16)]
    assert all(torch.equal(a, b) for a, b in zip(left, again))
    assert not torch.allclose(left[0], right[0]) and not torch.allclose(left[1], right[1])  # they follow the report
    assert extractor.side_by_side(4) == 1  # its own text encoder reads one image at a time


def test_features_of_another_report_are_not_taken_from_the_cache(pipeline_folder):
    extractor = make_extractor(BackboneConfig(timesteps=(50,)), weights=str(pipeline_folder))
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    cache = FeatureCache(extractor)
    first = cache.get({"id": "a", "image": image, "report": "left"})
    edited = cache.get({"id": "a", "image": image, "report": "right"})
    assert not torch.equal(first[1], edited[1]) and len(cache._memory) == 2


def test_a_monai_bundle_is_read_safely_and_gives_features(bundle_folder):
    extractor = make_extractor(BackboneConfig(timesteps=(50, 150)), weights=str(bundle_folder))
    assert not extractor.text_conditioned and extractor.cfg.image_size == 32 and extractor.cfg.in_channels == 1
    features = extractor(torch.zeros(2, 1, 32, 32))
    assert [tuple(f.shape) for f in features] == [(2, 2 * 64, 8, 8), (2, 2 * 32, 16, 16)]
    assert extractor.latent.scale_factor == 1.0  # none stated: said in the log, read at 1.0
    with pytest.raises(ValueError, match="latent diffusion model: it gives features, but pretraining"):
        load_diffusion(str(bundle_folder))


def test_a_bundle_value_that_is_code_is_never_evaluated(bundle_folder, tmp_path):
    import shutil

    evil = tmp_path / "evil"
    shutil.copytree(bundle_folder, evil)
    config = json.loads((evil / "configs" / "inference.json").read_text())
    config["network_def"]["channels"] = "$__import__('os').system('touch /tmp/pwned') or [32, 64]"
    (evil / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="never evaluated"):
        make_extractor(BackboneConfig(), weights=str(evil))


@pytest.mark.parametrize("kind", ["pipeline", "bundle"])
def test_train_predict_and_serve_through_a_latent_backbone(kind, pipeline_folder, bundle_folder, sample_dir,
                                                           tmp_path):
    from textdiff import cli

    backbone = pipeline_folder if kind == "pipeline" else bundle_folder
    model = tmp_path / "model.pt"
    tiny = ["--set", "head.dim=16", "head.heads=2", "head.head_channels=[8]", "backbone.max_windows=1",
            "backbone.timesteps=[50,150]"]
    assert cli.main(["train", "--data", str(sample_dir / "train"), "--out", str(model), "--backbone", str(backbone),
                     "--epochs", "1", *tiny]) == 0
    images = sorted((sample_dir / "test").glob("*.png"))
    out = tmp_path / "m"
    assert cli.main(["predict", "--model", str(model), "--images", *map(str, images), "--out", str(out)]) == 0
    assert all((out / image.name).is_file() for image in images)
    assert serve_a_mask_through(backbone, tmp_path / "app")["label_names"] == {"infection": 1}
