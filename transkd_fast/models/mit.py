"""Mix Transformer (MiT) backbones B0…B5 of SegFormer, with NVlabs ``mix_transformer.py`` names.

Per stage i (1…4), with tokens ``x`` ``[B, N_i, C_i]`` on an ``H_i × W_i`` grid::

    x, H_i, W_i = patch_embed{i}(feat)           Conv2d(k7 s4 p3 | k3 s2 p1) + LayerNorm(eps 1e-5)
    for blk in block{i}:
        x = x + drop_path(blk.attn(blk.norm1(x)))     efficient attention, below
        x = x + drop_path(blk.mlp(blk.norm2(x)))      fc1 → dwconv.dwconv (3×3 depthwise) → GELU → fc2
    feat = norm{i}(x) viewed as [B, C_i, H_i, W_i]

``attn``: ``q`` Linear(C, C); when sr > 1, ``sr`` Conv2d(C, C, k=s=sr) on the spatial view then
``norm`` LayerNorm(eps 1e-5); ``kv`` Linear(C, 2C) whose output splits as [k | v];
``softmax(q kᵀ · D^-½) v`` per head (:func:`transkd_fast.ops.attention.efficient_attention`);
``proj`` Linear(C, C). Block and stage norms use eps 1e-6 (NVlabs); Hugging Face's port uses
1e-5 there (``norm_eps=1e-5`` reproduces its numbers).

Fast paths (oneDNN matmuls, the lean MixFFN, fused residual adds) read the Linears' and convs'
weights without calling those modules; when a forward hook or pre-hook is registered on one of
them (or globally), that attention / MixFFN calls its submodules instead, so hooks always fire.
The LayerNorms are :class:`LayerNorm` (an ``nn.LayerNorm``) whose CPU inference runs a C kernel.

Layout: tokens stay ``[B, N, C]`` contiguous; the NCHW views the convolutions need are
``x.transpose(1, 2).view(B, C, H, W)``, i.e. channels_last tensors, so ``sr``, ``dwconv`` and
the next ``patch_embed`` read them without a copy and their channels_last outputs flatten back to
contiguous tokens without a copy. Stage features are therefore NCHW-shaped tensors in
``torch.channels_last`` memory format (use ``reshape``, not ``view``, on them).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from transkd_fast.backend import autocast_enabled, get_backend, hooks_registered
from transkd_fast.ops import layer_norm as ln_ops
from transkd_fast.ops import onednn
from transkd_fast.ops.attention import efficient_attention

# name: (embed_dims, depths, num_heads, mlp_ratios, sr_ratios)
MIT_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "b0": ((32, 64, 160, 256), (2, 2, 2, 2), (1, 2, 5, 8), (4, 4, 4, 4), (8, 4, 2, 1)),
    "b1": ((64, 128, 320, 512), (2, 2, 2, 2), (1, 2, 5, 8), (4, 4, 4, 4), (8, 4, 2, 1)),
    "b2": ((64, 128, 320, 512), (3, 4, 6, 3), (1, 2, 5, 8), (4, 4, 4, 4), (8, 4, 2, 1)),
    "b3": ((64, 128, 320, 512), (3, 4, 18, 3), (1, 2, 5, 8), (4, 4, 4, 4), (8, 4, 2, 1)),
    "b4": ((64, 128, 320, 512), (3, 8, 27, 3), (1, 2, 5, 8), (4, 4, 4, 4), (8, 4, 2, 1)),
    "b5": ((64, 128, 320, 512), (3, 6, 40, 3), (1, 2, 5, 8), (4, 4, 4, 4), (8, 4, 2, 1)),
}


def tokens_to_nchw(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """``[B, H·W, C]`` → ``[B, C, H, W]``; a channels_last view when ``x`` is contiguous."""
    B, N, C = x.shape
    # view + permute (not transpose + reshape) so every stride is the canonical channels_last
    # one even when B == 1; kernels pick their channels_last path from the strides.
    return x.reshape(B, H, W, C).permute(0, 3, 1, 2)


def nchw_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, H·W, C]``; contiguous without a copy when ``x`` is channels_last."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


def init_linear_norm_(m: nn.Module) -> bool:
    """Linear trunc_normal(std .02) with zero bias; LayerNorm (1, 0). True when ``m`` was one of them."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    else:
        return False
    return True


