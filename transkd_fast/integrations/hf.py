"""transkd_fast as an attention backend for Hugging Face transformers.

    import transkd_fast.integrations.hf as tkf_hf
    tkf_hf.enable()                                   # once per process
    model.set_attn_implementation("transkd_fast")     # e.g. a stock SegformerForSemanticSegmentation

:func:`enable` registers :func:`attention_forward` with transformers' ``AttentionInterface``
under ``"transkd_fast"``. Models whose attention goes through that interface (SegFormer does
in transformers ≥ 5: ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation)``)
then call :func:`transkd_fast.ops.attention.efficient_attention`, with the backend in force
(``transkd_fast.set_backend`` / ``use_backend``, or the one given to :func:`enable`).

transformers hands over query/key/value as ``[B, H, N, D]`` transposed views of the projection
outputs; a transpose back gives our ``[B, N, H, D]`` layout as the original contiguous view
(no copy). The result is ``[B, Nq, H, D]`` contiguous, what transformers' eager path returns
before it reshapes to ``[B, Nq, H·D]``; attention weights are never formed, so ``None`` is
returned in their place.

Not supported (refused with an error, never silently ignored): attention masks, causal
attention, attention dropout while training, and fewer key/value heads than query heads.
"""

from __future__ import annotations

from typing import Optional

import torch

from transkd_fast.backend import _check_name
from transkd_fast.ops.attention import efficient_attention

NAME = "transkd_fast"
_pinned_backend: Optional[str] = None


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                      dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function: softmax(scaling · q kᵀ) v.

    query ``[B, H, Nq, D]``, key/value ``[B, H, Nkv, D]`` → (``[B, Nq, H, D]``, ``None``).
    """
    if attention_mask is not None:
        raise ValueError(f"{NAME} attention takes no attention_mask (got one of shape "
                         f"{tuple(attention_mask.shape)}); use attn_implementation='sdpa' or 'eager' for masked models")
    if kwargs.get("is_causal", getattr(module, "is_causal", False)):
        raise ValueError(f"{NAME} attention is not causal; {type(module).__name__} asks for causal attention")
    if dropout > 0.0 and module.training:
        raise NotImplementedError(f"{NAME} attention has no attention dropout (p={dropout} while training); "
                                  "set attention_probs_dropout_prob=0 or use attn_implementation='eager'")
    if key.shape[1] != query.shape[1]:
        raise ValueError(f"{NAME} attention needs as many key/value heads as query heads, "
                         f"got {key.shape[1]} and {query.shape[1]}")
    out = efficient_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                              scale=scaling, backend=_pinned_backend)
    return out, None


def enable(backend: Optional[str] = None) -> str:
    """Register :func:`attention_forward` with transformers' ``AttentionInterface``.

    ``backend`` pins a transkd_fast backend for these calls (``None``: the backend in force at
    call time). Returns the name to pass to ``model.set_attn_implementation``. Idempotent.
    """
    global _pinned_backend
    from transformers import AttentionInterface

    _pinned_backend = None if backend is None else _check_name(backend)
    AttentionInterface.register(NAME, attention_forward)
    return NAME


def disable() -> None:
    """Remove the registration (models already switched to it fail on their next call)."""
    from transformers import AttentionInterface

    AttentionInterface._global_mapping.pop(NAME, None)
