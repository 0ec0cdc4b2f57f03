// The page: open a NIfTI, three views, box / point prompts through the protocol endpoints, undo, objects,
// download. The volume and every coordinate are (z, y, x) = (S, A, R) (see views.js and dcm/serve/page.py);
// the protocol's (a0, a1, a2) are exactly these.
import { ApiError, Server } from "./api.js";
import { SliceView, colorOf } from "./views.js";

const $ = (id) => document.getElementById(id);
const DRAG_PX = 4; // a press that moves less than this is a click, more is a box

const state = {
  vol: null, // {data: Float32Array, shape: [nz, ny, nx], spacing: [sz, sy, sx], name}
  labels: null, // Uint8Array: the finished objects (label k = object k)
  current: null, // Uint8Array: the active object's mask, as the server's buffer holds it
  cursor: [0, 0, 0],
  window: 1, level: 0, range: [0, 1], opacity: 0.45, radiological: true,
  objects: [], // [{label}]
  active: 1,
  prompts: [], // the active object's prompts, for display and undo: {kind: "box"|"point", ...}
  busy: false,
};

const server = new Server($("key"));
const views = ["axial", "coronal", "sagittal"].map((name) => new SliceView(name, $(`view-${name}`), state));

// ------------------------------------------------------------------ messages and rendering

function say(text, kind = "info") {
  const box = $("message");
  box.textContent = text;
  box.dataset.kind = kind;
}

function setBusy(busy, text) {
  state.busy = busy;
  document.body.dataset.busy = busy ? "1" : "0";
  $("status").textContent = busy ? text : state.vol ? "ready" : "no image";
}

function renderAll() {
  for (const v of views) {
    v.render();
    const slider = $(`slice-${v.name}`);
    if (state.vol) {
      slider.max = v.depth - 1;
      slider.value = v.slice;
      $(`pos-${v.name}`).textContent = `${v.slice + 1} / ${v.depth}`;
    }
  }
}

function histogram(mask) {
  const counts = new Array(256).fill(0);
  for (let i = 0; i < mask.length; i++) counts[mask[i]]++;
  return counts;
}

function count(mask, value) {
  return histogram(mask)[value];
}

function renderObjects() {
  const list = $("objects");
  list.replaceChildren();
  const finished = histogram(state.labels), active = count(state.current, 1);
  for (const { label } of state.objects) {
    const item = document.createElement("li");
    const [r, g, b] = colorOf(label);
    const voxels = label === state.active ? active : finished[label];
    item.innerHTML = `<span class="swatch" style="background: rgb(${r}, ${g}, ${b})"></span>` +
      `Object ${label} <span class="voxels" data-label="${label}">${voxels}</span> voxels`;
    if (label === state.active) item.classList.add("active");
    list.append(item);
  }
}

// run `work` with the page marked busy; errors become the page's message
async function task(text, work) {
  if (state.busy) {
    say("still working on the previous request", "warn");
    return;
  }
  setBusy(true, text);
  try {
    await work();
  } catch (e) {
    say(e instanceof ApiError || e instanceof Error ? e.message : String(e), "error");
  } finally {
    setBusy(false);
    renderAll();
    if (state.vol) renderObjects();
  }
}

// ------------------------------------------------------------------ opening a file

async function openFile(file) {
  const bytes = await file.arrayBuffer();
  const send = async () => {
    if (!server.lease) await server.claim();
    return server.request("/page/open", { body: bytes, headers: { "X-Filename": encodeURIComponent(file.name) } });
  };
  let response;
  try {
    response = await send();
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 410)) throw e;
    response = await send(); // the server forgot this lease (restart, idle): claim a new one once
  }
  const meta = JSON.parse(response.headers.get("X-Meta"));
  const data = new Float32Array(await response.arrayBuffer());
  const n = meta.shape[0] * meta.shape[1] * meta.shape[2];
  if (data.length !== n) throw new Error(`${file.name}: got ${data.length} voxels, expected ${n}`);
  state.vol = { data, shape: meta.shape, spacing: meta.spacing, name: meta.name };
  state.labels = new Uint8Array(n);
  state.current = new Uint8Array(n);
  state.cursor = meta.shape.map((d) => Math.floor(d / 2));
  state.range = meta.range;
  state.objects = [{ label: 1 }];
  state.active = 1;
  state.prompts = [];
  autoWindow();
  const [nz, ny, nx] = meta.shape;
  $("info").textContent = `${meta.name}: ${nx} x ${ny} x ${nz} voxels (R, A, S), ` +
    `${meta.spacing.slice().reverse().map((s) => s.toFixed(2)).join(" x ")} mm; file axes ${meta.file_axcodes}`;
  say([`opened ${meta.name}`, ...meta.warnings].join("; "), meta.warnings.length ? "warn" : "info");
}

