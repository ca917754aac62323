"""timm integration: ATS as an in-place class swap of a timm ``VisionTransformer`` (ToMe style).

``apply(model, stages=range(3, 12), rho=1.0)`` gives the model, its blocks and their attention modules the
classes below (:func:`vitbench.patching.attach`: a subclass of the model's own class keeps its other methods);
parameters and ``state_dict`` keys are untouched, so pretrained timm weights load unchanged. After every forward
``model.record`` (:class:`ATSRecord`) holds, for each block and image, the realised token counts and (for ATS
blocks) the kept tokens as original token indices in the order the block outputs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn
from vitbench.patching import attach, qkv_heads

from . import sampling
from .tokens import TokenSets

MODES = ("official", "paper")
VARIANTS = ("topk", "self_attention", "no_vnorm", "random_row", "cls_not_enforced")


@dataclass(frozen=True)
class ATSConfig:
    """Where and how ATS runs. ``k[i]`` belongs to block ``stages[i]``: a ratio rho if ``<= 1``
    (``K_n = max(round(rho * N_n), 8)``), else an absolute K; K counts the CLS token."""

    stages: tuple[int, ...]
    k: tuple[float, ...]
    mode: str = "official"
    variant: frozenset[str] = frozenset()
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        unknown = set(self.variant) - set(VARIANTS)
        if unknown:
            raise ValueError(f"unknown ATS variant(s) {sorted(unknown)}; choose from {VARIANTS}")
        if len(self.k) != len(self.stages):
            raise ValueError("one K (or rho) per ATS stage is needed")
        if any(k <= 0 for k in self.k):
            raise ValueError(f"K and rho must be positive, got {self.k}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"ATS stages must be distinct, got {self.stages}")

    def k_of(self, block: int) -> float | None:
        return self.k[self.stages.index(block)] if block in self.stages else None


@dataclass
class ATSRecord:
    """Per-forward record, filled by the patched model (read by evaluation, FLOPs and figures).

    ``tokens_in[i]`` / ``tokens_out[i]``: ``[B]`` token counts (CLS included) entering / leaving block i;
    ``kept[i]``: ``[B, K'max]`` original token indices kept by ATS block i, output order, -1 padded.
    """

    config: ATSConfig
    grid: tuple[int, int] = (0, 0)
    n_ref: int = 0
    tokens_in: list[Tensor] = field(default_factory=list)
    tokens_out: list[Tensor] = field(default_factory=list)
    kept: dict[int, Tensor] = field(default_factory=dict)

    def reset(self, n_ref: int, grid: tuple[int, int]) -> None:
        self.n_ref, self.grid = n_ref, grid
        self.tokens_in, self.tokens_out, self.kept = [], [], {}

    def kept_indices(self, block: int) -> list[Tensor]:
        """Kept original token indices of ATS block ``block``, one tensor per image (output order)."""
        return [row[row >= 0] for row in self.kept[block]]

    def token_counts(self) -> tuple[Tensor, Tensor]:
        """``([B, depth], [B, depth])`` tokens entering and leaving every block."""
        return torch.stack(self.tokens_in, 1), torch.stack(self.tokens_out, 1)


class ATSAttention(Attention):
    """timm ``Attention`` on variable-length token sets, with the ATS sampling step.

    Modifications: takes packed rows plus their ``TokenSets`` layout; keys of padding are masked; the ATS
    step computes only the attention rows it needs (the score row, then ``O = A_s V`` for the kept queries
    with the fused ``scaled_dot_product_attention``); pretrained parameters are those of ``Attention``.
    """

    def heads(self, h: Tensor, tokens: TokenSets) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, k, v as ``[B, H, Nmax, d]`` (qkv runs on the valid rows only), and the padded ``[B, Nmax, 3C]`` qkv."""
        qkv = tokens.pad(self.qkv(h))
        return *qkv_heads(self, qkv), qkv

    def queries(self, qkv: Tensor, positions: Tensor) -> Tensor:
        """The queries of ``positions`` (``[B, K]``, -1 padded) as ``[B, H, K, d]``, gathered as whole rows."""
        B, N, _ = qkv.shape
        flat = (torch.arange(B, device=qkv.device)[:, None] * N + positions.clamp(min=0)).flatten()
        q = qkv.view(B * N, -1)[:, : self.attn_dim].index_select(0, flat)
        return self.q_norm(q.view(B, -1, self.num_heads, self.head_dim).transpose(1, 2))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
        )

    def output(self, o: Tensor, tokens: TokenSets) -> Tensor:
        """``[B, H, Nq, d]`` attention output -> projected rows in ``tokens``' layout."""
        B, _, N, _ = o.shape
        o = o.transpose(1, 2)
        o = tokens.pack(o.reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(self.norm(o)))

    def forward_tokens(self, h: Tensor, tokens: TokenSets) -> Tensor:
        """Plain multi-head self-attention on every image's own tokens."""
        q, k, v, _ = self.heads(h, tokens)
        return self.output(self.attend(q, k, v, tokens.key_mask()), tokens)

    def sample(self, h: Tensor, tokens: TokenSets, k_cfg: float, info: ATSRecord, block: int):
        """The ATS step (Sec. 3): score, sample, ``O = A_s V``. Returns (attention rows, positions, K'+1, the
        same counts as Python ints). The counts are read to the host once: the stage's only host sync."""
        q, k, v, qkv = self.heads(h, tokens)
        lin = sampling.linspace_rows(info.n_ref - 1, h.device) if info.config.mode == "official" else None
        positions, count = self.select(q, k, v, tokens.lengths, k_cfg, info.n_ref, lin, info.config, block)
        sizes = count.tolist()
        positions = positions[:, : max(sizes)]
        o = self.attend(self.queries(qkv, positions), k, v, tokens.key_mask())
        return o, positions, count, sizes

    @sampling.in_fp32
    def select(self, q: Tensor, k: Tensor, v: Tensor, n: Tensor, k_cfg: float, n_ref: int, lin: Tensor | None,
               cfg: ATSConfig, block: int) -> tuple[Tensor, Tensor]:
        """Score (Eq. 3) and sample (Eqs. 4-6) the tokens of every image: ``q, k, v`` ``[B, H, Nmax, d]``, ``n``
        the token counts, ``lin`` the official grid table (:func:`sampling.linspace_rows`). Returns the kept
        positions (CLS first when enforced; ``[B, W]``, -1 padded, ``W`` fixed by the shapes) and K'+1: a pure
        tensor function without host syncs (:func:`compile_ats` compiles it), in fp32 also under autocast."""
        attn = self.score_rows(q, k, n, cfg, block)  # [B, H, N]
        enforce = "cls_not_enforced" not in cfg.variant
        first = 1 if enforce else 0
        n_cand = n - first
        if "no_vnorm" in cfg.variant:
            v_norm = torch.ones_like(attn if cfg.mode == "paper" else attn[:, 0])
        else:
            v_norm = sampling.value_norms(v.float(), per_head=cfg.mode == "paper")
        cand = (attn[..., first:], v_norm[..., first:])
        if cfg.mode == "paper":
            scores = sampling.significance_scores_per_head(*cand, n_cand)
        else:
            scores = sampling.significance_scores(*cand, n_cand)
        ks = sampling.stage_k_tensor(n, k_cfg)
        points = ks - 1
        if "topk" in cfg.variant:
            sel, count = sampling.topk_select(scores, n_cand, points)
        elif cfg.mode == "paper":
            sel, count = sampling.paper_select(scores, n_cand, points)
        else:
            points = torch.where(ks == n, n_ref - 1, points)
            sel, count = sampling.official_select(scores, n_cand, points, lin)
        if enforce:
            positions = torch.cat([sel.new_zeros(sel.shape[0], 1), torch.where(sel >= 0, sel + 1, -1)], 1)
            return positions, count + 1
        rank = torch.where(sel < 0, 2, torch.where(sel == 0, 0, 1))  # the CLS competes; if kept it goes first
        return sel.gather(1, rank.sort(dim=-1, stable=True).indices), count

    def score_rows(self, q: Tensor, k: Tensor, n: Tensor, cfg: ATSConfig, block: int) -> Tensor:
        """Attention weights that score the tokens, ``[B, H, N]``: the CLS row (Sec. 3.1) or an ablation."""
        eps = sampling.OFFICIAL_EPS if cfg.mode == "official" else None
        if "self_attention" in cfg.variant:  # column sums of the full matrix (Fig. 3 "self-attention")
            valid = sampling.valid_mask(n, k.shape[2])
            logits = (q @ k.transpose(-2, -1)) * self.scale
            attn = logits.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)
            return (attn * valid[:, None, :, None]).sum(-2)
        if "random_row" in cfg.variant:  # one fixed random relative non-CLS query position per block
            u = torch.rand((), generator=torch.Generator().manual_seed(cfg.seed * 1000 + block)).item()
            row = torch.minimum(1 + ((n - 1).double() * u).long(), (n - 1).clamp(min=0))
            q_row = q.gather(2, row[:, None, None, None].expand(-1, q.shape[1], 1, q.shape[3]))
            return sampling.cls_attention(q_row, k, self.scale, n, eps)
        return sampling.cls_attention(q[:, :, :1], k, self.scale, n, eps)


