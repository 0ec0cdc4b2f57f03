"""The browser page served at ``/`` by ``dcm.serve`` (``dcm/serve/static/``, ``/page/*``).

The page's endpoints are checked with httpx; the page itself in headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium) with real mouse events: open a NIfTI, drag a box, click, right-click,
undo, scroll, a second object, download the label map and read it back with nibabel. The server (small CPU
preset, models loaded once) runs in a thread on 127.0.0.1, a free port, with an API key.

The browser tests skip, with the reason, where chromium / chromedriver / selenium are missing, and fail instead
under ``CI=true``. ``python tests/test_serve_page.py --screenshot figs/viewer.png`` makes the README figure
(the MNI152 template from the nilearn wheel, a box and two clicks).
"""

from __future__ import annotations

import gzip
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parent.parent
KEY = "page-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# two bright cubes, half-open (z, y, x) ranges in the page's (S, A, R) index order, on a 32 x 64 x 64 grid
CUBES = [((6, 18), (8, 28), (8, 28)), ((14, 26), (36, 56), (36, 56))]
SHAPE_ZYX = (32, 64, 64)
# the file's affine: voxel axes i -> Left, j -> Posterior, k -> Superior (LPS), 2 mm slices, not the page's order
AFFINE = np.array([[-1.0, 0, 0, 40], [0, -1.0, 0, 50], [0, 0, 2.0, -30], [0, 0, 0, 1]])


# ---------------------------------------------------------------------------------------------- helpers



#: Dice above which an answer lies on the object: a misplaced or transposed answer scores near 0. How good
#: the small model is belongs to the benchmarks (README "Real images"), not to these protocol tests.
ON_THE_OBJECT = 0.4

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """``make_app`` under uvicorn in a thread (API key, 2 sessions)."""

    def __init__(self, make_session):
        from dcm.serve import SessionRegistry, make_app

        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        registry = SessionRegistry(make_session, max_sessions=2, idle_timeout=600, liveness_timeout=60)
        app = make_app(registry, api_key=KEY, max_body_bytes=64 << 20)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/healthz", headers=AUTH, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _to_file_order(zyx: np.ndarray) -> np.ndarray:
    """(z, y, x) = (S, A, R) -> the array of a file with :data:`AFFINE` (i = L, j = P, k = S)."""
    return np.ascontiguousarray(zyx.transpose(2, 1, 0)[::-1, ::-1, :])


def _cube_nifti(path: Path) -> Path:
    rng = np.random.default_rng(0)
    zyx = rng.normal(0, 5, SHAPE_ZYX).astype(np.float32)
    for cube in CUBES:
        zyx[tuple(slice(*r) for r in cube)] += 100
    img = nib.Nifti1Image(_to_file_order(zyx), AFFINE)
    img.header.set_qform(AFFINE, 1)
    img.header.set_sform(AFFINE, 1)
    nib.save(img, path)
    return path


