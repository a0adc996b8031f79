"""Frozen diffusion backbone: feature shapes, determinism, one batched UNet forward, errors, save/load."""

import dataclasses

import pytest
import torch

from textdiff.model.backbone import build_scheduler, build_unet, load_diffusion, make_extractor, save_diffusion


def test_one_feature_map_per_layer_with_timesteps_stacked(extractor, h):
    images = torch.rand(2, 1, h.size, h.size) * 2 - 1
    features = extractor(images)
    assert len(features) == len(h.feature_layers)
    steps = len(h.timesteps)
    # up_blocks.0 works at half resolution with 16 channels, up_blocks.1 at full resolution with 8 channels
    assert features[0].shape == (2, steps * 16, h.size // 2, h.size // 2)
    assert features[1].shape == (2, steps * 8, h.size, h.size)
    assert extractor.feature_channels == [steps * 16, steps * 8]
    assert all(f.dtype == torch.float32 and torch.isfinite(f).all() for f in features)


def test_features_are_deterministic_and_depend_on_the_image(extractor, h):
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(1, 1, h.size, h.size, generator=gen) * 2 - 1
    b = torch.rand(1, 1, h.size, h.size, generator=gen) * 2 - 1
    first, second = extractor(a), extractor(a.clone())
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    other = extractor(b)
    for x, y in zip(first, other):
        assert not torch.allclose(x, y)


def test_features_of_an_image_do_not_depend_on_its_batch(extractor, h):
    """Bit for bit: a last-bit difference is enough to change which epoch a benchmark run keeps."""
    images = torch.rand(3, 1, h.size, h.size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    batched = extractor(images)
    for i in range(3):
        single = extractor(images[i : i + 1])
        for b, s in zip(batched, single):
            assert torch.equal(b[i : i + 1], s)


def test_passes_side_by_side_keep_the_callers_bfloat16_and_threads_reading_at_once_get_their_own(extractor, h):
    """On the CPU a batch's passes run in threads: each keeps the caller's autocast, and two callers at once (a
    volume's slices) each get their own images' features, bit for bit as read alone."""
    from concurrent.futures import ThreadPoolExecutor

    assert (extractor.side_by_side(4), extractor.side_by_side(1)) == (2, 1)
    images = torch.rand(4, 1, h.size, h.size, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batched = extractor(images)
        alone = [extractor(images[i : i + 1]) for i in range(4)]
    for i in range(4):
        assert all(torch.equal(b[i : i + 1], a) for b, a in zip(batched, alone[i]))
    assert not torch.equal(batched[0], extractor(images)[0])  # bfloat16 was read, not float32
    with ThreadPoolExecutor(2) as pool:
        at_once = list(pool.map(extractor, [images[:2], images[2:]]))
    expected = extractor(images)
    for half, part in enumerate(at_once):
        assert all(torch.equal(p, e[2 * half : 2 * half + 2]) for p, e in zip(part, expected))


def test_the_unet_run_for_anything_but_its_features_runs_whole(extractor, h):
    noisy = torch.zeros(1, 1, h.size, h.size)
    assert extractor.unet(noisy, torch.tensor([10])).sample.shape == noisy.shape


def test_each_timestep_is_a_separate_block_of_channels(extractor, h):
    """The channels of one timestep equal the layer output for that timestep alone."""
    image = torch.rand(1, 1, h.size, h.size, generator=torch.Generator().manual_seed(3)) * 2 - 1
    full = extractor(image)
    cfg = dataclasses.replace(extractor.cfg, timesteps=(h.timesteps[1],))
    single = make_extractor(cfg)(image)
    for f, s in zip(full, single):
        channels = s.shape[1]
        torch.testing.assert_close(f[:, channels : 2 * channels], s, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(f[:, :channels], s)


def test_all_timesteps_of_an_image_go_through_one_unet_forward(extractor, h):
    calls, handle = h.count_calls(extractor.unet)
    try:
        extractor(torch.zeros(2, 1, h.size, h.size))
    finally:
        handle.remove()
    assert calls == [len(h.timesteps)] * 2


def test_the_unet_reads_channels_last_and_gives_the_features_of_a_contiguous_read(h):
    """Channels-last convolutions are the faster CPU kernels (docs/results/speed.md); the features may change by
    rounding only. Three channels: a one-channel image is contiguous both ways."""
    extractor = make_extractor(h.tiny_backbone(in_channels=3))
    images = torch.rand(2, 3, h.size, h.size, generator=torch.Generator().manual_seed(4)) * 2 - 1
    read = []
    handle = extractor.unet.register_forward_pre_hook(
        lambda _module, args: read.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        fast = extractor(images)
    finally:
        handle.remove()
    assert read == [True, True] and not images.is_contiguous(memory_format=torch.channels_last)
    handle = extractor.unet.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    try:
        plain = extractor(images)
    finally:
        handle.remove()
    for f, p in zip(fast, plain):
        assert f.is_contiguous()  # as cached, whatever the kernels' layout
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-5)


def test_extractor_stays_frozen_and_in_eval_mode(extractor):
    extractor.train()
    assert not extractor.training and not extractor.unet.training
    assert not any(p.requires_grad for p in extractor.unet.parameters())
    out = extractor(torch.zeros(1, 1, extractor.cfg.image_size, extractor.cfg.image_size))
    assert not out[0].requires_grad


@pytest.mark.parametrize("shape", [(1, 1, 16, 16), (1, 1, 32, 48), (1, 3, 32, 32)])
def test_wrong_input_shape_raises(extractor, shape):
    with pytest.raises(ValueError, match="backbone expects images of shape"):
        extractor(torch.zeros(shape))


def test_unknown_feature_layer_lists_decoder_modules(h):
    with pytest.raises(ValueError) as err:
        make_extractor(h.tiny_backbone(feature_layers=("up_blocks.0.resnets.1", "up_blocks.9.nothing")))
    message = str(err.value)
    assert "up_blocks.9.nothing" in message
    assert "decoder modules" in message
    assert "up_blocks.1.resnets" in message


def test_random_backbone_is_rebuilt_identically_from_init_seed(h):
    a, b = build_unet(h.tiny_backbone()), build_unet(h.tiny_backbone())
    c = build_unet(h.tiny_backbone(init_seed=1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    # building must not consume the global RNG
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    build_unet(h.tiny_backbone())
    assert torch.equal(torch.rand(1), expected)


def test_random_backbone_ablation_has_the_pretrained_architecture_and_fresh_weights(tmp_path, h):
    """The benchmark's "random backbone" must differ from the pretrained one by training only, even when the
    pretrained architecture is not the configured one."""
    from textdiff.model.backbone import make_random_extractor

    wide = h.tiny_backbone(block_out_channels=(16, 32), init_seed=7)
    trained = build_unet(wide)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.5)  # stands for training
    save_diffusion(trained, build_scheduler(wide), tmp_path / "bb")
    cfg = h.tiny_backbone(pretrained=str(tmp_path / "bb"))  # configured (8, 16): the folder must win
    random_a, random_b = make_random_extractor(cfg), make_random_extractor(cfg)
    assert tuple(random_a.unet.config.block_out_channels) == (16, 32)
    assert make_extractor(cfg).cfg.block_out_channels == (16, 32)  # what a checkpoint records
    state, pretrained = random_a.unet.state_dict(), make_extractor(cfg).unet.state_dict()
    assert state.keys() == pretrained.keys()
    assert all(state[k].shape == pretrained[k].shape for k in state)
    assert not any(torch.equal(state[k], pretrained[k]) for k in state if state[k].numel() > 1 and state[k].std() > 0)
    assert all(torch.equal(state[k], random_b.unet.state_dict()[k]) for k in state)  # rebuilt identically
    assert make_random_extractor(h.tiny_backbone()).unet.config.block_out_channels == (8, 16)


def test_save_diffusion_is_atomic_and_loadable(tmp_path, h):
    cfg = h.tiny_backbone()
    unet, scheduler = build_unet(cfg), build_scheduler(cfg)
    target = tmp_path / "models" / "backbone"
    assert save_diffusion(unet, scheduler, target) == target
    with torch.no_grad():
        next(unet.parameters()).add_(1.0)
    save_diffusion(unet, scheduler, target)  # replaces the existing model
    assert sorted(p.name for p in target.parent.iterdir()) == ["backbone"]  # no staging or .old folders left
    assert (target / "unet").is_dir() and (target / "scheduler").is_dir()
    loaded, loaded_scheduler = load_diffusion(str(target))
    for key, value in unet.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded_scheduler.config.num_train_timesteps == cfg.num_train_timesteps
    # and an extractor built from the folder gives the same features as one on the in-memory weights
    from textdiff.model.backbone import DiffusionFeatureExtractor

    image = torch.rand(1, 1, h.size, h.size)
    for x, y in zip(make_extractor(cfg, weights=str(target))(image), DiffusionFeatureExtractor(unet, scheduler, cfg)(image)):
        assert torch.equal(x, y)


def test_half_precision_weights_take_half_the_space_and_load_as_float32(tmp_path, h):
    cfg = h.tiny_backbone()
    unet, scheduler = build_unet(cfg), build_scheduler(cfg)
    full = save_diffusion(unet, scheduler, tmp_path / "full")
    half = save_diffusion(unet, scheduler, tmp_path / "half", half=True)
    assert next(unet.parameters()).dtype == torch.float32  # the model being saved is left as it was
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (half / weights).stat().st_size < 0.6 * (full / weights).stat().st_size
    loaded, _ = load_diffusion(str(half))
    for key, value in unet.state_dict().items():
        assert loaded.state_dict()[key].dtype == torch.float32, key
        assert torch.equal(loaded.state_dict()[key], value.half().float()), key
    image = torch.rand(1, 1, h.size, h.size)
    for x, y in zip(make_extractor(cfg, weights=str(half))(image), make_extractor(cfg, weights=str(full))(image)):
        assert x.dtype == torch.float32 and torch.allclose(x, y, atol=1e-2)


def test_a_missing_backbone_folder_is_named_and_never_looked_up_on_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="no diffusion backbone folder .*nothing-here.* write hf:"):
        load_diffusion(str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError, match="no diffusion backbone folder 'runs/gpu/small-extra'"):
        load_diffusion("runs/gpu/small-extra")  # also a valid hub id: only hf:runs/gpu/small-extra would ask the hub


def test_by_default_every_decoder_block_is_read_down_to_the_window_size(h):
    """The finest decoder block carries the boundaries (docs/results/mri.md): the default reads it, so the head's
    classifier runs at the window's own size."""
    from textdiff.model.fusion import TextDiffHead

    extractor = make_extractor(h.tiny_backbone(feature_layers=None))
    assert extractor.cfg.feature_layers == ("up_blocks.0.resnets.1", "up_blocks.1.resnets.1")
    features = extractor(torch.rand(1, 1, h.size, h.size) * 2 - 1)
    assert max(f.shape[-1] for f in features) == h.size
    head = TextDiffHead(extractor.feature_channels, 384, h.tiny_config(use_text=False).head, h.size)
    seen = []
    head.classifier.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[1]))
    assert head(features).shape[-2:] == (h.size, h.size) and seen == [h.size]
