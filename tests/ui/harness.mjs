// What the UI tests share: the API's URL (set by tests/api_ui.rs), a check that fails
// the script, and real headless Chromium (Debian's /usr/bin/chromium, or CHROMIUM_PATH)
// driven by playwright-core in a profile of its own.
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const base = process.env.NETSEL_API_URL;
if (!base) throw new Error('NETSEL_API_URL is not set');

export function check(cond, msg) {
  if (!cond) throw new Error('UI check failed: ' + msg);
}

// Chromium in a fresh profile; `close()` ends it and removes the profile. The page's
// strict CSP is bypassed only for Playwright's own polling helpers (they evaluate
// strings); the tests check that no request leaves NetSel.
export async function launch(viewport) {
  const profile = mkdtempSync(join(tmpdir(), 'netsel-ui-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--disable-dev-shm-usage'],
    ...(viewport ? { viewport } : {}),
    bypassCSP: true,
  });
  const close = async () => {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  };
  return { context, close };
}
