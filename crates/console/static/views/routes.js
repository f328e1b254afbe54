// Routes: each route's traffic, latency and errors; opened, its cluster's endpoints with
// their health and breakers, and a split's observed shares against its weights.
import { h, keyed, setText, setData, spark, drawSpark, num, ms, pct, age, chip, setChip } from '../dom.js';

let body;
const open = new Set();

function targetText(r) {
  if (r.kind === 'cluster') return r.cluster;
  if (r.kind === 'split') return r.variants.map((v) => `${v.name}→${v.cluster}`).join(', ');
  if (r.kind === 'aggregate') return `composite of ${r.parts.length}`;
  return 'the gateway';
}

function clustersOf(r) {
  if (r.kind === 'cluster') return [r.cluster];
  if (r.kind === 'split') return r.variants.map((v) => v.cluster);
  if (r.kind === 'aggregate') return [...new Set(r.parts.map((p) => p.cluster))];
  return [];
}

function breakerLabel(e, now) {
  const since = age(now - e.breaker_since);
  return `${e.breaker.replace('_', '-')} · ${since}`;
}

function createRow(r) {
  const cells = {};
  const td = (k, cls) => (cells[k] = h('td', { class: cls || '' }));
  const toggle = h('button', { type: 'button', class: 'link', 'aria-expanded': 'false' }, r.name);
  const tr = h('tr', { class: 'route' },
    h('td', {}, toggle), td('target'), td('rps', 'n'), td('p50', 'n'), td('p95', 'n'), td('p99', 'n'),
    td('err', 'n'), td('limited', 'n'), td('retries', 'n'), td('breakers', 'chips'), td('spark', 'sparkcell'));
  cells.sp = spark('rps');
  cells.spark.append(cells.sp);
  const detail = h('tr', { class: 'detail', hidden: true }, h('td', { colspan: 11 }));
  toggle.addEventListener('click', () => {
    const key = tr.parentElement.dataset.key;
    if (open.has(key)) open.delete(key); else open.add(key);
    detail.hidden = !open.has(key);
    toggle.setAttribute('aria-expanded', String(open.has(key)));
    update();
  });
  // Two rows per route, kept together in one tbody.
  const group = h('tbody', { class: 'route-group' }, tr, detail);
  group._cells = cells;
  group._detail = detail;
  return group;
}

let lastCtx = null;

function endpointTable(ctx, clusters, tick) {
  const now = Date.now();
  const wrap = h('div', { class: 'endpoints' });
  for (const c of clusters) {
    const rows = c.endpoints.map((e) => {
      let rps = 0;
      for (const r of Object.values((tick && tick.routes) || {})) rps += (r.endpoints && r.endpoints[e.url]) || 0;
      return h('tr', {},
        h('td', { class: 'mono' }, e.url),
        h('td', {}, chip('health', e.healthy ? 'ok' : 'down', e.healthy ? 'healthy' : 'unhealthy')),
        h('td', {}, e.last_check ? `${age(now - e.last_check)} ago` : c.health_checked ? 'not yet' : 'no checks'),
        h('td', {}, chip('breaker', e.breaker, breakerLabel(e, now))),
        h('td', { class: 'n' }, num(e.trips, 0)),
        h('td', { class: 'n' }, num(e.in_flight, 0)),
        h('td', { class: 'n' }, num(rps)));
    });
    wrap.append(
      h('h4', {}, `cluster ${c.name} · ${c.load_balancer}`),
      h('div', { class: 'scroll' }, h('table', { class: 'grid' },
        h('thead', {}, h('tr', {}, ['endpoint', 'health', 'last check', 'breaker (time in state)', 'trips', 'in flight', 'req/s'].map((t) => h('th', {}, t)))),
        h('tbody', {}, rows))));
  }
  return wrap;
}