def _cube_mask_file(cube) -> np.ndarray:
    m = np.zeros(SHAPE_ZYX, bool)
    m[tuple(slice(*r) for r in cube)] = True
    return _to_file_order(m)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float(np.logical_and(a, b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def server():
    from dcm.serve import session_factory

    s = _Server(session_factory("dcm_small"))
    yield s
    s.stop()


# ---------------------------------------------------------------------------------------------- no browser


def test_reorientation_round_trip_keeps_the_files_grid():
    from dcm.serve.page import labels_to_nifti, read_nifti_bytes

    rng = np.random.default_rng(1)
    data = rng.normal(size=(7, 9, 5)).astype(np.float32)
    affine = np.array([[0, 0, -2.0, 10], [-1.5, 0, 0, 20], [0, 3.0, 0, -5], [0, 0, 0, 1]])  # axes P, S, L
    img = nib.Nifti1Image(data, affine)
    image = read_nifti_bytes(gzip.compress(img.to_bytes()), "psl.nii.gz")
    assert image.volume.shape == (9, 7, 5) and image.spacing_zyx == (3.0, 1.5, 2.0)
    assert image.meta()["file_axcodes"] == "PSL"
    # (z, y, x) index steps are S, A, R steps in world space
    world = lambda ijk: affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]  # noqa: E731
    index = np.arange(data.size).reshape(data.shape)
    page_index = read_nifti_bytes(nib.Nifti1Image(index.astype(np.float32), affine).to_bytes(), "i.nii").volume
    at = lambda zyx: np.argwhere(index == page_index[zyx])[0]  # noqa: E731
    for axis, direction in enumerate(([0, 0, 1], [0, 1, 0], [1, 0, 0])):
        step = [0, 0, 0]
        step[axis] = 1
        delta = world(at(tuple(step))) - world(at((0, 0, 0)))
        assert np.allclose(delta / np.linalg.norm(delta), direction), (axis, delta)
    # labels written back lie on the file's own grid, with its affine
    labels = (image.volume > 0.5).astype(np.uint8)
    out = nib.Nifti1Image.from_bytes(gzip.decompress(labels_to_nifti(labels, image)))
    assert out.shape == data.shape and np.allclose(out.affine, affine)
    assert out.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(out.dataobj), (data > 0.5).astype(np.uint8))


def test_page_endpoints(server, tmp_path):
    url = server.url
    page = httpx.get(url + "/")  # the page and its files need no key
    assert page.status_code == 200 and "DCM" in page.text and page.headers["content-type"].startswith("text/html")
    for name in ("app.js", "api.js", "views.js", "style.css"):
        assert httpx.get(f"{url}/static/{name}").status_code == 200, name
    assert httpx.post(url + "/page/open", content=b"x").status_code == 401  # the endpoints do
    token = httpx.post(url + "/claim", headers=AUTH).json()["lease_token"]
    headers = {**AUTH, "X-Lease-Token": token}
    try:
        r = httpx.post(url + "/page/open", headers={**headers, "X-Filename": "notes.nii"}, content=b"hello " * 100)
        assert r.status_code == 400 and "notes.nii" in r.json()["detail"]
        r = httpx.post(url + "/page/open", headers={**headers, "X-Filename": "bad.nii.gz"},
                       content=gzip.compress(b"x" * 1000)[:40])
        assert r.status_code == 400 and "bad.nii.gz" in r.json()["detail"]
        assert httpx.post(url + "/page/download", headers=headers, content=b"").status_code == 409

        raw = _cube_nifti(tmp_path / "cubes.nii.gz").read_bytes()
        r = httpx.post(url + "/page/open", headers={**headers, "X-Filename": "cubes.nii.gz"}, content=raw)
        assert r.status_code == 200, r.text
        meta = __import__("json").loads(r.headers["X-Meta"])
        assert meta["shape"] == list(SHAPE_ZYX) and meta["spacing"] == [2.0, 1.0, 1.0]
        assert meta["file_axcodes"] == "LPS" and meta["file_shape"] == [64, 64, 32]
        volume = np.frombuffer(r.content, np.float32).reshape(SHAPE_ZYX)
        assert volume[12, 18, 18] > 50 and volume[2, 2, 2] < 50  # inside / outside cube 1 in (S, A, R)

        # a protocol prompt, then the region its answer names
        r = httpx.post(url + "/add_bbox_interaction", headers=headers, json={
            "bbox_coords": [[12, 13], [6, 30], [6, 30]], "include_interaction": True, "run_prediction": True})
        bbox = __import__("json").loads(r.headers["X-Meta"])["bbox"]
        assert bbox is not None
        flat = ",".join(str(v) for pair in bbox for v in pair)
        region = httpx.get(f"{url}/page/mask?bbox={flat}", headers=headers)
        shape = [hi - lo for lo, hi in bbox]
        assert region.status_code == 200 and len(region.content) == int(np.prod(shape))
        assert httpx.get(f"{url}/page/mask?bbox=0,1,0,1", headers=headers).status_code == 400
        assert httpx.get(f"{url}/page/mask?bbox=0,99,0,1,0,1", headers=headers).status_code == 400

        labels = np.zeros(SHAPE_ZYX, np.uint8)
        labels[tuple(slice(*r) for r in CUBES[0])] = 1
        r = httpx.post(url + "/page/download", headers=headers, content=labels.tobytes())
        assert r.status_code == 200 and 'filename="cubes_labels.nii.gz"' in r.headers["content-disposition"]
        out = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
        assert out.shape == (64, 64, 32) and np.allclose(out.affine, AFFINE)
        assert np.array_equal(np.asarray(out.dataobj) == 1, _cube_mask_file(CUBES[0]))
        assert httpx.post(url + "/page/download", headers=headers, content=b"\0" * 10).status_code == 400
    finally:
        httpx.post(url + "/release", headers=headers)


