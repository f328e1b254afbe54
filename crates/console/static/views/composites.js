// Composites: each composite route's parts, with their latency, fallbacks and cache use.
import { h, keyed, setText, setData, num, ms, pct } from '../dom.js';

let holder;

function createComposite(r) {
  const tbody = h('tbody');
  const el = h('div', { class: 'composite' },
    h('h3', {}, r.name),
    h('p', { class: 'muted' }, `matches ${r.matches}`),
    h('div', { class: 'scroll' }, h('table', { class: 'grid' },
      h('thead', {}, h('tr', {}, ['part', 'cluster', 'after', 'required', 'timeout', 'calls/s', 'p50', 'p99', 'timeouts/s', 'timeouts', 'fallbacks/s', 'fallbacks', 'failures/s', 'cache hits'].map((t) => h('th', {}, t)))),
      tbody)));
  el._body = tbody;
  return el;
}

function createPart() {
  const cells = {};
  const tr = h('tr', {}, ...['part', 'cluster', 'after', 'required', 'timeout', 'calls', 'p50', 'p99', 'tos', 'to', 'fbs', 'fb', 'fail', 'cache']
    .map((k) => (cells[k] = h('td', { class: ['part', 'cluster', 'after'].includes(k) ? '' : 'n' }))));
  tr._cells = cells;
  return tr;
}

export default {
  id: 'composites',
  title: 'Composites',
  requires: ['gateway'],
  mount(root) {
    holder = h('div', { id: 'composites' });
    root.append(h('h2', {}, 'Composites'), h('p', { class: 'muted' }, 'Per part, over the last 10 seconds (totals since start). A timeout is a call that did not answer within its part\'s timeout or the request\'s deadline: an optional part then serves its fallback, a required one fails the request. Fallbacks count every failed optional call, timed out or not.'), holder);
  },
  update(ctx) {
    const g = ctx.store.state.gateway;
    const composites = g ? g.routes.filter((r) => r.kind === 'aggregate') : [];
    const parts = (ctx.store.tick && ctx.store.tick.parts) || {};
    if (!composites.length) {
      if (!holder.querySelector('.empty')) holder.replaceChildren(h('p', { class: 'empty' }, 'No composite routes in this configuration.'));
      return;
    }
    const empty = holder.querySelector('.empty');
    if (empty) empty.remove();
    keyed(holder, composites, (r) => r.name, createComposite, (el, r) => {
      keyed(el._body, r.parts, (p) => p.name, createPart, (tr, p) => {
        const c = tr._cells;
        const t = parts[`${r.name}/${p.name}`] || {};
        setText(c.part, p.name);
        setText(c.cluster, p.cluster);
        setText(c.after, p.after.join(', ') || '–');
        setText(c.required, p.required ? 'yes' : 'no');
        setText(c.timeout, p.timeout_ms ? `${p.timeout_ms} ms` : '–');
        setText(c.calls, num(t.calls));
        setText(c.p50, ms(t.p50));
        setText(c.p99, ms(t.p99));
        setText(c.tos, num(t.timeouts));
        setText(c.to, num(t.total_timeouts, 0));
        setData(c.tos, 'level', t.timeouts > 0 ? 'warn' : 'ok');
        setText(c.fbs, num(t.fallbacks));
        setText(c.fb, num(t.total_fallbacks, 0));
        setData(c.fbs, 'level', t.fallbacks > 0 ? 'warn' : 'ok');
        setText(c.fail, num(t.failures));
        setText(c.cache, p.cached ? pct(t.cache_hit) : 'off');
      });
    });
  },
};
