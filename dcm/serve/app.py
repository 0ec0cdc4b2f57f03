"""The HTTP server: nnInteractive's remote protocol (client ``nninteractive-client``) in front of DCM.

Every endpoint of the protocol is served with the encoding the client expects: JSON bodies, or a packed array
(:mod:`dcm.serve.wire`) with its JSON metadata in the ``X-Meta`` header; the lease token rides in
``X-Lease-Token``; predictions and undos answer with the changed region only (``X-Meta``:
``{"ran_prediction", "bbox", "dtype", "shape"}`` and the region packed as the body).

Status codes: 400 a bad request (shape, dtype, value, a prompt DCM has no meaning for), 401 a missing or wrong
API key, 404 an unknown path, 409 a call that does not fit the session's state (no image yet), 410 an unknown
or reaped lease (the client raises ``SessionExpiredError``), 413 a body or array over the limits, 503 every
session slot taken (``ServerAtCapacityError``). Every error body is ``{"detail": "<one line>"}``.

The browser page (``/``, files in ``static/``) adds three endpoints of its own, under ``/page/``: open a NIfTI,
read the current object's buffer as raw bytes, download the label map as NIfTI (:mod:`dcm.serve.page`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import weakref
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Optional
from urllib.parse import unquote

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from dcm.errors import DCMError
from dcm.serve import prompts as P
from dcm.serve import wire
from dcm.serve.page import NiftiError, PageImage, labels_to_nifti, read_nifti_bytes
from dcm.serve.sessions import AtCapacity, Change, ServedSession, SessionRegistry, StateError, UnknownLease

__all__ = ["make_app", "ServeError", "capabilities_of", "STATIC_DIR"]

logger = logging.getLogger("dcm.serve")

META_HEADER = "X-Meta"
LEASE_HEADER = "X-Lease-Token"
OCTET_STREAM = "application/octet-stream"
STATIC_DIR = Path(__file__).parent / "static"
#: paths served without the API key: the browser page's files (no data, no session)
_PUBLIC_PATHS = ("/", "/favicon.ico")
_PUBLIC_PREFIX = "/static/"


class ServeError(Exception):
    """An HTTP error with a one-line reason."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = " ".join(str(detail).split())[:500]


def _error(status: int, detail: str, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"detail": " ".join(str(detail).split())[:500]}, status_code=status, headers=headers)


def capabilities_of(undo_levels: int, license_text: str) -> Dict[str, Any]:
    """What ``GET /capabilities`` answers: the fields the client reads, and DCM's notes on its prompts."""
    import dcm

    return {
        "supported_interactions": {"points": True, "bbox2d": True, "bbox3d": True, "scribble": True, "lasso": True},
        "channel_mapping": {},  # DCM has no interaction channels
        "num_interaction_channels": 0,
        "supports_initial_label": True,
        "supports_zero_shot_label_refinement": True,
        "preferred_scribble_thickness": [2, 2, 2],
        "interaction_decay": None,
        "patch_size": None,
        "do_autozoom": True,
        "inference_session_version": dcm.__version__,
        "license": license_text,
        "supports_undo": True,
        "server": "dcm",
        "undo_levels": undo_levels,
        "axes": "client (c, a0, a1, a2) -> DCM channel 0, (z, y, x) = (a0, a1, a2); spacing from "
                "image_properties['spacing'] in that order, else 1 mm",
        "prompts": {
            "bbox3d": "the object's box: z range = a0, in-plane box = (a1, a2) on the middle slice",
            "bbox2d": "a box whose missing extent is its smaller drawn side in mm, centred on the drawn slice",
            "points": "include / exclude -> positive / negative click",
            "scribble": f"clicks on the stroke, one per {P.SCRIBBLE_MM_PER_CLICK:g} mm of its extent, "
                        f"1 to {P.SCRIBBLE_MAX_CLICKS}",
            "lasso": "include: filled region -> previous mask + its box; exclude: region erased",
            "initial_label": "previous mask (run_prediction: refined with its box)",
        },
        "unsupported": {
            "exclude_bbox": "DCM has no negative box (400)",
            "do_autozoom": "accepted, no effect (DCM's experts choose their own regions)",
            "multi_channel": "channel 0 is segmented",
        },
    }


