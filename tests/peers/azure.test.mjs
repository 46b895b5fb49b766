// End-to-end checks of the Azure doubles (azure.mjs), using node:https / node:http as the client.
// The HTTPS clients trust only the CA the peer generated and connect to 127.0.0.1 with the real
// host name as TLS server name and Host header, which is what /etc/hosts does for the Rust binary.
// Run: cd tests/peers && node --test azure.test.mjs

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import { fileURLToPath } from 'node:url';
import { spawnPeer } from './peer-process.mjs';
import { once } from 'node:events';

const PEER = fileURLToPath(new URL('./azure.mjs', import.meta.url));
const TENANT = '3f1c0a2e-5b7d-4e8f-9a10-2b3c4d5e6f70';
const OTHER_TENANT = 'b6a2d1c0-1111-4222-8333-944455556666';
const IDENTITY_HEADER = 'test-identity-header-0123';
const UA_CLIENT = '5e0f1d2c-aaaa-4bbb-8ccc-0123456789ab';
const CONFIG = {
  tenant_id: TENANT,
  identity_header: IDENTITY_HEADER,
  user_assigned_client_ids: [UA_CLIENT],
  secrets: {
    'db-password': 'hunter2',
    'old-secret': { value: 'nope', enabled: false },
    'dataverse-client-secret': { value: 's3cr3t', content_type: 'text/plain', tags: { owner: 'dc' } },
  },
  entra_clients: [
    { tenant: TENANT, client_id: 'dc-app', client_secret: 'dc-app-secret' },
    { tenant: OTHER_TENANT, client_id: 'wi-app', accept_any_assertion: true },
  ],
};

// ---------------------------------------------------------------------------
// peer process helpers
// ---------------------------------------------------------------------------

async function startPeer(config) {
  const peer = await spawnPeer(PEER, 'AZURE_PEER_CONFIG', config);
  return { ...peer, ca: fs.readFileSync(peer.ready.ca), control: new URL('/__control/', peer.ready.identity).href };
}

// One request. https URLs connect to 127.0.0.1 but keep the URL's host name for SNI, certificate
// verification and the Host header. `ca: null` means "use Node's default trust store".
function request(url, { method = 'GET', headers = {}, body, ca } = {}) {
  const u = new URL(url);
  const isHttps = u.protocol === 'https:';
  const mod = isHttps ? https : http;
  const opts = {
    method,
    host: '127.0.0.1',
    port: u.port,
    path: `${u.pathname}${u.search}`,
    headers: { host: u.host, ...headers },
    agent: false,
  };
  if (isHttps) {
    opts.servername = u.hostname === '127.0.0.1' ? undefined : u.hostname;
    if (ca !== null) opts.ca = ca ?? peer.ca;
  }
  let payload;
  if (body !== undefined) {
    payload = typeof body === 'string' ? body : body instanceof URLSearchParams ? body.toString() : JSON.stringify(body);
    opts.headers['content-length'] = Buffer.byteLength(payload);
    if (!Object.keys(headers).some((h) => h.toLowerCase() === 'content-type')) {
      opts.headers['content-type'] = body instanceof URLSearchParams ? 'application/x-www-form-urlencoded' : 'application/json';
    }
  }
  return new Promise((resolve, reject) => {
    const req = mod.request(opts, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let json;
        try { json = JSON.parse(text); } catch { /* not JSON */ }
        resolve({ status: res.statusCode, headers: res.headers, text, json });
      });
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(payload);
  });
}

const ctl = (p, opts) => request(new URL(p, peer.control).href, opts);
const kv = (p, opts) => request(new URL(p, peer.ready.keyvault).href, opts);
const kvGet = (name, token, version = '') => kv(`secrets/${name}/${version}?api-version=2025-07-01`, {
  headers: { accept: 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) },
});
const miToken = (query, header = IDENTITY_HEADER) => request(`${peer.ready.identity}?${new URLSearchParams(query)}`, {
  headers: { metadata: 'true', ...(header === null ? {} : { 'x-identity-header': header }) },
});
const entraToken = (tenant, form, headers = {}) => request(`${peer.ready.entra}/${tenant}/oauth2/v2.0/token`, {
  method: 'POST', body: new URLSearchParams(form), headers,
});

