"""ATS on video: TimeSformer and X-ViT on timm layers (registered with timm on import), their checkpoint readers,
ATS on them, their FLOPs, and the video side of ``ats-eval`` / ``ats-train`` (ATS paper, Tables 2, 3 and A.2).

    import timm, ats.video
    model = timm.create_model("timesformer_l_patch16_224")
    ats.video.load_released(model, "TimeSformer_divST_96x4_224_K400.pyth")   # the authors' checkpoint
    ats.video.apply(model, rho=0.7)       # stages: TimeSformer 3..5, X-ViT 3..11
"""

from .checkpoint import convert_released, inflate_image_state, load_released, load_video_checkpoint
from .models import VIDEO_MODELS, TimeSformer, VideoTransformer, XViT
from .patch import STAGES, VideoATSRecord, apply, compile_ats

__all__ = [
    "STAGES", "VIDEO_MODELS", "TimeSformer", "VideoATSRecord", "VideoTransformer", "XViT", "apply", "compile_ats",
    "convert_released", "inflate_image_state", "load_released", "load_video_checkpoint",
]
