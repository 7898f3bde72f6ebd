// The web UI with ACLs on: it asks for a token, then lists and updates live with it
// (EventSource carries it as ?token=). Run by tests/api_ui.rs with NETSEL_API_URL,
// NETSEL_READ_TOKEN and NETSEL_WRITE_TOKEN set.
import { base, check, launch } from './harness.mjs';

const readToken = process.env.NETSEL_READ_TOKEN;
const writeToken = process.env.NETSEL_WRITE_TOKEN;
const { context, close } = await launch();
try {
  const page = context.pages()[0] || await context.newPage();
  await page.goto(base + '/ui/', { waitUntil: 'load' });
  // Without a token the data is refused and the page asks for one.
  await page.waitForSelector('#token-form', { state: 'visible', timeout: 15000 });
  check(await page.locator('tr.service').count() === 0, 'rows shown without a token');
  await page.fill('#token', readToken);
  await page.click('#token-form button');
  await page.waitForFunction(() => document.getElementById('status').textContent === 'live', null, { timeout: 15000 });
  await page.waitForSelector('tr[data-service="acl-before"]', { timeout: 15000 });
  const r = await fetch(base + '/v1/instances', {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: 'Bearer ' + writeToken },
    body: JSON.stringify({ name: 'acl-after', address: '127.0.0.1', port: 7001 }),
  });
  check(r.status === 201, 'registration with the write token answered ' + r.status);
  await page.waitForSelector('tr[data-service="acl-after"]', { timeout: 15000 });
  check(!(await page.isVisible('#token-form')), 'token form still shown');
  console.log(JSON.stringify({ ok: true }));
} finally {
  await close();
}