async function vaultToken() {
  const r = await miToken({ 'api-version': '2019-08-01', resource: 'https://vault.azure.net' });
  assert.equal(r.status, 200, r.text);
  return r.json.access_token;
}

let peer;
before(async () => { peer = await startPeer(CONFIG); });
after(async () => { await peer?.stop(); });

// ---------------------------------------------------------------------------
// ready line, TLS
// ---------------------------------------------------------------------------

test('ready line has the documented shape and nothing else goes to stdout', async () => {
  const r = peer.ready;
  assert.deepEqual(Object.keys(r), ['ready', 'keyvault', 'identity', 'entra', 'ingestion', 'discovery', 'instrumentation_key', 'ca']);
  assert.match(r.ingestion, /^https:\/\/localhost:\d+\/$/);
  assert.match(r.discovery, /^https:\/\/localhost:\d+$/);
  assert.equal(r.ready, true);
  assert.match(r.keyvault, /^https:\/\/dctest\.vault\.azure\.net:\d+\/$/);
  assert.match(r.identity, /^http:\/\/127\.0\.0\.1:\d+\/msi\/token$/);
  assert.match(r.entra, /^https:\/\/login\.microsoftonline\.com:\d+$/);
  assert.match(peer.ca.toString(), /^-----BEGIN CERTIFICATE-----/);
  await ctl('stats');
  assert.equal(peer.stdoutAfterReady(), '');
});

test('the server certificate chains to the generated CA for every configured name, and only to it', async () => {
  const kvPort = new URL(peer.ready.keyvault).port;
  const entraPort = new URL(peer.ready.entra).port;
  for (const host of ['dctest.vault.azure.net', 'login.microsoftonline.com', 'localhost', '127.0.0.1']) {
    const r = await request(`https://${host}:${entraPort}/${TENANT}/v2.0/.well-known/openid-configuration`);
    assert.equal(r.status, 200, host);
  }
  const r = await request(`https://localhost:${kvPort}/secrets/x/?api-version=2025-07-01`);
  assert.equal(r.status, 401);
  // Without the CA the chain is unknown.
  await assert.rejects(request(`https://dctest.vault.azure.net:${kvPort}/secrets/x/?api-version=2025-07-01`, { ca: null }),
    (err) => /UNABLE_TO_VERIFY_LEAF_SIGNATURE|SELF_SIGNED|unable to (get|verify)/i.test(`${err.code} ${err.message}`));
  // A name not on the certificate fails host name verification.
  await assert.rejects(request(`https://other.vault.azure.net:${kvPort}/secrets/x/?api-version=2025-07-01`),
    (err) => err.code === 'ERR_TLS_CERT_ALTNAME_INVALID');
});

// ---------------------------------------------------------------------------
// Key Vault challenge + managed identity + secret
// ---------------------------------------------------------------------------

test('Key Vault: the first request without Authorization gets the 401 challenge', async () => {
  const r = await kvGet('db-password');
  assert.equal(r.status, 401);
  assert.equal(r.headers['www-authenticate'],
    `Bearer authorization="https://login.microsoftonline.com/${TENANT}", resource="https://vault.azure.net"`);
  assert.deepEqual(r.json, { error: { code: 'Unauthorized', message: 'AKV10000: Request is missing a Bearer or PoP token.' } });
  assert.match(r.headers['content-type'], /^application\/json/);
});

test('managed identity: App Service 2019-08-01 protocol, expires_on as a string', async () => {
  const before = Math.floor(Date.now() / 1000);
  const r = await miToken({ 'api-version': '2019-08-01', resource: 'https://vault.azure.net' });
  assert.equal(r.status, 200, r.text);
  assert.deepEqual(Object.keys(r.json).sort(), ['access_token', 'client_id', 'expires_on', 'resource', 'token_type']);
  assert.equal(typeof r.json.expires_on, 'string');
  assert.match(r.json.expires_on, /^\d+$/);
  const exp = Number(r.json.expires_on);
  assert.ok(exp >= before + 3600 && exp <= before + 3602, `expires_on ${exp}`);
  assert.equal(r.json.resource, 'https://vault.azure.net');
  assert.equal(r.json.token_type, 'Bearer');
  // JWT-shaped, with the usual v1 claims
  const claims = JSON.parse(Buffer.from(r.json.access_token.split('.')[1], 'base64url').toString());
  assert.equal(claims.aud, 'https://vault.azure.net');
  assert.equal(claims.tid, TENANT);
  assert.equal(claims.exp, exp);
  assert.equal(claims.appid, r.json.client_id);
});

