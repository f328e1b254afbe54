// Orders and their sagas: a filterable list, and one order's timeline appending live.
import { h, keyed, setText, setData, api, clock, age, chip, setChip } from '../dom.js';

let el = {};
let ctxRef = null;
let selected = null;
let listTimer = 0;
let orderTimer = 0;

function query() {
  const p = new URLSearchParams();
  if (el.status.value) p.set('status', el.status.value);
  if (el.reason.value) p.set('reason', el.reason.value);
  if (el.stuck.checked) p.set('stuck_secs', el.stuckSecs.value || '30');
  if (el.q.value.trim()) p.set('q', el.q.value.trim());
  p.set('limit', '100');
  return p.toString();
}

async function loadList() {
  listTimer = 0;
  try {
    const page = await api(`/console/api/orders?${query()}`);
    setText(el.listNote, `${page.items.length} orders${page.items.length === 100 ? ' (the newest 100)' : ''}`);
    keyed(el.rows, page.items, (o) => o.id, createRow, updateRow);
  } catch (e) {
    setText(el.listNote, `could not load orders: ${e.message}`);
  }
}

function createRow(o) {
  const cells = {};
  const open = h('button', { type: 'button', class: 'link mono' }, o.id.slice(0, 8));
  open.addEventListener('click', () => select(o.id));
  const tr = h('tr', {}, h('td', {}, open),
    ...['user', 'status', 'reason', 'total', 'created', 'age'].map((k) => (cells[k] = h('td', { class: k === 'total' ? 'n' : '' }))));
  cells.chip = chip('order', 'PENDING');
  cells.status.append(cells.chip);
  tr._cells = cells;
  return tr;
}

function updateRow(tr, o) {
  const c = tr._cells;
  setText(c.user, o.user_name ?? o.user_id);
  setChip(c.chip, o.status);
  setText(c.reason, o.reason || '');
  setText(c.total, `${(o.total_minor / 100).toFixed(2)} ${o.currency}`);
  setText(c.created, clock(o.created_at));
  setText(c.age, o.status === 'PENDING' ? age(Date.now() - Date.parse(o.created_at)) : '');
  setData(tr, 'selected', selected === o.id);
}

async function loadOrder() {
  orderTimer = 0;
  if (!selected) return;
  try {
    const o = await api(`/console/api/orders/${encodeURIComponent(selected)}`);
    setText(el.title, `Order ${o.id}`);
    setChip(el.orderChip, o.status);
    setText(el.meta, `${o.user_name ?? o.user_id} · ${(o.total_minor / 100).toFixed(2)} ${o.currency}${o.reason ? ` · ${o.reason}` : ''}${o.trace_id ? ` · trace ${o.trace_id}` : ''}`);
    if (o.ship_to !== undefined && o.ship_to !== null) setText(el.ship, `ships to ${typeof o.ship_to === 'string' ? o.ship_to : JSON.stringify(o.ship_to)}`);
    else setText(el.ship, '');
    keyed(el.steps, timeline(o), (x) => x.key,
      () => h('li', {}, h('time'), h('span', { class: 'step' }), h('span', { class: 'detail' })),
      (li, x) => {
        setText(li.children[0], stamp(x.at));
        setText(li.children[1], x.label);
        setText(li.children[2], x.detail || '');
        setData(li, 'kind', x.kind);
        setData(li, 'step', x.step);
        setData(li, 'event', x.event);
        setData(li, 'consumer', x.consumer);
        setData(li, 'level', x.level);
      });
    el.detail.hidden = false;
  } catch (e) {
    setText(el.meta, `could not load the order: ${e.message}`);
  }
}

/** Time of day with milliseconds: a saga's steps are often within one second. */
function stamp(t) {
  if (!t) return '–';
  const d = new Date(t);
  return `${clock(t)}.${String(d.getMilliseconds()).padStart(3, '0')}`;
}

function short(kind) {
  return (kind || 'message').replace(/^shop\./, '');
}

/** One message event in words: what happened, to which message, where. */
function describe(m) {
  const what = short(m.kind);
  const by = m.consumer || m.service;
  const nth = m.attempt > 1 ? ` (delivery ${m.attempt})` : '';
  const compensation = /order\.cancelled$/.test(m.kind || '') && m.event === 'applied' && m.service !== 'orders';
  switch (m.event) {
    case 'staged': return [`${m.service} staged ${what}, not yet published`, 'warn'];
    case 'published': return [`${m.service} published ${what} → ${m.topic}`, 'info'];
    case 'applied': return compensation ? [`${by} compensated: ${what}${nth}`, 'warn'] : [`${by} applied ${what}${nth}`, 'ok'];
    case 'duplicate': return [`${by} skipped a duplicate of ${what}`, 'info'];
    case 'retry': return [`${by} failed ${what}, delivery ${m.attempt}: will retry`, 'warn'];
    case 'dead_lettered': return [`${by} gave up on ${what} after ${m.attempt} deliveries: dead-lettered`, 'error'];
    case 'dead_letter': return [`dead letter of ${what} kept for ${by} (${m.attempt} deliveries)`, 'error'];
    case 'replayed': return [`${what} replayed to ${by}`, 'info'];
    default: return [`${by} ${m.event} ${what}`, 'info'];
  }
}

