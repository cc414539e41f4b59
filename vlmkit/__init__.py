"""vlmkit: run, serve and fine-tune vision-language models."""

from vlmkit.models import load_model, load_processor
from vlmkit.vlm import VLM
from vlmkit.weights import CheckpointError

__version__ = "0.1.0"
__all__ = ["VLM", "CheckpointError", "load_model", "load_processor"]
