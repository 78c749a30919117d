"""`DiffusionModel`: one text-to-image diffusion model in the Stable Diffusion layout (unet, text_encoder,
tokenizer, optional vae, scheduler), seen as a dict of named parameters plus a frozen rest.

Parameters are named `unet.<path>` and `text_encoder.<path>`. Every algorithm passes a dict of replaced
parameters to `denoise` / `encode_prompts`, which call the modules with them in place of their own
(`torch.func.functional_call`'s swap; the denoiser's through slots found once), so inner steps are pure
functions of that dict and hypergradients are ordinary autograd.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.func import functional_call

from diffimmune.errors import DiffImmuneError
from diffimmune.files import atomic_folder, read_json
from diffimmune.models.loading import check_model_folder, check_safetensors_file, looks_like_hub_id

COMPONENT_PREFIXES = ("unet.", "text_encoder.")
DELTA_FORMAT = "diffimmune-delta/1"


def quiet_libraries() -> None:
    """diffusers/transformers print progress bars and advice on every load; the CLI has its own."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def dtype_keyword() -> str:
    """diffusers renamed `torch_dtype` to `dtype` (the old name now warns); use what this version knows."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tensor_sha256(tensor: Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def strip_prefix(params: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    cut = len(prefix)
    return {name[cut:]: value for name, value in params.items() if name.startswith(prefix)}


class DiffusionModel:
    """A text-to-image diffusion model: components, noise schedule, encoders, denoiser and sampler."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler, vae=None, source: str = "<in memory>"):
        from diffusers import DDPMScheduler

        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.pipeline_scheduler = scheduler
        # Training always adds noise with the DDPM forward process of the model's own schedule.
        self.scheduler = DDPMScheduler.from_config(scheduler.config)
        self.source = source
        for module in self.modules():
            module.requires_grad_(False)
            module.eval()

    # ----------------------------------------------------------------- construction and persistence
    @classmethod
    def from_pipeline(cls, pipeline, source: str = "<in memory>") -> DiffusionModel:
        missing = [
            name
            for name in ("unet", "text_encoder", "tokenizer", "scheduler")
            if getattr(pipeline, name, None) is None
        ]
        if missing:
            raise DiffImmuneError(
                f"{source} is a {type(pipeline).__name__} without {', '.join(missing)}; diffimmune needs the "
                "Stable Diffusion layout (unet, text_encoder, tokenizer, vae, scheduler)"
            )
        return cls(
            unet=pipeline.unet,
            text_encoder=pipeline.text_encoder,
            tokenizer=pipeline.tokenizer,
            scheduler=pipeline.scheduler,
            vae=getattr(pipeline, "vae", None),
            source=source,
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        *,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> DiffusionModel:
        """Load a diffusers pipeline folder or hub id. Pickle weights and remote code are refused
        unless the caller opts in; every other problem is a one-line `DiffImmuneError`."""
        from diffusers import DiffusionPipeline

        quiet_libraries()
        text = str(path_or_id)
        path = Path(text).expanduser()
        kwargs: dict = {"trust_remote_code": trust_remote_code}
        # float32 unless asked otherwise: a folder stored in float16 (like the shipped world model) is
        # upcast whole, text encoder included, which transformers would otherwise leave in float16.
        kwargs[dtype_keyword()] = dtype or torch.float32
        kwargs["use_safetensors"] = None if allow_pickle else True
        if path.exists() or not looks_like_hub_id(text):
            index = check_model_folder(path, allow_pickle)
            class_name = index.get("_class_name", "")
            import diffusers

            if not hasattr(diffusers, class_name) and not trust_remote_code:
                raise DiffImmuneError(
                    f"{path}/model_index.json names pipeline class '{class_name}', which is not in diffusers; "
                    "loading it would run the folder's own code: pass --trust-remote-code if you trust it"
                )
            # Components stored as null (no vae, no safety checker) must be passed as None explicitly.
            for name, spec in index.items():
                if not name.startswith("_") and isinstance(spec, list) and spec[0] is None:
                    kwargs[name] = None
            source = str(path.resolve())
            target = str(path)
        else:
            source = target = text
        try:
            pipeline = DiffusionPipeline.from_pretrained(target, **kwargs)
        except DiffImmuneError:
            raise
        except Exception as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            where = "local folder" if path.exists() else "hub id (is this machine offline?)"
            raise DiffImmuneError(f"could not load model {text} as a {where}: {message}") from None
        model = cls.from_pipeline(pipeline, source=source)
        return model.to(device or default_device())

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.text_encoder, self.vae) if m is not None]

    def to(self, device: str | torch.device) -> DiffusionModel:
        for module in self.modules():
            module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def as_pipeline(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.pipeline_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write an ordinary diffusers folder (safetensors only), atomically."""
        quiet_libraries()
        target = Path(directory)
        with atomic_folder(target) as temporary:
            self.as_pipeline().save_pretrained(temporary, safe_serialization=True)
        return target

    # ----------------------------------------------------------------- parameters
    def named_parameters(self) -> dict[str, Tensor]:
        """Every trainable tensor of the denoiser and the text encoder, by its qualified name."""
        named = {f"unet.{n}": p for n, p in self.unet.named_parameters()}
        named.update({f"text_encoder.{n}": p for n, p in self.text_encoder.named_parameters()})
        return named

    def snapshot(self, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        """Detached copies of the current values (the reference a delta is taken against)."""
        named = self.named_parameters()
        return {n: named[n].detach().clone() for n in (names if names is not None else named)}

    @torch.no_grad()
    def load_parameters(self, values: dict[str, Tensor]) -> None:
        named = self.named_parameters()
        unknown = sorted(set(values) - set(named))
        if unknown:
            raise DiffImmuneError(
                f"parameter {unknown[0]} does not exist in this model; check the delta's base model"
            )
        for name, value in values.items():
            if named[name].shape != value.shape:
                raise DiffImmuneError(
                    f"parameter {name} has shape {tuple(value.shape)}, the model has {tuple(named[name].shape)}"
                )
            named[name].copy_(value)

    # ----------------------------------------------------------------- encoders
    @property
    def max_prompt_length(self) -> int:
        length = getattr(self.tokenizer, "model_max_length", 77)
        positions = getattr(self.text_encoder.config, "max_position_embeddings", length)
        return int(min(length, positions))

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Token ids [B, L]; each prompt is tokenized once and remembered (training repeats prompts)."""
        cache = self.__dict__.setdefault("_token_cache", {})
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            if len(cache) > 50_000:
                cache.clear()
            ids = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.max_prompt_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            cache.update(zip(missing, ids, strict=True))
        return torch.stack([cache[p] for p in prompts]).to(self.device)

    def encode_prompts(self, prompts: Sequence[str], params: dict[str, Tensor] | None = None) -> Tensor:
        """Text embeddings [B, L, D] as the Stable Diffusion pipeline computes them (last hidden state)."""
        ids = self.tokenize(prompts)
        replaced = strip_prefix(params, "text_encoder.") if params else {}
        if replaced:
            output = functional_call(self.text_encoder, replaced, (ids,), tie_weights=False, strict=False)
        else:
            output = self.text_encoder(ids)
        return output[0]

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 1.0)) if self.vae is not None else 1.0

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images [B,3,H,W] in [0,1] -> the denoiser's space (scaled VAE latents, or pixels in [-1,1]).
        Without a generator the latent is the posterior mean, so encoding is deterministic."""
        if self.vae is None:
            return images.to(self.device, self.dtype) * 2 - 1
        pixels = images.to(self.device, self.vae.dtype) * 2 - 1
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.mean if generator is None else posterior.sample(generator)
        return (latents * self.latent_scale).to(self.dtype)

    def decode(self, x0: Tensor) -> Tensor:
        """The denoiser's space -> images [B,3,H,W] in [0,1]."""
        pixels = (
            x0 if self.vae is None else self.vae.decode((x0 / self.latent_scale).to(self.vae.dtype)).sample
        )
        return (pixels / 2 + 0.5).clamp(0, 1)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, height, width)

    @property
    def image_size(self) -> int:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        return self.sample_shape[1] * factor

    # ----------------------------------------------------------------- denoiser
    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def denoise(
        self, params: dict[str, Tensor] | None, x_t: Tensor, t: Tensor, text_embeddings: Tensor
    ) -> Tensor:
        """The denoiser's prediction with `params` replacing the model's own tensors of the same name."""
        replaced = strip_prefix(params, "unet.") if params else {}
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        kwargs = {"encoder_hidden_states": text_embeddings, "return_dict": False}
        if not replaced:
            return self.unet(x_t, t, **kwargs)[0]
        slots = self._parameter_slots()
        if not all(name in slots for name in replaced):
            return functional_call(self.unet, replaced, (x_t, t), kwargs, tie_weights=False, strict=False)[0]
        # What functional_call does for parameters (put each tensor in its module's parameter table for
        # the call, then put the original back), through slots found once: swapping the whole denoiser's
        # few hundred tensors that way costs a few ms per call, a sizeable part of a small model's step.
        saved = []
        try:
            for name, value in replaced.items():
                table, leaf = slots[name]
                saved.append((table, leaf, table[leaf]))
                table[leaf] = value
            return self.unet(x_t, t, **kwargs)[0]
        finally:
            for table, leaf, original in reversed(saved):
                table[leaf] = original

    def _parameter_slots(self) -> dict[str, tuple[dict, str]]:
        """Every denoiser parameter's (module parameter table, name in it), by its path; found once per
        denoiser module."""
        cached = self.__dict__.get("_slot_cache")
        if cached is None or cached[0] is not self.unet:
            slots = {}
            for path, module in self.unet.named_modules(remove_duplicate=False):
                for leaf, value in module._parameters.items():
                    if value is not None:
                        slots[f"{path}.{leaf}" if path else leaf] = (module._parameters, leaf)
            cached = (self.unet, slots)
            self.__dict__["_slot_cache"] = cached
        return cached[1]

    # ----------------------------------------------------------------- sampling
    def make_sampler(self, sampler: str = "ddim"):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        samplers = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}
        if sampler == "pipeline":
            return type(self.pipeline_scheduler).from_config(self.pipeline_scheduler.config)
        if sampler not in samplers:
            raise DiffImmuneError(f"unknown sampler '{sampler}'; choose one of ddim, dpm, pipeline")
        return samplers[sampler].from_config(self.scheduler.config)

    def initial_noise(self, seeds: Sequence[int]) -> Tensor:
        """One noise tensor per seed, drawn on the CPU so a seed gives the same image on any device."""
        noise = [
            torch.randn((1, *self.sample_shape), generator=torch.Generator().manual_seed(int(s)))
            for s in seeds
        ]
        return torch.cat(noise).to(self.device, self.dtype)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        steps: int = 25,
        guidance_scale: float = 5.0,
        batch_size: int = 32,
        params: dict[str, Tensor] | None = None,
        sampler: str = "ddim",
        negative_prompt: str = "",
        progress=None,
    ) -> Tensor:
        """Images [N,3,H,W] in [0,1] on the CPU; image i uses seeds[i] (default: its index)."""
        prompts = list(prompts)
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise DiffImmuneError(
                f"generate got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt"
            )
        images = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            latents = self.initial_noise(seeds[start : start + batch_size])
            x0 = self.sample(chunk, latents, steps, guidance_scale, params, sampler, negative_prompt)
            images.append(self.decode(x0).float().cpu())
            if progress is not None:
                progress(len(chunk))
        return torch.cat(images) if images else torch.empty(0, 3, self.image_size, self.image_size)

    def sample(
        self,
        prompts,
        latents,
        steps,
        guidance_scale,
        params=None,
        sampler="ddim",
        negative_prompt="",
        on_state=None,
    ):
        """The Stable Diffusion sampling loop with classifier-free guidance, from given initial noise.

        ``on_state(model_input, t)``, if given, sees every state the denoiser is called at (before the
        guidance doubling) with its timestep."""
        scheduler = self.make_sampler(sampler)
        scheduler.set_timesteps(steps, device=self.device)
        condition = self.encode_prompts(prompts, params)
        guided = guidance_scale > 1.0
        if guided:
            unconditional = self.encode_prompts([negative_prompt] * len(prompts), params)
            condition = torch.cat([unconditional, condition])
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            if on_state is not None:
                on_state(scheduler.scale_model_input(latents, t), t)
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            prediction = self.denoise(params, model_input, t, condition)
            if guided:
                uncond, cond = prediction.chunk(2)
                prediction = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
        return latents

    # ----------------------------------------------------------------- deltas
    def save_delta(
        self,
        directory: str | os.PathLike,
        reference: dict[str, Tensor],
        *,
        method: str = "",
        selection: str = "",
        hyperparameters: dict | None = None,
        extra: dict | None = None,
    ) -> Path:
        """Store the tensors that differ from `reference` (a `snapshot` taken before the change) as
        safetensors, with a manifest naming the base model, what changed and the hashes of both sides."""
        named = self.named_parameters()
        changed = {n: named[n] for n in reference if not torch.equal(named[n], reference[n])}
        return write_delta(
            directory,
            changed,
            reference,
            base_model=self.source,
            method=method,
            selection=selection,
            hyperparameters=hyperparameters,
            extra=extra,
        )

    def load_delta(self, directory: str | os.PathLike, check_base: bool = True) -> dict:
        """Apply a delta written by `save_delta` to this model in place; return its manifest."""
        from safetensors.torch import load_file

        manifest = read_delta_manifest(directory)
        weights_path = Path(directory) / "delta.safetensors"
        check_safetensors_file(weights_path)
        values = load_file(str(weights_path))
        if sorted(values) != manifest["changed"]:
            raise DiffImmuneError(
                f"{weights_path} does not hold the tensors its manifest lists; re-export the delta"
            )
        named = self.named_parameters()
        for name in manifest["changed"]:
            if name not in named:
                raise DiffImmuneError(
                    f"delta {directory} changes {name}, which this model lacks; load base {manifest['base_model']}"
                )
            if tensor_sha256(values[name]) != manifest["sha256"][name]:
                raise DiffImmuneError(
                    f"{weights_path}: tensor {name} does not match its hash; the file is corrupt"
                )
            if check_base and tensor_sha256(named[name]) != manifest["base_sha256"][name]:
                raise DiffImmuneError(
                    f"delta {directory} was made for another base model ({name} differs); "
                    f"load it onto {manifest['base_model']}"
                )
        self.load_parameters({n: v.to(self.device, named[n].dtype) for n, v in values.items()})
        return manifest

    @classmethod
    def from_delta(
        cls, directory: str | os.PathLike, base: str | None = None, **load_options
    ) -> DiffusionModel:
        manifest = read_delta_manifest(directory)
        # The base may itself be a delta (an immunized model made on an erased one): load it the same way.
        model = load_model(base or manifest["base_model"], **load_options)
        model.load_delta(directory)
        model.source = str(Path(directory).resolve())
        return model


