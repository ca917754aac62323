"""ATS inside other backbone families of the paper, each a model on timm layers registered with timm, with its
checkpoint-layout converter and its ATS placement; every one uses the same :mod:`ats.sampling` functions and
records per-image token counts in :class:`ats.patch.ATSRecord`."""
