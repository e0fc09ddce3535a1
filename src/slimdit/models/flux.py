"""Flux (``FluxTransformer2DModel``, an MMDiT): units ``double.N`` (separate image and text weights, joint attention)
and ``single.N`` (one joint sequence). Both kinds take ``hidden_states`` (image) and ``encoder_hidden_states``
(text) and return ``(encoder_hidden_states, hidden_states)`` (diffusers >= 0.35; earlier single blocks took one
concatenated tensor, which slimdit does not support). Latents ``(B, C, H, W)`` are 2x2-packed into tokens here,
and the guidance scale of a guidance-distilled model enters as an embedding.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimdit.models.arch import T5_XXL, ArchSpec, Component, register_arch
from slimdit.models.base import Adapter, register, unwrap

_IMG_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
_TXT_ATTN = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)``: each 2x2 patch one token, as ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack` for latents of height ``h`` and width ``w``."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Rotary position ids ``(h/2 * w/2, 3)`` of the packed latent tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


@register
class FluxAdapter(Adapter):
    name = "flux"
    groups = {"double": ("transformer_blocks", "num_layers"),
              "single": ("single_transformer_blocks", "num_single_layers")}
    streams = ("image", "text")
    pipelines = ("FluxPipeline",)
    #: Flux-dev's sampling (thesis table 4.4): the guidance scale enters as an embedding, one pass per step
    sampling = {"num_inference_steps": 50, "guidance_scale": 3.5, "max_sequence_length": 512}
    #: the guidance a guidance-distilled model is distilled at when the conditioning names none (Flux-dev's
    #: default, thesis table 4.4)
    guidance = 3.5

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        from diffusers import FluxTransformer2DModel

        return isinstance(model, FluxTransformer2DModel)

    def part_layers(self, model: nn.Module, unit: str) -> dict[str, list[str]]:
        self.unit(model, unit)
        if unit.startswith("double."):
            return {"img_attn": _IMG_ATTN, "txt_attn": _TXT_ATTN, "img_mlp": ["ff.net.0.proj", "ff.net.2"],
                    "txt_mlp": ["ff_context.net.0.proj", "ff_context.net.2"], "img_mod": ["norm1.linear"],
                    "txt_mod": ["norm1_context.linear"]}
        # the thesis' fused "linear1" (table 4.2) is attn + mlp; proj_out takes attention and MLP outputs together
        return {"attn": ["attn.to_q", "attn.to_k", "attn.to_v"], "mlp": ["proj_mlp"], "proj_out": ["proj_out"],
                "mod": ["norm.linear"]}

    def takes_guidance(self, model: nn.Module) -> bool:
        return bool(unwrap(model).config.guidance_embeds)

    def guidance_scale(self, model: nn.Module, defaults: dict) -> float:
        """A guidance-distilled model's guidance input (``guidance_scale``); a model without one guides by true CFG,
        which FluxPipeline runs only with ``true_cfg_scale > 1`` and a negative prompt."""
        if self.takes_guidance(model):
            return float(defaults["guidance_scale"])
        true_cfg = float(defaults.get("true_cfg_scale", 1.0))
        return true_cfg if true_cfg > 1 and defaults.get("negative_prompt") is not None else 1.0

    def guided_sampling(self, model: nn.Module, guidance: float) -> dict:
        if self.takes_guidance(model):
            return {"guidance_scale": guidance}
        # true CFG against the empty caption (the null the base learnt by caption dropout); at 1 it is off
        return {"guidance_scale": 1.0, "true_cfg_scale": guidance, "negative_prompt": "" if guidance > 1 else None}

    def passes_per_step(self, model: nn.Module, options) -> int:
        """Two with true CFG (``true_cfg_scale > 1`` and a negative prompt), else one: a guidance-distilled model
        takes its scale as an input."""
        extra = options.extra
        return 2 if extra.get("true_cfg_scale", 1.0) > 1 and extra.get("negative_prompt") is not None else 1

    def image_tokens(self, model: nn.Module, latents: torch.Tensor) -> int:
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    # ---- unit I/O: both streams, in and out ---------------------------------------------------------------
    def unit_inputs(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        # keywords in a plain forward; positional (hidden, encoder, ...) under gradient checkpointing
        return {"image": args[0] if args else kwargs["hidden_states"],
                "text": args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]}

    def unit_outputs(self, out) -> dict[str, torch.Tensor]:
        return {"text": out[0], "image": out[1]}

    def unit_result(self, streams: dict[str, torch.Tensor]):
        return streams["text"], streams["image"]

    # ---- conditioning and prediction ---------------------------------------------------------------------
    def latent_channels(self, model: nn.Module) -> int:
        return unwrap(model).config.in_channels // 4  # each token packs a 2x2 latent patch

    def dummy_conditioning(self, model: nn.Module, n: int, max_sequence_length: int,
                           generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        c = unwrap(model).config
        return {"prompt_embeds": torch.randn(n, max_sequence_length, c.joint_attention_dim, generator=generator),
                "pooled_prompt_embeds": torch.randn(n, c.pooled_projection_dim, generator=generator)}

    def encode_prompts(self, pipe, captions: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        """T5 hidden states and the CLIP pooled vector, through ``FluxPipeline.encode_prompt``."""
        emb, pooled, _ = pipe.encode_prompt(captions, prompt_2=None, device=pipe.text_encoder.device,
                                            max_sequence_length=max_sequence_length)
        return {"prompt_embeds": emb.float().cpu(), "pooled_prompt_embeds": pooled.float().cpu()}

    def predict(self, model: nn.Module, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        b, _, h, w = noisy.shape
        emb = cond["prompt_embeds"]
        guidance = None
        if self.takes_guidance(model):
            g = cond.get("guidance")
            guidance = (g if g is not None else torch.full((b,), self.guidance)).to(noisy.device, noisy.dtype)
        out = model(hidden_states=pack(noisy), encoder_hidden_states=emb,
                    pooled_projections=cond["pooled_prompt_embeds"], timestep=t.to(noisy.dtype) / 1000,
                    img_ids=image_ids(h, w, noisy.device, noisy.dtype),
                    txt_ids=torch.zeros(emb.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                    guidance=guidance).sample
        return unpack(out, h, w)


# FLUX.1-dev: diffusers' FluxTransformer2DModel defaults are its dimensions (19 double, 38 single blocks, 3072
# wide, a guidance embedding); CLIP ViT-L/14's text model for the pooled vector, T5-XXL for the sequence, the
# 16-channel VAE and the flow-matching scheduler with dynamic shifting
register_arch(ArchSpec(
    name="flux-dev", adapter="flux", resolution=1024, max_sequence_length=512,
    components={
        "transformer": Component("diffusers", "FluxTransformer2DModel", {"guidance_embeds": True}),
        "text_encoder": Component("transformers", "CLIPTextModel", {
            "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
            "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768,
            "hidden_act": "quick_gelu"}, "CLIPTextConfig"),
        "text_encoder_2": T5_XXL,
        "vae": Component("diffusers", "AutoencoderKL", {
            "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 16,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "use_quant_conv": False, "use_post_quant_conv": False, "sample_size": 1024,
            "scaling_factor": 0.3611, "shift_factor": 0.1159}),
        "scheduler": Component("diffusers", "FlowMatchEulerDiscreteScheduler", {
            "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
            "base_image_seq_len": 256, "max_image_seq_len": 4096}),
    }))