function autoWindow() {
  const [lo, hi] = state.range;
  state.window = Math.max(hi - lo, 1e-6);
  state.level = (hi + lo) / 2;
  $("window").value = +state.window.toPrecision(4);
  $("level").value = +state.level.toPrecision(4);
}

// ------------------------------------------------------------------ prompts

function requireImage() {
  if (!state.vol) throw new Error("open a NIfTI file first");
}

// write the server's buffer on `bbox` (half-open, z/y/x) into the current mask
async function pull(meta) {
  if (!meta.bbox) return;
  const region = await server.mask(meta.bbox);
  const [[z0, z1], [y0, y1], [x0, x1]] = meta.bbox;
  const [, ny, nx] = state.vol.shape;
  let k = 0;
  for (let z = z0; z < z1; z++) {
    for (let y = y0; y < y1; y++) {
      const row = (z * ny + y) * nx;
      for (let x = x0; x < x1; x++) state.current[row + x] = region[k++];
    }
  }
}

function addBox(view, a, b) {
  return task("segmenting (box)...", async () => {
    requireImage();
    const lo = view.voxelAt(Math.min(a.c, b.c), Math.min(a.r, b.r));
    const hi = view.voxelAt(Math.max(a.c, b.c), Math.max(a.r, b.r));
    // a 2D box on the slice (size 1 along the view's axis); voxel order may be reversed by the view's flips
    const bbox = [0, 1, 2].map((ax) => [Math.min(lo[ax], hi[ax]), Math.max(lo[ax], hi[ax]) + 1]);
    const meta = await server.interact("/add_bbox_interaction",
      { bbox_coords: bbox, include_interaction: true, run_prediction: true });
    await pull(meta);
    state.prompts.push({ kind: "box", view: view.name, lo, hi });
    state.cursor = bbox.map(([l, h]) => Math.floor((l + h - 1) / 2));
    say(`box on ${view.name} slice ${view.slice + 1}: object ${state.active} segmented`);
  });
}

function addPoint(view, cell, positive) {
  return task(`segmenting (${positive ? "positive" : "negative"} point)...`, async () => {
    requireImage();
    const voxel = view.voxelAt(cell.c, cell.r);
    const meta = await server.interact("/add_point_interaction",
      { coordinates: voxel, include_interaction: positive, run_prediction: true });
    await pull(meta);
    state.prompts.push({ kind: "point", voxel, positive });
    state.cursor = [...voxel]; // a copy: scrolling moves the cursor, never the point
    say(`${positive ? "positive" : "negative"} point at (z, y, x) = (${voxel.join(", ")})`);
  });
}

function undo() {
  return task("undoing...", async () => {
    requireImage();
    const meta = await server.interact("/undo");
    if (!meta.ran_prediction) {
      say(`nothing to undo for object ${state.active}`, "warn");
      return;
    }
    await pull(meta);
    state.prompts.pop();
    say(`undone (object ${state.active})`);
  });
}

function newObject() {
  return task("starting a new object...", async () => {
    requireImage();
    if (!state.prompts.length && !count(state.current, 1)) {
      say(`object ${state.active} is still empty: draw a box or click on it first`, "warn");
      return;
    }
    if (state.objects.length >= 255) throw new Error("at most 255 objects (uint8 label map)");
    await server.interact("/reset_interactions");
    for (let i = 0; i < state.current.length; i++) if (state.current[i]) state.labels[i] = state.active;
    state.current.fill(0);
    state.prompts = [];
    state.active = state.objects.length + 1;
    state.objects.push({ label: state.active });
    say(`object ${state.active}: draw a box or click on it`);
  });
}