# ---------------------------------------------------------------------------------------------- browser


def _missing_browser() -> str:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements-test.txt)"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install -y {package})"
    return ""


def _start_browser(download_dir: Path, size=(1400, 800)):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={size[0]},{size[1]}", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    return driver


@pytest.fixture
def browser(tmp_path):
    missing = _missing_browser()
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser tests need chromium, chromedriver and selenium under CI: {missing}")
        pytest.skip(missing)
    driver = _start_browser(tmp_path)
    yield driver
    driver.quit()


class Page:
    """The page in a selenium driver: its controls, and mouse actions at voxels."""

    VIEWS = ("axial", "coronal", "sagittal")

    def __init__(self, driver, url: str):
        self.d = driver
        driver.get(url)
        self.wait(lambda: driver.execute_script("return !!window.dcmPage"), "the page did not load")

    def wait(self, ready, what: str, seconds: float = 60) -> None:
        deadline = time.time() + seconds
        while time.time() < deadline:
            if ready():
                return
            time.sleep(0.05)
        raise AssertionError(f"{what}; page says: {self.message()!r}")

    def idle(self) -> None:
        time.sleep(0.05)
        self.wait(lambda: self.d.execute_script("return document.body.dataset.busy") == "0", "the page stayed busy")

    def message(self) -> str:
        return self.d.execute_script("return document.getElementById('message').textContent")

    def js(self, script: str, *args):
        return self.d.execute_script(script, *args)

    def open(self, path: Path, key: str = KEY) -> None:
        from selenium.webdriver.common.by import By

        field = self.d.find_element(By.ID, "key")
        field.clear()
        field.send_keys(key)
        self.d.find_element(By.ID, "file").send_keys(str(path))
        self.wait(lambda: self.message().startswith(("opened", path.name)), f"{path.name} did not open")
        self.idle()

    def canvas(self, view: str):
        from selenium.webdriver.common.by import By

        return self.d.find_element(By.ID, f"view-{view}")

    def offset(self, view: str, voxel: Sequence[int]) -> List[float]:
        """The (x, y) offset from the canvas centre (selenium's origin) of a voxel's centre on ``view``."""
        return self.js("""
            const v = window.dcmPage.views.find((w) => w.name === arguments[0]);
            const {c, r} = v.cellOf(arguments[1]);
            const {ox, oy, cw, ch} = v.layout();
            return [ox + (c + 0.5) * cw - v.canvas.clientWidth / 2, oy + (r + 0.5) * ch - v.canvas.clientHeight / 2];
        """, view, list(voxel))

    def show(self, view: str, voxel: Sequence[int]) -> None:
        """Scroll ``view`` to ``voxel``'s slice with its slider (the wheel is tested on its own)."""
        axis = self.VIEWS.index(view)
        self.js("const s = document.getElementById(arguments[0]); s.value = arguments[1];"
                "s.dispatchEvent(new Event('input'));", f"slice-{view}", int(voxel[axis]))

    def drag(self, view: str, a: Sequence[int], b: Sequence[int]) -> None:
        from selenium.webdriver import ActionChains

        self.show(view, a)
        (ax, ay), (bx, by) = self.offset(view, a), self.offset(view, b)
        (ActionChains(self.d).move_to_element_with_offset(self.canvas(view), int(ax), int(ay)).click_and_hold()
         .move_by_offset(int((bx - ax) / 2), int((by - ay) / 2)).move_by_offset(int(bx - ax) - int((bx - ax) / 2),
                                                                                 int(by - ay) - int((by - ay) / 2))
         .release().perform())
        self.idle()

    def click(self, view: str, voxel: Sequence[int], how: str = "left") -> None:
        from selenium.webdriver import ActionChains, Keys

        self.show(view, voxel)
        x, y = self.offset(view, voxel)
        chain = ActionChains(self.d).move_to_element_with_offset(self.canvas(view), int(round(x)), int(round(y)))
        if how == "right":
            chain = chain.context_click()
        elif how == "shift":
            chain = chain.key_down(Keys.SHIFT).click().key_up(Keys.SHIFT)
        else:
            chain = chain.click()
        chain.perform()
        self.idle()

    def button(self, name: str) -> None:
        from selenium.webdriver.common.by import By

        self.d.find_element(By.ID, name).click()
        self.idle()

    def voxels(self) -> Dict[int, int]:
        return {int(k): v for k, v in self.js(
            "return Object.fromEntries([...document.querySelectorAll('#objects .voxels')]"
            ".map((e) => [e.dataset.label, Number(e.textContent)]))").items()}

    def prompts(self) -> List[Dict]:
        return self.js("return window.dcmPage.state.prompts")


