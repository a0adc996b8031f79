"""Frozen text encoder (shapes, mask, padding, types) and how reports reach the logits."""

import pytest
import torch

from textdiff.config import TextConfig
from textdiff.model.fusion import TextDiffHead, position_features
from textdiff.model.text import TextEncoder
from textdiff.errors import DataError


def test_encoder_output_shapes_and_mask(text_encoder):
    tokens, mask = text_encoder(["a", "a much longer report with many words here", ""])
    assert tokens.shape == (3, 16, 384)
    assert mask.shape == (3, 16) and mask.dtype == torch.bool
    lengths = mask.sum(1).tolist()
    assert lengths[0] < lengths[1] <= 16
    assert lengths[2] == 2  # an empty report still has [CLS] and [SEP]
    # the mask is a prefix of real tokens followed by padding
    for row, length in zip(mask, lengths):
        assert row[:length].all() and not row[length:].any()


def test_long_report_is_truncated_to_max_tokens(text_encoder):
    tokens, mask = text_encoder([" ".join(["infection"] * 40)])
    assert tokens.shape == (1, 16, 384)
    assert mask.all()


def test_padding_does_not_change_real_token_states(text_encoder):
    report = "Bilateral pulmonary infection, two infected areas."
    longer = TextEncoder(TextConfig(max_tokens=32))
    short_tokens, short_mask = text_encoder([report])
    long_tokens, long_mask = longer([report])
    n = int(short_mask.sum())
    assert n == int(long_mask.sum()) < 16
    torch.testing.assert_close(short_tokens[0, :n], long_tokens[0, :n], rtol=1e-4, atol=1e-4)


