"""DCM: interactive 3D medical image segmentation with a global-RoI and a local-RoI expert.

Arrays are (z, y, x) everywhere; see ``dcm.data.cases`` for the case representation.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Heavy modules (torch, MONAI) load only when the session is asked for.
    if name == "InteractiveSession":
        from dcm.engine.session import InteractiveSession

        return InteractiveSession
    raise AttributeError(f"module 'dcm' has no attribute {name!r}")