def test_browser_box_clicks_undo_objects_download(server, browser, tmp_path):
    from selenium.webdriver import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

    image = _cube_nifti(tmp_path / "cubes.nii.gz")
    page = Page(browser, server.url + "/")

    # a wrong key and a bad file are messages on the page that say what went wrong
    (tmp_path / "notes.nii").write_text("not an image\n" * 50)
    page.open(tmp_path / "notes.nii")
    assert "notes.nii" in page.message() and "not a NIfTI" in page.message()
    assert page.js("return document.getElementById('message').dataset.kind") == "error"
    page.open(image, key="wrong")
    assert "API key" in page.message()

    page.open(image)
    assert page.js("return window.dcmPage.state.vol.shape") == list(SHAPE_ZYX)
    # radiological: the axial view's left column is the patient's right (largest x), top row anterior
    assert page.js("return window.dcmPage.views[0].voxelAt(0, 0)") == [16, 63, 63]
    page.button("neurological")  # the patient's left on the left
    assert page.js("return window.dcmPage.views[0].voxelAt(0, 0)") == [16, 63, 0]
    page.button("neurological")

    # wheel: three notches down on the axial view go three slices up
    z0 = page.js("return window.dcmPage.state.cursor[0]")
    origin = ScrollOrigin.from_element(page.canvas("axial"))
    for _ in range(3):
        ActionChains(browser).scroll_from_origin(origin, 0, 120).perform()
    page.wait(lambda: page.js("return window.dcmPage.state.cursor[0]") == z0 + 3, "the wheel did not scroll")

    # object 1: a box on an axial slice, a positive click, a right-click, an undo
    (z, y, x), (z1, y1, x1) = [c[0] for c in CUBES[0]], [c[1] - 1 for c in CUBES[0]]
    zm = (z + z1) // 2
    page.drag("axial", (zm, y - 2, x - 2), (zm, y1 + 2, x1 + 2))
    assert page.voxels()[1] > 500, page.message()
    assert [p["kind"] for p in page.prompts()] == ["box"]
    page.click("coronal", (zm + 2, 16, 16))
    page.click("sagittal", (zm, 2, 60), how="right")
    assert page.prompts()[1]["voxel"] == [zm + 2, 16, 16]  # scrolling moved the cursor, not the point
    assert [(p["kind"], p.get("positive")) for p in page.prompts()] == [("box", None), ("point", True),
                                                                         ("point", False)]
    before = page.voxels()[1]
    page.button("undo")
    assert len(page.prompts()) == 2 and page.message().startswith("undone"), page.message()
    page.click("axial", (zm, 18, 18), how="shift")  # shift+click: negative too
    assert page.prompts()[-1]["positive"] is False
    page.button("undo")
    assert page.voxels()[1] > 500 and before > 0

    # object 2: a box on the coronal view
    page.button("new-object")
    assert set(page.voxels()) == {1, 2} and page.voxels()[2] == 0
    (z, y, x), (z1, y1, x1) = [c[0] for c in CUBES[1]], [c[1] - 1 for c in CUBES[1]]
    ym = (y + y1) // 2
    page.drag("coronal", (z - 2, ym, x - 2), (z1 + 2, ym, x1 + 2))
    assert page.voxels()[2] > 500, page.message()
    page.button("undo")
    page.button("undo")
    assert "nothing to undo" in page.message()
    page.drag("coronal", (z - 2, ym, x - 2), (z1 + 2, ym, x1 + 2))

    # download: the input's grid and affine, both objects where the cubes are
    page.button("download")
    target = tmp_path / "cubes_labels.nii.gz"
    page.wait(lambda: target.is_file() and not list(tmp_path.glob("*.crdownload")), "no download")
    out = nib.load(target)
    assert out.shape == (64, 64, 32) and np.allclose(out.affine, AFFINE)
    labels = np.asarray(out.dataobj)
    assert set(np.unique(labels)) == {0, 1, 2}
    for k, cube in enumerate(CUBES, 1):
        assert _dice(labels == k, _cube_mask_file(cube)) > ON_THE_OBJECT, k


