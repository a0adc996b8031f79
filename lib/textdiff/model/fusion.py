"""The trained part of TextDiff: text-to-image cross-attention shared by all scales, and the pixel classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from textdiff.config import HeadConfig


POSITION_FREQUENCIES = 4


def position_features(height: int, width: int, box: torch.Tensor | None = None,
                      frequencies: int = POSITION_FREQUENCIES) -> torch.Tensor:
    """Sine/cosine features of each pixel's relative (row, column) position, (height*width, 4*frequencies).

    Coordinates are relative to the image, so every scale describes the same place ("lower left lung") the same way.
    A window of a larger image passes its `box` (first and last pixel centre per axis in [-1, 1], as
    `tiling.relative_box` gives): its pixels then get their places in the whole image.
    """
    if box is None:
        rows, cols = torch.linspace(-1, 1, height), torch.linspace(-1, 1, width)
    else:
        rows, cols = torch.linspace(box[0], box[2], height), torch.linspace(box[1], box[3], width)
    rows, cols = torch.meshgrid(rows, cols, indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # (h*w, 2)
    # The lowest frequency has period 4, so the two image edges (-1 and 1) stay distinct.
    angles = coords[:, :, None] * (torch.pi / 2 * 2.0 ** torch.arange(frequencies))  # (h*w, 2, f)
    return torch.cat([angles.sin(), angles.cos()], dim=2).flatten(1)


def batch_positions(height: int, width: int, boxes: list[torch.Tensor | None] | None) -> torch.Tensor:
    """(1 or B, height*width, 4*frequencies): one grid for whole images, one per window when any has a box."""
    if not boxes or all(box is None for box in boxes):
        return position_features(height, width)[None]
    whole = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    return torch.stack([position_features(height, width, whole if box is None else box) for box in boxes])


class CrossAttentionBlock(nn.Module):
    """Image tokens attend to text tokens: pre-LayerNorm cross-attention layers with residuals, then a GELU
    feed-forward with a residual, as in the TextDiff paper.

    With `positional` the queries also carry the pixel's relative position (a learned projection of fixed sine
    features), so that a report naming a side or zone can raise the evidence there; the paper's queries carry none.

    The queries are laid out in memory sequence first (`_sequence_first`): PyTorch's batch-first attention transposes
    them, and under CPU bfloat16 autocast its input projection of a transposed tensor became a batched matmul over
    one copy of the weight per token, which made the served head slower in bfloat16 than in float32.
    """

    def __init__(self, dim: int, heads: int, layers: int, ff_mult: int, positional: bool = True, gated: bool = False):
        super().__init__()
        self.position = nn.Linear(4 * POSITION_FREQUENCIES, dim) if positional else None
        # tanh gates at 0: the block starts as the identity for text and opens only where the text pays off.
        self.gates = nn.Parameter(torch.zeros(layers)) if gated else None
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.attentions = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(layers))
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult), nn.GELU(), nn.Linear(dim * ff_mult, dim))

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                height: int, width: int, boxes: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        ignore = ~text_mask.bool()
        x = image_tokens
        where = self.position(batch_positions(height, width, boxes).to(x)) if self.position is not None else 0
        for index, (norm, attention) in enumerate(zip(self.norms, self.attentions)):
            query = _sequence_first(norm(x) + where)
            attended, _ = attention(query, text_tokens, text_tokens, key_padding_mask=ignore, need_weights=False)
            x = x + (attended if self.gates is None else torch.tanh(self.gates[index]) * attended)
        return x + self.ff(x)


def _sequence_first(tokens: torch.Tensor) -> torch.Tensor:
    """The same (B, L, C) tensor, its memory (L, B, C): contiguous once batch-first attention transposes it."""
    return tokens.transpose(0, 1).contiguous().transpose(0, 1)


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _classifier_layers(widths: tuple[int, ...], num_classes: int) -> list[nn.Module]:
    """3x3 conv-BN-ReLU from each width to the next, then a 3x3 convolution to the class scores."""
    return [*(_conv_bn_relu(a, b) for a, b in zip(widths[:-1], widths[1:])),
            nn.Conv2d(widths[-1], num_classes, 3, padding=1)]


def _upsampled(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class ConcatClassifier(nn.Sequential):
    """The papers' pixel classifier: every fused scale upsampled to the classifier's grid, concatenated, then 3x3
    convolutions (the first one reads all scales at full size: a third of a training step on a CPU)."""

    def __init__(self, scales: int, dim: int, widths: tuple[int, ...], num_classes: int):
        super().__init__(*_classifier_layers((dim * scales, *widths), num_classes))

    def forward(self, fused: list[torch.Tensor], size: int) -> torch.Tensor:
        return super().forward(torch.cat([_upsampled(x, size) for x in fused], dim=1))


class ScaleSumClassifier(nn.Module):
    """The same classifier with its first 3x3 convolution split by scale and run at each scale's own resolution
    before upsampling, the results summed: a coarse scale is convolved where it has its pixels, not after it was
    upsampled 8x, and only the first layer's narrower output is upsampled. As many weights; a training step on a CPU
    takes about 0.6 of the time (docs/results/speed.md, "A leaner first layer")."""

    def __init__(self, scales: int, dim: int, widths: tuple[int, ...], num_classes: int):
        super().__init__()
        self.entry = nn.ModuleList(nn.Conv2d(dim, widths[0], 3, padding=1, bias=False) for _ in range(scales))
        self.layers = nn.Sequential(nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
                                    *_classifier_layers(widths, num_classes))

    def forward(self, fused: list[torch.Tensor], size: int) -> torch.Tensor:
        return self.layers(sum(_upsampled(conv(x), size) for conv, x in zip(self.entry, fused)))


class PixelMLPClassifier(nn.Module):
    """A per-pixel MLP on the fused scales: 1x1 convolutions with ReLUs between, no BatchNorm, as a probe of frozen
    features reads them. Its first layer is one weight over the concatenated scales, applied to each scale at the
    scale's own resolution and the results upsampled and summed: the same function as concatenating the upsampled
    scales first (a 1x1 convolution and bilinear upsampling commute), each coarse scale multiplied where it has its
    pixels."""

    def __init__(self, scales: int, dim: int, widths: tuple[int, ...], num_classes: int):
        super().__init__()
        self.dim = dim
        self.entry = nn.Conv2d(scales * dim, widths[0], 1)
        layers = [nn.Conv2d(a, b, 1) for a, b in zip(widths, (*widths[1:], num_classes))]
        self.layers = nn.Sequential(*(m for conv in layers[:-1] for m in (nn.ReLU(), conv)), nn.ReLU(), layers[-1])

    def forward(self, fused: list[torch.Tensor], size: int) -> torch.Tensor:
        weights = self.entry.weight.split(self.dim, dim=1)
        x = sum(_upsampled(F.conv2d(scale, weight), size) for scale, weight in zip(fused, weights))
        return self.layers(x + self.entry.bias[:, None, None])


class TextDiffHead(nn.Module):
    """Reduce each diffusion scale to `dim` channels, fuse it with the report tokens, classify the fused scales.

    Scales finer than `cfg.attention_size` are fused on average-pooled tokens and get the fusion's change upsampled.

    The classifier merges the fused scales at `out_size` (the window size), or with `cfg.full_resolution` False at
    the finest feature scale, its logits then upsampled to `out_size`; `cfg.per_scale_entry` says how it merges them
    (`ScaleSumClassifier`, or the papers' `ConcatClassifier`); `cfg.classifier` "pixel_mlp" reads each pixel alone
    (`PixelMLPClassifier`).

    With `cfg.use_text` False the cross-attention is skipped, which gives the "diffusion features only" ablation.
    """

    def __init__(self, feature_channels: list[int], text_dim: int, cfg: HeadConfig, out_size: int):
        super().__init__()
        self.cfg = cfg
        self.out_size = out_size
        self.reduce = nn.ModuleList(nn.Conv2d(c, cfg.dim, 1) for c in feature_channels)
        if cfg.use_text:
            self.text_proj = nn.Linear(text_dim, cfg.dim)
            self.fusion = CrossAttentionBlock(cfg.dim, cfg.heads, cfg.cross_attention_layers, cfg.ff_mult,
                                              cfg.positional_queries, cfg.gated_text)
        classifier = PixelMLPClassifier if cfg.classifier == "pixel_mlp" else \
            ScaleSumClassifier if cfg.per_scale_entry else ConcatClassifier
        self.classifier = classifier(len(feature_channels), cfg.dim, cfg.head_channels, cfg.num_classes)

    def forward(
        self, features: list[torch.Tensor], text_tokens: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
        boxes: list[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Logits (B, classes, out_size, out_size); `boxes` place windows of a larger image (`position_features`)."""
        if self.cfg.use_text and (text_tokens is None or text_mask is None):
            raise ValueError("this head fuses text: pass text_tokens and text_mask (an empty report is fine)")
        text = self.text_proj(text_tokens) if self.cfg.use_text else None
        size = self.out_size if self.cfg.full_resolution else max(f.shape[-1] for f in features)
        fused = []
        for reduce, feature in zip(self.reduce, features):
            x = reduce(feature)
            if text is not None:
                x = self._fuse(x, text, text_mask, boxes)
            fused.append(x)
        return _upsampled(self.classifier(fused, size), self.out_size)

    def _fuse(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
              boxes: list[torch.Tensor | None] | None) -> torch.Tensor:
        """The shared cross-attention block on one scale, run on at most `attention_size`² pooled tokens."""
        b, c, h, w = x.shape
        limit = self.cfg.attention_size
        size = (min(h, limit), min(w, limit)) if limit else (h, w)
        small = F.adaptive_avg_pool2d(x, size) if size != (h, w) else x
        tokens = self.fusion(small.flatten(2).transpose(1, 2), text, text_mask, *size, boxes)
        change = tokens.transpose(1, 2).reshape(b, c, *size) - small
        if size != (h, w):
            change = F.interpolate(change, size=(h, w), mode="bilinear", align_corners=False)
        return x + change
