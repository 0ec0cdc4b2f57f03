"""The interactive session API with stand-in experts: prompts, undo, remove, reset, constraints."""

import sys
from pathlib import Path

import numpy as np
import pytest

from dcm.engine.session import InteractiveSession

sys.path.insert(0, str(Path(__file__).parent))
from stubs import StubExpert  # noqa: E402

BOX = dict(z_min=5, z_max=14, z_mid=10, z_mid_x_min=5, z_mid_y_min=5, z_mid_x_max=14, z_mid_y_max=14)


def _session(**engine):
    experts = {"global": StubExpert("global", 4, 0.9), "local": StubExpert("local", 1, 0.1)}
    s = InteractiveSession(config={"engine": {"policy": "dual", **engine}}, experts=experts, max_undo=3)
    s.set_image(np.zeros((20, 30, 30), np.float32), spacing=(2.0, 1.0, 1.0))
    return s


def test_prompts_and_several_undo_levels():
    s = _session()
    obj = s.new_object()
    assert obj == 1
    m_box = s.add_box(obj, BOX)
    assert m_box.sum() > 0 and m_box.dtype == bool
    m1 = s.add_point(obj, (10, 10, 10), positive=False)
    m2 = s.add_point(obj, (8, 8, 8), positive=False)
    assert not m1[10, 10, 10] and not m2[8, 8, 8]
    assert s.last_changed_region is not None
    assert np.array_equal(s.undo(obj), m1)
    assert np.array_equal(s.undo(obj), m_box)
    assert len(s.objects[obj].clicks) == 0
    assert not s.undo(obj).any()
    with pytest.raises(IndexError):
        s.undo(obj)


def test_undo_depth_is_bounded():
    s = _session()
    obj = s.new_object()
    s.add_box(obj, BOX)
    for z in range(6, 11):
        s.add_point(obj, (z, 10, 10))
    for _ in range(3):
        s.undo(obj)
    with pytest.raises(IndexError):
        s.undo(obj)


def test_remove_reset_and_constraints():
    s = _session(overlap="keep_others")
    a, b = s.new_object(), s.new_object()
    s.add_box(a, BOX)
    shifted = dict(BOX, z_mid_x_min=8, z_mid_x_max=17)
    mb = s.add_box(b, shifted)
    assert not (mb & s.mask(a)).any()  # b may not take a's voxels
    s.remove(a)
    assert not s.mask(b).sum() == 0 and (s.labels() != 1).all()
    assert s.new_object() == 1
    s.reset()
    assert s.labels().max() == 0 and not s.objects


def test_errors_tell_what_to_do():
    s = InteractiveSession(config={}, experts={"global": StubExpert("global", 2, 0.9)})
    with pytest.raises(RuntimeError, match="set_image"):
        s.new_object()
    s.set_image(np.zeros((5, 6, 7)))
    with pytest.raises(KeyError, match="new_object"):
        s.add_point(3, (1, 1, 1))
    obj = s.new_object()
    with pytest.raises(ValueError, match="outside"):
        s.add_point(obj, (5, 0, 0))
    with pytest.raises(ValueError, match="inverted"):
        s.add_box(obj, dict(BOX, z_min=4, z_max=2, z_mid=3))