# ---------------------------------------------------------------------------------------------- the figure


def _mni_crop(path: Path) -> Path:
    """The MNI152 template from the nilearn wheel at 2 mm (every second voxel, brain bounding box)."""
    import nilearn

    src = Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    img = nib.load(src)
    data = np.asarray(img.dataobj, dtype=np.float32)[::2, ::2, ::2]
    affine = img.affine.copy()
    affine[:3, :3] *= 2
    inside = np.argwhere(data > 0.05 * data.max())
    lo, hi = inside.min(0), inside.max(0) + 1
    data = data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    affine[:3, 3] += affine[:3, :3] @ lo
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


#: the figure's prompts on the 2 mm MNI crop, (z, y, x) = (S, A, R) voxels: a box around the patient's left
#: lateral ventricle on an axial slice, a positive click in its posterior part and a negative one beside it
FIG_BOX = ((45, 30, 21), (45, 63, 35))
FIG_CLICKS = (("axial", (45, 38, 27), "left"), ("axial", (45, 50, 23), "right"))


def make_screenshot(out: Path) -> None:
    """The README figure: the MNI crop, :data:`FIG_BOX` and :data:`FIG_CLICKS`."""
    import tempfile

    from dcm.serve import session_factory

    server = _Server(session_factory("dcm_small"))
    with tempfile.TemporaryDirectory() as tmp:
        driver = _start_browser(Path(tmp), size=(1500, 840))
        try:
            page = Page(driver, server.url + "/")
            page.open(_mni_crop(Path(tmp) / "mni152_2mm.nii.gz"))
            page.drag("axial", *FIG_BOX)
            for view, voxel, how in FIG_CLICKS:
                page.click(view, voxel, how)
            page.show("axial", FIG_BOX[0])  # the box's slice, the other views through the positive click
            for view in ("coronal", "sagittal"):
                page.show(view, FIG_CLICKS[0][1])
            time.sleep(0.3)
            print(page.message(), page.voxels())
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
        finally:
            driver.quit()
            server.stop()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--screenshot":
        make_screenshot(Path(sys.argv[2]))
    else:
        print(__doc__)
