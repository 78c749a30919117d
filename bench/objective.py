"""Benchmark: the diffusion loss through `functional_call` against the module's own forward, both
with a backward pass, on the tiny model, side by side in one run. Target ratio <= 1.05.

    python bench/objective.py [--model DIR] [--repeats 30] [--batch 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffimmune.core.objective import Batch, diffusion_loss
from diffimmune.models.diffusion_model import DiffusionModel, quiet_libraries
from diffimmune.models.params import trainable_parameters
from diffimmune.models.tiny import build_tiny_pipeline


def module_step(model, batch, noise, timesteps, text_ids):
    """The reference: the modules called directly, gradients by loss.backward()."""
    x_t = model.scheduler.add_noise(batch.x0, noise, timesteps)
    embeddings = model.text_encoder(text_ids)[0]
    prediction = model.unet(x_t, timesteps, encoder_hidden_states=embeddings).sample
    loss = (prediction - noise).pow(2).flatten(1).mean(1).mean()
    loss.backward()


def functional_step(model, params, batch):
    loss = diffusion_loss(model, params, batch)
    grads = torch.autograd.grad(loss, list(params.values()))
    for tensor, grad in zip(params.values(), grads, strict=True):
        tensor.grad = grad


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="diffusers folder (default: a tiny model built in memory)"
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--selection", default="unet")
    args = parser.parse_args()
    quiet_libraries()
    torch.manual_seed(0)
    if args.model:
        model = DiffusionModel.from_pretrained(args.model)
    else:
        model = DiffusionModel.from_pipeline(build_tiny_pipeline(image_size=32))
    params = trainable_parameters(model, args.selection)
    size = model.image_size
    images = torch.rand(args.batch, 3, size, size)
    prompts = ["a red star in stripes style"] * args.batch
    x0 = model.encode_images(images)
    noise = torch.randn_like(x0)
    timesteps = torch.randint(0, 1000, (args.batch,))
    batch = Batch(x0=x0, prompts=prompts, noise=noise, timesteps=timesteps)
    text_ids = model.tokenize(prompts)
    timings = {"module": [], "functional": []}
    for repeat in range(args.repeats + 3):
        # Alternate the two so that drifts of the machine affect both alike.
        for name in ("module", "functional") if repeat % 2 == 0 else ("functional", "module"):
            for tensor in params.values():
                tensor.grad = None
            start = time.perf_counter()
            if name == "module":
                module_step(model, batch, noise, timesteps, text_ids)
            else:
                functional_step(model, params, batch)
            if repeat >= 3:  # warm-up
                timings[name].append(time.perf_counter() - start)
    module = statistics.median(timings["module"])
    functional = statistics.median(timings["functional"])
    print(f"model: {model.source}, selection {args.selection}, batch {args.batch}, {args.repeats} repeats")
    print(f"module forward+backward      {module * 1000:8.2f} ms (median)")
    print(f"functional_call fwd+bwd      {functional * 1000:8.2f} ms (median)")
    print(f"ratio functional / module    {functional / module:8.3f}   (target <= 1.05)")


if __name__ == "__main__":
    main()