test('Key Vault accepts the managed identity token and returns the secret (with and without trailing slash, by version)', async () => {
  const token = await vaultToken();
  const r = await kvGet('db-password', token);
  assert.equal(r.status, 200, r.text);
  assert.equal(r.json.value, 'hunter2');
  const m = /^https:\/\/dctest\.vault\.azure\.net:(\d+)\/secrets\/db-password\/([0-9a-f]{32})$/.exec(r.json.id);
  assert.ok(m, r.json.id);
  assert.equal(m[1], new URL(peer.ready.keyvault).port);
  assert.equal(r.json.attributes.enabled, true);
  assert.equal(typeof r.json.attributes.created, 'number');
  assert.equal(typeof r.json.attributes.updated, 'number');
  assert.equal(r.json.attributes.recoveryLevel, 'Recoverable+Purgeable');
  assert.deepEqual(r.json.tags, {});
  const noSlash = await kv('secrets/db-password?api-version=2025-07-01', { headers: { authorization: `Bearer ${token}` } });
  assert.equal(noSlash.status, 200);
  assert.equal(noSlash.json.value, 'hunter2');
  const byVersion = await kvGet('db-password', token, m[2]);
  assert.equal(byVersion.status, 200);
  assert.equal(byVersion.json.id, r.json.id);
  const tagged = await kvGet('dataverse-client-secret', token);
  assert.equal(tagged.json.contentType, 'text/plain');
  assert.deepEqual(tagged.json.tags, { owner: 'dc' });
});

test('Key Vault: unknown, expired and wrong-audience tokens get 401 with the challenge', async () => {
  const challenge = `Bearer authorization="https://login.microsoftonline.com/${TENANT}", resource="https://vault.azure.net"`;
  const unknown = await kvGet('db-password', 'not-a-token-the-double-issued');
  assert.equal(unknown.status, 401);
  assert.equal(unknown.headers['www-authenticate'], challenge);

  const arm = await miToken({ 'api-version': '2019-08-01', resource: 'https://management.azure.com/' });
  const wrongAud = await kvGet('db-password', arm.json.access_token);
  assert.equal(wrongAud.status, 401);
  assert.match(wrongAud.json.error.message, /^AKV10022: Invalid audience/);

  const token = await vaultToken();
  assert.equal((await ctl('tokens/expire', { method: 'POST', body: { token } })).json.expired, 1);
  const expired = await kvGet('db-password', token);
  assert.equal(expired.status, 401);
  assert.equal(expired.headers['www-authenticate'], challenge);
  assert.equal(expired.json.error.message, "[TokenExpired] Error validating token: 'S2S12086'.");
});

test('Key Vault error bodies: missing, disabled, invalid name', async () => {
  const token = await vaultToken();
  const missing = await kvGet('no-such-secret', token);
  assert.equal(missing.status, 404);
  assert.equal(missing.json.error.code, 'SecretNotFound');
  assert.match(missing.json.error.message, /^A secret with \(name\/id\) no-such-secret was not found in this key vault\. If you recently deleted/);
  const disabled = await kvGet('old-secret', token);
  assert.equal(disabled.status, 403);
  assert.deepEqual(disabled.json, {
    error: { code: 'Forbidden', message: 'Operation get is not allowed on a disabled secret.', innererror: { code: 'SecretDisabled' } },
  });
  const badName = await kvGet('bad_name', token);
  assert.equal(badName.status, 400);
  assert.deepEqual(badName.json, { error: { code: 'BadParameter', message: 'The request URI contains an invalid name: bad_name' } });
  const badVersion = await kvGet('db-password', token, '0'.repeat(32));
  assert.equal(badVersion.status, 404);
  assert.match(badVersion.json.error.message, new RegExp(`\\(name/id\\) db-password/${'0'.repeat(32)} was not found`));
});

