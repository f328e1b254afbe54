// The console's shell: the event stream, the store every view reads, tabs, live/paused.
import { h, setText, setData, url } from './dom.js';
import overview from './views/overview.js';
import routes from './views/routes.js';
import topology from './views/topology.js';
import composites from './views/composites.js';
import orders from './views/orders.js';
import messaging from './views/messaging.js';
import config from './views/config.js';
import feed from './views/feed.js';

const VIEWS = [overview, routes, topology, composites, orders, messaging, config, feed];
const HISTORY = 900;

/** What the page knows: the last snapshot, advanced by every tick and event. */
const store = {
  features: {},
  state: {},
  tick: null,
  history: { overview: null, routes: {} },
  feed: [],
  seq: 0,
  snapshots: 0,
};

const listeners = new Map();
const ctx = {
  store,
  /** Subscribes a view to a stream event (`saga`, `dead_letter`, …). */
  on(event, fn) {
    if (!listeners.has(event)) listeners.set(event, []);
    listeners.get(event).push(fn);
  },
  /** Views call this after an action, to show its effect without waiting for a tick. */
  refresh() { schedule(['*']); },
};

let active = null;
let live = true;
let source = null;
let pending = new Set();
let frame = 0;
const mounted = new Map();

function emptySeries() { return { t: [], rps: [], err: [], p50: [], p99: [], backlog: [] }; }

function push(series, t, p) {
  series.t.push(t);
  series.rps.push(p.rps);
  series.err.push(p.err);
  series.p50.push(p.p50 ?? null);
  series.p99.push(p.p99 ?? null);
  series.backlog.push(p.backlog ?? 0);
  while (series.t.length && series.t[0] <= t - HISTORY) {
    for (const k of Object.keys(series)) series[k].shift();
  }
}

function onSnapshot(data) {
  store.features = data.features;
  store.state = data.state;
  store.tick = data.tick;
  store.history = {
    overview: data.history.overview || emptySeries(),
    routes: data.history.routes || {},
  };
  store.feed = data.feed || [];
  store.seq = data.seq;
  store.snapshots += 1;
  setData(document.body, 'snapshots', store.snapshots);
  buildTabs();
  schedule(['*']);
}

function onTick(data) {
  const m = data.metrics;
  if (m) {
    store.tick = m;
    const secs = Math.floor(m.t / 1000);
    push(store.history.overview, secs, m.overview);
    for (const [name, r] of Object.entries(m.routes)) {
      if (!store.history.routes[name]) store.history.routes[name] = emptySeries();
      push(store.history.routes[name], secs, { rps: r.rps, err: r.err, p50: r.p50, p99: r.p99_now });
    }
  }
  const changed = Object.keys(data.changed || {});
  for (const k of changed) store.state[k] = data.changed[k];
  schedule(['tick', ...changed]);
}

function onEvent(kind, data) {
  if (kind !== 'saga' && kind !== 'messages') {
    store.feed.push(data);
    if (store.feed.length > 200) store.feed.shift();
  }
  for (const fn of listeners.get(kind) || []) fn(data);
  schedule(['feed', kind]);
}

function connect() {
  if (source) return;
  setConn('connecting');
  source = new EventSource(url('/console/events'));
  source.addEventListener('open', () => setConn('live'));
  source.addEventListener('error', () => {
    if (!source) return;
    if (source.readyState === EventSource.CLOSED) {
      // Refused (401, 403) or gone: try again later, from a fresh snapshot.
      source = null;
      setConn('offline');
      setTimeout(() => { if (!document.hidden) connect(); }, 2000);
    } else {
      setConn('reconnecting');
    }
  });
  const guard = (fn) => (e) => {
    const id = Number(e.lastEventId || 0);
    if (id && id <= store.seq) return; // already in the snapshot
    if (id) store.seq = id;
    fn(JSON.parse(e.data));
  };
  source.addEventListener('snapshot', (e) => { onSnapshot(JSON.parse(e.data)); setConn('live'); });
  source.addEventListener('tick', guard(onTick));
  for (const kind of ['breaker', 'health', 'reload', 'dead_letter', 'key', 'saga', 'messages']) {
    source.addEventListener(kind, guard((d) => onEvent(kind, d)));
  }
}

function disconnect() {
  if (source) source.close();
  source = null;
}

function setConn(state) {
  const el = document.getElementById('conn');
  setData(el, 'state', state);
  setText(el, state);
}

function available(view) {
  return !view.requires || view.requires.every((f) => store.features[f]);
}

function buildTabs() {
  const nav = document.getElementById('tabs');
  const main = document.getElementById('views');
  const wanted = VIEWS.filter(available);
  if (nav.dataset.built === wanted.map((v) => v.id).join(',')) return;
  nav.dataset.built = wanted.map((v) => v.id).join(',');
  nav.replaceChildren(...wanted.map((v) => h('a', {
    href: `#${v.id}`, id: `tab-${v.id}`, class: 'tab', role: 'tab', dataset: { view: v.id },
  }, v.title)));
  main.replaceChildren();
  mounted.clear();
  for (const v of wanted) {
    const root = h('section', { id: `view-${v.id}`, class: 'view', role: 'tabpanel', hidden: true, 'aria-labelledby': `tab-${v.id}` });
    main.append(root);
    v.mount(root, ctx);
    mounted.set(v.id, { view: v, root, stale: true });
  }
  select(location.hash.slice(1));
}

function select(id) {
  const views = [...mounted.keys()];
  if (!views.includes(id)) id = views[0];
  active = id;
  for (const [vid, m] of mounted) {
    m.root.hidden = vid !== id;
    const tab = document.getElementById(`tab-${vid}`);
    if (tab) tab.setAttribute('aria-selected', String(vid === id));
  }
  setData(document.body, 'view', id);
  schedule(['*']);
}

function schedule(what) {
  for (const w of what) pending.add(w);
  if (!live || frame) return;
  frame = setTimeout(render, 0);
}

function render() {
  frame = 0;
  if (!live || document.hidden) return;
  const changed = pending;
  pending = new Set();
  // Only the view on screen touches the DOM; the others catch up when shown.
  for (const [id, m] of mounted) {
    if (id === active) {
      const all = m.stale ? new Set(['*']) : changed;
      m.stale = false;
      m.view.update(ctx, all);
    } else if (changed.size) {
      m.stale = true;
    }
  }
}

function init() {
  window.addEventListener('hashchange', () => select(location.hash.slice(1)));
  document.getElementById('live').addEventListener('click', (e) => {
    live = !live;
    e.currentTarget.setAttribute('aria-pressed', String(live));
    setText(e.currentTarget, live ? 'Live' : 'Paused');
    setData(document.body, 'live', live);
    if (live) schedule(['*']);
  });
  // A hidden page costs nothing: the stream is closed and opened again (with a fresh
  // snapshot) when the page is seen.
  document.addEventListener('visibilitychange', () => {
    if (document.hidden) {
      disconnect();
      setConn('paused');
    } else {
      connect();
    }
  });
  setData(document.body, 'live', true);
  document.getElementById('views').replaceChildren();
  connect();
}

init();
