"""Segment one object in a NIfTI image from a box and / or clicks; the mask keeps the input's geometry.

    python -m dcm.segment IMAGE.nii.gz --box z0 z1 y0 y1 x0 x1 --point z y x [--negative z y x] \\
        --out MASK.nii.gz [--config FILE] [--weights FILE] [key=value ...]

Without --config and --weights the small CPU preset (configs/dcm_small.yaml with the bundled
weights/dcm_small.pt) runs, and one line says so; --config configs/dcm.yaml --weights FILE for the full size.
Coordinates are voxel indices in (z, y, x) array order (SimpleITK / the challenge's convention), bounds
inclusive. Prompts are applied in order: the box, then the positive and negative clicks as given on the
command line.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from dcm.errors import CheckpointError, DCMError

__all__ = ["box_from_bounds", "main"]


def box_from_bounds(z0: int, z1: int, y0: int, y1: int, x0: int, x1: int) -> dict:
    """A challenge box dict from inclusive (z, y, x) bounds (the x / y box sits on the middle slice)."""
    return {"z_min": z0, "z_max": z1, "z_mid": (z0 + z1) // 2, "z_mid_x_min": x0, "z_mid_y_min": y0,
            "z_mid_x_max": x1, "z_mid_y_max": y1}


class _OrderedClick(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        clicks: List = getattr(namespace, "clicks", None) or []
        clicks.append((tuple(values), option_string == "--point"))
        namespace.clicks = clicks


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcm.segment", description=__doc__.split("\n\n")[0])
    parser.add_argument("image", help="input image (.nii.gz, .nii, .mha, ...)")
    parser.add_argument("--out", required=True, help="output mask file (same grid and geometry as the input)")
    parser.add_argument("--box", type=int, nargs=6, metavar=("Z0", "Z1", "Y0", "Y1", "X0", "X1"))
    parser.add_argument("--point", type=int, nargs=3, action=_OrderedClick, metavar=("Z", "Y", "X"),
                        help="positive click (repeatable)")
    parser.add_argument("--negative", type=int, nargs=3, action=_OrderedClick, metavar=("Z", "Y", "X"),
                        help="negative click (repeatable)")
    parser.add_argument("--config", help="YAML config path or preset name (default: configs/dcm.yaml with "
                                         "--weights, else the small CPU preset configs/dcm_small.yaml)")
    parser.add_argument("--weights", help="combined checkpoint of both experts")
    parser.add_argument("--device", help="auto (default), cpu or cuda")
    parser.add_argument("--trust-checkpoint", action="store_true")
    parser.add_argument("--random-init", action="store_true", help="no weights: random models (tests only)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    clicks = getattr(args, "clicks", None) or []
    if args.box is None and not clicks:
        parser.error("give a --box and / or at least one --point")

    from dcm.atomic import check_writable
    from dcm.cli import check_device
    from dcm.config import load_config, pick_config, resolve_repo_path
    from dcm.engine.session import InteractiveSession
    from dcm.experts import build_experts

    weights = args.weights
    try:  # settings and the output path first: a bad one must not cost the whole segmentation
        check_writable(args.out)
        config = pick_config(args.config, args.weights, args.random_init)
        cfg = load_config(config, tuple(args.overrides))  # every section checked here
        check_device(args.device or cfg.get("device"), "--device" if args.device else "device")
        weights = None if args.random_init else resolve_repo_path(args.weights or cfg.get("weights"))
        experts = build_experts(cfg, args.weights, args.device, trusted=args.trust_checkpoint,
                                random_init=args.random_init, config_name=str(config))
        session = InteractiveSession(config=cfg, experts=experts)
        session.set_image(args.image)
        obj = session.new_object()
        if args.box is not None:
            session.add_box(obj, box_from_bounds(*args.box))
        for zyx, positive in clicks:
            session.add_point(obj, zyx, positive=positive)
        session.save(args.out)
    except CheckpointError as e:
        print(f"segment: {e.naming(weights)}", file=sys.stderr)
        return 2
    except (DCMError, ValueError) as e:
        print(" ".join(f"segment: {e}".split()), file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({int(session.mask(obj).sum())} voxels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
