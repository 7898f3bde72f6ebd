// NetSel dashboard: lists services, VIPs, instances, health, tags and lease countdowns,
// kept live by the /v1/events server-sent-event stream, with small hand-drawn SVG charts
// of each service's recent traffic from /v1/traffic. The filter, sort, "only unhealthy"
// and which services are expanded live in the URL (?q=web&expand=web,db&unhealthy=1), so
// a view can be shared. No dependencies, no build step.
'use strict';
(() => {
  const state = {
    services: new Map(),
    sort: { key: 'name', dir: 1 },
    filter: '',
    open: new Set(),
    expandAll: false,
    onlyUnhealthy: false,
    token: sessionStorage.getItem('netsel-token') || '',
    index: 0,
    // Traffic series by service ({t, rps, error_rate, p99_ms, open}), newest last.
    traffic: new Map(),
    trafficSince: 0,
    pointsMax: 180,
    intervalSecs: 5,
    domain: 'netsel',
  };
  // For tests and curious operators: a page-load id (unchanged = no reload) and counters.
  window.netselUi = { loadId: Math.random().toString(36).slice(2), renders: 0, events: 0, trafficPolls: 0 };

  const $ = (id) => document.getElementById(id);
  const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ESC[c]);

  // The view in the URL: read once at load, written (replaceState) on every change.
  const SORT_KEYS = ['name', 'vip', 'health', 'instances', 'lease'];
  function readUrl() {
    const p = new URLSearchParams(location.search);
    const q = p.get('q') || '';
    $('filter').value = q;
    state.filter = q.trim().toLowerCase();
    state.onlyUnhealthy = p.get('unhealthy') === '1';
    $('only-unhealthy').checked = state.onlyUnhealthy;
    state.expandAll = p.get('all') === '1';
    $('expand-all').checked = state.expandAll;
    state.open = new Set((p.get('expand') || '').split(',').map((n) => n.trim().toLowerCase()).filter(Boolean));
    const sort = p.get('sort') || '';
    const key = sort.replace(/^-/, '');
    if (SORT_KEYS.includes(key)) state.sort = { key, dir: sort.startsWith('-') ? -1 : 1 };
  }
  function writeUrl() {
    const p = new URLSearchParams();
    const q = $('filter').value.trim();
    if (q) p.set('q', q);
    if (state.sort.key !== 'name' || state.sort.dir !== 1) p.set('sort', (state.sort.dir < 0 ? '-' : '') + state.sort.key);
    if (state.onlyUnhealthy) p.set('unhealthy', '1');
    if (state.expandAll) p.set('all', '1');
    if (state.open.size) p.set('expand', [...state.open].sort().join(','));
    // Commas stay readable: service names never contain one.
    const search = p.toString().replace(/%2C/g, ',');
    const url = location.pathname + (search ? '?' + search : '') + location.hash;
    if (url !== location.pathname + location.search + location.hash) history.replaceState(null, '', url);
  }

  function authHeaders() {
    return state.token ? { Authorization: 'Bearer ' + state.token } : {};
  }

  async function api(path) {
    const r = await fetch(path, { headers: authHeaders(), cache: 'no-store' });
    if (r.status === 401 || r.status === 403) {
      const body = await r.json().catch(() => ({}));
      showTokenForm(body.error || 'access denied');
      throw new Error('unauthorized');
    }
    return r;
  }

  // Lease deadlines on the local clock, from the server's "remaining" figures.
  function stamp(svc) {
    const now = Date.now();
    svc.instances = svc.instances || [];
    for (const i of svc.instances) i.deadline = now + i.lease_remaining_ms;
    svc.next = svc.instances.length ? Math.min(...svc.instances.map((i) => i.deadline)) : Infinity;
    return svc;
  }

  async function loadAll() {
    const r = await api('/v1/services?detail=true');
    if (!r.ok) return;
    const body = await r.json();
    state.services = new Map(body.services.map((s) => [s.name, stamp(s)]));
    state.index = body.index;
    schedule();
  }

  // Services named by change events, refetched one by one (coalesced).
  const dirty = new Set();
  let fetching = false;
  async function refreshDirty() {
    if (fetching) return;
    fetching = true;
    try {
      while (dirty.size) {
        const names = [...dirty];
        dirty.clear();
        if (names.length > 50) {
          await loadAll();
          continue;
        }
        await Promise.all(names.map(async (name) => {
          const r = await api('/v1/services/' + encodeURIComponent(name));
          if (r.status === 404) {
            state.services.delete(name);
          } else if (r.ok) {
            const s = stamp(await r.json());
            s.fresh = Date.now();
            state.services.set(s.name, s);
          }
        }));
        schedule();
      }
    } catch (e) {
      // Shown through the status badge; the next event or refresh retries.
    } finally {
      fetching = false;
    }
  }

  let renderTimer = null;
  function schedule() {
    if (renderTimer === null) renderTimer = setTimeout(() => { renderTimer = null; render(); }, 30);
  }

  function matches(s) {
    if (state.onlyUnhealthy && s.health === 'passing') return false;
    if (!state.filter) return true;
    const hay = [s.name, s.vip + ':' + s.port, ...s.tags,
      ...s.instances.map((i) => i.endpoint + ' ' + i.id)].join(' ').toLowerCase();
    return state.filter.split(/\s+/).every((t) => hay.includes(t));
  }

  const HEALTH_RANK = { critical: 0, warning: 1, passing: 2 };
  function ipKey(ip) {
    return ip.includes('.') ? ip.split('.').map((p) => p.padStart(3, '0')).join('.') : ip;
  }
  function compare(a, b) {
    let d = 0;
    switch (state.sort.key) {
      case 'vip': d = ipKey(a.vip) < ipKey(b.vip) ? -1 : ipKey(a.vip) > ipKey(b.vip) ? 1 : 0; break;
      case 'health': d = HEALTH_RANK[a.health] - HEALTH_RANK[b.health]; break;
      case 'instances': d = a.instance_count - b.instance_count; break;
      case 'lease': d = (a.next === b.next) ? 0 : (a.next < b.next ? -1 : 1); break;
      default: d = 0;
    }
    if (d === 0) d = a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
    return d * state.sort.dir;
  }

  function fmtLease(ms) {
    if (!Number.isFinite(ms)) return '–';
    const s = Math.max(0, Math.ceil(ms / 1000));
    if (s >= 3600) return Math.floor(s / 3600) + 'h' + String(Math.floor((s % 3600) / 60)).padStart(2, '0') + 'm';
    if (s >= 60) return Math.floor(s / 60) + 'm' + String(s % 60).padStart(2, '0') + 's';
    return s + 's';
  }

  const tags = (list) => list.map((t) => '<span class="tag">' + esc(t) + '</span>').join('');

  // What the instance's last active check saw, and when: "HTTP 503 from /healthz · 3× · 4s ago".
  function checkCell(i) {
    const r = i.check_result;
    if (!r) return '–';
    const parts = [esc(r.output)];
    if (r.consecutive > 1) parts.push(r.consecutive + '×');
    if (r.checked_at_unix_ms) parts.push(fmtLease(Date.now() - r.checked_at_unix_ms) + ' ago');
    return '<span class="badge ' + esc(r.status) + '">' + esc(r.status) + '</span> ' + parts.join(' · ');
  }

  function instanceRows(s) {
    const rows = s.instances.map((i) =>
      '<tr data-instance="' + esc(i.id) + '">' +
      '<td class="mono">' + esc(i.id) + '</td>' +
      '<td class="mono">' + esc(i.endpoint) + '</td>' +
      '<td><span class="badge ' + esc(i.health) + '">' + esc(i.health) + '</span></td>' +
      '<td class="num">' + esc(i.weight) + '</td>' +
      '<td>' + esc(i.protocol) + '</td>' +
      '<td>' + tags(i.tags) + '</td>' +
      '<td class="num lease" data-deadline="' + i.deadline + '"></td>' +
      '<td class="mono">' + esc(i.owner || '') + '</td>' +
      '<td class="check">' + checkCell(i) + '</td>' +
      '<td class="meta">' + meta(i.meta) + '</td>' +
      '</tr>').join('');
    const domain = state.domain ? state.domain + '.' : '';
    const dns = '<div class="dns">DNS <code data-dns="a">' + esc(s.name + '.' + domain) + '</code> (A, the VIP)' +
      ' · <code data-dns="srv">' + esc('_' + s.name + '._tcp.' + domain) + '</code> (SRV, healthy instances)</div>';
    return '<tr class="instances" data-instances-of="' + esc(s.name) + '"><td colspan="7">' + dns +
      '<table class="inner"><thead><tr><th>Instance</th><th>Endpoint</th><th>Health</th>' +
      '<th class="num">Weight</th><th>Protocol</th><th>Tags</th><th class="num">Lease</th>' +
      '<th title="the cluster node that holds its lease">Node</th>' +
      '<th title="what its last active check saw">Check</th><th>Metadata</th></tr></thead>' +
      '<tbody>' + rows + '</tbody></table></td></tr>';
  }

  const meta = (m) => Object.entries(m || {}).map(([k, v]) =>
    '<span class="tag meta-kv">' + esc(k) + '=' + esc(v) + '</span>').join('') || '–';

  // --- Traffic charts -------------------------------------------------------------------
  // Hand-drawn SVG sparklines: newest point at the right edge, the x axis spanning the
  // whole window (pointsMax intervals), y from 0 to the series' maximum.
  const CHARTS = [
    { key: 'rps', label: 'requests/s', cls: 'rps', fmt: (v) => fmtNum(v) + '/s' },
    { key: 'error_rate', label: 'error rate', cls: 'err', fmt: (v) => fmtNum(v * 100) + '%' },
    { key: 'p99_ms', label: 'p99 latency', cls: 'p99', fmt: (v) => fmtNum(v) + ' ms' },
    { key: 'open', label: 'open connections', cls: 'open', fmt: (v) => fmtNum(v) },
  ];
  // Rows beyond this many get no charts (filter to see them): the page stays light.
  const CHART_ROWS = 200;
  const W = 64;
  const H = 18;

  function fmtNum(v) {
    if (v === null || v === undefined || !Number.isFinite(v)) return '–';
    if (v === 0) return '0';
    if (Math.abs(v) >= 100) return String(Math.round(v));
    if (Math.abs(v) >= 10) return v.toFixed(1).replace(/\.0$/, '');
    return v.toPrecision(2).replace(/\.?0+$/, '');
  }

  function spark(name, c, values) {
    const n = values.length;
    const defined = values.filter((v) => v !== null && v !== undefined);
    const max = defined.length ? Math.max(...defined) : 0;
    const step = W / Math.max(1, state.pointsMax - 1);
    const y = (v) => (H - 1 - (max > 0 ? (v / max) * (H - 2) : 0)).toFixed(1);
    let d = '';
    let pen = false;
    for (let i = 0; i < n; i++) {
      const v = values[i];
      if (v === null || v === undefined) { pen = false; continue; }
      d += (pen ? 'L' : 'M') + (W - (n - 1 - i) * step).toFixed(1) + ' ' + y(v);
      pen = true;
    }
    const last = defined.length ? defined[defined.length - 1] : null;
    const minutes = Math.round(state.pointsMax * state.intervalSecs / 60);
    const title = name + ' ' + c.label + ' over the last ' + minutes + ' min: ' + n + ' points, latest ' +
      c.fmt(last) + ', highest ' + c.fmt(max);
    return '<span class="chart ' + c.cls + '"><svg class="spark" width="' + W + '" height="' + H +
      '" viewBox="0 0 ' + W + ' ' + H + '" role="img" aria-label="' + esc(title) + '" data-metric="' + c.key +
      '" data-points="' + n + '" data-nonzero="' + defined.filter((v) => v > 0).length + '" data-last="' + (last === null ? '' : last) + '" data-max="' + max + '">' +
      '<title>' + esc(title) + '</title><path d="M0 ' + (H - 0.5) + 'H' + W + '" class="base"/>' +
      (d ? '<path d="' + d + '"/>' : '') + '</svg><span class="last">' + esc(c.fmt(last)) + '</span></span>';
  }

  const chartHtml = new Map();
  function trafficCell(name) {
    let html = chartHtml.get(name);
    if (html === undefined) {
      const t = state.traffic.get(name);
      html = t ? CHARTS.map((c) => spark(name, c, t[c.key])).join('') : '<span class="muted">no data yet</span>';
      chartHtml.set(name, html);
    }
    return html;
  }

  const KEYS = ['t', 'rps', 'error_rate', 'p99_ms', 'open'];
  async function loadTraffic() {
    const since = state.trafficSince ? '?since=' + state.trafficSince : '';
    const r = await fetch('/v1/traffic' + since, { headers: authHeaders(), cache: 'no-store' });
    if (!r.ok) return;
    const body = await r.json();
    state.pointsMax = body.points_max || state.pointsMax;
    state.intervalSecs = body.interval_secs || state.intervalSecs;
    const next = new Map();
    for (const [name, fresh] of Object.entries(body.services)) {
      const old = since ? state.traffic.get(name) : undefined;
      const series = {};
      for (const k of KEYS) {
        const merged = (old ? old[k] : []).concat(fresh[k]);
        series[k] = merged.slice(Math.max(0, merged.length - state.pointsMax));
      }
      next.set(name, series);
      if (!old || fresh.t.length) chartHtml.delete(name);
      const last = fresh.t[fresh.t.length - 1];
      if (last > state.trafficSince) state.trafficSince = last;
    }
    // Services the server no longer tracks are gone.
    for (const name of state.traffic.keys()) if (!next.has(name)) chartHtml.delete(name);
    state.traffic = next;
    for (const td of document.querySelectorAll('td[data-traffic]')) {
      td.innerHTML = trafficCell(td.dataset.traffic);
    }
    window.netselUi.trafficPolls++;
  }

  let trafficTimer = null;
  function pollTraffic() {
    clearTimeout(trafficTimer);
    const again = () => {
      const ms = Math.min(5000, Math.max(500, state.intervalSecs * 1000));
      trafficTimer = setTimeout(pollTraffic, ms);
    };
    if (document.hidden) { again(); return; }
    loadTraffic().catch(() => {}).finally(again);
  }

  function render() {
    const all = [...state.services.values()];
    const list = all.filter(matches).sort(compare);
    const now = Date.now();
    const html = [];
    let charted = 0;
    for (const s of list) {
      const open = state.expandAll || state.open.has(s.name);
      const fresh = s.fresh && now - s.fresh < 2000;
      html.push('<tr class="service' + (open ? ' open' : '') + (fresh ? ' fresh' : '') +
        '" data-service="' + esc(s.name) + '">' +
        '<td class="name">' + esc(s.name) + '</td>' +
        '<td class="mono">' + esc(s.vip) + ':' + esc(s.port) + '</td>' +
        '<td><span class="badge ' + esc(s.health) + '">' + esc(s.health) + '</span></td>' +
        '<td class="num">' + s.healthy_count + '/' + s.instance_count + '</td>' +
        '<td>' + tags(s.tags) + '</td>' +
        (charted++ < CHART_ROWS
          ? '<td class="traffic" data-traffic="' + esc(s.name) + '">' + trafficCell(s.name) + '</td>'
          : '<td class="traffic muted" title="filter to see this service\'s charts">…</td>') +
        '<td class="num lease" data-deadline="' + s.next + '"></td></tr>');
      if (open) html.push(instanceRows(s));
    }
    $('rows').innerHTML = html.join('');
    const instances = all.reduce((n, s) => n + s.instance_count, 0);
    $('summary').textContent = all.length + ' services, ' + instances + ' instances';
    $('shown').textContent = list.length === all.length ? '' : 'showing ' + list.length + ' of ' + all.length;
    $('empty').hidden = all.length !== 0;
    for (const th of document.querySelectorAll('th[data-sort]')) {
      th.classList.toggle('sorted-asc', th.dataset.sort === state.sort.key && state.sort.dir === 1);
      th.classList.toggle('sorted-desc', th.dataset.sort === state.sort.key && state.sort.dir === -1);
    }
    tick();
    writeUrl();
    window.netselUi.renders++;
  }

  function tick() {
    const now = Date.now();
    for (const el of document.querySelectorAll('[data-deadline]')) {
      const left = Number(el.dataset.deadline) - now;
      el.textContent = fmtLease(left);
      el.classList.toggle('low', left < 5000);
    }
  }

  function setStatus(s) {
    const el = $('status');
    el.className = 'status ' + s;
    el.textContent = s;
  }

  let events = null;
  let batchTimer = null;
  function connect() {
    if (events) events.close();
    const url = '/v1/events' + (state.token ? '?token=' + encodeURIComponent(state.token) : '');
    events = new EventSource(url);
    setStatus('connecting');
    // Load after the stream is open, so no change falls between the two.
    events.addEventListener('hello', () => {
      setStatus('live');
      loadAll().catch(() => {});
    });
    events.addEventListener('change', (e) => {
      window.netselUi.events++;
      const c = JSON.parse(e.data);
      state.index = Math.max(state.index, c.index);
      // One write sends several events: batch them briefly, and drop a removed service
      // locally instead of asking for it.
      if (c.kind === 'service_removed') {
        dirty.delete(c.service);
        state.services.delete(c.service);
        schedule();
      } else {
        dirty.add(c.service);
      }
      clearTimeout(batchTimer);
      batchTimer = setTimeout(refreshDirty, 20);
    });
    events.addEventListener('resync', () => loadAll().catch(() => {}));
    events.onerror = () => {
      if (events.readyState === EventSource.CLOSED) {
        setStatus('offline');
        // A refused stream (e.g. 401) closes for good: probe to show why, then retry.
        api('/v1/services').catch(() => {});
        setTimeout(connect, 3000);
      } else {
        setStatus('connecting');
      }
    };
  }

  function showTokenForm(message) {
    $('token-form').hidden = false;
    $('token-error').textContent = message;
  }

  $('token-form').addEventListener('submit', (e) => {
    e.preventDefault();
    state.token = $('token').value.trim();
    sessionStorage.setItem('netsel-token', state.token);
    $('token-form').hidden = true;
    connect();
  });

  let filterTimer = null;
  $('filter').addEventListener('input', (e) => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => { state.filter = e.target.value.trim().toLowerCase(); render(); }, 60);
  });
  $('only-unhealthy').addEventListener('change', (e) => { state.onlyUnhealthy = e.target.checked; render(); });
  $('expand-all').addEventListener('change', (e) => { state.expandAll = e.target.checked; render(); });
  document.querySelector('#services thead').addEventListener('click', (e) => {
    const th = e.target.closest('th[data-sort]');
    if (!th) return;
    const key = th.dataset.sort;
    state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
    render();
  });
  $('rows').addEventListener('click', (e) => {
    const tr = e.target.closest('tr.service');
    if (!tr) return;
    const name = tr.dataset.service;
    if (state.open.has(name)) state.open.delete(name); else state.open.add(name);
    render();
  });

  // The store's state: which store, this node, and in a cluster whether etcd takes writes
  // and how old this node's view is.
  async function storeStatus() {
    try {
      const r = await fetch('/v1/health', { cache: 'no-store' });
      const h = await r.json();
      if (h.dns_domain !== undefined && h.dns_domain !== state.domain) {
        state.domain = h.dns_domain;
        schedule();
      }
      const el = $('store');
      let text = h.store + (h.node ? ' · node ' + h.node : '');
      if (h.status === 'degraded') {
        const age = h.view_age_ms === undefined ? '' : ' · view ' + Math.round(h.view_age_ms / 1000) + 's old';
        text = 'store degraded: ' + (h.store_error || 'cannot take writes') + age;
      }
      el.textContent = text;
      el.className = h.status === 'degraded' ? 'status offline' : 'muted';
      el.title = 'writes ' + (h.status === 'degraded' ? 'fail; reads, DNS and proxies go on from the last view' : 'accepted');
    } catch (e) {
      // The status badge already says offline.
    }
  }
  readUrl();
  storeStatus();
  setInterval(storeStatus, 5000);
  pollTraffic();
  document.addEventListener('visibilitychange', () => { if (!document.hidden) pollTraffic(); });

  setInterval(tick, 1000);
  // Heartbeats renew leases without change events: refresh open services often and the
  // whole list now and then, so countdowns stay true.
  setInterval(() => {
    for (const name of state.open) dirty.add(name);
    refreshDirty();
  }, 5000);
  setInterval(() => loadAll().catch(() => {}), 30000);
  connect();
})();