def test_results_do_not_depend_on_batch_companions(text_encoder):
    alone = TextEncoder(TextConfig(max_tokens=16))  # fresh cache
    a, _ = alone(["No pulmonary infection."])
    b, _ = text_encoder(["something else entirely", "No pulmonary infection."])
    torch.testing.assert_close(a[0], b[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [None, 3, float("nan"), ["nested"]])
def test_non_text_report_is_bad_input(text_encoder, bad):
    with pytest.raises(DataError, match="report must be text"):
        text_encoder(["fine", bad])


def test_text_encoder_is_frozen(text_encoder):
    text_encoder.train()
    assert not text_encoder.model.training
    assert not any(p.requires_grad for p in text_encoder.model.parameters())


def test_missing_text_encoder_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no text encoder folder .*no-encoder"):
        TextEncoder(TextConfig(encoder=str(tmp_path / "no-encoder")))


def test_reports_change_the_logits(make_model, extractor, h):
    model = make_model().eval()
    features = extractor(torch.rand(2, 1, h.size, h.size, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    with torch.no_grad():
        infected = model.logits_from_features(features, [h.infected, h.infected])
        normal = model.logits_from_features(features, [h.normal, h.normal])
        again = model.logits_from_features(features, [h.infected, h.infected])
        mixed = model.logits_from_features(features, [h.infected, h.normal])
    assert infected.shape == (2, 2, h.size, h.size)
    assert not torch.allclose(infected, normal)
    assert torch.equal(infected, again)
    # each image gets its own report
    torch.testing.assert_close(mixed[0], infected[0])
    torch.testing.assert_close(mixed[1], normal[1])


def test_without_text_the_reports_do_not_matter(make_model, extractor, h):
    model = make_model(use_text=False).eval()
    assert not hasattr(model.head, "fusion")
    features = extractor(torch.rand(1, 1, h.size, h.size) * 2 - 1)
    with torch.no_grad():
        a = model.logits_from_features(features, [h.infected])
        b = model.logits_from_features(features, [h.normal])
    assert torch.equal(a, b)


def test_forward_equals_features_then_logits(make_model, h):
    model = make_model().eval()
    images = torch.rand(1, 1, h.size, h.size) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(images, [h.normal]), model.logits_from_features(model.features(images), [h.normal]))


def test_the_head_reads_features_channels_last_with_the_logits_of_a_contiguous_read(make_model, h):
    """Channels-last features make a CPU training step about a quarter faster (docs/results/speed.md); the logits
    may change by rounding only, and the cached features are left as they are."""
    model = make_model().eval()
    features = [torch.rand(2, 48, h.size // 2, h.size // 2), torch.rand(2, 24, h.size, h.size)]
    read = []
    handle = model.head.register_forward_pre_hook(
        lambda _module, args: read.append([f.is_contiguous(memory_format=torch.channels_last) for f in args[0]]))
    with torch.no_grad():
        try:
            fast = model.logits_from_features(features, [h.normal, h.infected])
        finally:
            handle.remove()
        tokens, mask = model.text_encoder([h.normal, h.infected])
        plain = model.head([f.contiguous() for f in features], tokens, mask)
    assert read == [[True, True]] and all(f.is_contiguous() for f in features)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_the_fusion_projects_its_queries_in_one_matmul_under_cpu_bfloat16_autocast():
    """Batch-first attention transposes its queries; projected from that transposed memory under bfloat16 autocast,
    they went through a batched matmul over one copy of the weight per token, which made the served head slower in
    bfloat16 than in float32 (docs/results/speed.md, "The head in bfloat16"). In float32 the output and the
    gradients are bit for bit those of the block fed batch-first memory."""
    from torch.profiler import ProfilerActivity, profile

    from textdiff.model.fusion import CrossAttentionBlock

    torch.manual_seed(0)
    block = CrossAttentionBlock(16, 2, 2, 2).eval()
    tokens, text, mask = torch.randn(2, 256, 16), torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as trace, \
            torch.autocast("cpu", dtype=torch.bfloat16):
        block(tokens, text, mask, 16, 16)
    per_token = [event.input_shapes for event in trace.events()
                 if event.name == "aten::bmm" and event.input_shapes[0][0] == 256]
    assert per_token == []
    plain, where = tokens, block.position(position_features(16, 16))[None]
    for norm, attention in zip(block.norms, block.attentions):
        plain = plain + attention(norm(plain) + where, text, text, need_weights=False)[0]
    plain = plain + block.ff(plain)
    plain.square().mean().backward()
    expected = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    output = block(tokens, text, mask, 16, 16)
    output.square().mean().backward()
    assert torch.equal(output, plain)
    assert all(torch.equal(p.grad, g) for p, g in zip(block.parameters(), expected))


def test_text_head_without_text_raises(h):
    head = TextDiffHead([48, 24], 384, h.tiny_config().head, h.size)
    features = [torch.zeros(1, 48, 16, 16), torch.zeros(1, 24, 32, 32)]
    with pytest.raises(ValueError, match="text_tokens"):
        head(features)


def test_cross_attention_ignores_padded_text_tokens(h):
    """Changing the hidden states of masked-out text positions must not change the output."""
    torch.manual_seed(0)
    head = TextDiffHead([48, 24], 384, h.tiny_config().head, h.size).eval()
    features = [torch.randn(1, 48, 16, 16), torch.randn(1, 24, 32, 32)]
    tokens = torch.randn(1, 16, 384)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[:, :5] = True
    changed = tokens.clone()
    changed[:, 5:] = torch.randn(1, 11, 384) * 10
    with torch.no_grad():
        a = head(features, tokens, mask)
        b = head(features, changed, mask)
        c = head(features, changed, torch.ones_like(mask))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_positional_queries_let_the_text_act_differently_by_place(h):
    """On a uniform feature map, text attention can only vary across pixels if queries know where they are."""
    import torch

    from textdiff.model.fusion import CrossAttentionBlock

    torch.manual_seed(0)
    tokens = torch.ones(1, 16, 8)
    text = torch.randn(1, 4, 8)
    mask = torch.ones(1, 4, dtype=torch.bool)
    with_position = CrossAttentionBlock(8, 2, 1, 2, positional=True)(tokens, text, mask, 4, 4)
    without = CrossAttentionBlock(8, 2, 1, 2, positional=False)(tokens, text, mask, 4, 4)
    assert with_position.std(1).max() > 1e-3
    assert without.std(1).max() < 1e-5


def test_gated_text_starts_closed_and_opens_with_training():
    """With `gated_text` the report cannot change the output at initialisation; once the gate moves, it does."""
    from textdiff.model.fusion import CrossAttentionBlock

    torch.manual_seed(0)
    block = CrossAttentionBlock(8, 2, 2, 2, gated=True)
    tokens = torch.randn(1, 16, 8)
    mask = torch.ones(1, 4, dtype=torch.bool)
    first, second = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    torch.testing.assert_close(block(tokens, first, mask, 4, 4), block(tokens, second, mask, 4, 4))
    loss = block(tokens, first, mask, 4, 4).pow(2).sum() - block(tokens, second, mask, 4, 4).pow(2).sum()
    loss.backward()
    assert block.gates.grad.abs().sum() > 0  # the gates get a gradient from the text difference
    with torch.no_grad():
        block.gates.fill_(0.5)
    assert not torch.allclose(block(tokens, first, mask, 4, 4), block(tokens, second, mask, 4, 4))


def test_attention_runs_on_pooled_tokens_of_fine_scales(h):
    """`attention_size` bounds the tokens the cross-attention sees; coarser scales and the output size are unchanged,
    and the report still moves the logits."""
    torch.manual_seed(0)
    features = [torch.randn(1, 48, 16, 16), torch.randn(1, 24, 32, 32)]
    tokens, mask = torch.randn(2, 16, 384), torch.ones(2, 16, dtype=torch.bool)
    full = TextDiffHead([48, 24], 384, h.tiny_config(attention_size=None).head, h.size).eval()
    bounded = TextDiffHead([48, 24], 384, h.tiny_config(attention_size=32).head, h.size).eval()
    pooled = TextDiffHead([48, 24], 384, h.tiny_config(attention_size=8).head, h.size).eval()
    bounded.load_state_dict(full.state_dict())
    pooled.load_state_dict(full.state_dict())
    seen = []
    pooled.fusion.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    both = [f.expand(2, -1, -1, -1) for f in features]
    with torch.no_grad():
        torch.testing.assert_close(bounded(both, tokens, mask), full(both, tokens, mask))  # no scale above 32²
        out = pooled(both, tokens, mask)
    assert seen == [64, 64]  # 16² and 32² both pooled to 8²
    assert out.shape == (2, 2, h.size, h.size)
    assert not torch.allclose(out[0], out[1])  # same image, different report


def test_attention_size_must_be_positive():
    from textdiff.config import HeadConfig

    with pytest.raises(ValueError, match="attention_size"):
        HeadConfig(attention_size=0)


@pytest.mark.parametrize("per_scale_entry", [True, False])
@pytest.mark.parametrize("full_resolution", [False, True])
def test_the_classifier_runs_at_the_finest_scale_or_at_the_window_size(h, full_resolution, per_scale_entry):
    import dataclasses

    cfg = dataclasses.replace(h.tiny_config().head, full_resolution=full_resolution, per_scale_entry=per_scale_entry)
    head = TextDiffHead([48, 24], 8, cfg, out_size=32).eval()
    seen = []
    head.classifier.register_forward_pre_hook(lambda _module, args: seen.append(args[1]))
    features = [torch.randn(2, 48, 8, 8), torch.randn(2, 24, 16, 16)]
    logits = head(features, torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool))
    assert logits.shape == (2, 2, 32, 32)
    assert seen == [32 if full_resolution else 16]


def test_the_per_scale_entry_convolves_each_scale_at_its_own_resolution(h):
    """Each scale's first convolution runs where the scale has its pixels (the coarse one at 8², not upsampled to 16²
    first), and the classifier's later layers see their sum at the classifier's grid."""
    head = TextDiffHead([48, 24], 8, h.tiny_config().head, out_size=32).eval()
    assert head.cfg.per_scale_entry
    seen = []
    for conv in head.classifier.entry:
        conv.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape[-2:])))
    head.classifier.layers.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape[1:])))
    head([torch.randn(2, 48, 8, 8), torch.randn(2, 24, 16, 16)], torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool))
    assert seen == [(8, 8), (16, 16), (head.cfg.head_channels[0], 16, 16)]


