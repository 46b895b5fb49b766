// Test peer: a real, strict OAuth 2.0 authorization server (oidc-provider) for the
// Rust integration tests. See README.md in this folder.
//
// stdout carries exactly one line, the ready line; everything else goes to stderr.

import * as http from 'node:http';
import * as crypto from 'node:crypto';

// oidc-provider prints notices with console.info (stdout). Keep stdout for the ready line only.
const toStderr = (...args) => console.error(...args);
console.log = toStderr;
console.info = toStderr;
console.debug = toStderr;
// This peer hands oidc-provider pre-read form bodies on purpose (see middleware 3); drop that notice.
const warn = console.warn.bind(console);
console.warn = (...args) => {
  if (typeof args[0] === 'string' && args[0].includes('already parsed request body detected')) return;
  warn(...args);
};

const { default: Provider, errors } = await import('oidc-provider');
const { generateKeyPair, exportJWK } = await import('jose');

// ---------------------------------------------------------------------------
// configuration
// ---------------------------------------------------------------------------

function fail(message) {
  process.stderr.write(`oidc peer: ${message}\n`);
  process.exit(2);
}

let raw = {};
if (process.env.OIDC_PEER_CONFIG) {
  try {
    raw = JSON.parse(process.env.OIDC_PEER_CONFIG);
  } catch (err) {
    fail(`OIDC_PEER_CONFIG is not valid JSON: ${err.message}`);
  }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) {
    fail('OIDC_PEER_CONFIG must be a JSON object');
  }
}

const DEFAULT_CLIENT = {
  client_id: 'dynamics-companion',
  client_secret: 'dynamics-companion-secret',
  redirect_uris: ['http://127.0.0.1:7071/api/oauth/callback'],
  token_endpoint_auth_method: 'client_secret_post',
};

const config = {
  clients: Array.isArray(raw.clients) && raw.clients.length ? raw.clients : [DEFAULT_CLIENT],
  access_token_ttl: positiveInt(raw.access_token_ttl, 3600, 'access_token_ttl'),
  refresh_token_ttl: positiveInt(raw.refresh_token_ttl, 86400, 'refresh_token_ttl'),
  rotate_refresh_tokens: raw.rotate_refresh_tokens === undefined ? true : Boolean(raw.rotate_refresh_tokens),
  scopes: Array.isArray(raw.scopes) ? raw.scopes.map(String) : ['api.read', 'api.write'],
  require_redirect_uri: raw.require_redirect_uri === undefined ? true : Boolean(raw.require_redirect_uri),
  enforce_auth_method: raw.enforce_auth_method === undefined ? true : Boolean(raw.enforce_auth_method),
};

function positiveInt(value, dflt, name) {
  if (value === undefined || value === null) return dflt;
  if (!Number.isInteger(value) || value <= 0) fail(`${name} must be a positive integer (seconds)`);
  return value;
}

const clients = config.clients.map((c, i) => {
  if (!c || typeof c.client_id !== 'string') fail(`clients[${i}].client_id is required`);
  return {
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_post',
    ...c,
  };
});

// Internal client used only by POST /__control/introspect to call the real introspection endpoint.
const CONTROL_CLIENT_ID = '__control';
const CONTROL_CLIENT_SECRET = crypto.randomBytes(32).toString('base64url');
clients.push({
  client_id: CONTROL_CLIENT_ID,
  client_secret: CONTROL_CLIENT_SECRET,
  grant_types: [],
  response_types: [],
  redirect_uris: [],
  token_endpoint_auth_method: 'client_secret_basic',
});

const ROUTES = {
  authorization: '/auth',
  token: '/token',
  revocation: '/token/revocation',
  introspection: '/token/introspection',
  jwks: '/jwks',
  userinfo: '/me',
};

// ---------------------------------------------------------------------------
// control state
// ---------------------------------------------------------------------------

function freshStats() {
  return {
    token_requests: { authorization_code: 0, refresh_token: 0 },
    token_errors: {},
    token_success: { authorization_code: 0, refresh_token: 0 },
    revocations: 0,
    introspections: 0,
    authorizations: 0,
    authorization_errors: {},
    faults_injected: 0,
  };
}
let stats = freshStats();
let faults = {}; // { token_endpoint: { status, count, delay_ms, body, headers } }

