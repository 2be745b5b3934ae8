"""SegFormer: MiT backbone + All-MLP decode head (NVlabs/mmseg names: ``backbone.*``, ``decode_head.*``).

Head math, stage features f_i ``[B, C_i, h_i, w_i]`` (i = 1…4), decoder width E::

    c_i = linear_c{i}.proj(f_i)                      Linear(C_i, E) per pixel
    u_i = bilinear(c_i, size of f_1, align_corners=False)
    y   = ReLU(BN(linear_fuse.conv([u_4, u_3, u_2, u_1])))   1×1 conv 4E → E, no bias
    logits = linear_pred(Dropout2d(y))                 1×1 conv E → classes, at 1/4 input size

Fold (``decode_head.fold = True``, the default): the 1×1 ``linear_fuse`` conv is linear per pixel
and bilinear upsampling is linear per channel with weights summing to 1, so with W_j the slice of
linear_fuse's weight that sees u_i, ``W_j u_i = bilinear((W_j A_i) f_i) + W_j b_i``. The head
therefore applies one composed Linear (W_j A_i) to each stage at its own resolution, upsamples
E channels, sums, and adds every bias once (on the deepest stage, before its upsampling). In
eval the BatchNorm's affine map is folded
into the same weights too. The concat at stage-1 size and the 4E → E conv there (the bulk of the
head's FLOPs) disappear; parameters and state-dict names are unchanged (the fold is recomputed from
them at every forward, so gradients reach the original weights). ``fold = False`` runs the
original computation. Without autograd the three upsamplings write into one reused buffer.

CPU inference (the oneDNN fast path: autograd off, eval BatchNorm folded, no active dropout) runs
the folded head in tiles of stage-1 rows, end to end (:meth:`SegFormerHead._tiled_logits`): per
tile the stage-1 Linear, the three upsampled terms, ReLU and ``linear_pred``, so the two
``[B, h_1·w_1, E]`` maps of the untiled fold (32 MiB each for B0 at 512×1024) are never written
to memory; only the logits are. The middle of each tile (upsample the three deeper terms, add
them to stage 1's, ReLU) is one C kernel, :func:`transkd_fast.ops.upsample_add_relu.upsample_add_relu`,
where it builds (else ATen ops: width upsampling, a height matmul per term, ReLU). Same math up
to rounding (the bilinear upsampling done as its two separable passes, as ATen's kernel does).
A forward hook (or pre-hook) on any of the head's submodules, or a global module hook, makes
the head run unfolded, calling each submodule, so that the hook fires (except while tracing:
tracers hook every module, and what they record is the fold).

Stage features arrive as NCHW-shaped channels_last tensors (see :mod:`transkd_fast.models.mit`).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from transkd_fast.backend import autocast_enabled, hooks_registered
from transkd_fast.models.mit import MIT_CONFIGS, MixVisionTransformer, mit, nchw_to_tokens, tokens_to_nchw
from transkd_fast.ops import onednn
from transkd_fast.ops import upsample_add_relu as uar

DECODER_DIMS = {"b0": 256, "b1": 256, "b2": 768, "b3": 768, "b4": 768, "b5": 768}


class MLP(nn.Module):
    """Per-pixel Linear (``proj``) on an NCHW map; returns tokens ``[B, h·w, E]``."""

    def __init__(self, input_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(nchw_to_tokens(x))


class ConvModule(nn.Module):
    """mmcv-style Conv2d (``conv``) + optional BatchNorm (``bn``) + optional ReLU.

    Init as mmcv: conv kaiming normal (fan_out, ReLU gain), zero bias; BN weight 1, bias 0.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0,
                 norm: bool = False, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=not norm)
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.act = act
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.act else x


# Elements of one tile of the tiled inference head (fp32 [rows · w_1, E]): 2^20 (4 MiB). Measured
# in MiT-B0 at 512×1024 on the 2-core AMD EPYC (Zen 3): 2^18 / 2^19 / 2^20 → 392 / 346 / 306 ms for
# the whole model, against 331 untiled (fewer, larger tiles: fewer calls, each still in cache).
HEAD_TILE_ELEMS = 1 << 20


