"""ESD (Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023): fine-tune the model so
that its noise prediction for a concept prompt becomes the frozen model's prediction *guided away* from
the concept:

    target = eps0(x_t, "") - eta * (eps0(x_t, c) - eps0(x_t, ""))
    loss   = || eps_theta(x_t, c) - target ||^2

with eps0 the frozen original. ESD-x trains the cross-attention (`xattn`), ESD-u everything else
(`unet_minus_xattn`). As in the paper, x_t comes from the model's own generations of the concept's
prompts (generated once by the frozen model and cached in the run folder), not from training data.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffimmune.adapters.prior import cached_generations
from diffimmune.core.objective import Batch, esd_target, sample_noise_and_timesteps
from diffimmune.methods.common import Context, Method

GENERATION_SEED = 20_000


class ESD(Method):
    name = "esd"

    def __init__(self, context: Context):
        super().__init__(context)
        self.x0 = [self.concept_latents(index) for index in range(len(context.concepts))]
        with torch.no_grad():
            self.empty = self.model.encode_prompts([""])

    def concept_latents(self, index: int) -> torch.Tensor:
        """The frozen model's own generations of concept `index`'s prompts, as denoiser inputs."""
        concept = self.context.concepts[index]
        seeds = [GENERATION_SEED + 100 * index + i for i in range(len(concept.prompts))]
        path = Path(self.context.out_dir) / f"esd_images_{index}.safetensors"
        images = cached_generations(self.model, concept.prompts, seeds, path)
        with torch.no_grad():
            return self.model.encode_images(images)

    def step(self, params, step, generator):
        index = step % len(self.x0)
        concept = self.context.concepts[index]
        chosen = torch.randint(0, len(self.x0[index]), (self.config.batch_size,), generator=generator)
        prompts = [concept.prompts[i] for i in chosen.tolist()]
        batch = Batch(self.x0[index][chosen], prompts)
        noise, timesteps = sample_noise_and_timesteps(self.model, batch, generator)
        x_t = self.model.scheduler.add_noise(batch.x0, noise, timesteps)
        condition = self.model.encode_prompts(prompts)
        target = esd_target(self.model, x_t, timesteps, condition, self.empty, self.config.negative_guidance)
        theta = {n: params[n] for n in self.theta_names}
        prediction = self.model.denoise(theta, x_t, timesteps, condition)
        return (prediction.float() - target.float()).pow(2).mean()
