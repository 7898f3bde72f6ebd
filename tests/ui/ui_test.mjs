// Drives the NetSel web UI in real headless Chromium (Debian's /usr/bin/chromium) with
// playwright-core. Run by tests/api_ui.rs with NETSEL_API_URL and NETSEL_SCREENSHOT set.
import { base, check, launch } from './harness.mjs';

const screenshot = process.env.NETSEL_SCREENSHOT || 'netsel-ui.png';

async function register(body) {
  const r = await fetch(base + '/v1/instances', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  check(r.status === 201, 'registration answered ' + r.status);
  return r.json();
}

const { context, close } = await launch({ width: 1280, height: 800 });
try {
  const page = context.pages()[0] || await context.newPage();
  const foreign = [];
  const consoleErrors = [];
  page.on('request', (req) => { if (!req.url().startsWith(base)) foreign.push(req.url()); });
  const httpErrors = [];
  // Chromium logs every 4xx fetch as a console error; those are checked by URL below.
  const http404 = 'Failed to load resource: the server responded with a status of 404';
  page.on('console', (m) => { if (m.type() === 'error' && !m.text().startsWith(http404)) consoleErrors.push(m.text()); });
  page.on('pageerror', (e) => consoleErrors.push(String(e)));
  page.on('response', (r) => { if (r.status() >= 400) httpErrors.push(r.status() + ' ' + r.url()); });

  await page.goto(base + '/ui/', { waitUntil: 'load' });
  await page.waitForFunction(() => document.getElementById('status').textContent === 'live', null, { timeout: 15000 });
  // The services registered before the page loaded are listed.
  await page.waitForSelector('tr[data-service="seed-svc-0001"]', { timeout: 15000 });
  const loadId = await page.evaluate(() => window.netselUi.loadId);
  const before = await page.locator('tr.service').count();

  // A service registered now appears without a reload.
  const reg = await register({ name: 'ui-live', address: '127.0.0.1', port: 8765, tags: ['from-test', 'v2'], ttl_secs: 120 });
  await page.waitForSelector('tr[data-service="ui-live"]', { timeout: 15000 });
  check(await page.evaluate(() => window.netselUi.loadId) === loadId, 'the page reloaded');
  check(await page.locator('tr.service').count() === before + 1, 'row count did not grow by one');
  const row = page.locator('tr[data-service="ui-live"]');
  const text = await row.innerText();
  check(text.includes(reg.vip + ':8765'), 'VIP missing in: ' + text);
  check(text.includes('passing') && text.includes('from-test') && text.includes('1/1'), 'row: ' + text);

  // Instances with a lease countdown.
  await row.click();
  const inst = page.locator('tr[data-instance="' + reg.id + '"]');
  await inst.waitFor({ timeout: 5000 });
  const instText = await inst.innerText();
  check(instText.includes('127.0.0.1:8765'), 'instance row: ' + instText);
  const lease = await inst.locator('.lease').innerText();
  const m = /^(\d+)m(\d+)s$|^(\d+)s$/.exec(lease);
  check(m, 'lease countdown "' + lease + '"');

  // Filter and sort stay usable with many services.
  await page.fill('#filter', 'ui-live');
  await page.waitForFunction(() => document.querySelectorAll('tr.service').length === 1, null, { timeout: 5000 });
  await page.fill('#filter', '');
  await page.waitForFunction((n) => document.querySelectorAll('tr.service').length === n, before + 1, { timeout: 5000 });
  await page.click('th[data-sort="name"]');
  const first = await page.locator('tr.service').first().getAttribute('data-service');
  const names = await page.$$eval('tr.service', (rows) => rows.map((r) => r.dataset.service));
  check(first === [...names].sort().reverse()[0], 'descending sort by name, first was ' + first);
  await page.click('th[data-sort="name"]');

  // An instance with an active check shows what the check saw (nothing listens on its
  // port: waiting for the first check, or the refused connect once it ran).
  const checked = await register({ name: 'ui-checked', address: '127.0.0.1', port: 8766, ttl_secs: 120, check: { type: 'tcp' } });
  await page.fill('#filter', 'ui-checked');
  await page.waitForSelector('tr[data-service="ui-checked"]', { timeout: 15000 });
  await page.locator('tr[data-service="ui-checked"]').click();
  const checkCell = page.locator('tr[data-instance="' + checked.id + '"] td.check');
  await checkCell.waitFor({ timeout: 5000 });
  const checkText = await checkCell.innerText();
  check(/^(pending|critical) (waiting for the first check|connect 127\.0\.0\.1:8766: connection refused)/.test(checkText),
    'check cell: ' + checkText);
  await page.fill('#filter', '');

  // Deregistration disappears live too.
  const del = await fetch(base + '/v1/instances/' + reg.id, { method: 'DELETE', headers: { 'x-netsel-secret': reg.secret } });
  check(del.status === 200, 'deregister answered ' + del.status);
  await page.waitForSelector('tr[data-service="ui-live"]', { state: 'detached', timeout: 15000 });
  const again = await register({ name: 'ui-live', address: '127.0.0.1', port: 8765, tags: ['from-test'] });
  await page.waitForSelector('tr[data-service="ui-live"]', { timeout: 15000 });
  check(await page.evaluate(() => window.netselUi.loadId) === loadId, 'the page reloaded');
  check(again.id, 'registered again');

  check(foreign.length === 0, 'requests outside NetSel: ' + foreign.join(', '));
  check(consoleErrors.length === 0, 'console errors: ' + consoleErrors.join(' | '));
  // The only error answer the page may see: a service fetched just as it went away (its
  // removal event can arrive after the instance's on a busy machine).
  const unexpected = httpErrors.filter((e) => !/^404 .*\/v1\/services\/ui-live$/.test(e));
  check(unexpected.length === 0, 'HTTP errors: ' + unexpected.join(' | '));
  check(!(await page.isVisible('#token-form')), 'token form shown without ACLs');
  // The screenshot shows the live-registered service, expanded, among the thousand.
  await page.fill('#filter', 'ui-live');
  await page.waitForFunction(() => document.querySelectorAll('tr.service').length === 1, null, { timeout: 5000 });
  await page.check('#expand-all');
  await page.locator('tr[data-instance="' + again.id + '"]').waitFor({ timeout: 5000 });
  await page.screenshot({ path: screenshot, fullPage: false });
  console.log(JSON.stringify({ ok: true, rows: before + 1, screenshot }));
} finally {
  await close();
}
