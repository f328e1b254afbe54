// Messaging: consumers and outboxes, and the dead letters grouped by topic and error, with a
// non-destructive peek and replay of one, a selection or a group.
import { h, keyed, setText, setData, api, num, age, clock } from '../dom.js';

let el = {};
const chosen = new Set();
let busy = false;

function groupsOf(letters) {
  const groups = new Map();
  for (const d of letters) {
    const key = `${d.topic}\u0000${d.reason}`;
    if (!groups.has(key)) groups.set(key, { key, topic: d.topic, reason: d.reason, letters: [] });
    groups.get(key).letters.push(d);
  }
  return [...groups.values()];
}

async function replay(ids, label) {
  if (busy || !ids.length) return;
  busy = true;
  el.progress.hidden = false;
  el.bar.max = ids.length;
  el.bar.value = 0;
  setText(el.outcomes, '');
  el.outcomes.replaceChildren();
  let ok = 0;
  for (const [i, id] of ids.entries()) {
    setText(el.progressText, `${label}: ${i + 1}/${ids.length}`);
    let outcome;
    try {
      const r = await api(`/console/api/dead-letters/${encodeURIComponent(id)}/replay`, { method: 'POST' });
      ok += 1;
      outcome = h('li', { dataset: { outcome: 'ok' } }, `${id.slice(0, 8)} → replayed to ${r.consumer}`);
    } catch (e) {
      outcome = h('li', { dataset: { outcome: 'error' } }, `${id.slice(0, 8)} → ${e.message}`);
    }
    el.outcomes.append(outcome);
    el.bar.value = i + 1;
    chosen.delete(id);
  }
  setText(el.progressText, `${label}: ${ok} of ${ids.length} replayed`);
  setData(el.progress, 'done', 'true');
  busy = false;
}

async function peek(id) {
  try {
    const d = await api(`/console/api/dead-letters/${encodeURIComponent(id)}`);
    let payload = d.payload;
    try { payload = JSON.stringify(JSON.parse(d.payload), null, 2); } catch { /* as it is */ }
    setText(el.peekTitle, `${d.topic} · ${d.consumer} · ${d.attempts} attempts · ${clock(d.failed_at)}`);
    setText(el.peekReason, d.reason);
    setText(el.peekBody, payload);
    el.peek.hidden = false;
  } catch (e) {
    setText(el.peekTitle, `could not read ${id}: ${e.message}`);
    el.peek.hidden = false;
  }
}

function createGroup(g) {
  const all = h('input', { type: 'checkbox', 'aria-label': 'select the group' });
  const rows = h('tbody');
  const title = h('span', { class: 'group-title' });
  const count = h('span', { class: 'count' });
  const button = h('button', { type: 'button', class: 'replay-group' }, 'Replay group');
  const el2 = h('div', { class: 'dl-group' },
    h('div', { class: 'row' }, all, title, count, button),
    h('div', { class: 'scroll' }, h('table', { class: 'grid' },
      h('thead', {}, h('tr', {}, ['', 'id', 'service', 'consumer', 'subject', 'user', 'attempts', 'failed', ''].map((t) => h('th', {}, t)))),
      rows)));
  all.addEventListener('change', () => {
    for (const d of el2._group.letters) { if (all.checked) chosen.add(d.id); else chosen.delete(d.id); }
    for (const cb of rows.querySelectorAll('input[type=checkbox]')) cb.checked = all.checked;
    updateSelection();
  });
  button.addEventListener('click', () => replay(el2._group.letters.map((d) => d.id), `group ${el2._group.topic}`));
  Object.assign(el2, { _rows: rows, _title: title, _count: count });
  return el2;
}

function createLetter(d) {
  const cb = h('input', { type: 'checkbox', 'aria-label': 'select' });
  cb.addEventListener('change', () => { if (cb.checked) chosen.add(d.id); else chosen.delete(d.id); updateSelection(); });
  const peekB = h('button', { type: 'button', class: 'peek' }, 'Peek');
  peekB.addEventListener('click', () => peek(d.id));
  const replayB = h('button', { type: 'button', class: 'replay' }, 'Replay');
  replayB.addEventListener('click', () => replay([d.id], 'one'));
  const cells = {};
  const tr = h('tr', { class: 'letter' }, h('td', {}, cb),
    ...['id', 'service', 'consumer', 'subject', 'user', 'attempts', 'failed'].map((k) => (cells[k] = h('td', { class: k === 'id' ? 'mono' : k === 'attempts' ? 'n' : '' }))),
    h('td', { class: 'actions' }, peekB, replayB));
  tr._cells = cells;
  tr._cb = cb;
  return tr;
}

function updateSelection() {
  setText(el.selCount, `${chosen.size} selected`);
  el.replaySel.disabled = chosen.size === 0;
}