// ---------------------------------------------------------------------------
// managed identity errors
// ---------------------------------------------------------------------------

test('managed identity: wrong or missing X-IDENTITY-HEADER gets 400', async () => {
  for (const header of ['wrong-header', null]) { // null: no header at all
    const r = await miToken({ 'api-version': '2019-08-01', resource: 'https://vault.azure.net' }, header);
    assert.equal(r.status, 400);
    assert.equal(r.json.statusCode, 400);
    assert.equal(typeof r.json.message, 'string');
    assert.match(r.json.correlationId, /^[0-9a-f-]{36}$/);
  }
});

test('managed identity: user-assigned identities, api-version and resource checks', async () => {
  const ok = await miToken({ 'api-version': '2019-08-01', resource: 'https://vault.azure.net', client_id: UA_CLIENT });
  assert.equal(ok.status, 200, ok.text);
  assert.equal(ok.json.client_id, UA_CLIENT);
  const notAssigned = await miToken({ 'api-version': '2019-08-01', resource: 'https://vault.azure.net', client_id: 'not-assigned' });
  assert.equal(notAssigned.status, 400);
  assert.equal(notAssigned.json.message, 'Unable to load the proper Managed Identity.');
  const oldApi = await miToken({ 'api-version': '2017-09-01', resource: 'https://vault.azure.net' });
  assert.equal(oldApi.status, 400);
  const scopeAsResource = await miToken({ 'api-version': '2019-08-01', resource: 'https://vault.azure.net/.default' });
  assert.equal(scopeAsResource.status, 400);
  assert.match(scopeAsResource.json.message, /AADSTS500011/);
});

// ---------------------------------------------------------------------------
// control API: rotation, delete, outage
// ---------------------------------------------------------------------------

test('rotation creates a new version and value; the old version stays readable; delete makes it 404', async () => {
  const token = await vaultToken();
  const v1 = (await kvGet('db-password', token)).json;
  const set = await ctl('secrets', { method: 'POST', body: { name: 'db-password', value: 'rotated-2' } });
  assert.equal(set.status, 200, set.text);
  assert.match(set.json.version, /^[0-9a-f]{32}$/);
  const v2 = (await kvGet('db-password', token)).json;
  assert.equal(v2.value, 'rotated-2');
  assert.notEqual(v2.id, v1.id);
  assert.ok(v2.id.endsWith(`/${set.json.version}`));
  const oldVersion = v1.id.split('/').pop();
  assert.equal((await kvGet('db-password', token, oldVersion)).json.value, v1.value);
  // disabling the current version
  await ctl('secrets', { method: 'POST', body: { name: 'db-password', value: 'rotated-3', enabled: false } });
  assert.equal((await kvGet('db-password', token)).status, 403);
  // a new secret, then delete it
  assert.equal((await ctl('secrets', { method: 'POST', body: { name: 'fresh-one', value: 'v' } })).status, 200);
  assert.equal((await kvGet('fresh-one', token)).json.value, 'v');
  assert.equal((await ctl('secrets/fresh-one', { method: 'DELETE' })).status, 200);
  assert.equal((await kvGet('fresh-one', token)).status, 404);
  // invalid names are refused by the control API too
  assert.equal((await ctl('secrets', { method: 'POST', body: { name: 'under_score', value: 'v' } })).status, 400);
  await ctl('secrets', { method: 'POST', body: { name: 'db-password', value: 'hunter2' } });
});