def test_the_pixel_mlp_classifier_reads_each_pixel_alone_as_the_concatenated_scales_would(h):
    """head.classifier "pixel_mlp": its first layer on each scale at the scale's own resolution equals one 1x1
    convolution over the upsampled, concatenated scales; a pixel's logits do not move when another pixel's do."""
    import dataclasses

    from textdiff.model.fusion import PixelMLPClassifier, _upsampled

    cfg = dataclasses.replace(h.tiny_config().head, classifier="pixel_mlp", head_channels=(12, 10))
    head = TextDiffHead([48, 24], 8, cfg, out_size=32).eval()
    mlp = head.classifier
    assert isinstance(mlp, PixelMLPClassifier)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in mlp.modules())
    fused = [torch.randn(2, cfg.dim, 8, 8), torch.randn(2, cfg.dim, 16, 16)]
    concatenated = mlp.layers(mlp.entry(torch.cat([_upsampled(x, 16) for x in fused], dim=1)))
    assert torch.allclose(mlp(fused, 16), concatenated, atol=1e-5)
    changed = [fused[0], fused[1].clone()]
    changed[1][:, :, 3, 3] += 5.0
    moved = (mlp(changed, 16) - mlp(fused, 16)).abs().sum(dim=(0, 1)) > 0
    assert moved[3, 3] and moved.sum() == 1


def test_a_classifier_must_be_one_the_head_knows():
    from textdiff.config import HeadConfig, TrainConfig

    with pytest.raises(ValueError, match="head.classifier"):
        HeadConfig(classifier="unet")
    with pytest.raises(ValueError, match="dice_weight"):
        TrainConfig(dice_weight=-1.0)
