"""Routing policies: which expert(s) answer an object's prompts.

========================  ======================================================================
policy                    experts per object
========================  ======================================================================
``dual`` (default)        both: global segments the whole object, local updates its window
``released``              global for every object while the case has boxes, local otherwise
                          (the released DCM ``predict.sh``)
``global_then_local``     global at the box step (no click yet), local for every corrective click
``outside_global_roi``    global, but local when the last click is outside the object's global RoI
``global_only``           global
``local_only``            local
========================  ======================================================================
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, List, Optional

from dcm.data.cases import Case, ObjectPrompts
from dcm.experts.base import GLOBAL, LOCAL, Expert, RoISlices, policy_roles

__all__ = ["POLICIES", "route"]


def _inside(zyx, roi: Optional[RoISlices]) -> bool:
    return roi is not None and all(s.start <= c < s.stop for c, s in zip(zyx, roi))


def _dual(case: Case, obj: ObjectPrompts, experts: Dict[str, Expert]) -> List[str]:
    return [GLOBAL, LOCAL]


def _released(case: Case, obj: ObjectPrompts, experts: Dict[str, Expert]) -> List[str]:
    return [GLOBAL] if case.has_boxes else [LOCAL]


def _global_then_local(case: Case, obj: ObjectPrompts, experts: Dict[str, Expert]) -> List[str]:
    return [LOCAL] if obj.clicks else [GLOBAL]


def _outside_global_roi(case: Case, obj: ObjectPrompts, experts: Dict[str, Expert]) -> List[str]:
    last = obj.last_click
    if last is None:
        return [GLOBAL]
    # The RoI as it stood before this click (the global RoI grows to take in positive clicks).
    before = replace(obj, clicks=obj.clicks[:-1])
    roi = experts[GLOBAL].roi_of(before) if GLOBAL in experts else None
    return [GLOBAL] if _inside(last.zyx, roi) else [LOCAL]


POLICIES: Dict[str, Callable[[Case, ObjectPrompts, Dict[str, Expert]], List[str]]] = {
    "dual": _dual,
    "released": _released,
    "global_then_local": _global_then_local,
    "outside_global_roi": _outside_global_roi,
    "global_only": lambda case, obj, experts: list(policy_roles("global_only")),
    "local_only": lambda case, obj, experts: list(policy_roles("local_only")),
}


def route(policy: str, case: Case, obj: ObjectPrompts, experts: Dict[str, Expert]) -> List[str]:
    """Names of the experts (``'global'``, ``'local'``) that answer ``obj``, in fusion order."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {sorted(POLICIES)}")
    return [name for name in POLICIES[policy](case, obj, experts) if name in experts]
