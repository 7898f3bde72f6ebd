// The dashboard's traffic charts and shareable view, in real headless Chromium. Run by
// tests/api_ui.rs while it sends requests through the HTTP proxy to `chart-web`.
import { base, check, launch } from './harness.mjs';

const screenshot = process.env.NETSEL_SCREENSHOT || 'netsel-ui-traffic.png';
const { context, close } = await launch({ width: 1400, height: 700 });
try {
  const page = context.pages()[0] || await context.newPage();
  const foreign = [];
  const problems = [];
  page.on('request', (req) => { if (!req.url().startsWith(base)) foreign.push(req.url()); });
  page.on('console', (m) => { if (m.type() === 'error') problems.push(m.text()); });
  page.on('pageerror', (e) => problems.push(String(e)));

  // A shared link: filter and one expanded service, restored on load.
  await page.goto(base + '/ui/?q=chart&expand=chart-web', { waitUntil: 'load' });
  await page.waitForFunction(() => document.getElementById('status').textContent === 'live', null, { timeout: 15000 });
  await page.waitForSelector('tr[data-service="chart-web"]', { timeout: 15000 });
  check(await page.inputValue('#filter') === 'chart', 'filter not restored');
  const shown = await page.$$eval('tr.service', (rows) => rows.map((r) => r.dataset.service).sort());
  check(JSON.stringify(shown) === '["chart-db","chart-web"]', 'filtered rows: ' + shown);
  const expanded = page.locator('tr[data-instances-of="chart-web"]');
  await expanded.waitFor({ timeout: 5000 });
  check(await page.locator('tr[data-instances-of="chart-db"]').count() === 0, 'chart-db expanded too');

  // The expanded view: DNS names, metadata, check and node columns.
  await page.waitForFunction(() => document.querySelector('[data-instances-of="chart-web"] code[data-dns="srv"]')?.textContent === '_chart-web._tcp.netsel.', null, { timeout: 10000 });
  const detail = await expanded.innerText();
  check(detail.includes('chart-web.netsel.'), 'A name missing: ' + detail);
  check(detail.includes('version=1.2.3') && detail.includes('team=edge'), 'metadata missing: ' + detail);
  check(detail.includes('Check') && detail.includes('Node'), 'check/node columns missing: ' + detail);

  // After traffic through the proxy, the service's chart has data points with requests.
  await page.waitForFunction(() => {
    const svg = document.querySelector('td[data-traffic="chart-web"] svg[data-metric="rps"]');
    return svg && Number(svg.dataset.points) >= 2 && Number(svg.dataset.nonzero) >= 2;
  }, null, { timeout: 20000, polling: 100 });
  const charts = await page.$$eval('td[data-traffic="chart-web"] svg', (svgs) => svgs.map((s) => ({
    metric: s.dataset.metric, points: Number(s.dataset.points), role: s.getAttribute('role'),
    label: s.getAttribute('aria-label'), title: s.querySelector('title')?.textContent,
    drawn: s.querySelectorAll('path').length,
  })));
  check(JSON.stringify(charts.map((c) => c.metric)) === '["rps","error_rate","p99_ms","open"]', 'charts: ' + JSON.stringify(charts));
  for (const c of charts) {
    check(c.role === 'img' && c.label.startsWith('chart-web ') && c.title === c.label, 'accessible label: ' + JSON.stringify(c));
    check(c.points >= 2 && c.drawn === 2, 'drawn: ' + JSON.stringify(c));
  }
  const p99 = await page.getAttribute('td[data-traffic="chart-web"] svg[data-metric="p99_ms"]', 'data-last');
  check(Number(p99) > 0, 'p99 latency ' + p99);
  // chart-db got no traffic: its charts are flat.
  await page.waitForSelector('td[data-traffic="chart-db"] svg[data-metric="rps"]', { timeout: 10000 });
  check(await page.getAttribute('td[data-traffic="chart-db"] svg[data-metric="rps"]', 'data-nonzero') === '0', 'chart-db has requests');
  await page.screenshot({ path: screenshot, fullPage: false });

  // Changes go into the URL...
  await page.click('tr[data-service="chart-db"] td.name');
  await page.locator('tr[data-instances-of="chart-db"]').waitFor({ timeout: 5000 });
  await page.click('th[data-sort="name"]');
  await page.fill('#filter', 'chart-');
  await page.check('#only-unhealthy');
  await page.waitForFunction(() => location.search.includes('unhealthy=1') && location.search.includes('q=chart-'), null, { timeout: 5000 });
  const url = page.url();
  const params = new URL(url).searchParams;
  check(params.get('expand') === 'chart-db,chart-web', 'expand in ' + url);
  check(params.get('sort') === '-name', 'sort in ' + url);
  // ...and a fresh page on that URL (a colleague opening the link) shows the same view.
  const other = await context.newPage();
  other.on('pageerror', (e) => problems.push(String(e)));
  await other.goto(url, { waitUntil: 'load' });
  await other.waitForFunction(() => document.getElementById('status').textContent === 'live', null, { timeout: 15000 });
  check(await other.inputValue('#filter') === 'chart-', 'filter not restored on the shared link');
  check(await other.isChecked('#only-unhealthy'), 'only unhealthy not restored');
  check(await other.evaluate(() => document.querySelector('th[data-sort="name"]').classList.contains('sorted-desc')), 'sort not restored');
  // Everything here is healthy: nothing is shown until "only unhealthy" is turned off.
  await other.waitForFunction(() => window.netselUi.renders > 0 && document.querySelectorAll('tr.service').length === 0, null, { timeout: 5000 });
  await other.uncheck('#only-unhealthy');
  await other.locator('tr[data-instances-of="chart-db"]').waitFor({ timeout: 10000 });
  await other.locator('tr[data-instances-of="chart-web"]').waitFor({ timeout: 10000 });
  const order = await other.$$eval('tr.service', (rows) => rows.map((r) => r.dataset.service));
  check(JSON.stringify(order) === '["chart-web","chart-db"]', 'descending order: ' + order);
  check(!other.url().includes('unhealthy'), 'URL still says unhealthy: ' + other.url());

  check(foreign.length === 0, 'requests outside NetSel: ' + foreign.join(', '));
  check(problems.length === 0, 'console errors: ' + problems.join(' | '));
  console.log(JSON.stringify({ ok: true, charts, url, screenshot }));
} finally {
  await close();
}