test('outage: 503 until cleared, drop mode, count', async () => {
  const token = await vaultToken();
  const set = await ctl('outage', { method: 'POST', body: { keyvault: true } });
  assert.deepEqual(set.json, { keyvault: { mode: '503', remaining: null } });
  const r = await kvGet('db-password', token);
  assert.equal(r.status, 503);
  assert.equal(r.json.error.code, 'ServiceUnavailable');
  assert.equal((await kvGet('db-password')).status, 503, 'an outage answers before authentication');
  assert.equal((await ctl('outage', { method: 'POST', body: { keyvault: true, mode: 'drop' } })).status, 200);
  await assert.rejects(kvGet('db-password', token), (err) => ['ECONNRESET', 'EPIPE'].includes(err.code) || /socket hang up/.test(err.message));
  assert.equal((await ctl('outage', { method: 'POST', body: {} })).status, 200);
  assert.equal((await kvGet('db-password', token)).status, 200);
  // a counted outage, on the other services
  await ctl('outage', { method: 'POST', body: { identity: { count: 1 }, entra: { count: 1, retry_after: 2 } } });
  assert.equal((await miToken({ 'api-version': '2019-08-01', resource: 'https://vault.azure.net' })).status, 503);
  assert.equal((await miToken({ 'api-version': '2019-08-01', resource: 'https://vault.azure.net' })).status, 200);
  const e = await entraToken(TENANT, { grant_type: 'client_credentials', client_id: 'dc-app', client_secret: 'dc-app-secret', scope: 'https://org.crm.dynamics.com/.default' });
  assert.equal(e.status, 503);
  assert.equal(e.headers['retry-after'], '2');
  assert.equal(e.json.error, 'temporarily_unavailable');
  await ctl('outage', { method: 'DELETE' });
});

// ---------------------------------------------------------------------------
// Entra token endpoint
// ---------------------------------------------------------------------------

test('Entra client_credentials: success body, and the token is listed for its resource', async () => {
  const r = await entraToken(TENANT, {
    client_id: 'dc-app', client_secret: 'dc-app-secret', grant_type: 'client_credentials', scope: 'https://org.crm.dynamics.com/.default',
  });
  assert.equal(r.status, 200, r.text);
  assert.deepEqual(Object.keys(r.json), ['token_type', 'expires_in', 'ext_expires_in', 'access_token']);
  assert.equal(r.json.token_type, 'Bearer');
  assert.equal(r.json.expires_in, 3599);
  assert.equal(r.json.ext_expires_in, 3599);
  for (const res of ['https://org.crm.dynamics.com', 'https://org.crm.dynamics.com/']) {
    const list = await ctl(`tokens?resource=${encodeURIComponent(res)}`);
    assert.ok(list.json.tokens.includes(r.json.access_token), res);
  }
  const vaultList = await ctl(`tokens?resource=${encodeURIComponent('https://vault.azure.net')}`);
  assert.ok(!vaultList.json.tokens.includes(r.json.access_token));
  // client_secret_basic works too, and an Entra token for the vault is accepted by the vault
  const basic = Buffer.from('dc-app:dc-app-secret').toString('base64');
  const v = await entraToken(TENANT, { grant_type: 'client_credentials', scope: 'https://vault.azure.net/.default' }, { authorization: `Basic ${basic}` });
  assert.equal(v.status, 200, v.text);
  assert.equal((await kvGet('db-password', v.json.access_token)).json.value, 'hunter2');
});

function assertEntraError(r, status, error, code) {
  assert.equal(r.status, status, r.text);
  assert.equal(r.json.error, error);
  assert.deepEqual(r.json.error_codes, [code]);
  assert.match(r.json.error_description, new RegExp(`^AADSTS${code}: .*\\r\\nTrace ID: [0-9a-f-]{36}\\r\\nCorrelation ID: [0-9a-f-]{36}\\r\\nTimestamp: \\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d:\\d\\dZ$`, 's'));
  assert.match(r.json.timestamp, /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ$/);
  assert.match(r.json.trace_id, /^[0-9a-f-]{36}$/);
  assert.match(r.json.correlation_id, /^[0-9a-f-]{36}$/);
  assert.equal(r.json.error_uri, `https://login.microsoftonline.com/error?code=${code}`);
}

