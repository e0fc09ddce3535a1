"""PixArt-alpha/Sigma (``PixArtTransformer2DModel``): units ``block.N``; parts self_attn, cross_attn, mlp."""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from slimdit.models.arch import T5_XXL, ArchSpec, Component, register_arch
from slimdit.models.base import Adapter, register

_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


@register
class PixArtAdapter(Adapter):
    name = "pixart"
    groups = {"block": ("transformer_blocks", "num_layers")}
    pipelines = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
    #: PixArt-Sigma's sampling (thesis table 4.3)
    sampling = {"num_inference_steps": 20, "guidance_scale": 3.5, "max_sequence_length": 300}
    # sample at the requested size, not a binned aspect ratio; captions are clean already (cleaning needs bs4, ftfy)
    call_defaults = {"use_resolution_binning": False, "clean_caption": False}

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        from diffusers import PixArtTransformer2DModel

        return isinstance(model, PixArtTransformer2DModel)

    def part_layers(self, model: nn.Module, unit: str) -> dict[str, list[str]]:
        self.unit(model, unit)
        return {
            "self_attn": [f"attn1.{n}" for n in _ATTN],
            "cross_attn": [f"attn2.{n}" for n in _ATTN],
            "mlp": ["ff.net.0.proj", "ff.net.2"],
        }

    def predict(self, model: nn.Module, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        return model(noisy, encoder_hidden_states=cond["prompt_embeds"],
                     encoder_attention_mask=cond["prompt_mask"], timestep=t,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    def prediction(self, model: nn.Module, output: torch.Tensor) -> torch.Tensor:
        # PixArt-Sigma learns the variance too (out_channels = 2 x in): epsilon is the first half
        c = model.config.in_channels
        return output[:, :c] if model.config.out_channels == 2 * c else output

    def encode_prompts(self, pipe, captions: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        """T5 hidden states and their attention mask, through the pipeline's own ``encode_prompt``."""
        extra = {"clean_caption": False} if "clean_caption" in inspect.signature(pipe.encode_prompt).parameters else {}
        emb, mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False,
                                             device=pipe.text_encoder.device,
                                             max_sequence_length=max_sequence_length, **extra)
        return {"prompt_embeds": emb.float().cpu(), "prompt_mask": mask.cpu()}

    def dummy_conditioning(self, model: nn.Module, n: int, max_sequence_length: int,
                           generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        dim = model.config.caption_channels
        return {"prompt_embeds": torch.randn(n, max_sequence_length, dim, generator=generator),
                "prompt_mask": torch.ones(n, max_sequence_length, dtype=torch.long)}


# PixArt-Sigma-XL-2-512-MS over pixart_sigma_sdxlvae_T5_diffusers: the transformer's published config (64x64
# latents at 512 px, T5-XXL captions), the SDXL VAE, DPM-Solver with PixArt's linear betas and epsilon
register_arch(ArchSpec(
    name="pixart-sigma-xl", adapter="pixart", resolution=512, max_sequence_length=300,
    components={
        "transformer": Component("diffusers", "PixArtTransformer2DModel", {
            "sample_size": 64, "caption_channels": 4096, "interpolation_scale": None,
            "use_additional_conditions": False}),
        "text_encoder": T5_XXL,
        "vae": Component("diffusers", "AutoencoderKL", {
            "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "sample_size": 1024, "scaling_factor": 0.13025}),
        "scheduler": Component("diffusers", "DPMSolverMultistepScheduler", {
            "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000,
            "prediction_type": "epsilon"}),
    }))
