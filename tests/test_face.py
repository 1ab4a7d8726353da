"""The public face: ``__all__`` in its two documented groups, every name resolvable, nothing heavy imported by
``import promptcontrol``, old names warned, one base class for promptcontrol's own errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

import promptcontrol as pc

USER = {"load_pipeline", "trace", "control", "generate", "edit", "invert", "parse_prompt", "load_maps",
        "AttentionStore", "Reweight", "Replace", "Refine", "LocalBlend", "InjectSelf", "HeatMap", "HeatMaps"}
EXTENSION = {"Controller", "AttentionPlan", "AttentionTerm", "StepContext", "AttentionSite", "find_sites", "Session"}


def test_all_holds_the_user_face_and_the_extension_api():
    assert USER <= set(pc.USER_FACE) and EXTENSION <= set(pc.EXTENSION_API)
    assert set(pc.__all__) == set(pc.USER_FACE) | set(pc.EXTENSION_API) | {"testing"}
    for internal in ("BatchLayout", "RunInfo", "WeightedSpan", "JobMaps", "MapSet"):
        assert internal not in pc.__all__


@pytest.mark.parametrize("name", sorted(set(pc.__all__)))
def test_every_public_name_resolves(name):
    value = getattr(pc, name)
    assert value is not None
    if name != "testing":
        assert getattr(value, "__name__", name) == name


def test_importing_the_package_loads_no_torch():
    code = "import sys, promptcontrol; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_old_top_level_names_warn_and_still_work():
    from promptcontrol.context import BatchLayout

    with pytest.warns(DeprecationWarning, match="promptcontrol.context"):
        assert pc.BatchLayout is BatchLayout


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        pc.nothing_here  # noqa: B018


def test_own_errors_share_one_base_and_keep_their_builtin_types():
    from promptcontrol.loading import ModelFolderError
    from promptcontrol.outputs import OutputPathError

    assert issubclass(pc.SessionError, pc.PromptControlError) and issubclass(pc.SessionError, RuntimeError)
    assert issubclass(OutputPathError, pc.PromptControlError) and issubclass(OutputPathError, ValueError)
    assert issubclass(ModelFolderError, pc.PromptControlError) and issubclass(ModelFolderError, OSError)
