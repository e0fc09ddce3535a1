"""The shapes world's Flux: a genuine diffusers ``FluxPipeline`` at shapes scale.

A real ``FluxTransformer2DModel`` (double and single blocks, rotary positions, 2x2-packed latents), a tiny
``CLIPTextModel`` for the pooled vector beside the shapes T5 for the token sequence (both over the shapes
word-level tokenizer), an ``AutoencoderKL`` with 2x downsampling (32x32 pixels -> 16x16 latents -> 64 tokens after
packing, as many as shapes-pixart sees), and ``FlowMatchEulerDiscreteScheduler`` with Flux-dev's dynamic shift.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimdit.worlds.shapes.text import MAX_SEQUENCE_LENGTH, build_text_encoder, build_tokenizer


@dataclass
class FluxShape:
    """The dimensions of a shapes Flux."""

    double: int = 4
    single: int = 8
    heads: int = 4
    head_dim: int = 24  # rotary axes (4, 10, 10): text position, row, column
    t5_dim: int = 64
    t5_layers: int = 2
    clip_dim: int = 32
    clip_layers: int = 1
    latent_channels: int = 4
    vae_width: int = 16
    guidance_embeds: bool = False  # the CFG base; guidance distillation makes the True one


def build_clip_text_encoder(vocab_size: int, dim: int = 32, layers: int = 1, heads: int = 2):
    """A tiny ``CLIPTextModel`` whose pooled output is read at the shapes tokenizer's ``</s>`` (id 1)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=2 * dim,
                                       num_hidden_layers=layers, num_attention_heads=heads,
                                       max_position_embeddings=MAX_SEQUENCE_LENGTH, pad_token_id=0, bos_token_id=1,
                                       eos_token_id=1, projection_dim=dim))


def build_vae(shape: FluxShape):
    """An ``AutoencoderKL`` with one downsampling (x2); Flux's decode adds ``shift_factor``, so it is set (0)."""
    from diffusers import AutoencoderKL

    w = shape.vae_width
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=shape.latent_channels,
                         block_out_channels=(w, 2 * w), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=min(8, w),
                         sample_size=32, scaling_factor=1.0, shift_factor=0.0)


def build_transformer(shape: FluxShape):
    from diffusers import FluxTransformer2DModel

    rope = (4, (shape.head_dim - 4) // 2, (shape.head_dim - 4) // 2)
    return FluxTransformer2DModel(patch_size=1, in_channels=4 * shape.latent_channels, num_layers=shape.double,
                                  num_single_layers=shape.single, attention_head_dim=shape.head_dim,
                                  num_attention_heads=shape.heads, joint_attention_dim=shape.t5_dim,
                                  pooled_projection_dim=shape.clip_dim, guidance_embeds=shape.guidance_embeds,
                                  axes_dims_rope=rope)


def build_scheduler():
    """Flux-dev's sampler: flow-matching Euler with the resolution-dependent (dynamic) shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def build_pipeline(shape: FluxShape, vae=None, transformer=None, text_encoder=None, text_encoder_2=None):
    """A ``FluxPipeline`` of the shapes world; parts not given are built at random."""
    from diffusers import FluxPipeline

    tok = build_tokenizer()
    return FluxPipeline(
        scheduler=build_scheduler(), vae=vae if vae is not None else build_vae(shape),
        text_encoder=text_encoder if text_encoder is not None else build_clip_text_encoder(len(tok), shape.clip_dim,
                                                                                          shape.clip_layers),
        tokenizer=tok,
        text_encoder_2=text_encoder_2 if text_encoder_2 is not None else build_text_encoder(len(tok), shape.t5_dim,
                                                                                            shape.t5_layers),
        tokenizer_2=build_tokenizer(),
        transformer=transformer if transformer is not None else build_transformer(shape))


#: how shapes Flux pipelines sample (``slimdit.json``): 32x32 images, the shapes tokenizer's length
SAMPLING = {"num_inference_steps": 20, "guidance_scale": 3.5, "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "height": 32, "width": 32}
