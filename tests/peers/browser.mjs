// Drives the example portal page in headless Chromium (Debian's, through playwright-core)
// and prints one JSON line with what the browser saw. Scenario in env BROWSER_SCENARIO:
//   {"allowed": "<page URL on an allowed origin>", "other": "<same page on another origin>",
//    "user": "alice"}
//    "user": "alice", "stolen_link": "<an authorization URL another page started>", "bind_url": "..."}
// Steps: "Who am I?" on both pages (the other one must be blocked by CORS), then "Connect"
// on the allowed page: sign in and consent in the popup, wait for the page to learn the result.
// Then the stolen link in a second browser context (its own cookies, no opener): sign in,
// consent, and report the page the callback shows. Last, a page on the other origin opens
// the bind page as a popup and reports every message it receives from it.
import { chromium } from 'playwright-core';

const scenario = JSON.parse(process.env.BROWSER_SCENARIO || '{}');
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
const out = { console: [] };
try {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on('console', (m) => out.console.push(m.text()));

  // Reads #out once it holds a result (not the placeholder).
  const result = async (p) => {
    await p.waitForFunction(() => {
      const t = document.getElementById('out').textContent;
      return t.startsWith('{');
    }, null, { timeout: 20000 });
    const text = await p.locator('#out').textContent();
    await p.evaluate(() => { document.getElementById('out').textContent = '...'; });
    return JSON.parse(text);
  };

  await page.goto(scenario.allowed);
  await page.click('#me');
  out.me = await result(page);

  const other = await context.newPage();
  await other.goto(scenario.other);
  await other.click('#me');
  out.other = await result(other);

  const popupPromise = context.waitForEvent('page', { timeout: 20000 });
  await page.click('#connect');
  const popup = await popupPromise;
  await popup.waitForSelector('form#login', { timeout: 20000 });
  await popup.fill('form#login input[name=login]', scenario.user || 'alice');
  await popup.click('form#login button[type=submit]');
  await popup.waitForSelector('form#consent', { timeout: 20000 });
  await popup.click('form#consent button[type=submit]');
  out.connect = await result(page);
  out.popup_closed = popup.isClosed() || await popup.waitForEvent('close', { timeout: 5000 }).then(() => true, () => false);

  // The same popup flow with a provider that answers with response_mode=form_post.
  if (scenario.form_post_page) {
    await page.goto(scenario.form_post_page);
    const fpPopup = context.waitForEvent('page', { timeout: 20000 });
    await page.click('#connect');
    const p2 = await fpPopup;
    // Signed in at the provider already: it may go straight to consent.
    await p2.waitForSelector('form#login, form#consent', { timeout: 20000 });
    if (await p2.locator('form#login').count()) {
      await p2.fill('form#login input[name=login]', scenario.user || 'alice');
      await p2.click('form#login button[type=submit]');
    }
    await p2.waitForSelector('form#consent', { timeout: 20000 });
    await p2.click('form#consent button[type=submit]');
    out.connect_form_post = await result(page);
  }

  if (scenario.stolen_link) {
    const victim = await browser.newContext();
    const v = await victim.newPage();
    await v.goto(scenario.stolen_link);
    await v.waitForSelector('form#login', { timeout: 20000 });
    await v.fill('form#login input[name=login]', 'victim');
    await v.click('form#login button[type=submit]');
    await v.waitForSelector('form#consent', { timeout: 20000 });
    const answer = v.waitForResponse((r) => r.url().includes('/api/oauth/callback'), { timeout: 20000 });
    await v.click('form#consent button[type=submit]');
    const cb = await answer;
    out.stolen = { status: cb.status(), text: await cb.text() };
    await victim.close();
  }

  // Login CSRF: a page on another site auto-submits the bind form with the attacker's
  // own secret and link, in the victim's browser. The page is served by interception, so
  // its origin (http://attacker.test) is another site than the handler's.
  if (scenario.csrf) {
    const victim = await browser.newContext();
    const v = await victim.newPage();
    const c = scenario.csrf;
    const field = (n, val) => `<input type="hidden" name="${n}" value="${String(val).replace(/"/g, '&quot;')}">`;
    const html = `<!doctype html><html><body><form id="f" method="POST" action="${c.bind_url}">`
      + field('secret', c.secret) + field('authorization_url', c.authorization_url) + field('origin', c.origin)
      + `</form><script>document.getElementById('f').submit();</script></body></html>`;
    await v.route('http://attacker.test/**', (route) => route.fulfill({ status: 200, contentType: 'text/html', body: html }));
    const answer = v.waitForResponse((r) => r.url().startsWith(c.bind_url) && r.request().method() === 'POST', { timeout: 20000 });
    await v.goto('http://attacker.test/page');
    const r = await answer;
    const headers = await r.allHeaders();
    out.csrf = {
      status: r.status(),
      sent_origin: await r.request().headerValue('origin'),
      set_cookie: headers['set-cookie'] || null,
      cookies: (await victim.cookies()).map((k) => k.name),
      text: await r.text(),
    };
    await victim.close();
  }

  if (scenario.bind_url) {
    out.foreign_opener = await other.evaluate(async (bindUrl) => {
      const got = [];
      window.addEventListener('message', (e) => got.push({ origin: e.origin, data: e.data }));
      const w = window.open(bindUrl, 'bind-probe', 'width=300,height=300');
      await new Promise((r) => setTimeout(r, 2000));
      let stayed = null;
      try { stayed = w.location.href; } catch (e) { stayed = 'cross-origin'; }
      w.close();
      return { messages: got, popup_location: stayed };
    }, scenario.bind_url);
  }
} catch (err) {
  out.error = String(err && err.stack || err);
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(out) + '\n');
