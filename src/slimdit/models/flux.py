"""Flux (``FluxTransformer2DModel``, an MMDiT): units ``double.N`` (separate image and text weights, joint attention)
and ``single.N`` (one joint sequence). Both kinds take ``hidden_states`` (image) and ``encoder_hidden_states``
(text) and return ``(encoder_hidden_states, hidden_states)`` (diffusers >= 0.35; earlier single blocks took one
concatenated tensor, which slimdit does not support). Latents ``(B, C, H, W)`` are 2x2-packed into tokens here,
and the guidance scale of a guidance-distilled model enters as an embedding.
"""

from __future__ import annotations

import torch
import torch.nn as nn

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