function bump(map, key) {
  map[key] = (map[key] || 0) + 1;
}

// ---------------------------------------------------------------------------
// server: listen first (port 0) so the issuer can carry the real port
// ---------------------------------------------------------------------------

let handler = (req, res) => { res.statusCode = 503; res.end(); };
const server = http.createServer((req, res) => handler(req, res));
server.keepAliveTimeout = 1000;
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(0, '127.0.0.1', resolve);
});
const { port } = server.address();
const issuer = `http://127.0.0.1:${port}`;

// Fixed development signing key, generated at start.
const { privateKey } = await generateKeyPair('RS256', { extractable: true });
const signingJwk = { ...(await exportJWK(privateKey)), kid: 'peer-rs256', use: 'sig', alg: 'RS256' };

const htmlEscape = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const jsonInHtml = (v) => JSON.stringify(v).replace(/</g, '\\u003c');

const provider = new Provider(issuer, {
  clients,
  jwks: { keys: [signingJwk] },
  cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
  routes: ROUTES,
  responseTypes: ['code'],
  scopes: ['openid', 'offline_access', ...config.scopes],
  pkce: { required: () => true }, // S256 is the only method oidc-provider 9 supports
  allowOmittingSingleRegisteredRedirectUri: !config.require_redirect_uri,
  rotateRefreshToken: config.rotate_refresh_tokens,
  clientBasedCORS: () => false,
  findAccount: (ctx, sub) => ({ accountId: sub, claims: () => ({ sub }) }),
  ttl: {
    AccessToken: config.access_token_ttl,
    AuthorizationCode: 60,
    RefreshToken: config.refresh_token_ttl,
    IdToken: 3600,
    Interaction: 600,
    Session: 86400,
    Grant: Math.max(config.refresh_token_ttl * 10, 14 * 86400),
  },
  features: {
    devInteractions: { enabled: false },
    // RFC 7009. Same policy as oidc-provider's default, spelled out: a confidential client may
    // only revoke its own tokens.
    revocation: {
      enabled: true,
      allowedPolicy: (ctx, client, token) => {
        if (token.clientId !== client.clientId) {
          if (client.clientAuthMethod === 'none') return false;
          throw new errors.InvalidRequest('client is not authorized to revoke the presented token');
        }
        return true;
      },
    },
    // RFC 7662. Same policy as oidc-provider's default: confidential clients may introspect.
    introspection: {
      enabled: true,
      allowedPolicy: (ctx, client, token) => !(client.clientAuthMethod === 'none' && token.clientId !== client.clientId),
    },
  },
  interactions: {
    url: (ctx, interaction) => `/interaction/${interaction.uid}`,
  },
  // The error page shown when the provider cannot redirect back (e.g. unknown client or a
  // redirect_uri that is not registered). It embeds the error as JSON so the control API can report it.
  renderError: async (ctx, out, error) => {
    ctx.type = 'html';
    ctx.body = `<!DOCTYPE html><html><head><meta charset="utf-8"><title>oidc peer error</title></head><body>
<h1>${htmlEscape(out.error)}</h1><p>${htmlEscape(out.error_description || '')}</p>
<script type="application/json" id="oidc-error">${jsonInHtml(out)}</script></body></html>`;
  },
});

provider.on('server_error', (ctx, err) => process.stderr.write(`oidc peer server_error: ${err?.stack || err}\n`));
provider.on('authorization.success', () => { stats.authorizations += 1; });
provider.on('authorization.error', (ctx, err) => bump(stats.authorization_errors, err?.error || 'unknown'));

// ---------------------------------------------------------------------------
// helpers for our own (non-provider) routes
// ---------------------------------------------------------------------------

async function readBody(req, limit = 1 << 20) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw Object.assign(new Error('body too large'), { status: 413 });
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

async function readJson(ctx) {
  const text = await readBody(ctx.req);
  if (!text.trim()) return {};
  try {
    const v = JSON.parse(text);
    if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new Error('not an object');
    return v;
  } catch (err) {
    throw Object.assign(new Error(`invalid JSON body: ${err.message}`), { status: 400 });
  }
}