def _bilinear_rows(n_in: int, n_out: int) -> tuple[list, list, torch.Tensor]:
    """Height weights of bilinear resizing n_in → n_out rows (align_corners=False, no scale
    given), as ATen computes them in fp32: ``s = n_in / n_out``, ``src = max(s·(r + ½) − ½, 0)``,
    ``y0 = ⌊src⌋``, ``y1 = min(y0 + 1, n_in − 1)``, ``λ1 = src − y0``, ``λ0 = 1 − λ1``. Returns
    ``(y0, y1, R)`` with R ``[n_out, n_in]`` fp32, ``R[r, y0] += λ0``, ``R[r, y1] += λ1``."""
    scale = torch.tensor(n_in, dtype=torch.float32) / n_out
    src = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    y0 = src.long().clamp_(max=n_in - 1)
    y1 = torch.where(y0 < n_in - 1, y0 + 1, y0)
    l1 = src - y0
    R = torch.zeros(n_out, n_in)
    r = torch.arange(n_out)
    R.index_put_((r, y0), 1 - l1, accumulate=True)
    R.index_put_((r, y1), l1, accumulate=True)
    return y0.tolist(), y1.tolist(), R


def _tile_middle_aten(acc: torch.Tensor, terms: Sequence[tuple], r0: int, r1: int, W1: int) -> torch.Tensor:
    """The ATen route of one tile's middle (where the C kernel does not build), fp32 ``[rows·W1, E]``:
    ReLU(acc + Σ_i R_i[r0:r1, y_a:y_b] @ width-upsample(c_i[y_a:y_b])), ``acc`` the tile's
    stage-1 term ``[rows·W1, E]``, each term ``(c_i [h_i, w_i, E], y0, y1, R_i)`` from
    :func:`_bilinear_rows`; the upsampling is ATen's at unchanged height (an identity along it)."""
    E = acc.shape[-1]
    acc = acc.float().view(r1 - r0, W1 * E)
    for c, y0, y1, R in terms:
        ya, yb = y0[r0], y1[r1 - 1] + 1
        src = c[ya:yb].float()  # [n, w, E]
        if src.shape[1] != W1:
            src = torch.ops.aten.upsample_bilinear2d(src.unsqueeze(0).permute(0, 3, 1, 2), [yb - ya, W1],
                                                     False, None, None)
            src = nchw_to_tokens(src)
        acc.addmm_(R[r0:r1, ya:yb], src.reshape(yb - ya, W1 * E))
    return acc.relu_().view(-1, E)


