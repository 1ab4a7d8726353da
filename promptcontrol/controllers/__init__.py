"""Controllers: one file per controller, each a small class over pure tensor functions."""

from .base import Controller, PassThrough, check_controller
from .store import AttentionStore
from .reweight import Reweight
