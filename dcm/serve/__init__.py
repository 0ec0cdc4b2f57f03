"""``python -m dcm.serve``: DCM behind nnInteractive's remote-inference HTTP protocol.

nnInteractive's viewers (the napari plugin ``napari-nninteractive`` >= 2.5, the 3D Slicer extension >= 1.0)
and its torch-free client (``nninteractive-client``: ``nnInteractiveRemoteInferenceSession``) drive DCM through
it unchanged. :mod:`dcm.serve.app` is the HTTP layer, :mod:`dcm.serve.sessions` the leases and per-client
state, :mod:`dcm.serve.prompts` how the viewers' prompts map to DCM's, :mod:`dcm.serve.wire` the array
encoding; ``/`` serves a small browser page (:mod:`dcm.serve.static`).
"""

from typing import Sequence

from dcm.serve.app import make_app
from dcm.serve.sessions import SessionRegistry, clone_experts

__all__ = ["make_app", "SessionRegistry", "clone_experts", "session_factory", "build_registry"]


def session_factory(config: str = "dcm_small", weights=None, device=None, undo_levels: int = 20,
                    overrides: Sequence[str] = (), random_init: bool = False):
    """Load the models once; returns a function making an :class:`InteractiveSession` that shares them.

    Args:
        config: a config path or preset name (``dcm_small``: the small CPU preset and its bundled weights).
        weights: a combined checkpoint, or None for the config's.
        device: ``cpu``, ``cuda``, ``cuda:1``... (None: the config's).
        undo_levels: protocol undo levels; the session keeps twice as many (a lasso uses two).
        overrides: ``key=value`` config overrides (benchmarks: ``engine.policy=global_only``).
        random_init: random models, for timings only (e.g. the full-size presets, whose weights are not shipped).
    """
    from dcm.engine.session import InteractiveSession

    if overrides or random_init:
        from dcm.experts import build_experts_from_config

        overrides = (*overrides, "weights=null") if random_init else tuple(overrides)
        cfg, experts = build_experts_from_config(config, weights, device, overrides, random_init=random_init)
        template = InteractiveSession(config=cfg, experts=experts)
    else:
        template = InteractiveSession(config=config, weights=weights, device=device)
    engine = dict(template.engine_cfg)

    def make_session() -> InteractiveSession:
        return InteractiveSession(config={"engine": dict(engine)}, experts=clone_experts(template.experts),
                                  max_undo=max(undo_levels, 1) * 2)

    return make_session


def build_registry(config: str = "dcm_small", weights=None, device=None, max_sessions: int = 4,
                   idle_timeout: float = 600.0, liveness_timeout: float = 60.0, undo_levels: int = 20
                   ) -> SessionRegistry:
    """Load the models once (:func:`session_factory`) and return a registry whose sessions share them."""
    return SessionRegistry(session_factory(config, weights, device, undo_levels), max_sessions, idle_timeout,
                           liveness_timeout, undo_levels)
