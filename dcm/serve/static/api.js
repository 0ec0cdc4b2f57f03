// The server, as the page talks to it: the API key, the lease (X-Lease-Token), its heartbeat, and errors
// turned into one-line messages. Prompts use nnInteractive's protocol endpoints; /page/* are the page's own.

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

export class Server {
  constructor(keyInput) {
    this.keyInput = keyInput; // the page's API key field, read at every request
    this.lease = null;
    this.heartbeat = null;
  }

  headers(extra = {}) {
    const headers = { ...extra };
    const key = this.keyInput.value.trim();
    if (key) headers["Authorization"] = `Bearer ${key}`;
    if (this.lease) headers["X-Lease-Token"] = this.lease;
    return headers;
  }

  // fetch `path`; returns the Response, or throws ApiError with the server's one-line detail
  async request(path, { method = "POST", json, body, headers = {} } = {}) {
    const init = { method, headers: this.headers(headers) };
    if (json !== undefined) {
      init.body = JSON.stringify(json);
      init.headers["Content-Type"] = "application/json";
    } else if (body !== undefined) {
      init.body = body;
      init.headers["Content-Type"] = "application/octet-stream";
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, `the server does not answer (${e.message})`);
    }
    if (!response.ok) {
      let detail = `${response.status} ${response.statusText}`;
      try {
        detail = (await response.json()).detail || detail;
      } catch (_) { /* not JSON */ }
      if (response.status === 401) detail += ": enter the server's API key in the key field";
      if (response.status === 410) this.dropLease();
      throw new ApiError(response.status, detail);
    }
    return response;
  }

  async claim() {
    const answer = await (await this.request("/claim")).json();
    this.lease = answer.lease_token;
    const every = Math.max(2, Math.min(20, answer.liveness_timeout_seconds / 2)) * 1000;
    clearInterval(this.heartbeat);
    this.heartbeat = setInterval(() => {
      this.request("/heartbeat").catch(() => {});
    }, every);
  }

  dropLease() {
    clearInterval(this.heartbeat);
    this.heartbeat = null;
    this.lease = null;
  }

  release() {
    if (!this.lease) return;
    fetch("/release", { method: "POST", headers: this.headers(), keepalive: true }).catch(() => {});
    this.dropLease();
  }

  // a protocol interaction (bbox, point, undo, reset): its X-Meta as an object (the packed body is not read:
  // the page fetches the changed region with /page/mask instead)
  async interact(path, json = {}) {
    const response = await this.request(path, { json });
    const meta = response.headers.get("X-Meta");
    return meta ? JSON.parse(meta) : {};
  }

  // the current object's buffer on a half-open [[z0, z1], [y0, y1], [x0, x1]] box, as a Uint8Array
  async mask(bbox) {
    const flat = bbox.flat().join(",");
    const response = await this.request(`/page/mask?bbox=${flat}`, { method: "GET" });
    return new Uint8Array(await response.arrayBuffer());
  }
}
