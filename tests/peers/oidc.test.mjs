// End-to-end checks of the OAuth test peer (oidc.mjs), using only fetch as the client.
// Run: cd tests/peers && npm install && node --test

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import * as crypto from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { spawnPeer } from './peer-process.mjs';
import { once } from 'node:events';

const PEER = fileURLToPath(new URL('./oidc.mjs', import.meta.url));
const REDIRECT = 'http://127.0.0.1:7071/api/oauth/callback';
const POST_CLIENT = {
  client_id: 'companion-post',
  client_secret: 'post-secret-0123456789',
  redirect_uris: [REDIRECT],
  token_endpoint_auth_method: 'client_secret_post',
};
const BASIC_CLIENT = {
  client_id: 'companion-basic',
  client_secret: 'basic secret:with/odd+chars',
  redirect_uris: [REDIRECT],
  token_endpoint_auth_method: 'client_secret_basic',
};

// ---------------------------------------------------------------------------
// peer process helpers
// ---------------------------------------------------------------------------

async function startPeer(config) {
  const peer = await spawnPeer(PEER, 'OIDC_PEER_CONFIG', config);
  return { ...peer, issuer: peer.ready.issuer, port: peer.ready.port };
}

// ---------------------------------------------------------------------------
// OAuth client helpers (plain fetch)
// ---------------------------------------------------------------------------

function pkce() {
  const verifier = crypto.randomBytes(32).toString('base64url');
  const challenge = crypto.createHash('sha256').update(verifier).digest('base64url');
  return { verifier, challenge };
}

function authorizationUrl(issuer, client, { challenge, state, scope = 'offline_access api.read', extra = {}, omit = [] } = {}) {
  const params = {
    response_type: 'code',
    client_id: client.client_id,
    redirect_uri: client.redirect_uris[0],
    scope,
    state,
    code_challenge: challenge,
    code_challenge_method: 'S256',
    prompt: 'consent',
    ...extra,
  };
  const u = new URL('/auth', issuer);
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && !omit.includes(k)) u.searchParams.set(k, v);
  }
  return u.href;
}