function sendJson(ctx, status, body) {
  ctx.status = status;
  ctx.set('cache-control', 'no-store');
  ctx.type = 'application/json';
  ctx.body = JSON.stringify(body);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------
// middleware 1: token-endpoint faults and delays (before the provider sees the request)
// ---------------------------------------------------------------------------

provider.use(async (ctx, next) => {
  if (ctx.method === 'POST' && ctx.path === ROUTES.token) {
    const f = faults.token_endpoint;
    if (f) {
      if (f.delay_ms > 0) await sleep(f.delay_ms);
      if (f.remaining > 0) {
        f.remaining -= 1;
        stats.faults_injected += 1;
        await readBody(ctx.req).catch(() => {});
        ctx.status = f.status;
        ctx.set('cache-control', 'no-store');
        for (const [k, v] of Object.entries(f.headers || {})) ctx.set(k, String(v));
        if (typeof f.body === 'string') {
          ctx.body = f.body;
        } else {
          ctx.type = 'application/json';
          ctx.body = JSON.stringify(f.body);
        }
        return;
      }
    }
  }
  await next();
});

// ---------------------------------------------------------------------------
// middleware 2: statistics (observes what the provider answered)
// ---------------------------------------------------------------------------

provider.use(async (ctx, next) => {
  await next();
  if (ctx.method !== 'POST') return;
  if (ctx.path === ROUTES.token) {
    const gty = ctx.oidc?.params?.grant_type || ctx.state.peerForm?.get('grant_type') || 'unknown';
    bump(stats.token_requests, gty);
    if (ctx.status >= 400) {
      bump(stats.token_errors, (ctx.body && typeof ctx.body === 'object' && ctx.body.error) || `http_${ctx.status}`);
    } else {
      bump(stats.token_success, gty);
      // Remember what was issued, so tests can look for these values where they must
      // never appear (the client's logs, its store in clear).
      if (ctx.body && typeof ctx.body === 'object') {
        issued.push({ grant_type: gty, access_token: ctx.body.access_token, refresh_token: ctx.body.refresh_token });
      }
    }
  } else if (ctx.path === ROUTES.revocation && ctx.status === 200) {
    stats.revocations += 1;
  }
});

// ---------------------------------------------------------------------------
// middleware 3: the registered client authentication method is the only one accepted.
// oidc-provider itself accepts client_secret_basic and client_secret_post interchangeably for any
// client registered with either; this peer is stricter so a client that sends its secret the
// wrong way is caught. The form is read here and handed to oidc-provider as an already-parsed body.
// ---------------------------------------------------------------------------

const AUTH_ENDPOINTS = new Set([ROUTES.token, ROUTES.revocation, ROUTES.introspection]);
const registeredAuthMethod = new Map(clients.map((c) => [c.client_id, c.token_endpoint_auth_method]));

function basicClientId(ctx) {
  const m = /^Basic\s+(\S+)$/i.exec(ctx.get('authorization') || '');
  if (!m) return undefined;
  const decoded = Buffer.from(m[1], 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon < 0) return undefined;
  try {
    return decodeURIComponent(decoded.slice(0, colon).replace(/\+/g, ' '));
  } catch {
    return decoded.slice(0, colon);
  }
}

provider.use(async (ctx, next) => {
  if (ctx.method !== 'POST' || !AUTH_ENDPOINTS.has(ctx.path) || !ctx.is('application/x-www-form-urlencoded')) {
    return next();
  }
  const text = await readBody(ctx.req, 56 * 1024);
  ctx.req.body = text; // oidc-provider falls back to req.body once the stream has been read
  const form = new URLSearchParams(text);
  ctx.state.peerForm = form;
  if (config.enforce_auth_method) {
    const viaBasic = /^Basic\s/i.test(ctx.get('authorization') || '');
    const clientId = viaBasic ? basicClientId(ctx) : form.get('client_id');
    const registered = registeredAuthMethod.get(clientId);
    let problem;
    if (registered === 'client_secret_basic' && !viaBasic) {
      problem = 'this client must authenticate with client_secret_basic (HTTP Basic), not in the request body';
    } else if (registered === 'client_secret_post' && viaBasic) {
      problem = 'this client must authenticate with client_secret_post (client_id and client_secret in the body)';
    }
    if (problem) {
      ctx.status = 401;
      ctx.set('cache-control', 'no-store');
      if (registered === 'client_secret_basic') ctx.set('www-authenticate', 'Basic realm="oidc-peer"');
      ctx.type = 'application/json';
      ctx.body = { error: 'invalid_client', error_description: `client authentication failed: ${problem}` };
      return;
    }
  }
  await next();
});

// ---------------------------------------------------------------------------
// middleware 4: interactions (login + consent), our own minimal pages
// ---------------------------------------------------------------------------

function interactionPage(uid, prompt, details) {
  const forms = [];
  if (prompt.name === 'login') {
    forms.push(`<form id="login" method="post" action="/interaction/${uid}/login">
<label>user <input name="login" value=""></label><button type="submit">Sign in</button></form>`);
  } else {
    forms.push(`<form id="consent" method="post" action="/interaction/${uid}/confirm">
<p>${htmlEscape(details.params.client_id)} asks for: ${htmlEscape(details.params.scope || '')}</p>
<button type="submit">Allow</button></form>`);
  }
  forms.push(`<form id="abort" method="post" action="/interaction/${uid}/abort"><button type="submit">Cancel</button></form>`);
  return `<!DOCTYPE html><html><head><meta charset="utf-8"><title>${htmlEscape(prompt.name)}</title></head>
<body data-prompt="${htmlEscape(prompt.name)}">${forms.join('\n')}</body></html>`;
}

provider.use(async (ctx, next) => {
  const m = /^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login|confirm|abort))?$/.exec(ctx.path);
  if (!m) return next();
  const [, uid, action] = m;
  ctx.set('cache-control', 'no-store');
  try {
    const details = await provider.interactionDetails(ctx.req, ctx.res);
    if (details.uid !== uid) {
      sendJson(ctx, 400, { error: 'invalid_request', error_description: 'interaction uid does not match the interaction cookie' });
      return;
    }
    const { prompt, params, session } = details;

    if (!action && ctx.method === 'GET') {
      ctx.type = 'html';
      ctx.body = interactionPage(uid, prompt, details);
      return;
    }
    if (ctx.method !== 'POST' || !action) {
      ctx.status = 405;
      return;
    }

    const form = new URLSearchParams(await readBody(ctx.req));
    let result;
    if (action === 'abort') {
      result = { error: 'access_denied', error_description: 'End-User aborted interaction' };
    } else if (action === 'login') {
      if (prompt.name !== 'login') throw Object.assign(new Error('login is not the current prompt'), { status: 400 });
      const login = form.get('login');
      if (!login) throw Object.assign(new Error('login is required'), { status: 400 });
      result = { login: { accountId: login } };
    } else {
      if (prompt.name !== 'consent') throw Object.assign(new Error('consent is not the current prompt'), { status: 400 });
      const accountId = session.accountId;
      let grant;
      if (details.grantId) {
        grant = await provider.Grant.find(details.grantId);
      } else {
        grant = new provider.Grant({ accountId, clientId: params.client_id });
      }
      const d = prompt.details || {};
      if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
      if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
      if (d.missingResourceScopes) {
        for (const [indicator, scopes] of Object.entries(d.missingResourceScopes)) {
          grant.addResourceScope(indicator, scopes.join(' '));
        }
      }
      const grantId = await grant.save();
      result = { consent: { grantId } };
    }
    const returnTo = await provider.interactionResult(ctx.req, ctx.res, result, { mergeWithLastSubmission: true });
    ctx.redirect(returnTo);
    ctx.status = 303;
  } catch (err) {
    sendJson(ctx, err.status || 400, { error: err.error || 'invalid_request', error_description: err.error_description || err.message });
  }
});