def init_nvlabs_(m: nn.Module) -> None:
    """NVlabs/PVT init: :func:`init_linear_norm_`, and Conv2d normal(0, sqrt(2 / fan_out)) with
    fan_out = k_h·k_w·out / groups, zero bias."""
    if init_linear_norm_(m):
        return
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters, state dict and hooks) whose CPU inference over the last
    dimension runs the C kernel :func:`transkd_fast.ops.layer_norm.layer_norm` where
    :func:`transkd_fast.ops.layer_norm.fast_path` holds (autograd off, fp32 or bf16, not tracing or
    exporting, not the reference backend, the kernel built); ATen's LayerNorm otherwise. Same math
    (fp32 statistics), rounding aside: 2.1–2.7× ATen's CPU kernel at MiT-B0's shapes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) == 1 and ln_ops.fast_path(x):
            return ln_ops.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p`` in training,
    scale the kept ones by 1 / (1 − p); identity in eval."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class OverlapPatchEmbed(nn.Module):
    """Conv2d(k, stride s, padding k // 2) then LayerNorm over channels; returns ``(tokens, H, W)``."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int, eps: float = 1e-5):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = LayerNorm(embed_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        H, W = x.shape[-2:]
        return self.norm(nchw_to_tokens(x)), H, W


def _linear(m: nn.Linear, x: torch.Tensor, hooked: bool, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``m(x) (+ residual)``: a call of the module when hooks must fire, else :func:`onednn.linear`."""
    if hooked:
        out = m(x)
        return out if residual is None else out + residual
    return onednn.linear(x, m.weight, m.bias, residual)


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from a sequence reduced ``sr_ratio``× per side.

    Parameters ``q``, ``kv`` (fused [k | v]), ``sr`` + ``norm`` (only when sr_ratio > 1), ``proj``.
    q and k, v reach the op as strided ``[B, N, H, D]`` views of the Linear outputs (no copies).
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True,
                 sr_norm_eps: float = 1e-5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = LayerNorm(dim, eps=sr_norm_eps)

    def forward(self, x: torch.Tensor, H: int, W: int, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention output ``[B, N, C]``, plus ``residual`` when given (fused on the oneDNN path)."""
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        hooked = hooks_registered(self.q, self.kv, self.proj)
        q = _linear(self.q, x, hooked).view(B, N, h, d)
        if self.sr_ratio > 1:
            x = self.norm(nchw_to_tokens(self.sr(tokens_to_nchw(x, H, W))))  # [B, Nkv, C]
        kv = _linear(self.kv, x, hooked).view(B, x.shape[1], 2, h, d)  # row: [k heads | v heads]
        # the op picks its path (on CPU without autograd: its inference path, no LSE kept)
        out = efficient_attention(q, kv[:, :, 0], kv[:, :, 1], self.scale)
        # torch/triton backends return contiguous [B, N, h, d] (a free view); reference may copy.
        return _linear(self.proj, out.reshape(B, N, C), hooked, residual)


class DWConv(nn.Module):
    """3×3 depthwise conv (with bias) applied to tokens on their H × W grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return nchw_to_tokens(self.dwconv(tokens_to_nchw(x, H, W)))


def _mixffn_hidden(x, w1, b1, wdw, bdw, H: int, W: int):
    """fc1 and the depthwise conv: ``(h, d)`` with h ``[B, N, hidden]`` and d its 3×3 depthwise
    conv as an NCHW channels_last tensor (same ops, same order as the plain path)."""
    h = F.linear(x, w1, b1)
    d = F.conv2d(tokens_to_nchw(h, H, W), wdw, bdw, 1, 1, 1, wdw.shape[0])
    return h, d


def _mixffn_onednn(x, w1, b1, wdw, bdw, w2, b2, H: int, W: int, residual=None):
    """fc1, conv + GELU and fc2 (+ residual) as three oneDNN primitives; autograd off, and
    :func:`transkd_fast.ops.onednn.fast_path` true for ``x``. Same values as the ATen ops up to
    rounding."""
    h = onednn.linear(x, w1, b1)
    g = onednn.dwconv_gelu(tokens_to_nchw(h, H, W), wdw, bdw)
    del h
    return onednn.linear(nchw_to_tokens(g), w2, b2, residual)


class _LeanMixFFN(torch.autograd.Function):
    """fc1 → dwconv → GELU → fc2 that keeps only its input ``x`` for backward.

    The plain path keeps three hidden-size activations per block (fc1's output for the conv,
    the conv's output for GELU, GELU's output for fc2): 3·hidden = 12·C floats per token, the
    largest share of a training step's saved memory. Backward recomputes fc1, the conv and GELU
    from ``x`` with the plain path's ATen ops, then applies the same backward ops as autograd
    would (``mm`` for the Linears, ``convolution_backward``, ``gelu_backward``), freeing each
    hidden tensor as soon as it is used. Cost: one extra fc1 + conv + GELU per block. The
    forward is those same ATen ops (bit-identical to the plain path), or on the oneDNN fast
    path three oneDNN primitives whose values differ from them by rounding only.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, wdw, bdw, w2, b2, H: int, W: int):
        with torch.no_grad():
            if onednn.fast_path(x):
                out = _mixffn_onednn(x, w1, b1, wdw, bdw, w2, b2, H, W)
            else:
                _, d = _mixffn_hidden(x, w1, b1, wdw, bdw, H, W)
                # GELU in place (d is not kept; a fresh hidden-size buffer costs page faults), on
                # the token view: ATen's GELU rounds differently on the 4-D channels_last view.
                g = torch.ops.aten.gelu_(nchw_to_tokens(d))
                # addmm into a fresh [B, N, C] tensor (what F.linear runs on flattened tokens):
                # the output must not be a view, Block adds the residual into it in place.
                out = g.new_empty(g.shape[:-1] + (w2.shape[0],))
                torch.addmm(b2, g.reshape(-1, g.shape[-1]), w2.t(), out=out.view(-1, w2.shape[0]))
        ctx.save_for_backward(x, w1, b1, wdw, bdw, w2)
        ctx.hw = (H, W)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        x, w1, b1, wdw, bdw, w2 = ctx.saved_tensors
        H, W = ctx.hw
        need = ctx.needs_input_grad
        h, d = _mixffn_hidden(x, w1, b1, wdw, bdw, H, W)
        g_tok = F.gelu(nchw_to_tokens(d))  # [B, N, hidden], contiguous
        g2 = gout.reshape(-1, gout.shape[-1])  # [B·N, C_out]
        gw2 = g2.t().mm(g_tok.reshape(-1, g_tok.shape[-1])) if need[5] else None
        gb2 = g2.sum(0) if need[6] else None
        del g_tok
        gg = gout.matmul(w2)  # [B, N, hidden]
        gd = tokens_to_nchw(gg, H, W)
        torch.ops.aten.gelu_backward.grad_input(gd, d, grad_input=gd)  # in place: gg is not needed after
        del gg, d
        gh, gwdw, gbdw = torch.ops.aten.convolution_backward(
            gd, tokens_to_nchw(h, H, W), wdw, [wdw.shape[0]], [1, 1], [1, 1], [1, 1], False, [0, 0],
            wdw.shape[0], [need[0] or need[1] or need[2], need[3], need[4]])
        del gd, h
        gx = gw1 = gb1 = None
        if gh is not None:
            gh = nchw_to_tokens(gh)
            gh2 = gh.reshape(-1, gh.shape[-1])
            if need[1]:
                gw1 = gh2.t().mm(x.reshape(-1, x.shape[-1]))
            if need[2]:
                gb1 = gh2.sum(0)
            if need[0]:
                gx = gh.matmul(w1)
        return gx, gw1, gb1, gwdw, gbdw, gw2, gb2, None, None


class MixFFN(nn.Module):
    """fc1 → dwconv → GELU (exact) → fc2.

    Training with grad on a non-reference backend (the student) uses :class:`_LeanMixFFN`,
    which saves only ``x`` and recomputes the hidden activations in backward (under autocast in
    autocast's dtype: its inputs and weights cast as autocast casts them for the Linears and the
    conv); eval, no-grad (the teacher), tracing and the ``reference`` backend run the plain
    modules; without autograd (outside ``reference`` and tracing) GELU runs in place, with the
    same values.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def _lean(self, x: torch.Tensor) -> bool:
        return (self.training and torch.is_grad_enabled() and get_backend() != "reference"
                and not torch.jit.is_tracing() and not torch.jit.is_scripting()
                and x.is_contiguous() and x.dim() == 3)

    def forward(self, x: torch.Tensor, H: int, W: int, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """MixFFN output ``[B, N, C]``; ``residual`` is accepted only on the oneDNN path, which fuses it."""
        conv = self.dwconv.dwconv
        hooked = hooks_registered(self.fc1, self.dwconv, conv, self.fc2)
        if not hooked and self._lean(x):
            params = (self.fc1.weight, self.fc1.bias, conv.weight, conv.bias, self.fc2.weight, self.fc2.bias)
            if autocast_enabled(x):
                # Autocast casts fc1's, the conv's and fc2's operands to its dtype (all three are on
                # its lower-precision list) and leaves GELU in that dtype: cast them here, where
                # autograd records the casts, and the lean Function runs wholly in that dtype.
                dt = torch.get_autocast_dtype(x.device.type)
                x, params = x.to(dt), tuple(p.to(dt) for p in params)
            return _LeanMixFFN.apply(x, *params, H, W)
        if residual is not None:
            if not onednn.fast_path(x):
                raise RuntimeError("MixFFN: `residual` is fused only on the oneDNN inference path")
            if not hooked:
                return _mixffn_onednn(x, self.fc1.weight, self.fc1.bias, conv.weight, conv.bias,
                                      self.fc2.weight, self.fc2.bias, H, W, residual)
        if (not torch.is_grad_enabled() and get_backend() != "reference" and not torch.jit.is_tracing()
                and not torch.jit.is_scripting()):
            # No autograd (the teacher): GELU in place on the conv's fresh output, same values.
            out = self.fc2(torch.ops.aten.gelu_(self.dwconv(self.fc1(x), H, W)))
        else:
            out = self.fc2(F.gelu(self.dwconv(self.fc1(x), H, W)))
        return out if residual is None else out + residual


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, qkv_bias: bool = True,
                 drop_path: float = 0.0, norm_eps: float = 1e-6, sr_norm_eps: float = 1e-5):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio, qkv_bias, sr_norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=norm_eps)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        if onednn.fast_path(x) and not (self.training and isinstance(self.drop_path, DropPath)):
            # No autograd on CPU (the teacher, inference): the residual adds ride in the oneDNN
            # matmuls of proj and fc2.
            x = self.attn(self.norm1(x), H, W, residual=x)
            return self.mlp(self.norm2(x), H, W, residual=x)
        # Residual sums land in the branch's fresh output (a Linear's or DropPath's, neither saved
        # for backward), never in x: x may be the patch embedding handed out to the caller.
        x = self.drop_path(self.attn(self.norm1(x), H, W)).add_(x)
        return self.drop_path(self.mlp(self.norm2(x), H, W)).add_(x)


