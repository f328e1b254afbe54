// The event feed: breaker changes, health, reloads, dead-letter arrivals and key rotations,
// newest first.
import { h, keyed, setText, setData, clock } from '../dom.js';

let el = {};
const hidden = new Set();

function create() {
  const cells = {};
  const li = h('li', { class: 'event' },
    (cells.time = h('time')), (cells.kind = h('span', { class: 'chip kind' })),
    (cells.title = h('span', { class: 'title' })), (cells.subject = h('span', { class: 'subject mono' })),
    (cells.user = h('span', { class: 'user' })), (cells.detail = h('span', { class: 'detail' })));
  li._cells = cells;
  return li;
}

export default {
  id: 'feed',
  title: 'Events',
  mount(root, ctx) {
    el = {};
    el.list = h('ol', { class: 'feed', id: 'feed', reversed: true });
    const filters = h('div', { class: 'row toolbar' }, ...['breaker', 'health', 'reload', 'dead_letter', 'key'].map((k) => {
      const cb = h('input', { type: 'checkbox', checked: true, name: k });
      cb.addEventListener('change', () => { if (cb.checked) hidden.delete(k); else hidden.add(k); ctx.refresh(); });
      return h('label', {}, cb, ` ${k.replace('_', ' ')}`);
    }));
    el.none = h('p', { class: 'empty' }, 'Nothing happened yet.');
    root.append(h('h2', {}, 'Events'), filters, el.none, el.list);
  },
  update(ctx) {
    const items = ctx.store.feed.filter((e) => !hidden.has(e.kind)).slice().reverse();
    el.none.hidden = items.length > 0;
    keyed(el.list, items, (e) => e.id, create, (li, e) => {
      const c = li._cells;
      setText(c.time, clock(e.t));
      setText(c.kind, e.kind.replace('_', ' '));
      setData(c.kind, 'state', e.level);
      setData(li, 'kind', e.kind);
      setText(c.title, e.title);
      setText(c.subject, e.subject || '');
      setText(c.user, e.user ? `user ${e.user}` : '');
      setText(c.detail, e.detail || '');
    });
  },
};