function detailOf(ctx, r, t) {
  const g = ctx.store.state.gateway;
  const parts = [];
  parts.push(h('p', { class: 'muted' }, `matches ${r.matches}${r.auth ? ' · needs a token' : ''}${r.rate_limited ? ' · rate limited' : ''}`));
  if (r.kind === 'split') {
    const total = r.variants.reduce((a, v) => a + v.weight, 0) || 1;
    parts.push(h('h4', {}, 'Split: observed share (10 s) against configured weight'),
      h('table', { class: 'grid' },
        h('thead', {}, h('tr', {}, ['variant', 'cluster', 'configured', 'observed'].map((x) => h('th', {}, x)))),
        h('tbody', {}, r.variants.map((v) => h('tr', { dataset: { variant: v.name } },
          h('td', {}, v.name), h('td', {}, v.cluster), h('td', { class: 'n' }, pct(v.weight / total)),
          h('td', { class: 'n' }, pct(t && t.variants ? t.variants[v.name] ?? 0 : null)))))));
  }
  if (r.mirror) {
    const m = t && t.mirror;
    parts.push(h('h4', {}, `Mirror to ${r.mirror.cluster}: observed rate (10 s) against the configured share`),
      h('table', { class: 'grid', id: `mirror-${r.name}` },
        h('thead', {}, h('tr', {}, ['configured', 'drawn', 'sent', 'copies/s', 'answered well', 'skipped/s'].map((x) => h('th', {}, x)))),
        h('tbody', {}, h('tr', { dataset: { configured: r.mirror.percent / 100, drawn: m ? m.drawn : '' } },
          h('td', { class: 'n' }, pct(r.mirror.percent / 100)),
          h('td', { class: 'n' }, pct(m ? m.drawn : null)),
          h('td', { class: 'n' }, pct(m ? m.sent : null)),
          h('td', { class: 'n' }, num(m ? m.rps : null)),
          h('td', { class: 'n' }, pct(m ? m.ok : null)),
          h('td', { class: 'n' }, num(m ? m.skipped : null))))));
  }
  const names = clustersOf(r);
  const clusters = (g ? g.clusters : []).filter((c) => names.includes(c.name));
  parts.push(endpointTable(ctx, clusters, ctx.store.tick));
  return parts;
}

function update() {
  const ctx = lastCtx;
  if (!ctx) return;
  const g = ctx.store.state.gateway;
  const routes = g ? g.routes : [];
  const ticks = (ctx.store.tick && ctx.store.tick.routes) || {};
  const now = Date.now();
  keyed(body, routes, (r) => r.name, createRow, (group, r) => {
    const c = group._cells;
    const t = ticks[r.name] || {};
    setText(c.target, targetText(r));
    setText(c.rps, num(t.rps_10s));
    setText(c.p50, ms(t.p50));
    setText(c.p95, ms(t.p95));
    setText(c.p99, ms(t.p99));
    setText(c.err, pct(t.err));
    setData(c.err, 'level', t.err > 0.05 ? 'bad' : t.err > 0 ? 'warn' : 'ok');
    setText(c.limited, num(t.limited));
    setText(c.retries, num(t.retries));
    const names = clustersOf(r);
    const eps = (g ? g.clusters : []).filter((x) => names.includes(x.name))
      .flatMap((x) => x.endpoints.map((e) => ({ ...e, cluster: x.name })));
    keyed(c.breakers, eps, (e) => `${e.cluster} ${e.url}`,
      (e) => chip('breaker', e.breaker, ''),
      (node, e) => {
        setChip(node, e.breaker, e.breaker === 'closed' ? '●' : e.breaker.replace('_', '-'));
        setData(node, 'endpoint', e.url);
        const title = `${e.url}: ${e.healthy ? 'healthy' : 'unhealthy'}, breaker ${e.breaker} for ${age(now - e.breaker_since)}, ${e.trips} trips`;
        if (node.title !== title) node.title = title;
      });
    const hist = ctx.store.history.routes[r.name];
    drawSpark(c.sp, hist ? hist.t : [], hist ? hist.rps : []);
    const key = group.dataset.key;
    if (open.has(key)) {
      group._detail.hidden = false;
      group._detail.firstChild.replaceChildren(...detailOf(ctx, r, t));
    }
  });
}

export default {
  id: 'routes',
  title: 'Routes',
  requires: ['gateway'],
  mount(root) {
    const table = h('table', { class: 'grid routes', id: 'routes-table' },
      h('thead', {}, h('tr', {}, ['route', 'target', 'req/s', 'p50', 'p95', 'p99', 'errors', 'limited/s', 'retries/s', 'breakers', 'last 15 min'].map((t) => h('th', {}, t)))));
    body = table;
    root.append(h('h2', {}, 'Routes'), h('p', { class: 'muted' }, 'Requests/s, errors and latency percentiles over the last 10 seconds. Open a route to see its endpoints.'),
      h('div', { class: 'scroll' }, table));
  },
  update(ctx) {
    lastCtx = ctx;
    update();
  },
};
