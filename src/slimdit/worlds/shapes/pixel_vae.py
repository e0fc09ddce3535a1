"""An identity "VAE" so that a pixel-space model runs through the unchanged diffusers latent pipelines."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin


class PixelSpaceVAE(ModelMixin, ConfigMixin):
    """Map images in [-1, 1] to themselves; ``block_out_channels`` of length 1 gives a scale factor of 1.

    Pipelines compute ``vae_scale_factor = 2 ** (len(block_out_channels) - 1)`` and decode
    ``latents / scaling_factor``; with ``scaling_factor = 1`` both are the identity.
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, latent_channels: int = 3, block_out_channels: tuple[int, ...] = (3,),
                 scaling_factor: float = 1.0):
        super().__init__()
        # a parameter gives the module a device and a dtype, which pipelines query
        self._anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        return x

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        return DecoderOutput(sample=z) if return_dict else (z,)