function createRow(keys) {
  return () => {
    const cells = {};
    const tr = h('tr', {}, ...keys.map((k, i) => (cells[k] = h('td', { class: i ? 'n' : '' }))));
    tr._cells = cells;
    return tr;
  };
}

export default {
  id: 'messaging',
  title: 'Messaging',
  requires: ['messaging'],
  mount(root) {
    el = {};
    el.consumers = h('tbody', { id: 'consumers' });
    el.outboxes = h('tbody', { id: 'outboxes' });
    el.groups = h('div', { id: 'dead-letters' });
    el.none = h('p', { class: 'empty' }, 'No dead letters.');
    el.selCount = h('span', {}, '0 selected');
    el.replaySel = h('button', { type: 'button', id: 'replay-selection', disabled: true }, 'Replay selection');
    el.replaySel.addEventListener('click', () => replay([...chosen], 'selection'));
    el.bar = h('progress', { value: 0, max: 1 });
    el.progressText = h('span', { id: 'replay-progress' });
    el.outcomes = h('ul', { class: 'outcomes', id: 'replay-outcomes' });
    el.progress = h('div', { class: 'progress', hidden: true }, el.bar, el.progressText, el.outcomes);
    el.peekTitle = h('h4', {});
    el.peekReason = h('p', { class: 'reason' });
    el.peekBody = h('pre', { class: 'payload', id: 'peek-payload' });
    const close = h('button', { type: 'button' }, 'Close');
    el.peek = h('div', { class: 'peek-panel', hidden: true }, h('div', { class: 'row' }, el.peekTitle, close), el.peekReason, el.peekBody);
    close.addEventListener('click', () => { el.peek.hidden = true; });
    root.append(
      h('h2', {}, 'Consumers'),
      h('div', { class: 'scroll' }, h('table', { class: 'grid' },
        h('thead', {}, h('tr', {}, ['consumer', 'backlog', 'in flight', 'oldest', 'applied/s', 'retries/s', 'redelivered/s', 'dead-lettered'].map((t) => h('th', {}, t)))), el.consumers)),
      h('h2', {}, 'Outboxes'),
      h('div', { class: 'scroll' }, h('table', { class: 'grid' },
        h('thead', {}, h('tr', {}, ['service', 'staged', 'oldest'].map((t) => h('th', {}, t)))), el.outboxes)),
      h('h2', {}, 'Dead letters'),
      h('div', { class: 'row toolbar' }, el.selCount, el.replaySel),
      el.progress, el.none, el.groups, el.peek);
  },
  update(ctx) {
    const { store } = ctx;
    const consumers = Object.entries((store.tick && store.tick.consumers) || {}).map(([name, c]) => ({ name, ...c }));
    keyed(el.consumers, consumers, (c) => c.name, createRow(['name', 'backlog', 'inFlight', 'lag', 'applied', 'retried', 'redelivered', 'dead']), (tr, c) => {
      const x = tr._cells;
      setText(x.name, c.name);
      setText(x.backlog, num(c.backlog, 0));
      setText(x.inFlight, num(c.in_flight, 0));
      setText(x.lag, c.backlog ? age(c.lag_s * 1000) : '–');
      setText(x.applied, num(c.applied));
      setText(x.retried, num(c.retried));
      setText(x.redelivered, num(c.redelivered));
      setText(x.dead, num(c.total_dead, 0));
    });
    keyed(el.outboxes, store.state.outboxes || [], (o) => o.service, createRow(['service', 'pending', 'oldest']), (tr, o) => {
      const x = tr._cells;
      setText(x.service, o.service);
      setText(x.pending, num(o.pending, 0));
      setText(x.oldest, o.oldest_ms === null ? '–' : age(o.oldest_ms));
    });
    const letters = store.state.dead_letters || [];
    el.none.hidden = letters.length > 0;
    const live = new Set(letters.map((d) => d.id));
    for (const id of [...chosen]) if (!live.has(id)) chosen.delete(id);
    updateSelection();
    keyed(el.groups, groupsOf(letters), (g) => g.key, createGroup, (gEl, g) => {
      gEl._group = g;
      setText(gEl._title, `${g.topic} · ${g.reason}`);
      setText(gEl._count, `${g.letters.length}`);
      keyed(gEl._rows, g.letters, (d) => d.id, createLetter, (tr, d) => {
        const x = tr._cells;
        setText(x.id, d.id.slice(0, 8));
        setText(x.service, d.service);
        setText(x.consumer, d.consumer);
        setText(x.subject, d.subject || '');
        setText(x.user, d.user || '');
        setText(x.attempts, d.attempts);
        setText(x.failed, clock(d.failed_at));
        tr._cb.checked = chosen.has(d.id);
        setData(tr, 'id', d.id);
      });
    });
  },
};