// ---------------------------------------------------------------------------
// middleware 5: control API
// ---------------------------------------------------------------------------

// A tiny cookie jar: name/value per cookie, with path scoping, for one simulated browser.
class CookieJar {
  #cookies = new Map(); // key `${path}\0${name}` -> { name, value, path }

  store(requestUrl, setCookies) {
    const reqPath = new URL(requestUrl).pathname;
    for (const line of setCookies) {
      const [pair, ...attrs] = line.split(';');
      const eq = pair.indexOf('=');
      if (eq < 0) continue;
      const name = pair.slice(0, eq).trim();
      const value = pair.slice(eq + 1).trim();
      let path = reqPath.slice(0, reqPath.lastIndexOf('/')) || '/';
      let expired = false;
      for (const attr of attrs) {
        const [k, ...rest] = attr.split('=');
        const key = k.trim().toLowerCase();
        const v = rest.join('=').trim();
        if (key === 'path' && v.startsWith('/')) path = v;
        if (key === 'max-age' && Number(v) <= 0) expired = true;
        if (key === 'expires' && Date.parse(v) <= Date.now()) expired = true;
      }
      const id = `${path}\0${name}`;
      if (expired || value === '') this.#cookies.delete(id);
      else this.#cookies.set(id, { name, value, path });
    }
  }