class MixVisionTransformer(nn.Module):
    """Four-stage hierarchical transformer (MiT; PVTv2 uses the same blocks).

    ``forward(x)`` with ``x`` ``[B, in_chans, H, W]`` returns ``(stage_features, patch_embeddings)``:
    stage_features[i] ``[B, C_i, H/2^(i+2), W/2^(i+2)]`` (after ``norm{i+1}``, channels_last memory
    format), patch_embeddings[i] ``[B, N_i, C_i]`` (the tokens right after ``patch_embed{i+1}``,
    LayerNorm included). Sizes round up like the convs: ceil(H/4), then ceil(·/2) per stage.
    """

    def __init__(self, embed_dims: Sequence[int], depths: Sequence[int], num_heads: Sequence[int],
                 mlp_ratios: Sequence[float], sr_ratios: Sequence[int], in_chans: int = 3,
                 qkv_bias: bool = True, drop_path_rate: float = 0.1, norm_eps: float = 1e-6,
                 patch_embed_eps: float = 1e-5, sr_norm_eps: float = 1e-5, variant: str = ""):
        super().__init__()
        if not (len(embed_dims) == len(depths) == len(num_heads) == len(mlp_ratios) == len(sr_ratios) == 4):
            raise ValueError("MixVisionTransformer has 4 stages: give 4 values per setting")
        self.embed_dims = list(embed_dims)
        self.depths = list(depths)
        self.variant = variant
        total = sum(depths)
        # Stochastic depth rate grows linearly over all blocks, 0 → drop_path_rate.
        dpr = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        cur = 0
        for i in range(4):
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(
                in_chans if i == 0 else embed_dims[i - 1], embed_dims[i],
                patch_size=7 if i == 0 else 3, stride=4 if i == 0 else 2, eps=patch_embed_eps))
            setattr(self, f"block{i + 1}", nn.ModuleList(
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i], qkv_bias, dpr[cur + j],
                      norm_eps, sr_norm_eps)
                for j in range(depths[i])))
            setattr(self, f"norm{i + 1}", LayerNorm(embed_dims[i], eps=norm_eps))
            cur += depths[i]
        self.apply(init_nvlabs_)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        features: list[torch.Tensor] = []
        embeds: list[torch.Tensor] = []
        # channels_last from the start: the first conv runs faster and its output flattens to
        # contiguous tokens for the LayerNorm (a 3-channel copy; a no-op for channels_last input).
        x = x.contiguous(memory_format=torch.channels_last)
        for i in range(1, 5):
            tokens, H, W = getattr(self, f"patch_embed{i}")(x)
            embeds.append(tokens)
            for blk in getattr(self, f"block{i}"):
                tokens = blk(tokens, H, W)
            tokens = getattr(self, f"norm{i}")(tokens)
            x = tokens_to_nchw(tokens, H, W)
            features.append(x)
        return features, embeds


def mit(variant: str, **kwargs) -> MixVisionTransformer:
    """MiT backbone ``variant`` in b0…b5; keyword arguments override the constructor's defaults."""
    key = variant.lower().removeprefix("mit_")
    if key not in MIT_CONFIGS:
        raise ValueError(f"unknown MiT variant {variant!r}; choose one of {', '.join('mit_' + k for k in MIT_CONFIGS)}")
    dims, depths, heads, ratios, srs = MIT_CONFIGS[key]
    return MixVisionTransformer(dims, depths, heads, ratios, srs, variant=f"mit_{key}", **kwargs)


def mit_b0(**kwargs) -> MixVisionTransformer:
    return mit("b0", **kwargs)


def mit_b1(**kwargs) -> MixVisionTransformer:
    return mit("b1", **kwargs)


def mit_b2(**kwargs) -> MixVisionTransformer:
    return mit("b2", **kwargs)


def mit_b3(**kwargs) -> MixVisionTransformer:
    return mit("b3", **kwargs)


def mit_b4(**kwargs) -> MixVisionTransformer:
    return mit("b4", **kwargs)


def mit_b5(**kwargs) -> MixVisionTransformer:
    return mit("b5", **kwargs)
