// One orthogonal view of the volume: rendering, and screen <-> voxel mapping.
//
// The volume is (z, y, x) = (S, A, R): index z grows toward Superior, y toward Anterior, x toward the
// patient's Right (the server reorients every NIfTI so). Every view has superior / anterior at the top. In the
// radiological convention the patient's right is on the screen's left in the axial and coronal views; the
// neurological convention flips that. The sagittal view has anterior on the left.

export const PALETTE = [
  [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
  [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
];

export function colorOf(label) {
  return PALETTE[(label - 1) % PALETTE.length];
}

// fixed: the view's slice axis; col / row: the volume axes along the screen's columns / rows
const ORIENTS = {
  axial: { fixed: 0, col: 2, row: 1, title: "Axial" },
  coronal: { fixed: 1, col: 2, row: 0, title: "Coronal" },
  sagittal: { fixed: 2, col: 1, row: 0, title: "Sagittal" },
};

export class SliceView {
  constructor(name, canvas, state) {
    this.name = name;
    this.o = ORIENTS[name];
    this.canvas = canvas;
    this.state = state; // shared: volume, labels, current mask, cursor, window, prompts...
    this.drag = null; // the box being drawn: {c0, r0, c1, r1} in voxels
    this.offscreen = document.createElement("canvas");
  }

  // screen columns run toward decreasing x (patient's right on the left) in radiological axial / coronal,
  // toward decreasing y (anterior on the left) in sagittal; rows toward decreasing z / y (superior / anterior up)
  get colFlip() {
    return this.name === "sagittal" ? true : this.state.radiological;
  }

  get letters() { // left, right, top, bottom edges
    if (this.name === "sagittal") return ["A", "P", "S", "I"];
    const lr = this.state.radiological ? ["R", "L"] : ["L", "R"];
    return this.name === "axial" ? [...lr, "A", "P"] : [...lr, "S", "I"];
  }

  get slice() { return this.state.cursor[this.o.fixed]; }
  get depth() { return this.state.vol.shape[this.o.fixed]; }
  get ncols() { return this.state.vol.shape[this.o.col]; }
  get nrows() { return this.state.vol.shape[this.o.row]; }

  // voxel (z, y, x) of screen cell (c, r) on the current slice
  voxelAt(c, r) {
    const v = [0, 0, 0];
    v[this.o.fixed] = this.slice;
    v[this.o.col] = this.colFlip ? this.ncols - 1 - c : c;
    v[this.o.row] = this.nrows - 1 - r;
    return v;
  }

  // screen cell (c, r) of a voxel, and whether it lies on the current slice
  cellOf(v) {
    const c = this.colFlip ? this.ncols - 1 - v[this.o.col] : v[this.o.col];
    return { c, r: this.nrows - 1 - v[this.o.row], onSlice: v[this.o.fixed] === this.slice };
  }

  // where the image lies on the canvas (CSS pixels), voxels drawn with their physical aspect
  layout() {
    const sp = this.state.vol.spacing;
    const w = this.canvas.clientWidth, h = this.canvas.clientHeight;
    const mmW = this.ncols * sp[this.o.col], mmH = this.nrows * sp[this.o.row];
    const scale = Math.min(w / mmW, h / mmH);
    const cw = scale * sp[this.o.col], ch = scale * sp[this.o.row]; // one voxel, CSS pixels
    return { ox: (w - this.ncols * cw) / 2, oy: (h - this.nrows * ch) / 2, cw, ch };
  }

  // the screen cell under a mouse event (may lie outside the image)
  cellAt(event) {
    const rect = this.canvas.getBoundingClientRect();
    const { ox, oy, cw, ch } = this.layout();
    return {
      c: Math.floor((event.clientX - rect.left - ox) / cw),
      r: Math.floor((event.clientY - rect.top - oy) / ch),
    };
  }

  inside({ c, r }) {
    return c >= 0 && r >= 0 && c < this.ncols && r < this.nrows;
  }

  render() {
    const s = this.state;
    const ctx = this.canvas.getContext("2d");
    const dpr = window.devicePixelRatio || 1;
    const w = this.canvas.clientWidth, h = this.canvas.clientHeight;
    if (this.canvas.width !== Math.round(w * dpr) || this.canvas.height !== Math.round(h * dpr)) {
      this.canvas.width = Math.round(w * dpr);
      this.canvas.height = Math.round(h * dpr);
    }
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, w, h);
    if (!s.vol) return;
    this.drawSlice(ctx);
    this.drawCrosshair(ctx);
    this.drawPrompts(ctx);
    this.drawLetters(ctx, w, h);
  }

  drawSlice(ctx) {
    const s = this.state, nc = this.ncols, nr = this.nrows;
    const [, ny, nx] = s.vol.shape;
    const strides = [ny * nx, nx, 1];
    const image = new ImageData(nc, nr);
    const px = image.data;
    const lo = s.level - s.window / 2, gain = 255 / Math.max(s.window, 1e-6);
    const alpha = s.opacity, active = s.objects.length ? colorOf(s.active) : null;
    for (let r = 0; r < nr; r++) {
      for (let c = 0; c < nc; c++) {
        const v = this.voxelAt(c, r);
        const i = v[0] * strides[0] + v[1] * strides[1] + v[2];
        let g = (s.vol.data[i] - lo) * gain;
        g = g < 0 ? 0 : g > 255 ? 255 : g;
        let rgb = [g, g, g];
        const color = s.current[i] ? active : s.labels[i] ? colorOf(s.labels[i]) : null;
        if (color) rgb = rgb.map((x, k) => (1 - alpha) * x + alpha * color[k]);
        const p = 4 * (r * nc + c);
        px[p] = rgb[0]; px[p + 1] = rgb[1]; px[p + 2] = rgb[2]; px[p + 3] = 255;
      }
    }
    this.offscreen.width = nc;
    this.offscreen.height = nr;
    this.offscreen.getContext("2d").putImageData(image, 0, 0);
    const { ox, oy, cw, ch } = this.layout();
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(this.offscreen, ox, oy, nc * cw, nr * ch);
  }

  drawCrosshair(ctx) {
    const { ox, oy, cw, ch } = this.layout();
    const { c, r } = this.cellOf(this.state.cursor);
    ctx.strokeStyle = "rgba(255, 255, 255, 0.35)";
    ctx.lineWidth = 1;
    ctx.setLineDash([4, 4]);
    ctx.beginPath();
    ctx.moveTo(ox + (c + 0.5) * cw, oy);
    ctx.lineTo(ox + (c + 0.5) * cw, oy + this.nrows * ch);
    ctx.moveTo(ox, oy + (r + 0.5) * ch);
    ctx.lineTo(ox + this.ncols * cw, oy + (r + 0.5) * ch);
    ctx.stroke();
    ctx.setLineDash([]);
  }

  drawPrompts(ctx) {
    const { ox, oy, cw, ch } = this.layout();
    const rect = (c0, r0, c1, r1, color, dash) => { // inclusive cells
      ctx.strokeStyle = color;
      ctx.lineWidth = 2;
      ctx.setLineDash(dash);
      ctx.strokeRect(ox + Math.min(c0, c1) * cw, oy + Math.min(r0, r1) * ch,
        (Math.abs(c1 - c0) + 1) * cw, (Math.abs(r1 - r0) + 1) * ch);
      ctx.setLineDash([]);
    };
    for (const p of this.state.prompts) {
      if (p.kind === "box" && p.view === this.name) {
        const a = this.cellOf(p.lo), b = this.cellOf(p.hi);
        if (a.onSlice) rect(a.c, a.r, b.c, b.r, "#ffd400", []);
      } else if (p.kind === "point") {
        const { c, r, onSlice } = this.cellOf(p.voxel);
        if (!onSlice) continue;
        const x = ox + (c + 0.5) * cw, y = oy + (r + 0.5) * ch;
        ctx.fillStyle = p.positive ? "#22c55e" : "#ef4444";
        ctx.strokeStyle = "#fff";
        ctx.lineWidth = 1.5;
        ctx.beginPath();
        ctx.arc(x, y, 6, 0, 2 * Math.PI);
        ctx.fill();
        ctx.stroke();
        ctx.beginPath();
        ctx.moveTo(x - 3.5, y);
        ctx.lineTo(x + 3.5, y);
        if (p.positive) { ctx.moveTo(x, y - 3.5); ctx.lineTo(x, y + 3.5); }
        ctx.stroke();
      }
    }
    if (this.drag) rect(this.drag.c0, this.drag.r0, this.drag.c1, this.drag.r1, "#ffd400", [5, 3]);
  }

  drawLetters(ctx, w, h) {
    const [left, right, top, bottom] = this.letters;
    ctx.font = "bold 14px system-ui, sans-serif";
    ctx.fillStyle = "#fbbf24";
    ctx.strokeStyle = "rgba(0, 0, 0, 0.8)"; // legible on bright tissue too
    ctx.lineWidth = 3;
    const letter = (text, x, y, align, baseline) => {
      ctx.textAlign = align;
      ctx.textBaseline = baseline;
      ctx.strokeText(text, x, y);
      ctx.fillText(text, x, y);
    };
    letter(left, 6, h / 2, "left", "middle");
    letter(right, w - 6, h / 2, "right", "middle");
    letter(top, w / 2, 6, "center", "top");
    letter(bottom, w / 2, h - 6, "center", "bottom");
  }
}
