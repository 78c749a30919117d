"""diffimmune: immunize text-to-image diffusion models against malicious fine-tuning."""

from diffimmune.errors import DiffImmuneError

__version__ = "0.1.0"
__all__ = ["DiffImmuneError", "__version__"]