/** The saga's steps and its messages' events, in the order they happened. */
function timeline(o) {
  const out = o.steps.map((st, i) => ({
    key: `s${i}`, at: st.at, kind: 'step', step: st.step, label: st.step, detail: st.detail,
    level: st.step === 'cancelled' ? 'error' : st.step === 'confirmed' ? 'ok' : 'info',
  }));
  (o.messages || []).forEach((m, i) => {
    const [label, level] = describe(m);
    out.push({
      key: `${m.event}:${m.message_id || i}:${m.consumer || m.service}:${m.attempt || 0}:${m.dead_letter || ''}`,
      at: m.at, kind: 'message', event: m.event, consumer: m.consumer, label, level,
      detail: m.detail,
    });
  });
  // Stable: equal times keep the saga's step before the message it caused.
  return out.map((x, i) => ({ x, i })).sort((a, b) => (a.x.at - b.x.at) || (a.i - b.i)).map((y) => y.x);
}

function select(id) {
  selected = id;
  loadOrder();
  for (const tr of el.rows.children) setData(tr, 'selected', tr.dataset.key === id);
}

function later(fn, which) {
  if (which === 'list' && !listTimer) listTimer = setTimeout(fn, 1000);
  if (which === 'order' && !orderTimer) orderTimer = setTimeout(fn, 150);
}

export default {
  id: 'orders',
  title: 'Orders',
  requires: ['orders'],
  mount(root, ctx) {
    ctxRef = ctx;
    el = {};
    el.status = h('select', { name: 'status' }, ['', 'PENDING', 'CONFIRMED', 'CANCELLED'].map((s) => h('option', { value: s }, s || 'any status')));
    el.reason = h('select', { name: 'reason' }, ['', 'out_of_stock', 'payment_declined', 'timeout'].map((s) => h('option', { value: s }, s || 'any reason')));
    el.stuck = h('input', { type: 'checkbox', name: 'stuck' });
    el.stuckSecs = h('input', { type: 'number', name: 'stuck_secs', value: '30', min: '1', class: 'short' });
    el.q = h('input', { type: 'search', name: 'q', placeholder: 'order or user id' });
    for (const i of [el.status, el.reason, el.stuck, el.stuckSecs]) i.addEventListener('change', loadList);
    el.q.addEventListener('input', () => later(loadList, 'list'));
    el.rows = h('tbody', { id: 'orders-rows' });
    el.listNote = h('p', { class: 'muted' });
    el.title = h('h3', {});
    el.orderChip = chip('order', 'PENDING');
    el.meta = h('p', { class: 'muted' });
    el.ship = h('p', { class: 'muted' });
    el.steps = h('ol', { class: 'timeline', id: 'order-timeline' });
    el.detail = h('div', { class: 'order-detail', hidden: true }, h('div', { class: 'row' }, el.title, el.orderChip), el.meta, el.ship, el.steps);
    root.append(h('h2', {}, 'Orders and sagas'),
      h('form', { class: 'filters', onsubmit: (e) => { e.preventDefault(); loadList(); } },
        el.status, el.reason, h('label', {}, el.stuck, ' pending longer than ', el.stuckSecs, ' s'), el.q),
      h('div', { class: 'split' },
        h('div', {}, el.listNote, h('div', { class: 'scroll' }, h('table', { class: 'grid' },
          h('thead', {}, h('tr', {}, ['order', 'user', 'status', 'reason', 'total', 'placed', 'pending for'].map((t) => h('th', {}, t)))),
          el.rows))),
        el.detail));
    // Sagas move: the list and the open timeline follow.
    ctx.on('saga', (s) => {
      if (s.order === selected) later(loadOrder, 'order');
      later(loadList, 'list');
    });
    ctx.on('dead_letter', () => later(loadList, 'list'));
    // Its messages move (delivered, retried, dead-lettered, replayed): the timeline follows.
    ctx.on('messages', (m) => {
      if (selected && m.subjects.includes(selected)) later(loadOrder, 'order');
    });
  },
  update(ctx, changed) {
    ctxRef = ctx;
    if (changed.has('*')) {
      loadList();
      if (selected) loadOrder();
    }
  },
  select,
};