async function control(issuer, method, path, body) {
  const res = await fetch(new URL(path, issuer), {
    method,
    headers: body === undefined ? {} : { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await res.json();
  assert.equal(res.status, 200, `control ${method} ${path}: ${JSON.stringify(json)}`);
  return json;
}

const consent = (issuer, body) => control(issuer, 'POST', '/__control/consent', body);
const introspect = (issuer, token) => control(issuer, 'POST', '/__control/introspect', { token });

function clientAuth(client, form) {
  const headers = { 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json' };
  if (client.token_endpoint_auth_method === 'client_secret_basic') {
    // RFC 6749 2.3.1: form-urlencode id and secret before base64.
    const enc = (s) => encodeURIComponent(s).replace(/%20/g, '+');
    headers.authorization = `Basic ${Buffer.from(`${enc(client.client_id)}:${enc(client.client_secret)}`).toString('base64')}`;
  } else {
    form.set('client_id', client.client_id);
    form.set('client_secret', client.client_secret);
  }
  return headers;
}

async function tokenRequest(issuer, client, params) {
  const form = new URLSearchParams(params);
  const headers = clientAuth(client, form);
  const res = await fetch(new URL('/token', issuer), { method: 'POST', headers, body: form });
  const text = await res.text();
  let body;
  try { body = JSON.parse(text); } catch { body = text; }
  return { status: res.status, body, headers: res.headers };
}

const exchangeCode = (issuer, client, code, verifier) => tokenRequest(issuer, client, {
  grant_type: 'authorization_code',
  code,
  redirect_uri: client.redirect_uris[0],
  code_verifier: verifier,
});

const refresh = (issuer, client, refreshToken) => tokenRequest(issuer, client, {
  grant_type: 'refresh_token',
  refresh_token: refreshToken,
});

async function revoke(issuer, client, token, hint) {
  const form = new URLSearchParams({ token });
  if (hint) form.set('token_type_hint', hint);
  const headers = clientAuth(client, form);
  const res = await fetch(new URL('/token/revocation', issuer), { method: 'POST', headers, body: form });
  await res.arrayBuffer();
  return res.status;
}

// Full authorization-code flow up to the callback; returns the parsed callback parameters.
async function authorize(issuer, client, opts = {}) {
  const { verifier, challenge } = pkce();
  const state = crypto.randomBytes(16).toString('base64url');
  const url = authorizationUrl(issuer, client, { challenge, state, ...opts });
  const answer = await consent(issuer, { url, user: opts.user, deny: opts.deny });
  assert.ok(answer.location, `no location: ${JSON.stringify(answer)}`);
  const location = new URL(answer.location);
  assert.equal(`${location.origin}${location.pathname}`, client.redirect_uris[0]);
  return { answer, location, params: location.searchParams, state, verifier };
}

async function tokensFor(issuer, client, opts) {
  const { params, verifier } = await authorize(issuer, client, opts);
  const res = await exchangeCode(issuer, client, params.get('code'), verifier);
  assert.equal(res.status, 200, JSON.stringify(res.body));
  return res.body;
}

// ---------------------------------------------------------------------------
// the suite: one shared peer for the flow checks
// ---------------------------------------------------------------------------

let peer;
before(async () => {
  peer = await startPeer({
    clients: [POST_CLIENT, BASIC_CLIENT],
    access_token_ttl: 600,
    refresh_token_ttl: 7200,
    rotate_refresh_tokens: true,
    scopes: ['api.read', 'api.write'],
  });
});
after(async () => {
  await peer?.stop();
});

test('prints exactly one ready line on stdout', () => {
  assert.match(peer.readyLine, /^\{"ready":true,"issuer":"http:\/\/127\.0\.0\.1:\d+","port":\d+\}$/);
  assert.equal(peer.issuer, `http://127.0.0.1:${peer.port}`);
});

test('discovery advertises iss, S256 only, revocation and introspection', async () => {
  const res = await fetch(new URL('/.well-known/openid-configuration', peer.issuer));
  const d = await res.json();
  assert.equal(d.issuer, peer.issuer);
  assert.equal(d.authorization_response_iss_parameter_supported, true);
  assert.deepEqual(d.code_challenge_methods_supported, ['S256']);
  assert.deepEqual(d.response_types_supported, ['code']);
  assert.equal(d.token_endpoint, `${peer.issuer}/token`);
  assert.equal(d.revocation_endpoint, `${peer.issuer}/token/revocation`);
  assert.equal(d.introspection_endpoint, `${peer.issuer}/token/introspection`);
  assert.ok(d.scopes_supported.includes('offline_access'));
  assert.ok(d.scopes_supported.includes('api.write'));
});

test('code flow with client_secret_post: code, state, iss; tokens; refresh rotation; reuse detection', async () => {
  const { params, state, verifier } = await authorize(peer.issuer, POST_CLIENT);
  assert.ok(params.get('code'));
  assert.equal(params.get('state'), state);
  assert.equal(params.get('iss'), peer.issuer);
  assert.equal(params.get('error'), null);

  const res = await exchangeCode(peer.issuer, POST_CLIENT, params.get('code'), verifier);
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.equal(res.headers.get('cache-control'), 'no-store');
  const t = res.body;
  assert.equal(t.token_type, 'Bearer');
  assert.equal(typeof t.access_token, 'string');
  assert.equal(typeof t.refresh_token, 'string');
  assert.equal(t.expires_in, 600);
  assert.deepEqual(t.scope.split(' ').sort(), ['api.read', 'offline_access']);

  // refresh once: a new refresh token comes back
  const r1 = await refresh(peer.issuer, POST_CLIENT, t.refresh_token);
  assert.equal(r1.status, 200, JSON.stringify(r1.body));
  assert.ok(r1.body.access_token);
  assert.ok(r1.body.refresh_token);
  assert.notEqual(r1.body.refresh_token, t.refresh_token);
  assert.notEqual(r1.body.access_token, t.access_token);
  assert.equal(r1.body.expires_in, 600);
  assert.equal((await introspect(peer.issuer, r1.body.refresh_token)).active, true);
  assert.equal((await introspect(peer.issuer, t.refresh_token)).active, false, 'rotated-out token is inactive');

  // reuse the OLD refresh token: invalid_grant, and the whole grant is revoked
  const reuse = await refresh(peer.issuer, POST_CLIENT, t.refresh_token);
  assert.equal(reuse.status, 400);
  assert.equal(reuse.body.error, 'invalid_grant');
  assert.equal((await introspect(peer.issuer, r1.body.refresh_token)).active, false);
  assert.equal((await introspect(peer.issuer, r1.body.access_token)).active, false);
  const afterReuse = await refresh(peer.issuer, POST_CLIENT, r1.body.refresh_token);
  assert.equal(afterReuse.status, 400);
  assert.equal(afterReuse.body.error, 'invalid_grant');
});

test('an authorization code is single use; a replay revokes what it issued', async () => {
  const { params, verifier } = await authorize(peer.issuer, POST_CLIENT);
  const first = await exchangeCode(peer.issuer, POST_CLIENT, params.get('code'), verifier);
  assert.equal(first.status, 200);
  const again = await exchangeCode(peer.issuer, POST_CLIENT, params.get('code'), verifier);
  assert.equal(again.status, 400);
  assert.equal(again.body.error, 'invalid_grant');
  assert.equal((await introspect(peer.issuer, first.body.refresh_token)).active, false);
  assert.equal((await introspect(peer.issuer, first.body.access_token)).active, false);
});

test('code flow with client_secret_basic (secret with reserved characters)', async () => {
  const { params, verifier } = await authorize(peer.issuer, BASIC_CLIENT, { scope: 'offline_access api.read api.write', user: 'bob' });
  assert.equal(params.get('iss'), peer.issuer);
  const res = await exchangeCode(peer.issuer, BASIC_CLIENT, params.get('code'), verifier);
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.ok(res.body.access_token && res.body.refresh_token);
  const info = await introspect(peer.issuer, res.body.access_token);
  assert.equal(info.active, true);
  assert.equal(info.client_id, BASIC_CLIENT.client_id);
  assert.equal(info.sub, 'bob');
  assert.deepEqual(info.scope.split(' ').sort(), ['api.read', 'api.write', 'offline_access']);

  // registered for basic: the same secret in the body is refused, and the other way round
  const wrongMethod = await tokenRequest(peer.issuer, { ...BASIC_CLIENT, token_endpoint_auth_method: 'client_secret_post' }, {
    grant_type: 'refresh_token', refresh_token: res.body.refresh_token,
  });
  assert.equal(wrongMethod.status, 401);
  assert.equal(wrongMethod.body.error, 'invalid_client');
  const wrongMethod2 = await tokenRequest(peer.issuer, { ...POST_CLIENT, token_endpoint_auth_method: 'client_secret_basic' }, {
    grant_type: 'refresh_token', refresh_token: res.body.refresh_token,
  });
  assert.equal(wrongMethod2.status, 401);
  assert.equal(wrongMethod2.body.error, 'invalid_client');
  // a wrong secret is refused by oidc-provider itself
  const wrongSecret = await tokenRequest(peer.issuer, { ...BASIC_CLIENT, client_secret: 'nope' }, {
    grant_type: 'refresh_token', refresh_token: res.body.refresh_token,
  });
  assert.equal(wrongSecret.status, 401);
  assert.equal(wrongSecret.body.error, 'invalid_client');
  // the refresh token still works with the right method
  const ok = await refresh(peer.issuer, BASIC_CLIENT, res.body.refresh_token);
  assert.equal(ok.status, 200, JSON.stringify(ok.body));
});

test('revocation (RFC 7009) makes the refresh token inactive', async () => {
  const t = await tokensFor(peer.issuer, POST_CLIENT);
  assert.equal((await introspect(peer.issuer, t.refresh_token)).active, true);
  assert.equal(await revoke(peer.issuer, POST_CLIENT, t.refresh_token, 'refresh_token'), 200);
  assert.equal((await introspect(peer.issuer, t.refresh_token)).active, false);
  assert.equal((await introspect(peer.issuer, t.access_token)).active, false);
  const r = await refresh(peer.issuer, POST_CLIENT, t.refresh_token);
  assert.equal(r.status, 400);
  assert.equal(r.body.error, 'invalid_grant');
  // revoking an unknown token is still 200 (RFC 7009 2.2)
  assert.equal(await revoke(peer.issuer, POST_CLIENT, 'no-such-token'), 200);
});

test('PKCE is required and bound to the code', async () => {
  const state = 'st-no-pkce';
  const noPkce = await consent(peer.issuer, {
    url: authorizationUrl(peer.issuer, POST_CLIENT, { state, omit: ['code_challenge', 'code_challenge_method'] }),
  });
  assert.equal(noPkce.error, 'invalid_request');
  assert.match(noPkce.error_description, /PKCE/);
  const loc = new URL(noPkce.location);
  assert.equal(loc.searchParams.get('error'), 'invalid_request');
  assert.equal(loc.searchParams.get('state'), state);
  assert.equal(loc.searchParams.get('iss'), peer.issuer);

  const plain = await consent(peer.issuer, {
    url: authorizationUrl(peer.issuer, POST_CLIENT, { state, challenge: 'a'.repeat(43), extra: { code_challenge_method: 'plain' } }),
  });
  assert.equal(plain.error, 'invalid_request');

  const { params } = await authorize(peer.issuer, POST_CLIENT);
  const wrongVerifier = await exchangeCode(peer.issuer, POST_CLIENT, params.get('code'), pkce().verifier);
  assert.equal(wrongVerifier.status, 400);
  assert.equal(wrongVerifier.body.error, 'invalid_grant');
});

test('redirect_uri must match exactly; an unknown one gets an error page, not a redirect', async () => {
  const { challenge } = pkce();
  const bad = await consent(peer.issuer, {
    url: authorizationUrl(peer.issuer, POST_CLIENT, { challenge, state: 's', extra: { redirect_uri: `${REDIRECT}/` } }),
  });
  assert.equal(bad.location, undefined);
  assert.equal(bad.error, 'invalid_redirect_uri');
  assert.equal(bad.status, 400);

  const unknownClient = await consent(peer.issuer, {
    url: authorizationUrl(peer.issuer, { ...POST_CLIENT, client_id: 'nobody' }, { challenge, state: 's' }),
  });
  assert.equal(unknownClient.error, 'invalid_client');
  assert.equal(unknownClient.status, 400);
});

test('deny gives error=access_denied with state and iss', async () => {
  const { answer, params, state } = await authorize(peer.issuer, POST_CLIENT, { deny: true });
  assert.equal(answer.error, undefined);
  assert.equal(params.get('error'), 'access_denied');
  assert.equal(params.get('state'), state);
  assert.equal(params.get('iss'), peer.issuer);
  assert.equal(params.get('code'), null);
});

test('without prompt=consent offline_access is dropped and no refresh token is issued', async () => {
  const t = await tokensFor(peer.issuer, POST_CLIENT, { omit: ['prompt'] });
  assert.ok(t.access_token);
  assert.equal(t.refresh_token, undefined);
  assert.equal(t.scope, 'api.read');
});

test('stats count grants, errors and revocations; reset zeroes them', async () => {
  await control(peer.issuer, 'POST', '/__control/reset', {});
  const t = await tokensFor(peer.issuer, POST_CLIENT);
  const r = await refresh(peer.issuer, POST_CLIENT, t.refresh_token);
  assert.equal(r.status, 200);
  const reuse = await refresh(peer.issuer, POST_CLIENT, t.refresh_token);
  assert.equal(reuse.status, 400);
  assert.equal(await revoke(peer.issuer, POST_CLIENT, r.body.access_token), 200);
  const s = await control(peer.issuer, 'GET', '/__control/stats');
  assert.deepEqual(s.token_requests, { authorization_code: 1, refresh_token: 2 });
  assert.deepEqual(s.token_errors, { invalid_grant: 1 });
  assert.equal(s.revocations, 1);
  await control(peer.issuer, 'POST', '/__control/reset', {});
  const z = await control(peer.issuer, 'GET', '/__control/stats');
  assert.deepEqual(z.token_requests, { authorization_code: 0, refresh_token: 0 });
  assert.deepEqual(z.token_errors, {});
  assert.equal(z.revocations, 0);
});

test('faults: injected status for the next N token requests, then the real provider', async () => {
  await control(peer.issuer, 'POST', '/__control/reset', {});
  const t = await tokensFor(peer.issuer, POST_CLIENT);
  await control(peer.issuer, 'POST', '/__control/faults', { token_endpoint: { status: 503, count: 2 } });
  for (let i = 0; i < 2; i += 1) {
    const f = await refresh(peer.issuer, POST_CLIENT, t.refresh_token);
    assert.equal(f.status, 503);
    assert.equal(f.body.error, 'temporarily_unavailable');
  }
  const ok = await refresh(peer.issuer, POST_CLIENT, t.refresh_token);
  assert.equal(ok.status, 200, JSON.stringify(ok.body));

  // a custom body, then a delay on every request until cleared
  await control(peer.issuer, 'POST', '/__control/faults', {
    token_endpoint: { status: 500, count: 1, body: { error: 'server_error', error_description: 'boom' } },
  });
  const f500 = await refresh(peer.issuer, POST_CLIENT, ok.body.refresh_token);
  assert.equal(f500.status, 500);
  assert.deepEqual(f500.body, { error: 'server_error', error_description: 'boom' });

  await control(peer.issuer, 'POST', '/__control/faults', { token_endpoint: { count: 0, delay_ms: 300 } });
  const started = performance.now();
  const slow = await refresh(peer.issuer, POST_CLIENT, ok.body.refresh_token);
  assert.equal(slow.status, 200, JSON.stringify(slow.body));
  assert.ok(performance.now() - started >= 290, 'delay_ms was applied');

  await control(peer.issuer, 'POST', '/__control/faults', {});
  assert.deepEqual(await control(peer.issuer, 'GET', '/__control/faults'), {});
  const s = await control(peer.issuer, 'GET', '/__control/stats');
  assert.equal(s.faults_injected, 3);
  assert.deepEqual(s.token_requests, { authorization_code: 1, refresh_token: 2 });
});

test('control API rejects bad input', async () => {
  const res = await fetch(new URL('/__control/consent', peer.issuer), { method: 'POST', body: '{"url":' });
  assert.equal(res.status, 400);
  assert.equal((await res.json()).error, 'invalid_request');
  const nf = await fetch(new URL('/__control/nope', peer.issuer));
  assert.equal(nf.status, 404);
  await nf.arrayBuffer();
});

test('nothing but the ready line on stdout', () => {
  assert.equal(peer.stdoutAfterReady(), '');
});

// ---------------------------------------------------------------------------
// lifecycle: separate short-lived peers
// ---------------------------------------------------------------------------

test('defaults: starts with no config and exits 0 on SIGTERM', async () => {
  const p = await startPeer({});
  const d = await (await fetch(new URL('/.well-known/openid-configuration', p.issuer))).json();
  assert.deepEqual(d.scopes_supported, ['openid', 'offline_access', 'api.read', 'api.write']);
  const exited = once(p.child, 'exit');
  p.child.kill('SIGTERM');
  const [code, signal] = await exited;
  assert.equal(code, 0);
  assert.equal(signal, null);
  assert.equal(p.stdoutAfterReady(), '');
});

test('exits when stdin closes (orphaned peer dies with its test process)', async () => {
  const p = await startPeer({ rotate_refresh_tokens: false });
  const exited = once(p.child, 'exit');
  p.child.stdin.end();
  const [code] = await exited;
  assert.equal(code, 0);
});

test('rotate_refresh_tokens=false keeps the refresh token', async () => {
  const client = { ...POST_CLIENT };
  const p = await startPeer({ clients: [client], rotate_refresh_tokens: false });
  try {
    const t = await tokensFor(p.issuer, client);
    const r = await refresh(p.issuer, client, t.refresh_token);
    assert.equal(r.status, 200);
    assert.equal(r.body.refresh_token, t.refresh_token);
    const r2 = await refresh(p.issuer, client, t.refresh_token);
    assert.equal(r2.status, 200);
  } finally {
    await p.stop();
  }
});
