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
    keyed(el.steps, o.steps.map((st, i) => ({ ...st, i })), (st) => st.i,
      () => h('li', {}, h('time'), h('span', { class: 'step' }), h('span', { class: 'detail' })),
      (li, st) => {
        setText(li.children[0], clock(st.at));
        setText(li.children[1], st.step);
        setText(li.children[2], st.detail || '');
        setData(li, 'step', st.step);
      });
    el.detail.hidden = false;
  } catch (e) {
    setText(el.meta, `could not load the order: ${e.message}`);
  }
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