  header(url) {
    const p = new URL(url).pathname;
    const out = [];
    for (const c of this.#cookies.values()) {
      const matches = p === c.path || p.startsWith(c.path.endsWith('/') ? c.path : `${c.path}/`);
      if (matches) out.push(`${c.name}=${c.value}`);
    }
    return out.join('; ');
  }
}

function isProviderUrl(u) {
  return u.origin === issuer
    && (u.pathname === ROUTES.authorization || u.pathname.startsWith(`${ROUTES.authorization}/`)
      || u.pathname.startsWith('/interaction/'));
}

// Plays the user's browser through the authorization flow; returns the control API answer.
async function playBrowser(startUrl, { user, deny }) {
  let url;
  try {
    url = new URL(startUrl);
  } catch {
    return { error: 'invalid_request', error_description: '"url" is not a valid URL', status: 400 };
  }
  if (url.origin !== issuer) {
    return { error: 'invalid_request', error_description: `"url" must start with ${issuer}`, status: 400 };
  }
  const jar = new CookieJar();
  let method = 'GET';
  let body;
  let interacted = false;
  for (let step = 0; step < 20; step += 1) {
    const headers = { accept: 'text/html' };
    const cookie = jar.header(url.href);
    if (cookie) headers.cookie = cookie;
    if (body !== undefined) headers['content-type'] = 'application/x-www-form-urlencoded';
    const res = await fetch(url, { method, headers, body, redirect: 'manual' });
    jar.store(url.href, res.headers.getSetCookie());
    const location = res.headers.get('location');
    if (res.status >= 300 && res.status < 400 && location) {
      await res.arrayBuffer();
      const next = new URL(location, url);
      if (!isProviderUrl(next)) {
        const answer = { location: next.href };
        const error = next.searchParams.get('error');
        if (error && !interacted) {
          // The authorization request itself was rejected (the provider redirected the error back).
          Object.assign(answer, {
            error,
            error_description: next.searchParams.get('error_description') ?? undefined,
            status: res.status,
          });
        }
        return answer;
      }
      url = next;
      method = 'GET';
      body = undefined;
      continue;
    }
    const text = await res.text();
    if (res.status === 200 && url.pathname.startsWith('/interaction/') && method === 'GET') {
      interacted = true;
      const prompt = /data-prompt="([^"]+)"/.exec(text)?.[1];
      const formId = deny ? 'abort' : prompt === 'login' ? 'login' : 'consent';
      const action = new RegExp(`<form id="${formId}" method="post" action="([^"]+)"`).exec(text)?.[1];
      if (!action) {
        return { error: 'peer_error', error_description: `no ${formId} form on the interaction page`, status: res.status };
      }
      url = new URL(action, url);
      method = 'POST';
      body = formId === 'login' ? new URLSearchParams({ login: user }).toString() : '';
      continue;
    }
    // An error page (the provider could not redirect back to the client) or an unexpected answer.
    const embedded = /<script type="application\/json" id="oidc-error">([\s\S]*?)<\/script>/.exec(text)?.[1];
    if (embedded) {
      const out = JSON.parse(embedded);
      return { error: out.error, error_description: out.error_description, status: res.status };
    }
    let parsed;
    try { parsed = JSON.parse(text); } catch { /* not JSON */ }
    return {
      error: parsed?.error || 'unexpected_response',
      error_description: parsed?.error_description || text.slice(0, 500),
      status: res.status,
    };
  }
  return { error: 'peer_error', error_description: 'too many redirects', status: 508 };
}