def make_app(registry: SessionRegistry, api_key: Optional[str] = None, max_body_bytes: int = 1 << 30,
             max_array_bytes: int = 2 << 30, undo_levels: int = 20,
             license_text: str = "DCM weights: see weights/README.md", sweep_interval: Optional[float] = None,
             ) -> FastAPI:
    """The FastAPI app serving ``registry``'s sessions.

    Args:
        registry: the sessions (and the factory that makes one per claim).
        api_key: when set, every request but the page's static files needs ``Authorization: Bearer <key>``.
        max_body_bytes: largest request body (413 above).
        max_array_bytes: largest decoded array (image, mask, target buffer; 413 above).
        sweep_interval: seconds between reaper passes (default: a quarter of the shorter timeout, <= 15 s).
    """
    interval = sweep_interval or max(0.05, min(15.0, registry.liveness_timeout / 4, registry.idle_timeout / 4))
    caps = capabilities_of(undo_levels, license_text)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        async def reap() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    registry.sweep()
                except Exception:  # the reaper must outlive any one pass
                    logger.exception("reaper pass failed")

        task = asyncio.create_task(reap())
        try:
            yield
        finally:
            task.cancel()
            registry.close_all()

    app = FastAPI(title="DCM interactive segmentation server (nnInteractive protocol)", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)

    # ------------------------------------------------------------------ errors and auth
    @app.exception_handler(ServeError)
    async def _serve_error(_r: Request, e: ServeError) -> JSONResponse:
        return _error(e.status, e.detail)

    @app.exception_handler(404)
    async def _not_found(r: Request, _e: Exception) -> JSONResponse:
        return _error(404, f"no endpoint {r.url.path}")

    @app.exception_handler(405)
    async def _bad_method(r: Request, _e: Exception) -> JSONResponse:
        return _error(405, f"{r.method} is not allowed on {r.url.path}")

    @app.exception_handler(Exception)
    async def _unexpected(_r: Request, e: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        return _error(500, f"internal error: {type(e).__name__}: {e}")

    @app.middleware("http")
    async def _auth(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        if api_key and path not in _PUBLIC_PATHS and not path.startswith(_PUBLIC_PREFIX):
            given = request.headers.get("authorization", "")
            if not given.startswith("Bearer "):
                return _error(401, "missing bearer token (Authorization: Bearer <api key>)")
            if not hmac.compare_digest(given[len("Bearer "):].encode(), api_key.encode()):
                return _error(401, "invalid bearer token")
        return await call_next(request)

    # ------------------------------------------------------------------ request helpers
    async def body_of(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ServeError(400, "bad Content-Length")
            if int(declared) > max_body_bytes:
                raise ServeError(413, f"body of {declared} bytes is over the limit of {max_body_bytes}")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    raise ServeError(413, f"body is over the limit of {max_body_bytes} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ServeError(400, "client disconnected during the upload") from None
        return b"".join(chunks)

    async def json_of(request: Request) -> Dict[str, Any]:
        body = await body_of(request)
        if not body.strip():
            return {}
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError) as e:
            raise ServeError(400, f"body is not JSON: {e}") from None
        if not isinstance(payload, dict):
            raise ServeError(400, f"body must be a JSON object, got {type(payload).__name__}")
        return payload

    def meta_of(request: Request) -> Dict[str, Any]:
        raw = request.headers.get(META_HEADER)
        if raw is None:
            return {}
        try:
            meta = json.loads(raw)
        except ValueError as e:
            raise ServeError(400, f"bad {META_HEADER} header: {e}") from None
        if not isinstance(meta, dict):
            raise ServeError(400, f"{META_HEADER} must be a JSON object")
        return meta

    def flag(payload: Dict[str, Any], key: str, default: Optional[bool] = None) -> bool:
        if key not in payload:
            if default is None:
                raise ServeError(400, f"missing required field: {key}")
            return default
        value = payload[key]
        if not isinstance(value, (bool, int)) or value not in (0, 1):
            raise ServeError(400, f"{key} must be true or false, got {value!r}")
        return bool(value)

    def array_of(body: bytes, what: str) -> np.ndarray:
        try:
            return wire.unpack_array(body, max_bytes=max_array_bytes)
        except wire.ArrayTooLarge as e:
            raise ServeError(413, f"{what}: {e}") from None
        except wire.WireError as e:
            raise ServeError(400, f"{what}: {e}") from None

    def lease_of(request: Request, seen: bool = True) -> ServedSession:
        try:
            return registry.get(request.headers.get(LEASE_HEADER), seen=seen)
        except UnknownLease as e:
            raise ServeError(410, str(e)) from None

    async def locked(served: ServedSession, work: Callable[[], Any]) -> Any:
        """Run ``work`` in a worker thread under the session's lock, errors mapped to one-line 4xx."""
        def run() -> Any:
            served.mark_active()
            with served.lock:
                try:
                    return work()
                finally:
                    served.mark_active()

        try:
            return await run_in_threadpool(run)
        except (P.PromptError, wire.WireError) as e:
            raise ServeError(400, str(e)) from None
        except StateError as e:
            raise ServeError(409, str(e)) from None
        except (DCMError, ValueError, KeyError, IndexError) as e:  # CaseError is a ValueError
            raise ServeError(400, str(e).strip("'\"")) from None

    def answer(change: Change) -> Response:
        meta: Dict[str, Any] = {"ran_prediction": bool(change.ran), "bbox": None}
        content = b""
        if change.bbox is not None and change.values is not None:
            meta.update(bbox=change.bbox, dtype=str(change.values.dtype), shape=list(change.values.shape))
            content = wire.pack_array(change.values, nthreads=2)
        return Response(content=content, media_type=OCTET_STREAM,
                        headers={META_HEADER: json.dumps(meta, separators=(",", ":"))})

    # ------------------------------------------------------------------ leases
    @app.get("/healthz")
    async def healthz() -> Dict[str, Any]:
        return {"ok": True, "sessions": len(registry), "max_sessions": registry.max_sessions}

    @app.get("/capabilities")
    async def capabilities() -> Dict[str, Any]:
        return caps

    @app.post("/claim")
    async def claim() -> JSONResponse:
        try:
            token = await run_in_threadpool(registry.claim)
        except AtCapacity as e:
            return _error(503, str(e), headers={"Retry-After": "10"})
        return JSONResponse({"lease_token": token, "idle_timeout_seconds": registry.idle_timeout,
                             "liveness_timeout_seconds": registry.liveness_timeout,
                             "max_sessions": registry.max_sessions})

    @app.post("/release")
    async def release(request: Request) -> Dict[str, Any]:
        registry.release(request.headers.get(LEASE_HEADER))
        return {"released": True}

    @app.post("/heartbeat")
    async def heartbeat(request: Request) -> Dict[str, Any]:
        return {"remaining_seconds": registry.remaining(lease_of(request))}

    @app.get("/lease_status")
    async def lease_status(request: Request) -> Dict[str, Any]:
        served = lease_of(request, seen=False)
        return {"remaining_seconds": registry.remaining(served), "idle_timeout_seconds": registry.idle_timeout}

    # ------------------------------------------------------------------ image and buffer
    @app.post("/set_image")
    async def set_image(request: Request) -> Dict[str, Any]:
        served = lease_of(request)
        meta = meta_of(request)
        body = await body_of(request)
        properties = meta.get("image_properties") or {}
        if not isinstance(properties, dict):
            raise ServeError(400, "image_properties must be a JSON object")
        spacing = properties.get("spacing")
        if spacing is not None:
            if (not isinstance(spacing, list) or len(spacing) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spacing)):
                raise ServeError(400, f"image_properties.spacing must be 3 numbers (a0, a1, a2), got {spacing!r}"[:200])
            spacing = tuple(float(v) for v in spacing)

        def work() -> Dict[str, Any]:
            image = array_of(body, "image")
            warnings = served.set_image(image, spacing)
            for w in warnings:
                logger.warning("set_image: %s", w)
            return {"original_image_shape": list(image.shape), "spacing": list(served.spacing),
                    "warnings": warnings}

        return await locked(served, work)

    @app.post("/set_target_buffer")
    async def set_target_buffer(request: Request) -> Dict[str, Any]:
        served = lease_of(request)
        payload = await json_of(request)
        shape = payload.get("shape")
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
            raise ServeError(400, f"shape must be 3 positive integers, got {shape!r}"[:200])
        try:
            dtype = np.dtype(payload.get("dtype"))
        except (TypeError, ValueError):
            raise ServeError(400, f"unknown dtype {payload.get('dtype')!r}"[:200]) from None
        if dtype.kind not in "biu":
            raise ServeError(400, f"target buffer dtype must be bool or an integer type, got {dtype}")
        if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > max_array_bytes:
            raise ServeError(413, f"target buffer {shape} {dtype} is over the limit of {max_array_bytes} bytes")
        await locked(served, lambda: served.set_target_buffer(tuple(shape), dtype))
        return {}

    @app.post("/set_do_autozoom")
    async def set_do_autozoom(request: Request) -> Dict[str, Any]:
        served = lease_of(request)
        payload = await json_of(request)
        served.do_autozoom = flag(payload, "do_autozoom")  # accepted; DCM's experts choose their regions
        return {}

    @app.post("/reset_interactions")
    async def reset_interactions(request: Request) -> Dict[str, Any]:
        served = lease_of(request)
        await json_of(request)
        await locked(served, served.reset_interactions)
        return {}

    # ------------------------------------------------------------------ interactions
    @app.post("/undo")
    async def undo(request: Request) -> Response:
        served = lease_of(request)
        await json_of(request)
        return answer(await locked(served, served.undo))

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        served = lease_of(request)
        await json_of(request)
        return answer(await locked(served, served.predict))

    async def json_interaction(request: Request, field: str, method: str) -> Response:
        """A prompt sent as JSON: ``payload[field]`` applied by the served session's ``method``."""
        served = lease_of(request)
        payload = await json_of(request)
        if field not in payload:
            raise ServeError(400, f"missing required field: {field}")
        include, run = flag(payload, "include_interaction"), flag(payload, "run_prediction", True)
        apply = getattr(served, method)
        return answer(await locked(served, lambda: apply(payload[field], include, run)))

    @app.post("/add_bbox_interaction")
    async def add_bbox(request: Request) -> Response:
        return await json_interaction(request, "bbox_coords", "add_box")

    @app.post("/add_point_interaction")
    async def add_point(request: Request) -> Response:
        return await json_interaction(request, "coordinates", "add_point")

    async def mask_interaction(request: Request, kind: str) -> Response:
        served = lease_of(request)
        meta = meta_of(request)
        body = await body_of(request)
        include, run = flag(meta, "include_interaction"), flag(meta, "run_prediction", True)
        bbox = meta.get("interaction_bbox")

        def work() -> Change:
            crop = array_of(body, kind)
            method = served.add_scribble if kind == "scribble" else served.add_lasso
            return method(crop, include, interaction_bbox=bbox, run_prediction=run)

        return answer(await locked(served, work))

    @app.post("/add_scribble_interaction")
    async def add_scribble(request: Request) -> Response:
        return await mask_interaction(request, "scribble")

    @app.post("/add_lasso_interaction")
    async def add_lasso(request: Request) -> Response:
        return await mask_interaction(request, "lasso")

    @app.post("/add_initial_seg_interaction")
    async def add_initial_seg(request: Request) -> Response:
        served = lease_of(request)
        meta = meta_of(request)
        body = await body_of(request)
        run = flag(meta, "run_prediction", False)
        return answer(await locked(served, lambda: served.add_initial_seg(array_of(body, "initial seg"), run)))

    # ------------------------------------------------------------------ the browser page
    # /page/* serve only the page (dcm/serve/static/): NIfTI in and out (nibabel, see dcm.serve.page) and the
    # current object's buffer as raw bytes; its prompts go through the protocol endpoints above.
    pages: "weakref.WeakKeyDictionary[ServedSession, PageImage]" = weakref.WeakKeyDictionary()

    def page_image(served: ServedSession) -> PageImage:
        image = pages.get(served)
        if image is None:
            raise ServeError(409, "no NIfTI opened in this session: open a file first")
        return image

    @app.post("/page/open")
    async def page_open(request: Request) -> Response:
        """Body: a .nii / .nii.gz file. Sets the session's image and a uint8 target buffer; answers the volume
        (float32, (z, y, x) = (S, A, R), C order) with its metadata in X-Meta."""
        served = lease_of(request)
        name = unquote(request.headers.get("x-filename", ""))[:200] or "upload"  # the page URI-encodes it
        body = await body_of(request)

        def work() -> PageImage:
            try:
                image = read_nifti_bytes(body, name, max_array_bytes)
            except NiftiError as e:
                raise ServeError(400, str(e)) from None
            if image.volume.nbytes > max_array_bytes:
                raise ServeError(413, f"{name}: {list(image.volume.shape)} float32 is over the limit of "
                                      f"{max_array_bytes} bytes")
            image.warnings += served.set_image(image.volume[None], image.spacing_zyx)
            served.set_target_buffer(image.volume.shape, np.dtype(np.uint8))
            pages[served] = image
            return image

        image = await locked(served, work)
        return Response(content=image.volume.tobytes(), media_type=OCTET_STREAM,
                        headers={META_HEADER: json.dumps(image.meta(), separators=(",", ":"))})

    @app.get("/page/mask")
    async def page_mask(request: Request) -> Response:
        """The current object's buffer (uint8, C order) on ``?bbox=z0,z1,y0,y1,x0,x1`` (half-open), as the last
        protocol answer left it: the page fetches the region an answer's X-Meta bbox names."""
        served = lease_of(request)
        try:
            bounds = [int(v) for v in request.query_params.get("bbox", "").split(",")]
        except ValueError:
            bounds = []
        if len(bounds) != 6:
            raise ServeError(400, "bbox must be z0,z1,y0,y1,x0,x1")

        def work() -> bytes:
            if served.shown is None:
                raise StateError("no target buffer yet: open a file first")
            region = tuple(slice(bounds[2 * a], bounds[2 * a + 1]) for a in range(3))
            if any(not 0 <= s.start < s.stop <= n for s, n in zip(region, served.shown.shape)):
                raise P.PromptError(f"bbox {bounds} is outside the image {list(served.shown.shape)}")
            return np.ascontiguousarray(served.shown[region], dtype=np.uint8).tobytes()

        return Response(content=await locked(served, work), media_type=OCTET_STREAM)

    @app.post("/page/download")
    async def page_download(request: Request) -> Response:
        """Body: the label map (uint8, (z, y, x) as /page/open sent the volume). Answers it as .nii.gz on the
        opened file's grid, with its affine and header."""
        served = lease_of(request)
        body = await body_of(request)
        image = page_image(served)
        if len(body) != image.volume.size:
            raise ServeError(400, f"label map has {len(body)} bytes, the image {list(image.volume.shape)} needs "
                                  f"{image.volume.size} (uint8)")
        labels = np.frombuffer(body, dtype=np.uint8).reshape(image.volume.shape)
        data = await run_in_threadpool(labels_to_nifti, labels, image)
        stem = image.name
        for suffix in (".nii.gz", ".nii", ".gz"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        filename = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem or "image") + "_labels.nii.gz"
        return Response(content=data, media_type="application/gzip",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @app.get("/")
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            return _error(404, "no page shipped")
        return FileResponse(page, media_type="text/html")

    if STATIC_DIR.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    return app