RUN_DELTA = "delta"  # where an immunization run folder keeps its result


def load_model(path_or_id: str | os.PathLike, **load_options) -> DiffusionModel:
    """A diffusers folder or hub id, a delta folder (applied onto the base its manifest names), or a run
    folder of `diffimmune immunize` (its `delta/`)."""
    path = Path(path_or_id)
    if (path / RUN_DELTA / "manifest.json").is_file() and not (path / "manifest.json").is_file():
        path = path / RUN_DELTA
    if (path / "manifest.json").is_file() and not (path / "model_index.json").is_file():
        return DiffusionModel.from_delta(path, **load_options)
    return DiffusionModel.from_pretrained(path_or_id, **load_options)


def read_delta_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise DiffImmuneError(
            f"{directory} is not a diffimmune delta (no manifest.json); pass a folder save_delta wrote"
        )
    manifest = read_json(path, "re-export the delta")
    if manifest.get("format") != DELTA_FORMAT:
        raise DiffImmuneError(f"{path} has format {manifest.get('format')!r}, expected {DELTA_FORMAT!r}")
    return manifest


def write_delta(
    directory: str | os.PathLike,
    changed: dict[str, Tensor],
    base_values: dict[str, Tensor],
    *,
    base_model: str,
    method: str = "",
    selection: str = "",
    hyperparameters: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write changed tensors (by qualified name) and a manifest with the hashes of the new values and
    of the base values they replace, atomically."""
    from safetensors.torch import save_file

    from diffimmune import __version__

    values = {n: t.detach().cpu().contiguous() for n, t in changed.items()}
    manifest = {
        "format": DELTA_FORMAT,
        "diffimmune_version": __version__,
        "base_model": base_model,
        "method": method,
        "selection": selection,
        "hyperparameters": hyperparameters or {},
        "changed": sorted(values),
        "base_sha256": {n: tensor_sha256(base_values[n]) for n in sorted(values)},
        "sha256": {n: tensor_sha256(v) for n, v in sorted(values.items())},
        **(extra or {}),
    }
    target = Path(directory)
    with atomic_folder(target) as temporary:
        save_file(values, str(temporary / "delta.safetensors"), metadata={"format": DELTA_FORMAT})
        (temporary / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return target
