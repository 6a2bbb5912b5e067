"""The configuration of the UNet: the fields of diffusers' ``unet/config.json`` it reads.

As in diffusers, ``attention_head_dim`` of these configs counts *heads* (a naming slip diffusers
kept for compatibility); ``num_attention_heads`` overrides it when set.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

CROSS_DOWN, _DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, _UP = "CrossAttnUpBlock2D", "UpBlock2D"
_MID = "UNetMidBlock2DCrossAttn"


def _per_block(value: Any, count: int, name: str) -> tuple:
    """An int/bool or a per-block list of them as a tuple of ``count`` entries."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"unet config: {name} has {len(value)} entries for {count} blocks")
        return tuple(value)
    return (value,) * count


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The fields of diffusers' ``UNet2DConditionModel`` config that this implementation reads."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, _DOWN)
    up_block_types: tuple[str, ...] = (_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    mid_block_type: Optional[str] = _MID
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: Any = 8  # heads per block (int or per-block list), see module doc
    num_attention_heads: Any = None
    cross_attention_dim: int = 768
    transformer_layers_per_block: Any = 1  # int or per-block list (SDXL: [1, 2, 10])
    only_cross_attention: Any = False
    use_linear_projection: bool = False  # SD 2.x, SDXL: Dense instead of 1x1 conv around attention
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    addition_embed_type: Optional[str] = None  # SDXL: "text_time"
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None
    # Not a diffusers field: the feed-forward gate's GELU by its tanh approximation. The shapes
    # world's shipped UNet was trained so (Flax's default GELU); PyTorch checkpoints use exact.
    geglu_approximate: bool = False

    #: diffusers fields with the only value this implementation supports.
    _FIXED = {"act_fn": "silu", "center_input_sample": False, "class_embed_type": None,
              "encoder_hid_dim": None, "encoder_hid_dim_type": None, "time_embedding_type":
              "positional", "resnet_time_scale_shift": "default", "conv_in_kernel": 3,
              "conv_out_kernel": 3, "mid_block_only_cross_attention": None,
              "num_class_embeds": None, "class_embeddings_concat": False,
              "time_cond_proj_dim": None, "attention_type": "default",
              "dual_cross_attention": False, "cross_attention_norm": None,
              "reverse_transformer_layers_per_block": None, "mid_block_scale_factor": 1}

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "unet config") -> "UNetConfig":
        """Reads a diffusers ``unet/config.json`` dict; unknown fields that change the network
        raise one ``ValueError`` line, bookkeeping fields (``_class_name``...) are ignored."""
        for name, supported in cls._FIXED.items():
            if name in config and config[name] != supported and not (
                    supported is None and config[name] in (None, False)):
                raise ValueError(f"{source}: {name}={config[name]!r} is not supported (only "
                                 f"{supported!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        nullable = ("num_attention_heads", "mid_block_type", "addition_embed_type")
        values = {key: tuple(value) if isinstance(value, list) else value
                  for key, value in config.items()
                  if key in fields and (value is not None or key in nullable)}
        made = cls(**values)
        made.validate(source)
        return made

    def to_dict(self) -> dict[str, Any]:
        """The diffusers config fields (without the project-only ones)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.pop("geglu_approximate")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @property
    def blocks(self) -> int:
        return len(self.block_out_channels)

    @property
    def heads(self) -> tuple[int, ...]:
        value = self.num_attention_heads or self.attention_head_dim
        return tuple(int(v) for v in _per_block(value, self.blocks, "attention heads"))

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(int(v) for v in _per_block(self.transformer_layers_per_block, self.blocks,
                                                "transformer_layers_per_block"))

    @property
    def cross_only(self) -> tuple[bool, ...]:
        return tuple(bool(v) for v in _per_block(self.only_cross_attention, self.blocks,
                                                 "only_cross_attention"))

    def mid_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """[h, w, C] of the mid-block features for [H, W] inputs: every block but the last
        halves the size (stride-2 convs with padding 1: ceil)."""
        for _ in range(self.blocks - 1):
            height, width = -(-height // 2), -(-width // 2)
        return (height, width, self.block_out_channels[-1])

    def validate(self, source: str = "unet config") -> None:
        count = self.blocks
        if len(self.down_block_types) != count or len(self.up_block_types) != count:
            raise ValueError(f"{source}: {count} block_out_channels but "
                             f"{len(self.down_block_types)} down and {len(self.up_block_types)} "
                             "up blocks")
        for kind in self.down_block_types:
            if kind not in (CROSS_DOWN, _DOWN):
                raise ValueError(f"{source}: down block {kind!r} is not supported ({CROSS_DOWN}"
                                 f", {_DOWN})")
        for kind in self.up_block_types:
            if kind not in (CROSS_UP, _UP):
                raise ValueError(f"{source}: up block {kind!r} is not supported ({CROSS_UP}, "
                                 f"{_UP})")
        if self.mid_block_type not in (_MID, None):
            raise ValueError(f"{source}: mid block {self.mid_block_type!r} is not supported")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"{source}: addition_embed_type {self.addition_embed_type!r} is not "
                             "supported (None or 'text_time')")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(f"{source}: block channels {channels} are not a multiple of "
                                 f"norm_num_groups {self.norm_num_groups}")
        for per_block in (self.heads, self.depths, self.cross_only):  # lengths checked
            assert len(per_block) == count
