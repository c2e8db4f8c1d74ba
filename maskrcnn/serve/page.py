"""The page of ``maskrcnn serve``: one self-contained HTML document (inline CSS and JavaScript, nothing
fetched from elsewhere; the server's Content-Security-Policy enforces it).

It uploads the image once (``POST /predict?score_threshold=0``: every detection the model returns) and
draws on a canvas from the JSON: masks decoded from their compressed RLEs in JavaScript (``rleCounts``
is pycocotools' ``rleFrString``), boxes, "name score" labels, keypoints and their skeleton. The threshold
slider, the class toggles and the layer toggles only redraw. When the browser cannot display the file (a
TIFF, a PPM), the page asks the server for the image as the model read it (``include_image=true``).

For tests and tools: ``body[data-state]`` is ``idle``, ``busy``, ``drawn`` or ``error``; ``#count`` holds
``data-shown`` (detections drawn) and ``data-total``; ``window.maskrcnnPage.decodeRle(rle)`` decodes a
mask (``{x, y, w, h, data}``: the mask's bounding box and its pixels, row-major).
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>maskrcnn serve</title>
<style>
  :root { color-scheme: light dark; --accent: #2f6fde; font-family: system-ui, sans-serif; }
  body { margin: 0; padding: 1rem 1.5rem; }
  header { display: flex; align-items: baseline; gap: 1rem; flex-wrap: wrap; }
  h1 { font-size: 1.3rem; margin: 0; }
  #model, #timing { opacity: .7; font-size: .9rem; }
  #drop { display: block; border: 2px dashed #8888; border-radius: 8px; padding: 1rem; margin: 1rem 0;
          text-align: center; cursor: pointer; }
  #drop.over { border-color: var(--accent); background: #2f6fde1a; }
  #controls { display: flex; flex-wrap: wrap; gap: .5rem 1.5rem; align-items: center; margin-bottom: .5rem; }
  #classes { margin-bottom: .75rem; }
  #classes label, #layers label { margin-right: .8rem; white-space: nowrap; }
  #threshold { vertical-align: middle; width: 12rem; }
  #count { font-weight: 600; }
  #status.error { color: #d32f2f; font-weight: 600; }
  canvas { max-width: 100%; height: auto; display: block; }
  button { font: inherit; }
  [hidden] { display: none !important; }
</style>
</head>
<body data-state="idle">
<header><h1>maskrcnn serve</h1><span id="model">reading the model description…</span></header>
<label id="drop" for="file">Drop an image here, or choose one:
  <input id="file" type="file" accept="image/*,.tif,.tiff,.ppm,.pgm,.webp"></label>
<section id="controls" hidden>
  <label>score ≥ <input id="threshold" type="range" min="0" max="1" step="0.01" value="0.5">
    <output id="threshold-value">0.50</output></label>
  <span id="count" data-shown="0" data-total="0"></span>
  <span id="layers">
    <label><input type="checkbox" id="show-masks" checked>masks</label>
    <label><input type="checkbox" id="show-boxes" checked>boxes</label>
    <label><input type="checkbox" id="show-labels" checked>labels</label>
    <label id="keypoints-toggle" hidden><input type="checkbox" id="show-keypoints" checked>keypoints</label>
  </span>
  <button id="download-png" type="button">Download PNG</button>
  <button id="download-json" type="button">Download COCO JSON</button>
  <span id="timing"></span>
</section>
<div id="classes"></div>
<p id="status" role="status">No image yet.</p>
<canvas id="canvas" width="0" height="0"></canvas>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const state = {
  info: null, result: null, image: null, masks: [], hidden: new Set(), token: 0, name: "image",
};

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
  if (error) document.body.dataset.state = "error";
}

// detection i (in the model's order, best first) gets palette[i], as in `maskrcnn predict`'s drawings
function color(i) {
  const palette = state.info ? state.info.palette : [[230, 80, 80]];
  return palette[i % palette.length];
}

// pycocotools' compressed RLE string (rleFrString) -> run lengths: alternately 0s and 1s, column-major
function rleCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = true;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x += (c & 0x1f) * 2 ** (5 * k);
      more = (c & 0x20) !== 0;
      p++;
      k++;
      if (!more && (c & 0x10)) x -= 2 ** (5 * k);  // sign extension
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// a COCO RLE -> the mask's bounding box {x, y, w, h} and its pixels (row-major, 0/1) inside it
function decodeRle(rle) {
  const [h, w] = rle.size;
  const counts = typeof rle.counts === "string" ? rleCounts(rle.counts) : rle.counts;
  let x0 = w, x1 = -1, y0 = h, y1 = -1, pos = 0;
  const runs = [];
  for (let i = 0; i < counts.length; i++) {
    const n = counts[i];
    if (i % 2 === 1 && n > 0) {
      runs.push(pos, n);
      const ca = Math.floor(pos / h), cb = Math.floor((pos + n - 1) / h);
      x0 = Math.min(x0, ca);
      x1 = Math.max(x1, cb);
      if (ca === cb) {
        y0 = Math.min(y0, pos - ca * h);
        y1 = Math.max(y1, pos + n - 1 - ca * h);
      } else {  // the run wraps into the next column: rows h-1 and 0 are both in it
        y0 = 0;
        y1 = h - 1;
      }
    }
    pos += n;
  }
  if (x1 < 0) return { x: 0, y: 0, w: 0, h: 0, data: new Uint8Array(0) };
  const bw = x1 - x0 + 1, bh = y1 - y0 + 1, data = new Uint8Array(bw * bh);
  for (let r = 0; r < runs.length; r += 2) {
    for (let i = runs[r], end = runs[r] + runs[r + 1]; i < end; i++) {
      const col = Math.floor(i / h);
      data[(i - col * h - y0) * bw + col - x0] = 1;
    }
  }
  return { x: x0, y: y0, w: bw, h: bh, data };
}

// a mask in its colour: translucent inside, nearly opaque along its outline
function maskCanvas(m, rgb) {
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(m.w, 1);
  canvas.height = Math.max(m.h, 1);
  if (!m.w) return canvas;
  const ctx = canvas.getContext("2d"), img = ctx.createImageData(m.w, m.h);
  const px = img.data, d = m.data, w = m.w, h = m.h;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x;
      if (!d[i]) continue;
      const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 ||
        !d[i - 1] || !d[i + 1] || !d[i - w] || !d[i + w];
      px[4 * i] = rgb[0];
      px[4 * i + 1] = rgb[1];
      px[4 * i + 2] = rgb[2];
      px[4 * i + 3] = edge ? 230 : 115;
    }
  }
  ctx.putImageData(img, 0, 0);
  return canvas;
}

function shown() {
  const t = Number($("threshold").value);
  return state.result.detections
    .map((d, i) => [d, i])
    .filter(([d]) => d.score >= t && !state.hidden.has(d.category_id));
}

function drawKeypoints(ctx, d, css, line) {
  const k = d.keypoints, scores = d.keypoint_scores || [], n = k.length / 3;
  const visible = (j) => (scores.length ? scores[j] > state.info.keypoint_threshold : true);
  ctx.strokeStyle = css;
  ctx.lineWidth = line + 1;
  for (const [a, b] of state.info.skeleton) {
    if (a > n || b > n || !visible(a - 1) || !visible(b - 1)) continue;
    ctx.beginPath();
    ctx.moveTo(k[3 * (a - 1)], k[3 * (a - 1) + 1]);
    ctx.lineTo(k[3 * (b - 1)], k[3 * (b - 1) + 1]);
    ctx.stroke();
  }
  ctx.fillStyle = css;
  ctx.strokeStyle = "#000";
  ctx.lineWidth = 1;
  for (let j = 0; j < n; j++) {
    if (!visible(j)) continue;
    ctx.beginPath();
    ctx.arc(k[3 * j], k[3 * j + 1], line + 2, 0, 2 * Math.PI);
    ctx.fill();
    ctx.stroke();
  }
}

function draw() {
  const r = state.result;
  if (!r || !state.image) return;
  const canvas = $("canvas"), ctx = canvas.getContext("2d");
  canvas.width = r.width;
  canvas.height = r.height;
  canvas.style.width = Math.max(r.width, Math.min(720, 8 * r.width)) + "px";  // small images enlarged
  ctx.drawImage(state.image, 0, 0, r.width, r.height);
  const list = shown();
  const order = list.slice().sort((a, b) => a[0].score - b[0].score);  // the best ends on top
  const size = Math.max(r.width, r.height);
  const line = Math.max(1, Math.round(size / 400)), font = Math.max(9, Math.round(size / 55));
  if ($("show-masks").checked) {
    for (const [, i] of order) {
      const m = state.masks[i];
      if (m) ctx.drawImage(m.canvas, m.x, m.y);
    }
  }
  for (const [d, i] of order) {
    const [x, y, w, h] = d.bbox, rgb = color(i), css = `rgb(${rgb.join(",")})`;
    if ($("show-boxes").checked) {
      ctx.lineWidth = line;
      ctx.strokeStyle = css;
      ctx.strokeRect(x, y, w, h);
    }
    if (d.keypoints && $("show-keypoints").checked) drawKeypoints(ctx, d, css, line);
    if ($("show-labels").checked) {
      const text = `${d.category_name} ${d.score.toFixed(2)}`;
      ctx.font = `${font}px system-ui, sans-serif`;
      const tw = ctx.measureText(text).width + 4, th = font + 4;
      const tx = Math.min(Math.max(x, 0), Math.max(r.width - tw, 0));
      const ty = y - th >= 0 ? y - th : Math.max(y, 0);
      ctx.fillStyle = css;
      ctx.fillRect(tx, ty, tw, th);
      ctx.fillStyle = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 ? "#000" : "#fff";
      ctx.textBaseline = "top";
      ctx.fillText(text, tx + 2, ty + 2);
    }
  }
  const count = $("count");
  count.dataset.shown = list.length;
  count.dataset.total = r.detections.length;
  const total = r.detections.length;
  count.textContent = `${list.length} of ${total} detection${total === 1 ? "" : "s"} shown`;
  const t = Number($("threshold").value);
  for (const span of document.querySelectorAll("[data-count-for]")) {
    const label = Number(span.dataset.countFor), all = r.detections.filter((d) => d.category_id === label);
    span.textContent = `(${all.filter((d) => d.score >= t).length}/${all.length})`;
  }
  document.body.dataset.state = "drawn";
}

function buildClassToggles() {
  const box = $("classes");
  box.replaceChildren();
  const names = new Map();
  for (const d of state.result.detections) names.set(d.category_id, d.category_name);
  for (const label of [...names.keys()].sort((a, b) => a - b)) {
    const item = document.createElement("label"), check = document.createElement("input");
    check.type = "checkbox";
    check.checked = !state.hidden.has(label);
    check.dataset.label = label;
    check.addEventListener("change", () => {
      if (check.checked) state.hidden.delete(label); else state.hidden.add(label);
      draw();
    });
    const count = document.createElement("span");
    count.dataset.countFor = label;
    item.append(check, document.createTextNode(" " + names.get(label) + " "), count);
    box.append(item);
  }
}

function loadImage(url) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => resolve(null);
    img.src = url;
  });
}

async function requestPredict(file, includeImage) {
  const form = new FormData();
  form.append("image", file, file.name);
  const started = performance.now();
  let response, body;
  try {
    response = await fetch("predict?score_threshold=0" + (includeImage ? "&include_image=true" : ""),
                           { method: "POST", body: form });
    body = await response.json();
  } catch (e) {
    setStatus(`${file.name}: no answer from the server (${e.message})`, true);
    return null;
  }
  if (!response.ok) {
    setStatus(body.error || `${file.name}: HTTP ${response.status}`, true);
    return null;
  }
  body.round_trip_ms = performance.now() - started;
  return body;
}

async function handleFile(file) {
  if (!file) return;
  const token = ++state.token;
  await infoReady;
  if (state.info && file.size > state.info.max_upload_bytes) {
    const limit = state.info.max_upload_bytes;
    setStatus(`${file.name}: ${file.size} bytes, over the server's limit of ${limit} bytes`, true);
    return;
  }
  document.body.dataset.state = "busy";
  setStatus(`${file.name}: running the model…`);
  const url = URL.createObjectURL(file);
  let image = await loadImage(url);  // null when the browser cannot display this format
  URL.revokeObjectURL(url);
  let result = await requestPredict(file, !image);
  if (token !== state.token || !result) return;  // a newer image was chosen, or an error is shown
  if (!image || image.naturalWidth !== result.width || image.naturalHeight !== result.height) {
    if (!result.image_png) {  // the browser reads the file otherwise: draw on the server's reading
      result = await requestPredict(file, true);
      if (token !== state.token || !result) return;
    }
    image = await loadImage(result.image_png);
  }
  state.result = result;
  state.image = image;
  state.name = file.name;
  state.masks = result.detections.map((d, i) => {
    if (!d.segmentation) return null;
    const m = decodeRle(d.segmentation);
    m.canvas = maskCanvas(m, color(i));
    m.data = null;
    return m;
  });
  $("timing").textContent = `inference ${result.inference_ms.toFixed(0)} ms` +
    ` · server ${result.total_ms.toFixed(0)} ms` +
    ` · round trip ${result.round_trip_ms.toFixed(0)} ms`;
  $("timing").dataset.inferenceMs = result.inference_ms;
  $("controls").hidden = false;
  buildClassToggles();
  const found = result.detections.length;
  setStatus(`${file.name}: ${result.width}×${result.height}, ${found} detection(s) from the model`);
  draw();
}

function download(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

$("file").addEventListener("change", (e) => handleFile(e.target.files[0]));
$("threshold").addEventListener("input", () => {
  $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
  draw();
});
for (const id of ["show-masks", "show-boxes", "show-labels", "show-keypoints"]) {
  $(id).addEventListener("change", draw);
}
$("download-png").addEventListener("click", () => {
  $("canvas").toBlob((blob) => download(blob, state.name + ".detections.png"), "image/png");
});
$("download-json").addEventListener("click", () => {
  const entries = shown().map(([d]) => d);
  download(new Blob([JSON.stringify(entries)], { type: "application/json" }), state.name + ".coco.json");
});
window.addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
window.addEventListener("dragleave", () => $("drop").classList.remove("over"));
window.addEventListener("drop", (e) => {
  e.preventDefault();
  $("drop").classList.remove("over");
  handleFile(e.dataTransfer.files[0]);
});

const infoReady = fetch("health").then((r) => r.json()).then((info) => {
  state.info = info;
  const classes = info.num_classes ? info.num_classes - 1 : "?";
  const parts = [`${classes} class${classes === 1 ? "" : "es"}`];
  if (info.masks) parts.push("masks");
  if (info.num_keypoints) parts.push(`${info.num_keypoints} keypoints`);
  parts.push(`on ${info.device}`);
  $("model").textContent = parts.join(" · ");
  $("keypoints-toggle").hidden = !info.num_keypoints;
  $("threshold").value = info.score_threshold;
  $("threshold-value").textContent = Number(info.score_threshold).toFixed(2);
}).catch((e) => setStatus(`the server does not answer (${e.message})`, true));

window.maskrcnnPage = { decodeRle, rleCounts, state, draw };
</script>
</body>
</html>
"""
