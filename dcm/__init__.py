"""DCM: interactive 3D medical image segmentation with a global-RoI and a local-RoI expert.

Arrays are (z, y, x) everywhere; see ``dcm.data.cases`` for the case representation.
"""

__version__ = "0.1.0"
