"""Controllers: one file per controller, each a small class over pure tensor functions."""

from .base import Controller, PassThrough, check_controller
from .store import AttentionStore
from .replace import Replace
from .refine import Refine
from .inject import InjectSelf
from .blend import LocalBlend
from .reweight import Reweight