test('Entra error bodies: bad secret, bad scopes, unknown tenant, unknown client, missing credentials', async () => {
  const base = { grant_type: 'client_credentials', client_id: 'dc-app', client_secret: 'dc-app-secret', scope: 'https://org.crm.dynamics.com/.default' };
  const badSecret = await entraToken(TENANT, { ...base, client_secret: 'wrong' });
  assertEntraError(badSecret, 401, 'invalid_client', 7000215);
  assert.match(badSecret.json.error_description, /^AADSTS7000215: Invalid client secret provided\./);
  assertEntraError(await entraToken(TENANT, { ...base, scope: 'https://org.crm.dynamics.com/user_impersonation' }), 400, 'invalid_scope', 1002012);
  assertEntraError(await entraToken(TENANT, { ...base, scope: 'https://org.crm.dynamics.com/.default https://vault.azure.net/.default' }), 400, 'invalid_scope', 28000);
  assertEntraError(await entraToken(TENANT, { ...base, scope: 'not a uri/.default' }), 400, 'invalid_scope', 28000);
  assertEntraError(await entraToken(TENANT, { ...base, scope: 'notauri/.default' }), 400, 'invalid_scope', 70011);
  const unknownTenant = await entraToken('no-such-tenant', base);
  assertEntraError(unknownTenant, 400, 'invalid_request', 90002);
  assert.match(unknownTenant.json.error_description, /^AADSTS90002: Tenant 'no-such-tenant' not found\./);
  assertEntraError(await entraToken(TENANT, { ...base, client_id: 'nobody' }), 400, 'unauthorized_client', 700016);
  const { client_secret: _, ...noSecret } = base;
  assertEntraError(await entraToken(TENANT, noSecret), 401, 'invalid_client', 7000216);
  assertEntraError(await entraToken(TENANT, { ...base, grant_type: 'password' }), 400, 'unsupported_grant_type', 70003);
});

test('Entra client assertion (workload identity) when the client accepts any assertion', async () => {
  const form = {
    grant_type: 'client_credentials',
    client_id: 'wi-app',
    client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer',
    client_assertion: 'eyJhbGciOiJSUzI1NiJ9.e30.c2ln',
    scope: 'https://org.crm.dynamics.com/.default',
  };
  const ok = await entraToken(OTHER_TENANT, form);
  assert.equal(ok.status, 200, ok.text);
  assertEntraError(await entraToken(OTHER_TENANT, { ...form, client_assertion: '' }), 401, 'invalid_client', 700027);
  assertEntraError(await entraToken(TENANT, { ...form, client_id: 'dc-app' }), 401, 'invalid_client', 700027);
});

test('Entra discovery document', async () => {
  const r = await request(`${peer.ready.entra}/${TENANT}/v2.0/.well-known/openid-configuration`);
  assert.equal(r.status, 200);
  assert.equal(r.json.token_endpoint, `${peer.ready.entra}/${TENANT}/oauth2/v2.0/token`);
  assert.equal(r.json.issuer, `https://login.microsoftonline.com/${TENANT}/v2.0`);
  const keys = await request(r.json.jwks_uri);
  assert.equal(keys.json.keys[0].kty, 'RSA');
});

// ---------------------------------------------------------------------------
// stats
// ---------------------------------------------------------------------------

test('stats count per service, per secret, challenges, MI requests and Entra requests by client', async () => {
  assert.equal((await ctl('reset', { method: 'POST' })).status, 200);
  const zero = (await ctl('stats')).json;
  assert.equal(zero.keyvault.requests, 0);
  assert.deepEqual(zero.keyvault.secret_gets, {});

  // What the Rust SDK does for two get_secret calls: challenge, MI token, retry, then one request.
  assert.equal((await kvGet('db-password')).status, 401);
  const token = await vaultToken();
  assert.equal((await kvGet('db-password', token)).status, 200);
  assert.equal((await kvGet('dataverse-client-secret', token)).status, 200);
  assert.equal((await kvGet('no-such-secret', token)).status, 404);
  assert.equal((await kvGet('db-password', 'bogus')).status, 401);
  await miToken({ 'api-version': '2019-08-01', resource: 'https://vault.azure.net' }, 'wrong');
  await entraToken(TENANT, { grant_type: 'client_credentials', client_id: 'dc-app', client_secret: 'dc-app-secret', scope: 'https://org.crm.dynamics.com/.default' });
  await entraToken(TENANT, { grant_type: 'client_credentials', client_id: 'dc-app', client_secret: 'bad', scope: 'https://org.crm.dynamics.com/.default' });

  const s = (await ctl('stats')).json;
  assert.equal(s.keyvault.requests, 5);
  assert.equal(s.keyvault.challenges, 2);
  assert.equal(s.keyvault.unauthenticated, 1);
  assert.equal(s.keyvault.rejected_tokens, 1);
  assert.deepEqual(s.keyvault.secret_gets, { 'db-password': 1, 'dataverse-client-secret': 1, 'no-such-secret': 1 });
  assert.deepEqual(s.keyvault.responses, { 200: 2, 401: 2, 404: 1 });
  assert.equal(s.identity.token_requests, 2);
  assert.equal(s.identity.tokens_issued, 1);
  assert.deepEqual(s.identity.by_resource, { 'https://vault.azure.net': 1 });
  assert.deepEqual(s.identity.errors, { wrong_identity_header: 1 });
  assert.equal(s.entra.token_requests, 2);
  assert.deepEqual(s.entra.requests_by_client, { 'dc-app': 2 });
  assert.deepEqual(s.entra.tokens_by_client, { 'dc-app': 1 });
  assert.deepEqual(s.entra.errors, { 'invalid_client/AADSTS7000215': 1 });
});

