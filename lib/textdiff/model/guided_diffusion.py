"""OpenAI guided-diffusion checkpoints (the papers' backbones) as a diffusers `UNet2DModel` + `DDPMScheduler`.

TextDiff and DDPM-Seg read guided-diffusion `.pt` state dicts (`256x256_diffusion_uncond.pt`, the LSUN models, and
medical models trained with the same code). diffusers holds the same architecture (scale-shift norm, ResNet up/down
sampling, attention with fixed head channels), so the state dict is renamed into a `UNet2DModel` and the rest of the
product reads it as any other backbone. The architecture is read from the tensor shapes; what shapes cannot say
(attention heads, noise schedule) comes from a JSON file beside the checkpoint (`<name>.json`), with the published
models' values as defaults.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

logger = logging.getLogger(__name__)

# The decoder blocks TextDiff's MoNuSeg config hooks in the 256x256 model (`output_blocks` indices)
PAPER_OUTPUT_BLOCKS = (6, 8, 12, 16)
# What the tensor shapes cannot tell; the values of the published 256x256 models (guided-diffusion's README flags)
FLAG_DEFAULTS = {"image_size": 256, "num_head_channels": 64, "num_heads": 4, "use_new_attention_order": False,
                 "noise_schedule": "linear", "diffusion_steps": 1000}
_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


@dataclass(frozen=True)
class Architecture:
    """guided-diffusion's `UNetModel` arguments, as far as they shape the weights."""
    in_channels: int
    model_channels: int
    out_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_levels: tuple[bool, ...]
    resblock_updown: bool
    scale_shift: bool
    head_channels: int
    new_attention_order: bool

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    def channels(self, level: int) -> int:
        return self.model_channels * self.channel_mult[level]


class CheckpointError(ValueError):
    """A file that is not a guided-diffusion UNet this converter can read."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a pickle of anything else, a truncated download, ...
        raise CheckpointError(f"'{path}' is not a PyTorch state dict ({type(err).__name__}: {err})") from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or "input_blocks.0.0.weight" not in state:
        raise CheckpointError(f"'{path}' is not a guided-diffusion UNet checkpoint: "
                              "it has no 'input_blocks.0.0.weight'")
    if "label_emb.weight" in state:
        raise CheckpointError(f"'{path}' is a class-conditional model ('label_emb.weight'); an unconditional one is "
                              "needed, such as 256x256_diffusion_uncond.pt")
    return state


def read_flags(path: Path) -> dict:
    """The flags JSON beside the checkpoint (`model.pt` -> `model.json`), over the published defaults."""
    flags_file = path.with_suffix(".json")
    flags = json.loads(flags_file.read_text()) if flags_file.is_file() else {}
    unknown = sorted(set(flags) - set(FLAG_DEFAULTS))
    if unknown:
        raise CheckpointError(f"'{flags_file}': unknown flag(s) {unknown}; known: {sorted(FLAG_DEFAULTS)}")
    if flags.get("noise_schedule", "linear") not in _SCHEDULES:
        raise CheckpointError(f"'{flags_file}': noise_schedule must be one of {sorted(_SCHEDULES)}")
    return {**FLAG_DEFAULTS, **flags}


def _blocks(state: dict, prefix: str) -> int:
    return 1 + max(int(m.group(1)) for key in state if (m := re.match(rf"{prefix}\.(\d+)\.", key)))


def _has_upsampler(state: dict, block: int) -> bool:
    """An output block ends a level when it holds a second ResBlock (`resblock_updown`) or an Upsample conv."""
    return any(re.match(rf"output_blocks\.{block}\.[12]\.(in_layers|conv)\.", key) for key in state)


def infer_architecture(state: dict, flags: dict) -> Architecture:
    """Read the architecture from the tensor shapes: output blocks per level from where upsamplers sit, channels
    per level from the ResBlocks, attention from `qkv` weights."""
    out_blocks = _blocks(state, "output_blocks")
    ends = [b for b in range(out_blocks) if _has_upsampler(state, b)]
    per_level = ends[0] + 1 if ends else out_blocks
    if out_blocks % per_level:
        raise CheckpointError(f"{out_blocks} output blocks do not split into levels of {per_level}")
    levels = out_blocks // per_level
    first = [(levels - 1 - level) * per_level for level in range(levels)]  # each level's first output block
    model_channels = state["input_blocks.0.0.weight"].shape[0]
    mult = tuple(state[f"output_blocks.{b}.0.out_layers.3.weight"].shape[0] // model_channels for b in first)
    attention = tuple(f"output_blocks.{b}.1.qkv.weight" in state for b in first)
    head_channels = ({flags["num_head_channels"]} if flags["num_head_channels"] > 0 else
                     {model_channels * m // flags["num_heads"] for m, a in zip(mult, attention) if a})
    if len(head_channels) > 1:
        raise CheckpointError(f"attention with {flags['num_heads']} heads at every level gives heads of "
                              f"{sorted(head_channels)} channels; diffusers needs one head size (num_head_channels)")
    return Architecture(
        in_channels=state["input_blocks.0.0.weight"].shape[1], model_channels=model_channels,
        out_channels=state["out.2.weight"].shape[0], channel_mult=mult, num_res_blocks=per_level - 1,
        attention_levels=attention,
        resblock_updown=any(f"output_blocks.{b}.{k}.in_layers.0.weight" in state for b in ends for k in (1, 2)),
        scale_shift=state["output_blocks.0.0.emb_layers.1.weight"].shape[0] == 2 * model_channels * mult[-1],
        head_channels=head_channels.pop() if head_channels else flags["num_head_channels"],
        new_attention_order=flags["use_new_attention_order"],
    )


def build_unet(arch: Architecture, sample_size: int) -> UNet2DModel:
    """The diffusers UNet of the same architecture (noise read-out only: `learn_sigma`'s variance channels dropped)."""
    resample = "resnet" if arch.resblock_updown else "conv"
    plain_down = "ResnetDownsampleBlock2D" if arch.resblock_updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if arch.resblock_updown else "UpBlock2D"
    return UNet2DModel(
        sample_size=sample_size, in_channels=arch.in_channels, out_channels=arch.in_channels,
        block_out_channels=tuple(arch.channels(level) for level in range(arch.levels)),
        layers_per_block=arch.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else plain_down for a in arch.attention_levels),
        up_block_types=tuple("AttnUpBlock2D" if a else plain_up for a in reversed(arch.attention_levels)),
        downsample_type=resample, upsample_type=resample,
        resnet_time_scale_shift="scale_shift" if arch.scale_shift else "default",
        attention_head_dim=arch.head_channels, attn_norm_num_groups=32, norm_num_groups=32, norm_eps=1e-5,
        flip_sin_to_cos=True, freq_shift=0, time_embedding_type="positional",
    )


