"""promptcontrol: record, reweight and swap the cross-attention of Stable Diffusion pipelines in diffusers."""

from .context import BatchLayout, RunInfo, StepContext
from .controllers.base import Controller, PassThrough
from .plan import AttentionPlan, AttentionTerm
from .session import Session, SessionError, control
from .sites import AttentionSite, find_sites
from .controllers.store import AttentionStore  # inspect: record cross-attention
from .heatmap import HeatMap, HeatMaps
from .tracing import Trace, trace
from .controllers.replace import Replace  # prompt-to-prompt edits
from .controllers.refine import Refine
from .controllers.blend import LocalBlend
from .editing import EditResult, edit
from .controllers.reweight import Reweight  # emphasise: per-word weights
from .prompt_syntax import ParsedPrompt, WeightedSpan, WeightedWord, parse_prompt
from .generation import generate
from .loading import load_pipeline  # the embedded default model, a hub id or a folder
from .inversion import Inversion, invert  # real images: DDIM / null-text inversion

from .mapsets import JobMaps, MapSet, load_maps  # map datasets written by `promptcontrol sweep --save-maps`

from . import testing  # noqa: E402  (tiny offline pipelines)

__version__ = "0.1.0"
