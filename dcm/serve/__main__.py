"""``python -m dcm.serve [--config C] [--weights W] [--host H] [--port P] [--api-key K] ...``

Serves DCM over nnInteractive's remote protocol; see the README section "Use DCM from napari or 3D Slicer".
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from typing import List, Optional


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dcm.serve", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="dcm_small", help="config path or preset name (default: dcm_small)")
    p.add_argument("--weights", default=None, help="combined checkpoint (default: the config's)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=1527, help="TCP port (default 1527)")
    p.add_argument("--api-key", default=None,
                   help="bearer token required on every request (default: $DCM_API_KEY; none: no check)")
    p.add_argument("--max-sessions", type=int, default=4, help="concurrent client sessions (default 4)")
    p.add_argument("--idle-timeout", type=float, default=600.0,
                   help="seconds without a user action before a session is reaped (default 600)")
    p.add_argument("--liveness-timeout", type=float, default=60.0,
                   help="seconds without any request, heartbeats included, before a session is reaped (default 60)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: the config's)")
    p.add_argument("--undo-levels", type=int, default=20, help="undo levels per session (default 20)")
    p.add_argument("--max-body-mb", type=float, default=1024.0, help="largest request body in MiB (default 1024)")
    p.add_argument("--max-array-mb", type=float, default=2048.0,
                   help="largest decoded image / mask / target buffer in MiB (default 2048)")
    p.add_argument("--insecure-no-key", action="store_true",
                   help="allow a non-loopback --host without an API key (not recommended)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    args = p.parse_args(argv)
    args.api_key = args.api_key or os.environ.get("DCM_API_KEY") or None
    if args.max_sessions < 1:
        p.error("--max-sessions must be at least 1")
    if args.idle_timeout <= 0 or args.liveness_timeout <= 0:
        p.error("--idle-timeout and --liveness-timeout must be > 0")
    if not _is_loopback(args.host) and not args.api_key and not args.insecure_no_key:
        p.error(f"--host {args.host} is reachable from other machines: set --api-key (or DCM_API_KEY), "
                "or pass --insecure-no-key")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import uvicorn

    from dcm.errors import DCMError
    from dcm.serve import build_registry, make_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("dcm.serve")
    log.info("loading %s%s ...", args.config, f" with {args.weights}" if args.weights else "")
    try:
        registry = build_registry(args.config, args.weights, args.device, args.max_sessions, args.idle_timeout,
                                  args.liveness_timeout, args.undo_levels)
    except (DCMError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.api_key:
        log.warning("no API key: every client that reaches %s:%d can use this server", args.host, args.port)
    app = make_app(registry, api_key=args.api_key, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                   max_array_bytes=int(args.max_array_mb * (1 << 20)), undo_levels=args.undo_levels)
    log.info("serving on http://%s:%d", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
