// Topology: gateway → routes → clusters → endpoints (composites → their parts' clusters),
// drawn from the live configuration and coloured by health.
import { h, s, setData } from '../dom.js';

let holder;
let lastKey = '';

function endpointState(e) {
  if (!e.healthy || e.breaker === 'open') return 'down';
  if (e.breaker === 'half_open') return 'degraded';
  return 'ok';
}

function clusterState(c) {
  const states = c.endpoints.map(endpointState);
  if (states.length && states.every((x) => x === 'down')) return 'down';
  if (states.some((x) => x !== 'ok')) return 'degraded';
  return 'ok';
}

function routeState(r, t, clusters) {
  const targets = r.kind === 'cluster' ? [r.cluster] : r.kind === 'split' ? r.variants.map((v) => v.cluster)
    : r.kind === 'aggregate' ? r.parts.map((p) => p.cluster) : [];
  const cs = targets.map((n) => clusters.get(n)).filter(Boolean).map(clusterState);
  if (t && t.err > 0.05) return 'down';
  if (cs.includes('down')) return r.kind === 'aggregate' ? 'degraded' : 'down';
  if (cs.includes('degraded') || (t && t.err > 0)) return 'degraded';
  return 'ok';
}

function draw(ctx) {
  const g = ctx.store.state.gateway;
  if (!g) return;
  const ticks = (ctx.store.tick && ctx.store.tick.routes) || {};
  const clusters = new Map(g.clusters.map((c) => [c.name, c]));
  const endpoints = g.clusters.flatMap((c) => c.endpoints.map((e) => ({ c: c.name, e })));
  const rowH = 26;
  const rows = Math.max(g.routes.length, g.clusters.length, endpoints.length, 1);
  const height = rows * rowH + 40;
  const width = 1000;
  const col = [20, 230, 560, 760];
  const y = (i, n) => 30 + (i + 0.5) * ((rows * rowH) / Math.max(n, 1));
  const svg = s('svg', { class: 'topology', viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': 'gateway, routes, clusters and endpoints' });
  const links = s('g', { class: 'links' });
  const nodes = s('g', { class: 'nodes' });
  svg.append(links, nodes);
  const node = (x, yy, label, state, kind, key) => {
    const gEl = s('g', { class: `node ${kind}`, transform: `translate(${x},${yy})`, dataset: { state, key } },
      s('circle', { r: 6 }),
      s('text', { x: 10, y: 4 }, label));
    nodes.append(gEl);
  };
  const link = (x1, y1, x2, y2, state) => links.append(s('path', {
    d: `M${x1},${y1} C${(x1 + x2) / 2},${y1} ${(x1 + x2) / 2},${y2} ${x2},${y2}`, dataset: { state },
  }));
  const gy = 30 + (rows * rowH) / 2;
  node(col[0], gy, 'gateway', 'ok', 'gateway', 'gateway');
  const cy = new Map(g.clusters.map((c, i) => [c.name, y(i, g.clusters.length)]));
  g.routes.forEach((r, i) => {
    const ry = y(i, g.routes.length);
    const state = routeState(r, ticks[r.name], clusters);
    link(col[0] + 6, gy, col[1] - 6, ry, state);
    node(col[1], ry, r.kind === 'aggregate' ? `${r.name} (composite)` : r.name, state, `route ${r.kind}`, `route:${r.name}`);
    const targets = r.kind === 'cluster' ? [r.cluster] : r.kind === 'split' ? r.variants.map((v) => v.cluster)
      : r.kind === 'aggregate' ? r.parts.map((p) => p.cluster) : [];
    for (const t of new Set(targets)) {
      if (cy.has(t)) link(col[1] + 150, ry, col[2] - 6, cy.get(t), clusterState(clusters.get(t)));
    }
    if (r.mirror && cy.has(r.mirror.cluster)) link(col[1] + 150, ry, col[2] - 6, cy.get(r.mirror.cluster), 'mirror');
  });
  let ei = 0;
  g.clusters.forEach((c) => {
    const state = clusterState(c);
    node(col[2], cy.get(c.name), c.name, state, 'cluster', `cluster:${c.name}`);
    for (const e of c.endpoints) {
      const ey = y(ei, endpoints.length);
      ei += 1;
      link(col[2] + 120, cy.get(c.name), col[3] - 6, ey, endpointState(e));
      node(col[3], ey, e.url, endpointState(e), 'endpoint', `endpoint:${c.name}:${e.url}`);
    }
  });
  holder.replaceChildren(svg);
}

export default {
  id: 'topology',
  title: 'Topology',
  requires: ['gateway'],
  mount(root) {
    holder = h('div', { class: 'topo-holder', id: 'topology' });
    root.append(h('h2', {}, 'Topology'),
      h('p', { class: 'legend' }, h('span', { class: 'dot', dataset: { state: 'ok' } }), 'serving ',
        h('span', { class: 'dot', dataset: { state: 'degraded' } }), 'degraded ',
        h('span', { class: 'dot', dataset: { state: 'down' } }), 'down'),
      h('div', { class: 'scroll' }, holder));
  },
  update(ctx, changed) {
    // Redrawn only when what it shows changed: the configuration or a state colour.
    const g = ctx.store.state.gateway;
    const ticks = (ctx.store.tick && ctx.store.tick.routes) || {};
    const key = JSON.stringify([g && g.version, g && g.clusters.map((c) => c.endpoints.map(endpointState)),
      g && g.routes.map((r) => (ticks[r.name] && ticks[r.name].err > 0) || 0)]);
    if (key === lastKey && !changed.has('*')) return;
    lastKey = key;
    setData(holder, 'version', g ? g.version : '');
    draw(ctx);
  },
};