function download() {
  return task("writing the NIfTI...", async () => {
    requireImage();
    const merged = state.labels.slice(); // the active object wins where objects overlap
    for (let i = 0; i < merged.length; i++) if (state.current[i]) merged[i] = state.active;
    const response = await server.request("/page/download", { body: merged });
    const disposition = response.headers.get("Content-Disposition") || "";
    const name = (disposition.match(/filename="([^"]+)"/) || [null, "labels.nii.gz"])[1];
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement("a");
    link.href = url;
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    say(`downloaded ${name} (${state.objects.length} object${state.objects.length > 1 ? "s" : ""})`);
  });
}

// ------------------------------------------------------------------ mouse on the views

for (const view of views) {
  const canvas = view.canvas;
  let press = null;
  canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  canvas.addEventListener("pointerdown", (e) => {
    if (!state.vol || (e.button !== 0 && e.button !== 2)) return;
    const cell = view.cellAt(e);
    if (!view.inside(cell)) return;
    press = { x: e.clientX, y: e.clientY, cell, button: e.button, shift: e.shiftKey, moved: false };
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!press || press.button !== 0) return;
    if (Math.hypot(e.clientX - press.x, e.clientY - press.y) >= DRAG_PX) press.moved = true;
    if (!press.moved) return;
    const end = clampCell(view, view.cellAt(e));
    view.drag = { c0: press.cell.c, r0: press.cell.r, c1: end.c, r1: end.r };
    view.render();
  });
  canvas.addEventListener("pointerup", (e) => {
    if (!press) return;
    const p = press;
    press = null;
    view.drag = null;
    if (p.moved) {
      addBox(view, p.cell, clampCell(view, view.cellAt(e)));
    } else {
      addPoint(view, p.cell, !(p.button === 2 || p.shift || e.shiftKey));
    }
  });
  canvas.addEventListener("wheel", (e) => {
    if (!state.vol) return;
    e.preventDefault();
    const step = Math.sign(e.deltaY);
    state.cursor[view.o.fixed] = Math.min(view.depth - 1, Math.max(0, view.slice + step));
    renderAll();
  }, { passive: false });
  $(`slice-${view.name}`).addEventListener("input", (e) => {
    if (!state.vol) return;
    state.cursor[view.o.fixed] = Number(e.target.value);
    renderAll();
  });
}

function clampCell(view, { c, r }) {
  return { c: Math.min(view.ncols - 1, Math.max(0, c)), r: Math.min(view.nrows - 1, Math.max(0, r)) };
}

// ------------------------------------------------------------------ controls

$("file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (file) {
    task(`opening ${file.name}...`, () => openFile(file).catch((e) => { // every failure names the file
      throw new Error(e.message.startsWith(file.name) ? e.message : `${file.name}: ${e.message}`);
    }));
  }
  e.target.value = "";
});
$("undo").addEventListener("click", undo);
$("new-object").addEventListener("click", newObject);
$("download").addEventListener("click", download);
$("auto").addEventListener("click", () => { if (state.vol) { autoWindow(); renderAll(); } });
for (const id of ["window", "level"]) {
  $(id).addEventListener("input", (e) => {
    const value = Number(e.target.value);
    if (!Number.isFinite(value)) return;
    state[id] = id === "window" ? Math.max(value, 1e-6) : value;
    renderAll();
  });
}
$("opacity").addEventListener("input", (e) => { state.opacity = Number(e.target.value) / 100; renderAll(); });
$("neurological").addEventListener("change", (e) => { state.radiological = !e.target.checked; renderAll(); });
document.addEventListener("keydown", (e) => {
  if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "z") {
    e.preventDefault();
    undo();
  }
});
window.addEventListener("pagehide", () => server.release());
new ResizeObserver(() => renderAll()).observe($("views"));
setBusy(false);
renderAll();
window.dcmPage = { state, views }; // for the browser tests and the console
