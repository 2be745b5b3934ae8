"""TransKD's distillation modules, the TransKD distiller and the baselines.

- :class:`CSF` (Cross Selective Fusion), :class:`PEA` (Patch Embedding Alignment),
  :class:`GLMixer`, :class:`EmbeddingAssistant`: the KD modules (design §2).
- :class:`TransKD`: the distiller (variants ``base`` / ``gl`` / ``ea``).
- :class:`LogitKD`, :class:`CWD`, :class:`ReviewKD`: baselines on the same contract.
- :func:`build_distiller`: any of them by name (:data:`DISTILLERS`).
"""

from transkd_fast.distill.baselines import CWD, DISTILLERS, LogitKD, ReviewKD, build_distiller
from transkd_fast.distill.csf import CSF, CSFStage
from transkd_fast.distill.ea import EmbeddingAssistant
from transkd_fast.distill.gl_mixer import GLMixer
from transkd_fast.distill.losses import CITYSCAPES_CLASS_WEIGHTS
from transkd_fast.distill.pea import PEA
from transkd_fast.distill.transkd import Distiller, TransKD

__all__ = [
    "CITYSCAPES_CLASS_WEIGHTS", "CSF", "CSFStage", "CWD", "DISTILLERS", "Distiller", "EmbeddingAssistant",
    "GLMixer", "LogitKD", "PEA", "ReviewKD", "TransKD", "build_distiller",
]