async function introspect(token, tokenTypeHint) {
  const form = new URLSearchParams({ token });
  if (tokenTypeHint) form.set('token_type_hint', tokenTypeHint);
  const basic = Buffer.from(`${encodeURIComponent(CONTROL_CLIENT_ID)}:${encodeURIComponent(CONTROL_CLIENT_SECRET)}`).toString('base64');
  const res = await fetch(`${issuer}${ROUTES.introspection}`, {
    method: 'POST',
    headers: { authorization: `Basic ${basic}`, 'content-type': 'application/x-www-form-urlencoded' },
    body: form,
  });
  const out = await res.json();
  if (!res.ok) throw Object.assign(new Error(out.error_description || 'introspection failed'), { status: res.status, error: out.error });
  return out;
}

function normalizeTokenFault(f) {
  if (f === undefined || f === null) return undefined;
  if (typeof f !== 'object') throw Object.assign(new Error('token_endpoint must be an object'), { status: 400 });
  const status = f.status === undefined ? 503 : f.status;
  if (!Number.isInteger(status) || status < 100 || status > 599) {
    throw Object.assign(new Error('token_endpoint.status must be an HTTP status'), { status: 400 });
  }
  const count = f.count === undefined ? 1 : f.count;
  const delay = f.delay_ms === undefined ? 0 : f.delay_ms;
  if (!Number.isInteger(count) || count < 0) throw Object.assign(new Error('token_endpoint.count must be an integer >= 0'), { status: 400 });
  if (!Number.isInteger(delay) || delay < 0) throw Object.assign(new Error('token_endpoint.delay_ms must be an integer >= 0'), { status: 400 });
  return {
    status,
    count,
    remaining: count,
    delay_ms: delay,
    body: f.body === undefined
      ? { error: 'temporarily_unavailable', error_description: 'fault injected by the test peer' }
      : f.body,
    headers: f.headers && typeof f.headers === 'object' ? f.headers : undefined,
  };
}

const issued = [];
// `/__api/` answers 401 to its next `unauthorized` calls (a token rejected early).
const apiFaults = { unauthorized: 0 };
// `/__api/...?stream=1` answers in two chunks without a length: the first at once, the
// second only when `POST /__control/api-release` says so (a proxy that buffered the body
// would hold the first back).
let releaseStreams = [];

// A protected resource for proxy tests: `/__api/...` answers 200 with what it received
// when the bearer token is active (checked by introspection), 401 otherwise.
provider.use(async (ctx, next) => {
  if (!ctx.path.startsWith('/__api/')) return next();
  const m = /^Bearer\s+(\S+)$/.exec(ctx.get('authorization') || '');
  const info = m ? await introspect(m[1]).catch(() => ({ active: false })) : { active: false };
  const faulted = apiFaults.unauthorized > 0;
  if (faulted) apiFaults.unauthorized -= 1;
  if (!info.active || faulted) {
    ctx.set('www-authenticate', 'Bearer error="invalid_token"');
    sendJson(ctx, 401, { error: 'invalid_token' });
    return;
  }
  const body = await readBody(ctx.req).catch(() => Buffer.alloc(0));
  if (/(^|&)stream=1(&|$)/.test(ctx.querystring)) {
    ctx.respond = false;
    ctx.res.writeHead(200, { 'content-type': 'text/plain; charset=utf-8' });
    ctx.res.write('first chunk\n');
    await new Promise((resolve) => releaseStreams.push(resolve));
    ctx.res.end('second chunk\n');
    return;
  }
  // `?hostile=1`: answer with what a proxy must not pass to a browser (CORS, cookies,
  // hop-by-hop headers), next to one ordinary header it must pass.
  if (/(^|&)hostile=1(&|$)/.test(ctx.querystring)) {
    ctx.set('access-control-allow-origin', '*');
    ctx.set('access-control-allow-credentials', 'true');
    ctx.set('set-cookie', 'api-session=1; Path=/');
    ctx.set('connection', 'x-hop');
    ctx.set('x-hop', 'hop-by-hop');
    ctx.set('x-api-kept', 'yes');
  }
  sendJson(ctx, 200, {
    method: ctx.method,
    path: ctx.path,
    query: ctx.querystring,
    sub: info.sub,
    body: body.toString('utf8'),
    content_type: ctx.get('content-type') || null,
    forwarded_cookie: ctx.get('cookie') || null,
    headers: ctx.headers,
  });
});

