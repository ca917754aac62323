"""ATS inside other backbone families of the paper, each a model on timm layers registered with timm, with its
checkpoint-layout converter and its ATS placement; every one uses the same :mod:`ats.sampling` functions and
records per-image token counts in :class:`ats.patch.ATSRecord`."""

from . import cvt  # noqa: F401  (registers cvt_13_224, cvt_21_224, cvt_13_384, cvt_21_384 with timm)
