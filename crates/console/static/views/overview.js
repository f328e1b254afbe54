// Overview: the health strip and the system's vital signs over the last 15 minutes.
import { h, keyed, setText, setData, spark, drawSpark, num, ms, pct, age, setChip } from '../dom.js';

let el = {};

function card(id, title) {
  const value = h('div', { class: 'value', id: `ov-${id}` }, '–');
  const sub = h('div', { class: 'sub' });
  const sp = spark(id);
  el[id] = { value, sub, sp };
  return h('div', { class: 'card', dataset: { card: id } }, h('h3', {}, title), value, sub, sp);
}

/** One health item per service/broker/database, plus each cluster from its endpoints. */
function healthItems(store) {
  let items = [...(store.state.health || [])];
  // A broker that reports its connection (RabbitMQ, NATS, Kafka) says whether it is up.
  const brokers = Object.entries((store.tick && store.tick.brokers) || {});
  if (brokers.length) {
    items = items.filter((i) => !i.name.startsWith('broker'));
    for (const [name, up] of brokers) items.push({ name: `broker ${name}`, status: up ? 'ok' : 'down', detail: up ? 'connected' : 'disconnected' });
  }
  const g = store.state.gateway;
  if (g) {
    for (const c of g.clusters) {
      const open = c.endpoints.filter((e) => e.breaker !== 'closed').length;
      const down = c.endpoints.filter((e) => !e.healthy).length;
      const n = c.endpoints.length;
      let status = 'ok';
      if (down + open >= n && n > 0) status = 'down';
      else if (down + open > 0) status = 'degraded';
      items.push({ name: `cluster ${c.name}`, status, detail: `${n - Math.max(down, open)}/${n} endpoints serving` });
    }
  }
  return items;
}

export default {
  id: 'overview',
  title: 'Overview',
  mount(root) {
    el = {};
    el.strip = h('div', { class: 'strip', id: 'health-strip' });
    root.append(
      h('h2', {}, 'Health'),
      el.strip,
      h('div', { class: 'cards' },
        card('rps', 'Requests/s'),
        card('err', 'Error rate'),
        card('p50', 'p50 latency'),
        card('p99', 'p99 latency'),
        card('backlog', 'Consumer backlog'),
        card('outbox', 'Outbox backlog'),
        card('dlq', 'Dead letters'),
        card('version', 'Configuration')),
    );
  },
  update(ctx) {
    const { store } = ctx;
    keyed(el.strip, healthItems(store), (i) => i.name,
      (i) => h('span', { class: 'chip health', title: '' }, ''),
      (node, i) => {
        setChip(node, i.status, i.name);
        if (node.title !== (i.detail || i.status)) node.title = i.detail || i.status;
      });
    const hist = store.history.overview || { t: [] };
    const p = (store.tick && store.tick.overview) || {};
    setText(el.rps.value, num(p.rps));
    drawSpark(el.rps.sp, hist.t, hist.rps);
    setText(el.err.value, pct(p.err));
    setData(el.err.value, 'level', p.err > 0.05 ? 'bad' : p.err > 0 ? 'warn' : 'ok');
    drawSpark(el.err.sp, hist.t, hist.err);
    setText(el.p50.value, ms(p.p50));
    drawSpark(el.p50.sp, hist.t, hist.p50);
    setText(el.p99.value, ms(p.p99));
    drawSpark(el.p99.sp, hist.t, hist.p99);
    setText(el.backlog.value, num(p.backlog, 0));
    setText(el.backlog.sub, `published ${num(p.published)}/s · consumed ${num(p.consumed)}/s`);
    drawSpark(el.backlog.sp, hist.t, hist.backlog);
    const outboxes = store.state.outboxes || [];
    const pending = outboxes.reduce((a, o) => a + o.pending, 0);
    const oldest = outboxes.reduce((a, o) => (o.oldest_ms !== null && o.oldest_ms > a ? o.oldest_ms : a), 0);
    setText(el.outbox.value, store.features.messaging ? num(pending, 0) : '–');
    setText(el.outbox.sub, pending ? `oldest ${age(oldest)}` : 'empty');
    const dl = store.state.dead_letters;
    setText(el.dlq.value, dl ? num(dl.length, 0) : '–');
    setData(el.dlq.value, 'level', dl && dl.length ? 'bad' : 'ok');
    setText(el.dlq.sub, dl && dl.length ? `${new Set(dl.map((d) => d.topic)).size} topics` : 'none');
    const g = store.state.gateway;
    setText(el.version.value, g ? `v${g.version}` : '–');
    setText(el.version.sub, g && g.last_error ? `last reload refused: ${g.last_error}` : g ? `loaded ${new Date(g.loaded_at).toLocaleTimeString('en-GB')}` : '');
    setData(el.version.value, 'level', g && g.last_error ? 'bad' : 'ok');
  },
};