provider.use(async (ctx, next) => {
  if (!ctx.path.startsWith('/__control/')) return next();
  const route = `${ctx.method} ${ctx.path}`;
  try {
    switch (route) {
      case 'POST /__control/consent': {
        const b = await readJson(ctx);
        if (typeof b.url !== 'string') throw Object.assign(new Error('"url" is required'), { status: 400 });
        const user = typeof b.user === 'string' && b.user ? b.user : 'alice';
        sendJson(ctx, 200, await playBrowser(b.url, { user, deny: b.deny === true }));
        return;
      }
      case 'GET /__control/stats':
        sendJson(ctx, 200, stats);
        return;
      case 'POST /__control/reset':
        await readBody(ctx.req);
        stats = freshStats();
        faults = {};
        sendJson(ctx, 200, { ok: true });
        return;
      case 'GET /__control/faults':
        sendJson(ctx, 200, faults);
        return;
      case 'POST /__control/faults': {
        const b = await readJson(ctx);
        faults = {};
        const tokenFault = normalizeTokenFault(b.token_endpoint);
        if (tokenFault) faults.token_endpoint = tokenFault;
        sendJson(ctx, 200, faults);
        return;
      }
      case 'POST /__control/introspect': {
        const b = await readJson(ctx);
        if (typeof b.token !== 'string' || !b.token) throw Object.assign(new Error('"token" is required'), { status: 400 });
        stats.introspections += 1;
        sendJson(ctx, 200, await introspect(b.token, b.token_type_hint));
        return;
      }
      case 'POST /__control/api-faults': {
        const b = await readJson(ctx);
        apiFaults.unauthorized = Number.isInteger(b.unauthorized) && b.unauthorized >= 0 ? b.unauthorized : 0;
        sendJson(ctx, 200, apiFaults);
        return;
      }
      case 'POST /__control/api-release': {
        await readBody(ctx.req);
        const waiting = releaseStreams.length;
        releaseStreams.forEach((release) => release());
        releaseStreams = [];
        sendJson(ctx, 200, { released: waiting });
        return;
      }
      case 'GET /__control/issued':
        sendJson(ctx, 200, { tokens: issued });
        return;
      case 'GET /__control/config':
        sendJson(ctx, 200, { issuer, ...config, clients: config.clients });
        return;
      default:
        sendJson(ctx, 404, { error: 'not_found', error_description: `no control route ${route}` });
    }
  } catch (err) {
    sendJson(ctx, err.status || 500, { error: err.error || (err.status ? 'invalid_request' : 'server_error'), error_description: err.message });
  }
});

// Validate the configured clients now, so a bad config fails at start and not at the first request.
for (const c of clients) {
  try {
    if (!(await provider.Client.find(c.client_id))) throw new Error('not found');
  } catch (err) {
    fail(`client ${JSON.stringify(c.client_id)} is invalid: ${err.error_description || err.message}`);
  }
}

handler = provider.callback();

// ---------------------------------------------------------------------------
// lifecycle
// ---------------------------------------------------------------------------

let stopping = false;
function shutdown(reason) {
  if (stopping) return;
  stopping = true;
  process.stderr.write(`oidc peer: stopping (${reason})\n`);
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
if (process.env.OIDC_PEER_IGNORE_STDIN !== '1') {
  process.stdin.on('end', () => shutdown('stdin closed'));
  process.stdin.on('close', () => shutdown('stdin closed'));
  process.stdin.on('error', () => shutdown('stdin error'));
  process.stdin.resume();
}

process.stdout.write(`${JSON.stringify({ ready: true, issuer, port })}\n`);