_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut", "op": "conv", "conv": "conv"}
_FIXED = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
          "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "middle_block.0": "mid_block.resnets.0",
          "middle_block.1": "mid_block.attentions.0", "middle_block.2": "mid_block.resnets.1"}


def module_name(block: str, arch: Architecture) -> str:
    """The diffusers module that holds guided-diffusion's `input_blocks.N.k` / `output_blocks.N.k` / fixed parts."""
    if block in _FIXED:
        return _FIXED[block]
    kind, index, part = block.split(".")
    index, part, per_level = int(index), int(part), arch.num_res_blocks + 1
    if kind == "input_blocks":
        level, i = divmod(index - 1, per_level)
        if i == arch.num_res_blocks:
            return f"down_blocks.{level}.downsamplers.0"
        return f"down_blocks.{level}.{'attentions' if part else 'resnets'}.{i}"
    level, i = divmod(index, per_level)
    if part == 0:
        return f"up_blocks.{level}.resnets.{i}"
    attention = arch.attention_levels[arch.levels - 1 - level]
    return f"up_blocks.{level}.attentions.{i}" if part == 1 and attention else f"up_blocks.{level}.upsamplers.0"


def _qkv(weight: torch.Tensor, arch: Architecture) -> tuple[torch.Tensor, ...]:
    """Split a fused 1x1 qkv projection into q, k, v. The default ("legacy") order interleaves them per head:
    [q_h0, k_h0, v_h0, q_h1, ...]; the new order stacks all q, then all k, then all v."""
    channels = weight.shape[0] // 3
    if arch.new_attention_order:
        return weight.chunk(3, dim=0)
    per_head = weight.reshape(channels // arch.head_channels, 3, arch.head_channels, *weight.shape[1:])
    return tuple(per_head[:, j].reshape(channels, *weight.shape[1:]) for j in range(3))


def _rename(module: str, rest: str, tensor: torch.Tensor, arch: Architecture) -> dict[str, torch.Tensor]:
    layer, _, param = rest.rpartition(".")
    if not layer:  # a plain layer: conv_in, the time embedding's linears, the output norm
        return {f"{module}.{param}": tensor}
    if "attentions" in module and layer == "qkv":
        return {f"{module}.to_{n}.{param}": t.flatten(1) if param == "weight" else t
                for n, t in zip("qkv", _qkv(tensor, arch))}
    if "attentions" in module and layer in ("norm", "proj_out"):
        return {f"{module}.{'group_norm' if layer == 'norm' else 'to_out.0'}.{param}": tensor.flatten(1)
                if param == "weight" and layer == "proj_out" else tensor}
    if "attentions" not in module and layer in _RESNET:
        return {f"{module}.{_RESNET[layer]}.{param}": tensor}
    raise CheckpointError(f"checkpoint key '{rest}' of '{module}' does not fit a guided-diffusion UNet")


# a key's module part (an input/output block's part, a middle block part, the time embedding, the output norm), its rest
_BLOCK = re.compile(r"((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d|time_embed\.\d|out\.0)\.(.+)")


def convert_state_dict(state: dict[str, torch.Tensor], arch: Architecture) -> dict[str, torch.Tensor]:
    """guided-diffusion keys -> diffusers `UNet2DModel` keys; the output conv keeps the noise channels only."""
    converted = {}
    for key, tensor in state.items():
        if key.startswith("out.2."):
            converted[f"conv_out.{key.rsplit('.', 1)[1]}"] = tensor[: arch.in_channels]
            continue
        match = _BLOCK.match(key)
        if not match:
            raise CheckpointError(f"checkpoint key '{key}' does not fit a guided-diffusion UNet")
        converted.update(_rename(module_name(match.group(1), arch), match.group(2), tensor, arch))
    return converted


def load_guided_diffusion(path: str | Path) -> tuple[UNet2DModel, DDPMScheduler]:
    """A guided-diffusion `.pt` as a float32 diffusers UNet (noise prediction) and its DDPM scheduler; the UNet's
    `paper_feature_layers` are the decoder blocks TextDiff reads in such a model."""
    path = Path(path)
    state, flags = read_state_dict(path), read_flags(path)
    arch = infer_architecture(state, flags)
    unet = build_unet(arch, flags["image_size"])
    converted = convert_state_dict({k: v.float() for k, v in state.items()}, arch)
    missing, unexpected = unet.load_state_dict(converted, strict=False)
    if unexpected or missing:
        first = f"unexpected key '{unexpected[0]}'" if unexpected else f"no weights for '{missing[0]}'"
        raise CheckpointError(f"'{path}' does not fit the architecture read from it ({first})")
    unet.paper_feature_layers = paper_feature_layers(arch)
    scheduler = DDPMScheduler(num_train_timesteps=flags["diffusion_steps"],
                              beta_schedule=_SCHEDULES[flags["noise_schedule"]])
    logger.info("guided-diffusion checkpoint '%s': %.0f M parameters, %d levels of %s channels, attention at %s",
                path.name, sum(p.numel() for p in unet.parameters()) / 1e6, arch.levels,
                [arch.channels(level) for level in range(arch.levels)],
                [level for level, a in enumerate(arch.attention_levels) if a])
    return unet, scheduler


def output_block_module(block: int, arch: Architecture) -> str:
    """The diffusers module whose output is guided-diffusion's output block `block` (its last part)."""
    level, i = divmod(block, arch.num_res_blocks + 1)
    if i == arch.num_res_blocks and level < arch.levels - 1:
        return f"up_blocks.{level}.upsamplers.0"
    if arch.attention_levels[arch.levels - 1 - level]:
        return f"up_blocks.{level}.attentions.{i}"
    return f"up_blocks.{level}.resnets.{i}"


def paper_feature_layers(arch: Architecture) -> tuple[str, ...] | None:
    """Output blocks 6, 8, 12 and 16 (the papers' choice), when the model has that many."""
    if arch.levels * (arch.num_res_blocks + 1) <= max(PAPER_OUTPUT_BLOCKS):
        return None
    return tuple(output_block_module(block, arch) for block in PAPER_OUTPUT_BLOCKS)
