"""Controllers: one module per idea, each a small class over pure tensor functions.

``store`` (record cross-attention), ``reweight`` (per-word weights), ``replace`` (Replace / Refine and what they
share) and ``edit`` (AutoEdit: either of them per edited prompt), ``inject`` (self-attention injection), ``blend``
(local blending), ``concept`` (ConceptAttention: output-space concept maps on MM-DiTs), ``prompt_schedule`` (prompt editing: text features per step), ``inversion_guidance`` (sampling
from an inversion); ``base`` holds the protocol.
"""

from .base import Controller, PassThrough, check_controller
from .store import AttentionStore
from .replace import Refine, Replace
from .edit import AutoEdit
from .inject import InjectSelf
from .blend import LocalBlend
from .concept import ConceptAttention, ConceptMaps
from .reweight import Reweight
from .prompt_schedule import PromptSchedule
from .inversion_guidance import InversionGuidance

__all__ = [
    "Controller", "PassThrough", "check_controller", "AttentionStore", "Replace", "Refine", "AutoEdit", "InjectSelf",
    "LocalBlend", "ConceptAttention", "ConceptMaps", "Reweight", "PromptSchedule", "InversionGuidance",
]
