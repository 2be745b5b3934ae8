"""The ops: each a ``torch.library`` custom op ``transkd_fast::<op>`` dispatching by backend.

``from transkd_fast.ops import efficient_attention, selective_pool, selective_fuse, hcl_loss,
kd_kl_div, weighted_mse``. The modules load on first use (``transkd_fast.ops.<module>`` imports
stay cheap and free of import cycles); :func:`load_all` imports every op, which registers it
with :func:`transkd_fast.backend.registered_ops`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "efficient_attention": "attention",
    "efficient_attention_reference": "attention",
    "selective_pool": "selective_fusion",
    "selective_fuse": "selective_fusion",
    "selective_pool_reference": "selective_fusion",
    "selective_fuse_reference": "selective_fusion",
    "hcl_loss": "hcl",
    "hcl_loss_reference": "hcl",
    "kd_kl_div": "kl_div",
    "kd_kl_div_reference": "kl_div",
    "weighted_mse": "weighted_mse",
    "weighted_mse_reference": "weighted_mse",
}
OP_MODULES = ("attention", "selective_fusion", "hcl", "kl_div", "weighted_mse")

__all__ = sorted(_EXPORTS) + ["load_all"]


def load_all() -> None:
    """Import every op module (registering each op's backends)."""
    for mod in OP_MODULES:
        importlib.import_module(f"{__name__}.{mod}")


# ``weighted_mse`` names both an op module and its function. Importing a submodule binds it on
# the package, but only on its first load: loading it here, then binding the function, makes
# ``from transkd_fast.ops import weighted_mse`` the function whatever was imported before.
# (The module: ``importlib.import_module("transkd_fast.ops.weighted_mse")``.)
weighted_mse = importlib.import_module(f"{__name__}.weighted_mse").weighted_mse


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
