"""Life Regression based patch slimming for timm vision transformers (Chen et al.).

    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    liferegress.apply(model, keep_rate=0.7, temperature=1.5)
    logits = model(images)          # soft weights while training, hard pruning in eval
    model.record.lives              # (B, 197) lives in layer units
    model.record.kept_indices       # original token indices kept from blocks 4, 7, 10 on

The paper's configurations are timm names too (``liferegress.registry``):
``timm.create_model("deit_small_patch16_224_liferegress_rho07", pretrained=True)``.
"""

from .checkpoint import convert_state_dict, load_checkpoint, read_config, save_checkpoint
from .life import (
    DEFAULT_DROP_LAYERS,
    global_importance,
    keep_order,
    keep_schedule,
    kept_indices,
    life_statistics,
    lives_from_scores,
    log_soft_weights,
    soft_weights,
    step_weights,
    tokens_per_block,
)
from . import registry  # noqa: F401  (registers the paper's configurations with timm)
from .patch import (
    MODES,
    LifePredictor,
    LifeRecord,
    LifeRegressionConfig,
    apply,
    check_structure,
    is_patched,
    set_mode,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_DROP_LAYERS",
    "MODES",
    "LifePredictor",
    "LifeRecord",
    "LifeRegressionConfig",
    "apply",
    "check_structure",
    "convert_state_dict",
    "global_importance",
    "is_patched",
    "keep_order",
    "keep_schedule",
    "kept_indices",
    "life_statistics",
    "lives_from_scores",
    "load_checkpoint",
    "log_soft_weights",
    "read_config",
    "save_checkpoint",
    "set_mode",
    "soft_weights",
    "step_weights",
    "tokens_per_block",
]