// ---------------------------------------------------------------------------
// lifecycle and config errors
// ---------------------------------------------------------------------------

test('the peer exits 0 when its stdin closes, and removes its temp CA directory', async () => {
  const p = await startPeer({});
  assert.ok(fs.existsSync(p.ready.ca));
  const exited = once(p.child, 'exit');
  p.child.stdin.end();
  const [code] = await exited;
  assert.equal(code, 0);
  assert.ok(!fs.existsSync(p.ready.ca));
});

test('a bad config exits 2 before the ready line', async () => {
  const child = spawn(process.execPath, [PEER], {
    env: { ...process.env, AZURE_PEER_CONFIG: JSON.stringify({ secrets: { bad_name: 'x' } }) },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.on('data', (d) => { out += d; });
  const [code] = await once(child, 'exit');
  assert.equal(code, 2);
  assert.equal(out, '');
});

// ---------------------------------------------------------------------------
// Application Insights ingestion, admin consent, discovery
// ---------------------------------------------------------------------------

test('ingestion takes gzip envelopes with the instrumentation key and refuses a wrong one per item', async () => {
  const zlib = await import('node:zlib');
  const envelope = (iKey) => ({ name: 'Microsoft.ApplicationInsights.Message', time: new Date().toISOString(), iKey, data: { baseType: 'MessageData', baseData: { message: 'hi' } } });
  const body = zlib.gzipSync(JSON.stringify([envelope(peer.ready.instrumentation_key), envelope('00000000-0000-0000-0000-000000000000')]));
  const r = await new Promise((resolve, reject) => {
    const u = new URL('v2/track', peer.ready.ingestion);
    const req = https.request({ host: '127.0.0.1', port: u.port, path: u.pathname, method: 'POST', servername: 'localhost', ca: peer.ca,
      headers: { host: u.host, 'content-type': 'application/json', 'content-encoding': 'gzip', 'content-length': body.length } }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, json: JSON.parse(Buffer.concat(chunks).toString('utf8')) }));
    });
    req.on('error', reject);
    req.end(body);
  });
  assert.equal(r.status, 206);
  assert.equal(r.json.itemsReceived, 2);
  assert.equal(r.json.itemsAccepted, 1);
  assert.equal(r.json.errors[0].index, 1);
  const seen = (await ctl('telemetry')).json;
  assert.equal(seen.items.length, 1);
});

test('the discovery service lists a signed-in user\'s instances, never an app-only caller\'s', async () => {
  const app = await entraToken(TENANT, { grant_type: 'client_credentials', client_id: 'dc-app', client_secret: 'dc-app-secret', scope: 'https://globaldisco.crm.dynamics.com/.default' });
  assert.equal(app.status, 200);
  const r = await request(`${peer.ready.discovery}/api/discovery/v2.0/Instances`, { headers: { authorization: `Bearer ${app.json.access_token}` } });
  assert.equal(r.status, 403);
  const none = await request(`${peer.ready.discovery}/api/discovery/v2.0/Instances`);
  assert.equal(none.status, 401);
});
