// Small DOM helpers. Everything from the server goes into the page as text (textContent,
// attribute values), never parsed as markup.

const SVG = 'http://www.w3.org/2000/svg';

function build(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.setAttribute('class', v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'text') el.textContent = String(v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** An HTML element; string children become text nodes. */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element. */
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG, tag), attrs, children);
}

/** Sets an element's text only when it changed (no DOM work otherwise). */
export function setText(el, value) {
  const t = value === undefined || value === null ? '' : String(value);
  if (el.textContent !== t) el.textContent = t;
}

/** Sets an attribute only when it changed. */
export function setAttr(el, name, value) {
  const v = value === undefined || value === null ? null : String(value);
  if (v === null) {
    if (el.hasAttribute(name)) el.removeAttribute(name);
  } else if (el.getAttribute(name) !== v) {
    el.setAttribute(name, v);
  }
}

export function setData(el, name, value) {
  const v = value === undefined || value === null ? '' : String(value);
  if (el.dataset[name] !== v) el.dataset[name] = v;
}

/**
 * Keeps `container`'s children in step with `items`: one child per key, created once by
 * `create(item)`, refreshed by `update(el, item)`, moved only when the order changed.
 */
export function keyed(container, items, keyOf, create, update) {
  const existing = new Map();
  for (const el of Array.from(container.children)) {
    if (el.dataset.key !== undefined) existing.set(el.dataset.key, el);
  }
  let cursor = container.firstElementChild;
  while (cursor && cursor.dataset.key === undefined) cursor = cursor.nextElementSibling;
  const seen = new Set();
  for (const item of items) {
    const key = String(keyOf(item));
    seen.add(key);
    let el = existing.get(key);
    if (!el) {
      el = create(item);
      el.dataset.key = key;
    }
    update(el, item);
    if (el !== cursor) container.insertBefore(el, cursor);
    else cursor = cursor.nextElementSibling;
  }
  for (const [key, el] of existing) if (!seen.has(key)) el.remove();
}

/** An empty sparkline (an SVG with one path), filled by `drawSpark`. */
export function spark(cls) {
  return s('svg', { class: `spark ${cls || ''}`, viewBox: '0 0 100 24', preserveAspectRatio: 'none', 'aria-hidden': 'true' },
    s('path', { class: 'area' }), s('path', { class: 'line' }));
}

/**
 * Draws `values` (numbers or null, one a second at the times `times`) over the last
 * `span` seconds; a gap in time or a null breaks the line.
 */
export function drawSpark(svgEl, times, values, most = 900) {
  const line = svgEl.lastChild;
  const area = svgEl.firstChild;
  if (!times || times.length === 0) {
    setAttr(line, 'd', '');
    setAttr(area, 'd', '');
    return;
  }
  const end = times[times.length - 1];
  // The history there is, up to 15 minutes, at least a minute wide.
  const span = Math.min(most, Math.max(60, end - times[0]));
  const start = end - span;
  let max = 0;
  for (let i = 0; i < values.length; i++) if (times[i] > start && values[i] > max) max = values[i];
  if (max <= 0) max = 1;
  let d = '';
  let a = '';
  let prev = null;
  let runStart = null;
  let lastX = 0;
  for (let i = 0; i < values.length; i++) {
    const t = times[i];
    if (t <= start) continue;
    const v = values[i];
    const x = ((t - start) / span * 100).toFixed(2);
    if (v === null || v === undefined) { if (runStart !== null) a += `L${lastX},24Z`; prev = null; runStart = null; continue; }
    const y = (23 - (v / max) * 22).toFixed(2);
    if (prev === null || t - prev > 2) {
      if (runStart !== null) a += `L${lastX},24Z`;
      d += `M${x},${y}`;
      a += `M${x},24L${x},${y}`;
      runStart = x;
    } else {
      d += `L${x},${y}`;
      a += `L${x},${y}`;
    }
    prev = t;
    lastX = x;
  }
  if (runStart !== null) a += `L${lastX},24Z`;
  setAttr(line, 'd', d);
  setAttr(area, 'd', a);
}

export function num(v, digits = 1) {
  if (v === null || v === undefined || Number.isNaN(v)) return '–';
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString('en');
  return Number(v).toFixed(v === Math.round(v) ? 0 : digits);
}

export function ms(v) {
  if (v === null || v === undefined) return '–';
  if (v < 1) return `${v.toFixed(2)} ms`;
  if (v < 100) return `${v.toFixed(1)} ms`;
  return `${Math.round(v)} ms`;
}

export function pct(v) {
  if (v === null || v === undefined) return '–';
  return `${(v * 100).toFixed(v < 0.1 ? 1 : 0)} %`;
}

export function age(msSince) {
  if (msSince === null || msSince === undefined) return '–';
  const s = Math.max(0, Math.round(msSince / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function clock(t) {
  if (!t) return '–';
  const d = new Date(typeof t === 'number' ? t : Date.parse(t));
  return d.toLocaleTimeString('en-GB', { hour12: false });
}

/** A same-origin URL (never one carrying credentials, which fetch refuses). */
export function url(path) {
  return new URL(path, window.location.origin).toString();
}

/** Reads JSON from the admin API; actions (POST) carry the console's header. */
export async function api(path, { method = 'GET', body, json } = {}) {
  const headers = { accept: 'application/json' };
  let payload = body;
  if (method !== 'GET') headers['x-shopmesh-console'] = '1';
  if (json !== undefined) {
    headers['content-type'] = 'application/json';
    payload = JSON.stringify(json);
  } else if (body !== undefined) {
    headers['content-type'] = 'text/plain; charset=utf-8';
  }
  const res = await fetch(url(path), { method, headers, body: payload, credentials: 'same-origin', cache: 'no-store' });
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text }; }
  if (!res.ok) {
    const err = new Error((data && (data.detail || data.title)) || `HTTP ${res.status}`);
    err.status = res.status;
    err.data = data;
    throw err;
  }
  return data;
}

/** A chip: a small labelled state. */
export function chip(cls, state, label) {
  return h('span', { class: `chip ${cls}`, dataset: { state } }, label ?? state);
}

export function setChip(el, state, label) {
  setData(el, 'state', state);
  setText(el, label ?? state);
}
