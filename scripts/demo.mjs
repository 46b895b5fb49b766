// The demo behind scripts/demo: a real local OAuth provider (the oidc-provider server the
// tests use), a back-office token issuer that exists only inside this process, and the
// handler between them on its embedded defaults (SQLite in a temporary folder). It starts
// one connection and prints the link to open; once you consent it shows the connection
// active, an access token, and a call through the proxy.
//
// Nothing here is a setting production could turn on: the issuer is an ordinary
// AUTH_ISSUER pointing at this script's own little server, gone when the script stops.
//
//   node scripts/demo.mjs [--headless]     (scripts/demo builds the handler first)
//   --headless: the provider's test control plays the person (for CI).

import { spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as os from 'node:os';
import * as path from 'node:path';
import * as readline from 'node:readline';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const headless = process.argv.includes('--headless');
const port = Number(process.env.DEMO_PORT || 7071);
const handlerBin = process.env.DEMO_HANDLER || path.join(root, 'target', 'debug', 'handler');
const publicUrl = `http://localhost:${port}`;
const children = [];
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'dc-demo-'));

function stop(code) {
  for (const c of children) c.kill('SIGTERM');
  fs.rmSync(work, { recursive: true, force: true });
  process.exit(code);
}
process.on('SIGINT', () => { console.log('\nStopped.'); stop(0); });
process.on('SIGTERM', () => stop(0));
const say = (line = '') => console.log(line);
const fail = (message) => { console.error(`demo: ${message}`); stop(1); };

// --- 1. the OAuth provider -------------------------------------------------------
const PROVIDER_SECRET = crypto.randomBytes(18).toString('base64url');
const peer = spawn(process.execPath, [path.join(root, 'tests', 'peers', 'oidc.mjs')], {
  env: {
    ...process.env,
    OIDC_PEER_CONFIG: JSON.stringify({
      clients: [{ client_id: 'demo', client_secret: PROVIDER_SECRET, redirect_uris: [`${publicUrl}/api/oauth/callback`], token_endpoint_auth_method: 'client_secret_basic' }],
      scopes: ['api.read'],
    }),
  },
  stdio: ['pipe', 'pipe', 'ignore'],
});
children.push(peer);
const issuer = await new Promise((resolve) => {
  readline.createInterface({ input: peer.stdout }).once('line', (line) => {
    try { resolve(JSON.parse(line).issuer); } catch { fail(`the provider did not start: ${line}`); }
  });
  peer.once('exit', (code) => fail(`the provider exited (${code}); run npm ci --prefix tests/peers`));
});

// --- 2. a back-office token issuer, only inside this process ----------------------
const { publicKey, privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const kid = 'demo-key';
const jwk = { ...publicKey.export({ format: 'jwk' }), kid, alg: 'RS256', use: 'sig' };
const idp = http.createServer((req, res) => {
  const base = `http://127.0.0.1:${idp.address().port}/demo/v2.0`;
  const body = req.url.endsWith('/.well-known/openid-configuration') ? { issuer: base, jwks_uri: `${base}/keys` }
    : req.url.endsWith('/keys') ? { keys: [jwk] } : null;
  res.writeHead(body ? 200 : 404, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body || { error: 'not_found' }));
});
await new Promise((r) => idp.listen(0, '127.0.0.1', r));
const authIssuer = `http://127.0.0.1:${idp.address().port}/demo/v2.0`;
const AUDIENCE = 'api://dynamics-companion-demo';
const CALLER = 'demo-caller';
function bearer() {
  const enc = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  const input = `${enc({ alg: 'RS256', typ: 'JWT', kid })}.${enc({ iss: authIssuer, aud: AUDIENCE, azp: CALLER, sub: CALLER, iat: now, nbf: now, exp: now + 3600 })}`;
  return `${input}.${crypto.sign('sha256', Buffer.from(input), privateKey).toString('base64url')}`;
}

