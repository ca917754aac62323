"""Common bench for ViT token-reduction methods: data, FLOPs, throughput, the training loop.

Importing vitbench registers the embedded backbone ``vit_digits_patch8_112`` with timm.
"""

from . import models  # noqa: F401  (registers the embedded backbone with timm)
from .data import build_dataset, build_eval_loader, data_defaults, parse_data_spec
from .flops import ViTGeometry, block_macs, flop_counter_gmacs, vit_gmacs
from .models import create_model, load_checkpoint
from .throughput import compare, measure

__version__ = "0.1.0"
__all__ = [
    "ViTGeometry", "block_macs", "build_dataset", "build_eval_loader", "compare", "create_model", "data_defaults",
    "flop_counter_gmacs", "load_checkpoint", "measure", "parse_data_spec", "vit_gmacs",
]