class ATSBlock(Block):
    """timm ``Block`` on variable-length token sets; an ATS stage when its index is in the config.

    Modifications: the attention branch of an ATS stage outputs only the kept rows (``O = A_s V``) and the
    residual keeps the matching input rows (pre-LN, as in the released ``ATSBlock``); drop-path is per image.
    """

    def forward_tokens(self, tokens: TokenSets, info: ATSRecord, block: int) -> TokenSets:
        k_cfg = info.config.k_of(block)
        info.tokens_in.append(tokens.lengths)
        if k_cfg is None and tokens.uniform:
            out = TokenSets(self(tokens.x), tokens.lengths, tokens.origin, tokens.sizes)  # timm's Block.forward
        elif k_cfg is None:
            attn = self.attn.forward_tokens(self.norm1(tokens.x), tokens)
            x = tokens.x + tokens.drop_path(self.ls1(attn), self.drop_path1)
            out = TokenSets(x, tokens.lengths, tokens.origin, tokens.sizes)
            out.x = x + out.drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path2)
        else:
            o, positions, count, sizes = self.attn.sample(self.norm1(tokens.x), tokens, k_cfg, info, block)
            residual = tokens.x.flatten(0, -2).index_select(0, tokens.rows_of(positions, count, sizes))
            out = tokens.select(residual, positions, count, sizes)
            x = out.x + out.drop_path(self.ls1(self.attn.output(o, out)), self.drop_path1)
            out.x = x + out.drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path2)
            info.kept[block] = out.origin.detach()
        info.tokens_out.append(out.lengths)
        return out


class ATSVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` whose blocks run on per-image token sets.

    Modifications: ``forward_features`` threads a ``TokenSets`` through the blocks and records
    ``record``; everything before the blocks and after them is timm's own code.
    """

    record: ATSRecord

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, *,
                         hidden: Tensor | None = None, start: int = 0) -> Tensor:
        """timm's ``forward_features`` on token sets. ``hidden``: the output of the first ``start`` blocks for these
        images (``start`` = 0: the embedding; the blocks before the first ATS stage run dense, see
        :func:`dense_hidden`), from which the forward resumes; it lets configurations of the same weights share
        those blocks."""
        if attn_mask is not None or is_causal:
            raise ValueError("ATS models do not take an attention mask")
        if self.grad_checkpointing and self.training:
            raise ValueError("gradient checkpointing is not supported with ATS")
        grid = self.patch_embed.dynamic_feat_size(x.shape[-2:]) if self.dynamic_img_size else self.patch_embed.grid_size
        x = embed(self, x) if hidden is None else hidden
        return self.norm(run_blocks(self.blocks, x, self.record, tuple(grid), start, hidden is not None))


def run_blocks(blocks: Sequence[ATSBlock], x: Tensor, record: ATSRecord, grid: tuple[int, int], start: int = 0,
               resumed: bool = False) -> Tensor:
    """``blocks[start:]`` on per-image token sets from ``x`` ``[B, N, C]`` (CLS first; the output of
    ``blocks[:start]``, which ``resumed`` says were run elsewhere), recording every block's token counts and the
    ATS stages' kept tokens in ``record``; returns the last block's tokens, ``[B, K'max, C]`` padded."""
    if start > min(record.config.stages, default=len(blocks)) or (start and not resumed):
        raise ValueError("hidden states can only skip the dense blocks before the first ATS stage")
    record.reset(x.shape[1], grid)
    tokens = TokenSets.full(x)
    record.tokens_in += [tokens.lengths] * start
    record.tokens_out += [tokens.lengths] * start
    for i, blk in enumerate(blocks):
        if i >= start:
            tokens = blk.forward_tokens(tokens, record, i)
    return tokens.padded()


def embed(model: nn.Module, x: Tensor) -> Tensor:
    """The input of ``model.blocks[0]``: timm's token embedding (patches, CLS, positions, pre-norm), or the
    backbone's own ``embed_tokens`` where it has one (:mod:`ats.backbones`, e.g. CvT's stages 1-2 and stage-3
    embedding)."""
    if hasattr(model, "embed_tokens"):
        return model.embed_tokens(x)
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))


def dense_hidden(model: nn.Module, x: Tensor, stop: int, hidden: Tensor | None = None,
                 start: int = 0) -> Tensor:
    """Output of blocks ``start..stop-1`` run dense (timm's ``Block.forward``) on ``hidden``, the output of the first
    ``start`` blocks for ``x`` (default: the embedding of ``x``); ``model`` is dense or ATS-patched (its blocks
    ``start..stop-1`` then precede its first ATS stage)."""
    h = embed(model, x) if hidden is None else hidden
    for blk in model.blocks[start:stop]:
        h = blk(h)
    return h


def compile_ats(model: nn.Module, **options) -> nn.Module:
    """``torch.compile`` (in place, ``state_dict`` keys unchanged) the parts of an ATS model that gain from it.

    Whole blocks run compiled while every image still has all its tokens, and each stage's scoring and sampling
    (:meth:`ATSAttention.select`, some 200 small ops eager) is one graph with dynamic token counts
    (``dynamic=True``: one graph for every count). The layers after a stage's host read stay eager: compiled with
    dynamic counts they were no faster on CPU (the matrix products are the same library calls, and each compiled
    call costs a guard check). A whole-model ``torch.compile`` breaks its graph at each of those reads (their values
    are output shapes) and recompiles for each new set of counts. ``options`` go to ``torch.compile`` (e.g.
    ``mode``, ``backend``)."""
    if not all(isinstance(blk, ATSBlock) for blk in model.blocks):
        raise TypeError("compile_ats needs a model patched with ats.apply")
    options = {"dynamic": True, **options}
    for blk in model.blocks:
        blk.compile(**options)
        blk.attn.select = torch.compile(blk.attn.select, **options)
    return model


def check_structure(model: nn.Module) -> None:
    """Refuse a model ATS cannot patch: it needs a timm ``VisionTransformer`` whose one CLS token is read by the
    classifier, with plain timm blocks (or ATS-patched ones)."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"ATS patches a timm VisionTransformer, got {type(model).__name__}")
    if model.cls_token is None or model.num_prefix_tokens != 1 or model.global_pool != "token":
        raise ValueError("ATS needs exactly one prefix token, the CLS token, read by the classifier "
                         "(global_pool='token'); distilled / register / pooled ViTs are not supported")
    if model.attn_pool is not None or not isinstance(model.patch_drop, nn.Identity):
        raise ValueError("ATS does not support attention pooling or patch dropout")
    check_blocks(model.blocks)


def check_blocks(blocks: Sequence[nn.Module]) -> None:
    """Refuse blocks ATS cannot patch: plain timm ``Block`` with ``Attention`` (or ATS-patched ones, and the ATS
    block subclasses of :mod:`ats.backbones`, e.g. EViT's reorganising blocks), no gate."""
    for i, blk in enumerate(blocks):
        if not (type(blk) is Block or isinstance(blk, ATSBlock)) or type(blk.attn) not in (Attention, ATSAttention):
            raise TypeError(f"block {i} is {type(blk).__name__}/{type(blk.attn).__name__}; "
                            "ATS supports timm Block with Attention")
        if blk.attn.gate is not None:
            raise ValueError("gated attention is not supported")


def schedule(stages: Iterable[int], rho: float | None, k: float | Sequence[float] | None,
             depth: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Checked ``(stages, per-stage K or rho)`` of an ATS configuration on a ``depth``-block model (default rho 1)."""
    stages = tuple(int(s) for s in stages)
    if any(not 0 <= s < depth for s in stages):
        raise ValueError(f"ATS stages {stages} outside the model's {depth} blocks")
    if rho is not None and k is not None:
        raise ValueError("give rho or k, not both")
    if rho is not None and not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if k is None:
        return stages, (1.0 if rho is None else float(rho),) * len(stages)
    ks = tuple(float(v) for v in k) if isinstance(k, Sequence) else (float(k),) * len(stages)
    if any(v < 2 for v in ks):
        raise ValueError(f"an absolute K must be >= 2 (use rho for ratios), got {ks}")
    return stages, ks


def apply(
    model: VisionTransformer,
    stages: Iterable[int] = range(3, 12),
    rho: float | None = None,
    k: float | Sequence[float] | None = None,
    mode: str = "official",
    variant: str | Iterable[str] = (),
    seed: int = 0,
) -> VisionTransformer:
    """Patch ``model`` in place with ATS at ``stages`` (0-based block indices) and return it.

    Give either ``rho`` (multi-stage, ``K_n = max(round(rho * N_n), 8)``) or ``k`` (absolute K per stage, an
    int or one value per stage; K counts the CLS); the default is rho = 1 (the released configuration).
    ``mode``: ``"official"`` (released code) or ``"paper"`` (Eqs. 3-6). ``variant``: ablations from
    ``VARIANTS`` (a name or several). Calling it again on a patched model reconfigures it.
    """
    check_structure(model)
    return attach_ats(model, ATSVisionTransformer, stages, rho, k, mode, variant, seed)


def attach_ats(model: nn.Module, mixin: type, stages: Iterable[int], rho: float | None,
               k: float | Sequence[float] | None, mode: str, variant: str | Iterable[str], seed: int) -> nn.Module:
    """Give ``model`` its ATS ``mixin`` (a ``forward_features`` that runs :func:`run_blocks`), a fresh
    :class:`ATSRecord` and ATS blocks in ``model.blocks``; the arguments are :func:`apply`'s."""
    stages, ks = schedule(stages, rho, k, len(model.blocks))
    variants = frozenset([variant] if isinstance(variant, str) else variant)
    model.record = ATSRecord(ATSConfig(stages, ks, mode, variants, seed))
    attach(model, mixin)
    for blk in model.blocks:
        attach(blk, ATSBlock)
        attach(blk.attn, ATSAttention)
    return model