// --- 3. the handler ----------------------------------------------------------------
fs.writeFileSync(path.join(work, 'providers.toml'), `[providers.demo]
display_name = "Demo provider (a local oidc-provider)"
authorization_url = "${issuer}/auth"
token_url = "${issuer}/token"
revocation_url = "${issuer}/token/revocation"
issuer = "${issuer}"
client_id = "demo"
client_secret = "demo-provider-secret"
scopes = ["openid", "offline_access", "api.read"]
authorization_params = { prompt = "consent" }
api_base_url = "${issuer}/__api/"
`);
if (!fs.existsSync(handlerBin)) fail(`no handler at ${handlerBin}: run scripts/demo (it builds it), or cargo build`);
const handler = spawn(handlerBin, [], {
  cwd: work,
  env: {
    PATH: process.env.PATH, HOME: process.env.HOME || work,
    LOCAL_HTTP_PORT: String(port), PUBLIC_BASE_URL: publicUrl,
    DEMO_PROVIDER_SECRET: PROVIDER_SECRET,
    TOKEN_ENCRYPTION_KEYS: `k1:${crypto.randomBytes(32).toString('base64')}`,
    AUTH_ISSUER: authIssuer, AUTH_AUDIENCE: AUDIENCE, AUTH_ALLOWED_CLIENT_IDS: CALLER,
    LOG_LEVEL: 'warn',
  },
  stdio: ['ignore', 'inherit', 'inherit'],
});
children.push(handler);
handler.once('exit', (code) => fail(`the handler exited (${code}); is port ${port} free? (DEMO_PORT chooses another)`));
const api = (method, p, body) => fetch(`http://127.0.0.1:${port}${p}`, {
  method, headers: { authorization: `Bearer ${bearer()}`, 'content-type': 'application/json' },
  body: body === undefined ? undefined : JSON.stringify(body),
});
for (let i = 0; ; i++) {
  try { if ((await fetch(`http://127.0.0.1:${port}/`)).ok) break; } catch { /* not yet */ }
  if (i > 300) fail('the handler did not answer within 30 s');
  await new Promise((r) => setTimeout(r, 100));
}

// --- 4. one connection ----------------------------------------------------------------
say('Dynamics Companion demo');
say(`  handler   ${publicUrl}  (SQLite in ${work})`);
say(`  provider  ${issuer}  (oidc-provider, log in with any name)`);
const started = await (await api('POST', '/api/connections', { provider: 'demo', connection_id: 'demo-1', owner: 'account:demo' })).json();
if (!started.authorization_url) fail(`could not start a connection: ${JSON.stringify(started)}`);
say();
if (headless) {
  say('Consenting (headless)...');
  const ctl = await (await fetch(`${issuer}/__control/consent`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ url: started.authorization_url, user: 'demo-user' }) })).json();
  if (!ctl.location) fail(`the provider did not send the person back: ${JSON.stringify(ctl)}`);
  const back = await fetch(ctl.location.replace(publicUrl, `http://127.0.0.1:${port}`), { redirect: 'manual' });
  say(`  callback page: HTTP ${back.status}`);
} else {
  say('Open this link in a browser, log in with any name and allow access:');
  say();
  say(`  ${started.authorization_url}`);
  say();
  say('Waiting for the consent...');
}
let status;
for (let i = 0; i < 6000; i++) {
  status = await (await api('GET', '/api/connections/demo-1')).json();
  if (status.status !== 'pending') break;
  await new Promise((r) => setTimeout(r, headless ? 50 : 500));
}
say(`Connection demo-1: ${status.status}${status.status_detail ? ` (${status.status_detail})` : ''}`);
if (status.status !== 'active') stop(1);

const token = await (await api('POST', '/api/connections/demo-1/token', {})).json();
say(`Access token: ${String(token.access_token).slice(0, 12)}... (${token.token_type}, expires in ${token.expires_in} s)`);
const proxied = await api('GET', '/api/connections/demo-1/proxy/hello?from=demo');
const echoed = await proxied.json();
say(`Proxied call GET /api/connections/demo-1/proxy/hello: HTTP ${proxied.status}, the provider's API saw ${echoed.method} ${echoed.path}?${echoed.query} for user ${echoed.sub}`);
say();
if (headless) {
  say('Demo done.');
  stop(0);
}
say('The handler keeps running. Try it yourself (this token is valid for an hour):');
say(`  curl -s -X POST ${publicUrl}/api/connections/demo-1/token -H "Authorization: Bearer ${bearer()}" -H "Content-Type: application/json" -d "{}"`);
say('Ctrl-C stops everything.');