class _HeadTail(torch.autograd.Function):
    """Training tail of the folded head on tokens ``x`` ``[B, N, E]``::

        u = BN_train(x) = (x − μ) · γ/σ + β        μ, σ² over all B·N rows (biased σ²)
        z = ReLU(u) · m_b                          m ``[B, 1, E]``: Dropout2d's scaled mask (or 1)
        logits = z Wᵀ + b                          ``[B, N, K]``

    Saves only ``x`` (already alive: the fold's sum), the per-channel statistics and the mask;
    ``z`` is recomputed in backward for ∂W. The plain modules save three E-channel maps here
    (BN's input, ReLU's output, the dropout output), and run one pass more over them in each
    direction. Running statistics are updated as ``nn.BatchNorm2d`` does (unbiased σ²).
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, w, b, mask, running_mean, running_var, momentum: float, eps: float):
        B, N, E = x.shape
        x2 = x.view(-1, E)
        # BatchNorm's own statistics kernel: batch mean and biased variance, and the running
        # statistics updated in place with the unbiased one, as nn.BatchNorm2d does.
        mean, var = torch.ops.aten.batch_norm_update_stats(x2, running_mean, running_var, momentum)
        invstd = torch.rsqrt(var + eps)
        z = _HeadTail._activation(x, gamma, beta, mean, invstd, mask)
        logits = onednn.linear(z.view(-1, E), w, b).view(B, N, w.shape[0])
        ctx.save_for_backward(x, gamma, beta, w, mean, invstd, mask)
        ctx.eps = eps
        return logits

    @staticmethod
    def _activation(x, gamma, beta, mean, invstd, mask):
        """z = ReLU(x·s + t)·m = ReLU(x·(s·m) + t·m), m ≥ 0: one multiply-add pass and one ReLU."""
        scale = gamma * invstd
        shift = beta - mean * scale
        if mask is not None:
            scale, shift = scale * mask, shift * mask  # [B, 1, E]
        return torch.addcmul(shift, x, scale).clamp_min_(0.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, glogits):
        x, gamma, beta, w, mean, invstd, mask = ctx.saved_tensors
        B, N, E = x.shape
        g2 = glogits.reshape(-1, w.shape[0])  # [B·N, K]
        z = _HeadTail._activation(x, gamma, beta, mean, invstd, mask)
        gw = g2.t().mm(z.view(-1, E))
        gb = g2.sum(0)
        gz = onednn.linear(g2, w.t().contiguous()).view(B, N, E)  # K = 20: oneDNN beats MKL's mm ~2×
        if mask is not None:
            gz.mul_(mask)
        # ∂z/∂u = m·1[u > 0], and z > 0 exactly where m > 0 and u > 0.
        gu = torch.ops.aten.threshold_backward.grad_input(gz, z, 0.0, grad_input=gz)
        del z
        gx, ggamma, gbeta = torch.ops.aten.native_batch_norm_backward(
            gu.view(-1, E), x.view(-1, E), gamma, None, None, mean, invstd, True, ctx.eps, [True, True, True])
        return gx.view(B, N, E), ggamma, gbeta, gw, gb, None, None, None, None, None


class SegFormerHead(nn.Module):
    """All-MLP decoder: ``linear_c{1..4}``, ``linear_fuse`` (conv + bn), ``dropout``, ``linear_pred``.

    ``forward(features)`` with the 4 stage maps returns logits ``[B, num_classes, h_1, w_1]``
    (contiguous). ``fold`` picks the folded (default) or the original computation (module doc).
    """

    def __init__(self, in_channels: Sequence[int], embed_dim: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.in_channels = list(in_channels)
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        for i, c in enumerate(in_channels):
            setattr(self, f"linear_c{i + 1}", MLP(c, embed_dim))
        self.linear_fuse = ConvModule(4 * embed_dim, embed_dim, 1, norm=True)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)
        self.fold = True

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != 4:
            raise ValueError(f"SegFormerHead takes the 4 stage features, got {len(features)}")
        # The fold reads the Linears' and BN's weights without calling the modules: with a forward
        # hook on any of them the head runs unfolded, module by module, so the hooks fire. Not
        # while tracing: tracers (fvcore, torch.jit.trace) hook every module for their scopes, and
        # what they record must be the fold.
        hooked = not torch.jit.is_tracing() and hooks_registered(*(m for m in self.modules() if m is not self))
        if self.fold and not hooked and self._tiled_applies(features):
            return self._tiled_logits(features)
        if self.fold and not hooked:
            acc, bn_folded, (H, W) = self._folded_sum(features)
            if not bn_folded and self._train_tail_applies(acc):
                return self._train_tail(acc, H, W)
            y = tokens_to_nchw(acc, H, W)
            if not bn_folded:
                y = self.linear_fuse.bn(y)
            y = F.relu(y, inplace=True)
        else:
            y = self._fused_unfolded(features)
        y = self.dropout(y)
        if hooked:
            return self.linear_pred(y).contiguous()
        B, _, H, W = y.shape
        if onednn.fast_path(y) and y.is_contiguous(memory_format=torch.channels_last):
            # Inference on CPU: one oneDNN matmul over the tokens (bias fused) and a transpose of
            # the K-channel result, ~1.6× faster than the K-row GEMM below on its thin shape.
            tok = onednn.linear(nchw_to_tokens(y), self.linear_pred.weight.flatten(1), self.linear_pred.bias)
            return tokens_to_nchw(tok, H, W).contiguous()
        # W [K, E] @ y [B, E, h·w] writes contiguous NCHW logits whatever y's memory format.
        logits = torch.matmul(self.linear_pred.weight.flatten(1), y.flatten(2))
        logits = logits + self.linear_pred.bias[:, None]
        return logits.view(B, self.num_classes, H, W)

    def _fused_unfolded(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """ReLU(BN(linear_fuse.conv(cat[u4, u3, u2, u1]))) as the original computes it."""
        size = features[0].shape[-2:]
        ups = []
        for i in (3, 2, 1, 0):
            f = features[i]
            c = tokens_to_nchw(getattr(self, f"linear_c{i + 1}")(f), *f.shape[-2:])
            if c.shape[-2:] != size:
                c = F.interpolate(c, size=size, mode="bilinear", align_corners=False)
            ups.append(c)
        return self.linear_fuse(torch.cat(ups, dim=1))

    def _folded_weights(self) -> tuple[list[torch.Tensor], torch.Tensor, bool]:
        """Per-stage composed weights [E, C_i] and the total bias [E]; BN folded in eval.

        Composed in fp32 (fp64 for fp64 weights) whatever the weights' dtype and with autocast
        off, then returned in the weights' dtype: the fold is a change of parameters, not part of
        the computation, so bf16 weights (``prepare_for_inference``) are rounded once, as the
        unfolded head's are, and under autocast the matmuls that use them still run in
        autocast's dtype (:func:`transkd_fast.ops.onednn.linear` casts them as autocast would).
        """
        E = self.embed_dim
        conv_w = self.linear_fuse.conv.weight
        dt = torch.promote_types(conv_w.dtype, torch.float32)
        with torch.autocast(conv_w.device.type, enabled=False) if autocast_enabled(conv_w) else nullcontext():
            wf = conv_w.view(E, 4 * E).to(dt)
            weights, bias = [], None
            for i in range(4):
                j = 3 - i  # concat order is [c4, c3, c2, c1]
                proj = getattr(self, f"linear_c{i + 1}").proj
                wj = wf[:, j * E:(j + 1) * E]
                weights.append(wj @ proj.weight.to(dt))
                b = wj @ proj.bias.to(dt)
                bias = b if bias is None else bias + b
            bn = self.linear_fuse.bn
            bn_folded = self._bn_folds()
            if bn_folded:
                g = bn.weight.to(dt) * torch.rsqrt(bn.running_var.to(dt) + bn.eps)
                weights = [w * g[:, None] for w in weights]
                bias = (bias - bn.running_mean.to(dt)) * g + bn.bias.to(dt)
        if dt != conv_w.dtype:
            weights, bias = [w.to(conv_w.dtype) for w in weights], bias.to(conv_w.dtype)
        return weights, bias, bn_folded

    def _folded_sum(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, bool, tuple[int, int]]:
        """linear_fuse.conv(cat[u4, u3, u2, u1]) by the fold, as tokens ``[B, h_1·w_1, E]``
        (BN folded in too in eval); returns ``(tokens, bn_folded, (h_1, w_1))``."""
        weights, bias, bn_folded = self._folded_weights()
        f1 = features[0]
        size = f1.shape[-2:]
        # Accumulate in token layout: acc is then a base tensor, not a permuted view, so the
        # in-place adds below need no CopySlices (a clone + copy of the whole grad) in backward.
        acc = onednn.linear(nchw_to_tokens(f1), weights[0])
        # Without autograd, the three upsamplings share one output buffer: a fresh buffer of this
        # size costs more (page faults) than the interpolation itself. Same op, same result.
        reuse = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        buf = None
        for i in (3, 2, 1):
            f = features[i]
            # The deepest stage carries every bias: bilinear weights sum to 1, so a constant
            # survives upsampling, and adding it at 1/32 resolution is nearly free.
            t = tokens_to_nchw(onednn.linear(nchw_to_tokens(f), weights[i], bias if i == 3 else None), *f.shape[-2:])
            if t.shape[-2:] != size:
                if reuse:
                    buf = torch.empty_like(tokens_to_nchw(acc, *size)) if buf is None else buf
                    t = torch.ops.aten.upsample_bilinear2d.out(t, list(size), False, None, None, out=buf)
                else:
                    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
            # In place: acc is a fresh Linear output that autograd does not save, and a new
            # 1/4-resolution buffer per term would cost more than the add (page faults).
            acc.add_(nchw_to_tokens(t))
        # Not int(): under torch.export the sizes are symbolic, and int() would specialize them.
        return acc, bn_folded, (size[0], size[1])

    def _bn_folds(self) -> bool:
        """Whether the BatchNorm folds into the composed weights: eval mode with running stats."""
        bn = self.linear_fuse.bn
        return not bn.training and bn.track_running_stats and bn.running_var is not None

    def _tiled_applies(self, features: Sequence[torch.Tensor]) -> bool:
        """CPU inference with the fold: the oneDNN fast path for stage 1 (autograd off, fp32 or
        bf16, not tracing / compiling / the reference backend), channels_last stage features,
        the BatchNorm folded (:meth:`_bn_folds`) and no active dropout."""
        f1 = features[0]
        drop = self.dropout
        return (onednn.fast_path(f1) and self._bn_folds()
                and not (drop.training and isinstance(drop, nn.Dropout2d) and drop.p > 0)
                and all(f.device == f1.device and f.dim() == 4 for f in features)
                and all(f.is_contiguous(memory_format=torch.channels_last) for f in features))

    def _tiled_logits(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Eval logits ``[B, K, h_1, w_1]`` (contiguous, in the oneDNN compute dtype) by the fold,
        a tile of :data:`HEAD_TILE_ELEMS` // (w_1·E) stage-1 rows at a time. Per tile rows
        ``r0:r1`` and batch entry b, with c_i = (W_j A_i) f_i (+ all biases on stage 4) computed
        once per stage at its own resolution::

            acc  = (W_j A_1) f_1[r0:r1]                                   [rows·w_1, E]
            g_i  = bilinear along width of c_i[y_a:y_b + 1] to w_1         [n_i, w_1, E]
            acc += R_i[r0:r1, y_a:y_b + 1] @ g_i                           the height pass
            out[b, :, r0:r1] = linear_pred(ReLU(acc))                      [K, rows, w_1]

        R_i ``[h_1, h_i]`` holds the height weights of bilinear (align_corners=False) resizing,
        computed as ATen does (:func:`_bilinear_rows`); y_a…y_b are the source rows the tile
        reads. The width pass is ATen's own kernel at unchanged height (an identity along it).
        Where the C kernel builds (:func:`transkd_fast.ops.upsample_add_relu.kernel_available`)
        the three terms, the sum and the ReLU are its one pass over the tile instead, in place in
        acc (same math: the width pass once per source row, then the height pass per pixel).
        The two matmuls run in the compute dtype (bf16 for a bf16 model or under autocast(bf16)),
        the sum and ReLU in fp32.
        """
        weights, bias, _ = self._folded_weights()
        f1 = features[0]
        dt = onednn.compute_dtype(f1)
        B, _, H1, W1 = f1.shape
        E, K = self.embed_dim, self.num_classes
        wp = self.linear_pred.weight.flatten(1).to(dt)
        bp = self.linear_pred.bias.to(dt)
        weights, bias = [w.to(dt) for w in weights], bias.to(dt)
        fused = uar.kernel_available()
        with torch.autocast("cpu", enabled=False):  # dtypes are explicit here
            terms = []
            for i in (3, 2, 1):
                f = features[i].to(dt)
                h, w = f.shape[-2:]
                c = onednn.linear(nchw_to_tokens(f), weights[i], bias if i == 3 else None).view(B, h, w, E)
                terms.append((c,) if fused else (c, *_bilinear_rows(h, H1)))
            out = f1.new_empty(B, K, H1, W1, dtype=dt)
            tokens1 = nchw_to_tokens(f1).to(dt)
            rows = max(1, HEAD_TILE_ELEMS // (W1 * E))
            for b in range(B):
                srcs = [c[b:b + 1] for c, *_ in terms]
                for r0 in range(0, H1, rows):
                    r1 = min(H1, r0 + rows)
                    acc = onednn.linear(tokens1[b, r0 * W1:r1 * W1], weights[0])
                    if fused:
                        acc = acc.view(1, r1 - r0, W1, E)
                        z = uar.upsample_add_relu(acc, srcs, (H1, W1), r0, out=acc)
                    else:
                        z = _tile_middle_aten(acc, [(c[b], *t) for c, *t in terms], r0, r1, W1).to(dt)
                    tile = onednn.linear(z.view(-1, E), wp, bp)  # [rows·w_1, K]
                    out[b, :, r0:r1].copy_(tile.view(r1 - r0, W1, K).permute(2, 0, 1))
        return out

    def _train_tail_applies(self, acc: torch.Tensor) -> bool:
        """The fused tail serves plain BatchNorm2d in training with running stats (not the
        synchronized kinds DDP swaps in), Dropout2d or no dropout, fp32 without autocast, with
        autograd recording."""
        bn = self.linear_fuse.bn
        return (torch.is_grad_enabled() and type(bn) is nn.BatchNorm2d and bn.training and bn.affine
                and bn.track_running_stats and isinstance(self.dropout, (nn.Dropout2d, nn.Identity))
                and acc.is_contiguous() and acc.dtype == torch.float32
                and acc.shape[0] * acc.shape[1] > 1  # one value per channel: BatchNorm's own error
                and not autocast_enabled(acc)
                # batch_norm_update_stats has no meta kernel (compile_check runs models on meta)
                and acc.device.type != "meta"
                and not torch.jit.is_tracing() and not torch.compiler.is_compiling())

    def _train_tail(self, acc: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Training logits from the fold's tokens via :class:`_HeadTail` (same math as BN →
        ReLU → Dropout2d → linear_pred, same running-stat update and dropout mask)."""
        bn = self.linear_fuse.bn
        B, N, E = acc.shape
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        mask = None
        drop = self.dropout
        if isinstance(drop, nn.Dropout2d) and drop.training and drop.p > 0:
            # Dropout2d's own noise: one Bernoulli draw per (sample, channel), scaled by 1/(1-p),
            # drawn from the same generator in the same order (F.dropout2d's values exactly).
            keep = 1.0 - drop.p
            mask = acc.new_empty(B, E, 1, 1).bernoulli_(keep).div_(keep).view(B, 1, E)
        logits = _HeadTail.apply(acc, bn.weight, bn.bias, self.linear_pred.weight.flatten(1),
                                 self.linear_pred.bias, mask, bn.running_mean, bn.running_var, momentum, bn.eps)
        return tokens_to_nchw(logits, H, W).contiguous()


class BackboneHead(nn.Module):
    """A backbone with ``embed_dims`` + :class:`SegFormerHead` as ``decode_head``: the forward
    contract every distiller reads (see :class:`SegFormer`). Shared by SegFormer and LVT."""

    def __init__(self, backbone: nn.Module, num_classes: int, decoder_dim: int, dropout: float, variant: str):
        super().__init__()
        self.backbone = backbone
        self.decode_head = SegFormerHead(backbone.embed_dims, decoder_dim, num_classes, dropout)
        self.embed_dims = list(backbone.embed_dims)
        self.num_classes = num_classes
        self.variant = variant

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features, embeds = self.backbone(x)
        logits = self.decode_head(features)
        if return_features:
            return features, logits, embeds
        return logits


class SegFormer(BackboneHead):
    """SegFormer = ``backbone`` (MiT) + ``decode_head`` (:class:`SegFormerHead`).

    - ``model(x)`` → logits ``[B, num_classes, ⌈H/4⌉, ⌈W/4⌉]``.
    - ``model(x, return_features=True)`` → ``(stage_features, logits, patch_embeddings)``: 4 NCHW
      stage outputs (after ``norm{i}``) and 4 ``[B, N_i, C_i]`` patch-embedding token sequences.
    - ``model.backbone(x)`` → ``(stage_features, patch_embeddings)``; ``model.decode_head(features)`` → logits.
    """

    def __init__(self, backbone: MixVisionTransformer, num_classes: int = 19, decoder_dim: int = 256,
                 dropout: float = 0.1, variant: str = ""):
        super().__init__(backbone, num_classes, decoder_dim, dropout, variant)


def segformer(variant: str, num_classes: int = 19, decoder_dim: int | None = None, dropout: float = 0.1,
              **backbone_kwargs) -> SegFormer:
    """SegFormer-``variant`` (b0…b5); decoder width 256 for b0/b1, 768 for b2–b5 unless given.

    Extra keyword arguments go to the MiT backbone (``drop_path_rate``, ``norm_eps``, ...).
    """
    key = variant.lower().removeprefix("segformer_").removeprefix("mit_")
    if key not in MIT_CONFIGS:
        raise ValueError(f"unknown SegFormer variant {variant!r}; choose one of "
                         f"{', '.join('segformer_' + k for k in MIT_CONFIGS)}")
    backbone = mit(key, **backbone_kwargs)
    return SegFormer(backbone, num_classes, decoder_dim or DECODER_DIMS[key], dropout, variant=f"segformer_{key}")
