// Configuration: the effective configuration (secrets masked), the reload history, and
// validating a candidate or reloading the file.
import { h, keyed, setText, setData, api, clock } from '../dom.js';

let el = {};
let shownVersion = null;

function createReload() {
  const cells = {};
  const tr = h('tr', { class: 'reload' }, ...['at', 'result', 'version', 'changes'].map((k) => (cells[k] = h('td'))));
  tr._cells = cells;
  return tr;
}

async function reload() {
  el.reloadB.disabled = true;
  setText(el.reloadOut, 'reloading…');
  try {
    const r = await api('/console/api/config/reload', { method: 'POST' });
    setData(el.reloadOut, 'outcome', 'ok');
    setText(el.reloadOut, `version ${r.version} serves`);
  } catch (e) {
    setData(el.reloadOut, 'outcome', 'error');
    setText(el.reloadOut, e.message);
  } finally {
    el.reloadB.disabled = false;
  }
}

async function validate() {
  setText(el.validateOut, 'checking…');
  try {
    const r = await api('/console/api/config/validate', { method: 'POST', body: el.candidate.value });
    setData(el.validateOut, 'outcome', r.valid ? 'ok' : 'error');
    setText(el.validateOut, r.valid ? `valid: ${r.routes} routes, ${r.clusters} clusters` : `invalid: ${r.error}`);
  } catch (e) {
    setData(el.validateOut, 'outcome', 'error');
    setText(el.validateOut, e.message);
  }
}

export default {
  id: 'config',
  title: 'Configuration',
  requires: ['gateway'],
  mount(root, ctx) {
    el = {};
    el.version = h('span', { id: 'config-version' });
    el.source = h('span', { class: 'muted' });
    el.error = h('p', { class: 'error', id: 'config-error', hidden: true });
    el.reloadB = h('button', { type: 'button', id: 'reload' }, 'Reload from file');
    el.reloadB.addEventListener('click', reload);
    el.reloadOut = h('span', { id: 'reload-outcome' });
    el.history = h('tbody', { id: 'reload-history' });
    el.candidate = h('textarea', { id: 'candidate', rows: 8, spellcheck: 'false', placeholder: 'Paste a configuration (YAML) to validate it without applying it' });
    const validateB = h('button', { type: 'button', id: 'validate' }, 'Validate');
    validateB.addEventListener('click', validate);
    el.validateOut = h('span', { id: 'validate-outcome' });
    el.effective = h('pre', { class: 'payload', id: 'effective-config' });
    el.reloadRow = h('div', { class: 'row toolbar' }, el.reloadB, el.reloadOut);
    root.append(
      h('h2', {}, 'Configuration ', el.version), el.source, el.error, el.reloadRow,
      h('h3', {}, 'Reload history'),
      h('div', { class: 'scroll' }, h('table', { class: 'grid' },
        h('thead', {}, h('tr', {}, ['time', 'result', 'version', 'what changed / error'].map((t) => h('th', {}, t)))), el.history)),
      h('h3', {}, 'Validate a candidate'), el.candidate, h('div', { class: 'row toolbar' }, validateB, el.validateOut),
      h('h3', {}, 'Effective configuration (secrets masked)'), el.effective);
    ctx.on('reload', () => ctx.refresh());
  },
  update(ctx) {
    const g = ctx.store.state.gateway;
    if (!g) return;
    el.reloadRow.hidden = !ctx.store.features.reload;
    setText(el.version, `v${g.version}`);
    setText(el.source, g.source ? `from ${g.source}, loaded ${clock(g.loaded_at)}` : `built in code, loaded ${clock(g.loaded_at)}`);
    el.error.hidden = !g.last_error;
    setText(el.error, g.last_error ? `The last reload was refused (version ${g.version} serves on): ${g.last_error}` : '');
    const rows = [...g.reloads].reverse();
    keyed(el.history, rows, (r) => r.seq, createReload, (tr, r) => {
      const c = tr._cells;
      setText(c.at, clock(r.at));
      setText(c.result, r.ok ? 'applied' : 'refused');
      setData(tr, 'outcome', r.ok ? 'ok' : 'error');
      setText(c.version, `v${r.version}`);
      setText(c.changes, r.error || (r.changes.length ? r.changes.join('; ') : 'no change'));
    });
    if (shownVersion !== g.version || !el.effective.textContent) {
      shownVersion = g.version;
      setText(el.effective, JSON.stringify(g.config, null, 2));
    }
  },
};
