// Test doubles of four Azure services for the Rust integration tests, in one process:
//   - Azure Key Vault (secrets, data plane), HTTPS, with the real 401 challenge flow;
//   - the App Service / Functions managed identity endpoint (protocol 2019-08-01), plain HTTP;
//   - the Entra ID (v2.0) token endpoint, client credentials, HTTPS;
//   - the Application Insights ingestion endpoint (`POST /v2/track`, "Breeze"), HTTPS, with
//     local authentication on or off (then only Entra tokens for https://monitor.azure.com/).
// Node built-ins only; the TLS material comes from the openssl command-line tool.
// See README.md in this folder ("Azure doubles").
//
// stdout carries exactly one line, the ready line; everything else goes to stderr.

import * as http from 'node:http';
import * as https from 'node:https';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { execFileSync } from 'node:child_process';

const log = (...args) => process.stderr.write(`azure peer: ${args.join(' ')}\n`);
console.log = (...args) => console.error(...args); // keep stdout for the ready line

function fail(message) {
  process.stderr.write(`azure peer: ${message}\n`);
  process.exit(2);
}

// ---------------------------------------------------------------------------
// configuration
// ---------------------------------------------------------------------------

let raw = {};
if (process.env.AZURE_PEER_CONFIG) {
  try {
    raw = JSON.parse(process.env.AZURE_PEER_CONFIG);
  } catch (err) {
    fail(`AZURE_PEER_CONFIG is not valid JSON: ${err.message}`);
  }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) fail('AZURE_PEER_CONFIG must be a JSON object');
}

const KNOWN_KEYS = new Set([
  'vault_host', 'login_host', 'extra_hostnames', 'tenant_id', 'challenge_authority', 'secrets',
  'identity_header', 'system_assigned', 'user_assigned_client_ids', 'user_assigned', 'token_ttl_seconds',
  'entra_clients', 'tenants', 'accept_any_assertion', 'ports', 'tls_dir', 'ingestion', 'multitenant_apps',
  'admins', 'instances', 'service_principal_delay_ms',
]);
for (const k of Object.keys(raw)) if (!KNOWN_KEYS.has(k)) fail(`unknown config field ${JSON.stringify(k)}`);

const str = (v, dflt, name) => {
  if (v === undefined || v === null) return dflt;
  if (typeof v !== 'string' || !v) fail(`${name} must be a non-empty string`);
  return v;
};
const hostnameRe = /^(?:\*\.)?[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*$/i;
const SECRET_NAME_RE = /^[0-9a-zA-Z-]{1,127}$/; // Key Vault object names: alphanumerics and dashes

const DEFAULT_TENANT = '7d5c3b1a-0c4e-4f6a-9b2d-1e8f00d1c0de';
const config = {
  vault_host: str(raw.vault_host, 'dctest.vault.azure.net', 'vault_host').toLowerCase(),
  login_host: str(raw.login_host, 'login.microsoftonline.com', 'login_host').toLowerCase(),
  extra_hostnames: Array.isArray(raw.extra_hostnames) ? raw.extra_hostnames.map(String) : [],
  tenant_id: str(raw.tenant_id, DEFAULT_TENANT, 'tenant_id'),
  challenge_authority: str(raw.challenge_authority, 'https://login.microsoftonline.com', 'challenge_authority').replace(/\/+$/, ''),
  identity_header: str(raw.identity_header, 'dctest-identity-header', 'identity_header'),
  token_ttl_seconds: raw.token_ttl_seconds === undefined ? 3600 : raw.token_ttl_seconds,
  accept_any_assertion: raw.accept_any_assertion === true,
  // Entra creates the app's service principal in a customer tenant on consent, and it
  // replicates for a while: until then that tenant's token endpoint answers AADSTS7000229
  // ("Troubleshoot consent": a client-credential request right after consent can fail).
  service_principal_delay_ms: Number.isInteger(raw.service_principal_delay_ms) ? raw.service_principal_delay_ms : 0,
  tenants: Array.isArray(raw.tenants) ? raw.tenants.map(String) : [],
  ports: raw.ports && typeof raw.ports === 'object' ? raw.ports : {},
  tls_dir: raw.tls_dir === undefined ? undefined : str(raw.tls_dir, undefined, 'tls_dir'),
  // Application Insights: the resource's instrumentation key, and whether local (key-only)
  // authentication is disabled, as `DisableLocalAuth: true` does.
  ingestion: {
    instrumentation_key: str(raw.ingestion?.instrumentation_key, '5b0f8a43-8d0e-4d59-9f3e-6c1f1e2a9b77', 'ingestion.instrumentation_key').toLowerCase(),
    disable_local_auth: raw.ingestion?.disable_local_auth === true,
  },
};
if (!Number.isInteger(config.token_ttl_seconds) || config.token_ttl_seconds < 1) fail('token_ttl_seconds must be a positive integer');
for (const h of [config.vault_host, config.login_host, ...config.extra_hostnames]) {
  if (!hostnameRe.test(h)) fail(`not a host name: ${JSON.stringify(h)}`);
}
if (!config.vault_host.endsWith('.vault.azure.net')) {
  log(`warning: vault_host ${config.vault_host} does not end with .vault.azure.net; the Rust SDK's challenge-resource check will reject it`);
}
for (const k of ['keyvault', 'identity', 'entra']) {
  const p = config.ports[k];
  if (p !== undefined && (!Number.isInteger(p) || p < 0 || p > 65535)) fail(`ports.${k} must be a port number`);
}

// Managed identities. The system-assigned one answers when the request names no identity.
const guidFrom = (seed) => {
  const h = crypto.createHash('sha256').update(seed).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-8${h.slice(17, 20)}-${h.slice(20, 32)}`;
};
let systemAssigned = null;
if (raw.system_assigned !== false) {
  const sa = raw.system_assigned && typeof raw.system_assigned === 'object' ? raw.system_assigned : {};
  systemAssigned = {
    client_id: str(sa.client_id, guidFrom('system-assigned-client'), 'system_assigned.client_id'),
    object_id: str(sa.object_id, guidFrom('system-assigned-object'), 'system_assigned.object_id'),
  };
}
const userAssigned = [];
for (const id of Array.isArray(raw.user_assigned_client_ids) ? raw.user_assigned_client_ids : []) {
  if (typeof id !== 'string' || !id) fail('user_assigned_client_ids must be strings');
  userAssigned.push({ client_id: id, object_id: guidFrom(`ua-object-${id}`), resource_id: `/subscriptions/${guidFrom('sub')}/resourcegroups/dctest/providers/Microsoft.ManagedIdentity/userAssignedIdentities/ua-${id.slice(0, 8)}` });
}
for (const [i, ua] of (Array.isArray(raw.user_assigned) ? raw.user_assigned : []).entries()) {
  if (!ua || typeof ua.client_id !== 'string') fail(`user_assigned[${i}].client_id is required`);
  userAssigned.push({
    client_id: ua.client_id,
    object_id: str(ua.object_id, guidFrom(`ua-object-${ua.client_id}`), `user_assigned[${i}].object_id`),
    resource_id: str(ua.resource_id, `/subscriptions/${guidFrom('sub')}/resourcegroups/dctest/providers/Microsoft.ManagedIdentity/userAssignedIdentities/ua-${i}`, `user_assigned[${i}].resource_id`),
  });
}

// Entra applications (client credentials).
const entraClients = (Array.isArray(raw.entra_clients) && raw.entra_clients.length
  ? raw.entra_clients
  : [{ tenant: config.tenant_id, client_id: 'dctest-client', client_secret: 'dctest-client-secret' }]
).map((c, i) => {
  if (!c || typeof c !== 'object') fail(`entra_clients[${i}] must be an object`);
  if (typeof c.client_id !== 'string' || !c.client_id) fail(`entra_clients[${i}].client_id is required`);
  return {
    tenant: str(c.tenant, config.tenant_id, `entra_clients[${i}].tenant`),
    client_id: c.client_id,
    client_secret: c.client_secret === undefined ? undefined : str(c.client_secret, undefined, `entra_clients[${i}].client_secret`),
    client_assertion: c.client_assertion === undefined ? undefined : str(c.client_assertion, undefined, `entra_clients[${i}].client_assertion`),
    accept_any_assertion: c.accept_any_assertion === true,
    object_id: guidFrom(`sp-${c.tenant}-${c.client_id}`),
  };
});
const knownTenants = new Set([config.tenant_id, ...config.tenants, ...entraClients.map((c) => c.tenant)].map((t) => t.toLowerCase()));

// Multi-tenant app registrations (in the home tenant, `config.tenant_id`). Each has the
// redirect URIs admin consent may return to, and optionally a secret and federated identity
// credentials ({issuer, subject, audience}: a managed identity's token as the assertion).
// A customer tenant gets the app's service principal (an `entraClients` entry) when its
// administrator consents at /{tenant}/v2.0/adminconsent; until then the token endpoint
// answers AADSTS7000229 for that tenant.
const multitenantApps = (Array.isArray(raw.multitenant_apps) ? raw.multitenant_apps : []).map((a, i) => {
  if (!a || typeof a.client_id !== 'string') fail(`multitenant_apps[${i}].client_id is required`);
  return {
    client_id: a.client_id.toLowerCase(),
    redirect_uris: Array.isArray(a.redirect_uris) ? a.redirect_uris.map(String) : [],
    client_secret: a.client_secret === undefined ? undefined : String(a.client_secret),
    federated: (Array.isArray(a.federated_credentials) ? a.federated_credentials : []).map((f) => ({
      issuer: String(f.issuer), subject: String(f.subject), audience: String(f.audience || 'api://AzureADTokenExchange'),
    })),
    // Certificates (PEM) registered on the app, for private_key_jwt client assertions.
    certificates: (Array.isArray(a.certificates) ? a.certificates : []).map((pem) => new crypto.X509Certificate(String(pem))),
  };
});
for (const app of multitenantApps) {
  // The home tenant has the app's service principal from the start.
  if (!entraClients.some((c) => c.client_id === app.client_id && c.tenant.toLowerCase() === config.tenant_id.toLowerCase())) {
    entraClients.push({ tenant: config.tenant_id, client_id: app.client_id, client_secret: app.client_secret, federated: app.federated, certificates: app.certificates, object_id: guidFrom(`sp-${config.tenant_id}-${app.client_id}`) });
  }
}
// What each customer tenant's administrator answers at the consent prompt: 'approve'
// (default) or 'decline'; set through POST /__control/consent_decisions.
const consentDecisions = new Map();

// ---------------------------------------------------------------------------
// shared state: secrets, issued tokens, outages, counters
// ---------------------------------------------------------------------------

const nowSecs = () => Math.floor(Date.now() / 1000);
const newVersion = () => crypto.randomBytes(16).toString('hex'); // 32 hex, like Key Vault

const secrets = new Map(); // name -> { versions: [{ version, value, enabled, created, updated, content_type, tags }] }
function setSecret(name, spec) {
  const s = typeof spec === 'string' ? { value: spec } : spec;
  if (!s || typeof s !== 'object' || typeof s.value !== 'string') {
    throw httpError(400, `secret ${JSON.stringify(name)}: "value" must be a string`);
  }
  if (!SECRET_NAME_RE.test(name)) {
    throw httpError(400, `secret name ${JSON.stringify(name)} is invalid: Key Vault allows 1-127 alphanumerics and dashes`);
  }
  const t = nowSecs();
  const v = {
    version: newVersion(),
    value: s.value,
    enabled: s.enabled === undefined ? true : Boolean(s.enabled),
    created: t,
    updated: t,
    content_type: typeof s.content_type === 'string' ? s.content_type : undefined,
    tags: s.tags && typeof s.tags === 'object' ? Object.fromEntries(Object.entries(s.tags).map(([k, x]) => [k, String(x)])) : {},
  };
  const entry = secrets.get(name) || { versions: [] };
  entry.versions.push(v);
  secrets.set(name, entry);
  return v;
}

const tokens = new Map(); // access token -> { resource, expires_at, issuer, client_id, tenant, issued_at }
const normResource = (r) => String(r).replace(/\/+$/, '').toLowerCase();
const VAULT_RESOURCE = 'https://vault.azure.net';

function freshStats() {
  return {
    keyvault: {
      requests: 0, // every request that reached the vault listener (outages included)
      challenges: 0, // 401 answers (each carries WWW-Authenticate)
      unauthenticated: 0, // of which: no Authorization header
      rejected_tokens: 0, // of which: a bearer token that is unknown, expired or for another resource
      secret_gets: {}, // name -> GETs that reached the vault with a valid token (any outcome)
      responses: {}, // status -> count
      outage_responses: 0,
    },
    identity: {
      token_requests: 0,
      tokens_issued: 0,
      by_resource: {},
      by_client_id: {},
      errors: {},
      outage_responses: 0,
    },
    entra: {
      token_requests: 0,
      tokens_issued: 0,
      requests_by_client: {},
      tokens_by_client: {},
      errors: {}, // "invalid_client/AADSTS7000215" -> count
      discovery_requests: 0,
      outage_responses: 0,
    },
  };
}
let stats = freshStats();
const bump = (map, key, n = 1) => { map[key] = (map[key] || 0) + n; };

let outages = {}; // service -> { mode, remaining, retry_after }

function httpError(status, message) {
  return Object.assign(new Error(message), { status });
}

// Initial secrets (validated before anything is created on disk).
try {
  const initial = raw.secrets && typeof raw.secrets === 'object' && !Array.isArray(raw.secrets) ? raw.secrets : {};
  for (const [name, spec] of Object.entries(initial)) setSecret(name, spec);
} catch (err) {
  fail(`config: ${err.message}`);
}

// ---------------------------------------------------------------------------
// signing key for JWT-shaped access tokens (RS256, like Entra)
// ---------------------------------------------------------------------------

const { privateKey, publicKey } = await new Promise((resolve, reject) => {
  crypto.generateKeyPair('rsa', { modulusLength: 2048 }, (err, pub, priv) => (err ? reject(err) : resolve({ publicKey: pub, privateKey: priv })));
});
const KID = crypto.randomBytes(20).toString('base64url');
const jwk = { kty: 'RSA', use: 'sig', kid: KID, x5t: KID, ...publicKey.export({ format: 'jwk' }), alg: 'RS256' };

function signJwt(claims) {
  const header = { typ: 'JWT', alg: 'RS256', x5t: KID, kid: KID };
  const enc = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const input = `${enc(header)}.${enc(claims)}`;
  const sig = crypto.sign('sha256', Buffer.from(input), privateKey).toString('base64url');
  return `${input}.${sig}`;
}

function issueToken({ resource, issuer, client_id, object_id, tenant, appidacr, extra }) {
  const iat = nowSecs();
  const exp = iat + config.token_ttl_seconds;
  // Tokens for the token-exchange audience are v2 tokens (issuer login.microsoftonline.com/{tid}/v2.0),
  // which is what a federated identity credential's `issuer` names.
  const v2 = normResource(resource) === 'api://azureadtokenexchange';
  const access_token = signJwt({
    aud: resource,
    iss: v2 ? `https://login.microsoftonline.com/${tenant}/v2.0` : `https://sts.windows.net/${tenant}/`,
    iat,
    nbf: iat,
    exp,
    aio: crypto.randomBytes(24).toString('base64url'),
    appid: client_id,
    appidacr,
    idp: `https://sts.windows.net/${tenant}/`,
    oid: object_id,
    rh: `0.${crypto.randomBytes(12).toString('base64url')}.`,
    sub: object_id,
    tid: tenant,
    uti: crypto.randomBytes(16).toString('base64url'),
    ver: v2 ? '2.0' : '1.0',
    ...extra,
  });
  tokens.set(access_token, { resource: normResource(resource), expires_at: exp, issued_at: iat, issuer, client_id, tenant });
  return { access_token, exp };
}

// ---------------------------------------------------------------------------
// TLS material: a throwaway CA and one server certificate, made with openssl
// ---------------------------------------------------------------------------

function makeTls() {
  try {
    execFileSync('openssl', ['version'], { stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (err) {
    fail(`the openssl command-line tool is required to make the test CA and was not usable: ${err.code === 'ENOENT' ? 'openssl not found on PATH' : err.message}`);
  }
  let dir;
  let owned = false;
  if (config.tls_dir) {
    dir = path.resolve(config.tls_dir);
    fs.mkdirSync(dir, { recursive: true });
  } else {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'azure-peer-'));
    owned = true;
  }
  const names = [...new Set([config.vault_host, config.login_host, 'localhost', ...config.extra_hostnames])];
  const san = [...names.map((n) => `DNS:${n}`), 'IP:127.0.0.1'].join(',');
  const p = (f) => path.join(dir, f);
  fs.writeFileSync(p('server.ext'), [
    'basicConstraints = critical, CA:FALSE',
    'keyUsage = critical, digitalSignature, keyEncipherment',
    'extendedKeyUsage = serverAuth',
    'subjectKeyIdentifier = hash',
    'authorityKeyIdentifier = keyid, issuer',
    `subjectAltName = ${san}`,
    '',
  ].join('\n'));
  const run = (args) => {
    try {
      execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (err) {
      fail(`openssl ${args[0]} failed: ${err.stderr ? err.stderr.toString().trim() : err.message}`);
    }
  };
  const serial = () => `0x${crypto.randomBytes(12).toString('hex')}`;
  run(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
    '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '7', '-sha256', '-set_serial', serial(),
    '-subj', `/CN=Dynamics Companion test CA ${crypto.randomBytes(4).toString('hex')}`,
    '-addext', 'basicConstraints=critical,CA:TRUE,pathlen:0',
    '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
    '-addext', 'subjectKeyIdentifier=hash']);
  run(['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
    '-keyout', 'server.key', '-out', 'server.csr', '-subj', `/CN=${config.vault_host}`]);
  run(['x509', '-req', '-in', 'server.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-set_serial', serial(),
    '-days', '7', '-sha256', '-extfile', 'server.ext', '-out', 'server.pem']);
  fs.rmSync(p('ca.key'), { force: true }); // nothing else will ever be signed by this CA
  fs.rmSync(p('server.csr'), { force: true });
  return {
    dir,
    owned,
    caPath: p('ca.pem'),
    ca: fs.readFileSync(p('ca.pem')),
    cert: fs.readFileSync(p('server.pem')),
    key: fs.readFileSync(p('server.key')),
    names,
  };
}
const tls = makeTls();

// ---------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------

const MAX_BODY = 1 << 20;
function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > MAX_BODY) {
        reject(httpError(413, 'body too large'));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function send(res, status, body, headers = {}) {
  const text = body === undefined ? '' : typeof body === 'string' ? body : JSON.stringify(body);
  const h = { ...headers };
  if (body !== undefined && !Object.keys(h).some((k) => k.toLowerCase() === 'content-type')) {
    h['content-type'] = 'application/json; charset=utf-8';
  }
  h['content-length'] = Buffer.byteLength(text);
  res.writeHead(status, h);
  res.end(text);
}

// An outage answers (or drops) instead of the service. Returns true when it handled the request.
function applyOutage(service, req, res, answer503) {
  const o = outages[service];
  if (!o) return false;
  if (o.remaining !== null) {
    if (o.remaining <= 0) return false;
    o.remaining -= 1;
  }
  stats[service].outage_responses += 1;
  if (o.mode === 'drop') {
    req.socket.destroy();
    return true;
  }
  const headers = o.retry_after !== undefined ? { 'retry-after': String(o.retry_after) } : {};
  answer503(headers);
  return true;
}

const guid = () => crypto.randomUUID();

// ---------------------------------------------------------------------------
// Key Vault double (HTTPS)
// ---------------------------------------------------------------------------

function kvHeaders(req) {
  const h = {
    'cache-control': 'no-cache',
    pragma: 'no-cache',
    expires: '-1',
    'x-ms-keyvault-region': 'westeurope',
    'x-ms-request-id': guid(),
    'x-ms-keyvault-service-version': '1.9.2412.1',
    'x-ms-keyvault-network-info': `conn_type=Ipv4;addr=${req.socket.remoteAddress};act_addr_fam=InterNetwork;`,
    'strict-transport-security': 'max-age=31536000;includeSubDomains',
    'x-content-type-options': 'nosniff',
  };
  const cid = req.headers['x-ms-client-request-id'];
  if (cid) h['x-ms-client-request-id'] = cid;
  return h;
}

function kvSend(req, res, status, body, extra = {}) {
  bump(stats.keyvault.responses, String(status));
  send(res, status, body, { ...kvHeaders(req), ...extra });
}

function kvChallenge(req, res, message) {
  stats.keyvault.challenges += 1;
  kvSend(req, res, 401, { error: { code: 'Unauthorized', message } }, {
    'www-authenticate': `Bearer authorization="${config.challenge_authority}/${config.tenant_id}", resource="${VAULT_RESOURCE}"`,
  });
}

const kvError = (req, res, status, code, message, inner) => kvSend(req, res, status, {
  error: inner ? { code, message, innererror: { code: inner } } : { code, message },
});

function secretBody(req, name, v) {
  const host = req.headers.host || `${config.vault_host}:${kvPort}`;
  const body = {
    value: v.value,
    id: `https://${host}/secrets/${name}/${v.version}`,
  };
  if (v.content_type !== undefined) body.contentType = v.content_type;
  body.attributes = {
    enabled: v.enabled,
    created: v.created,
    updated: v.updated,
    recoveryLevel: 'Recoverable+Purgeable',
    recoverableDays: 90,
  };
  body.tags = v.tags;
  return body;
}

async function keyVault(req, res) {
  stats.keyvault.requests += 1;
  if (applyOutage('keyvault', req, res, (h) => kvSend(req, res, 503, {
    error: { code: 'ServiceUnavailable', message: 'The service is currently unavailable. Please retry the request later.' },
  }, h))) return;
  await readBody(req).catch(() => Buffer.alloc(0));

  // Authentication comes before routing, as on the real service.
  const auth = req.headers.authorization;
  if (!auth) {
    stats.keyvault.unauthenticated += 1;
    kvChallenge(req, res, 'AKV10000: Request is missing a Bearer or PoP token.');
    return;
  }
  const m = /^Bearer\s+(\S+)\s*$/i.exec(auth);
  const info = m ? tokens.get(m[1]) : undefined;
  let problem;
  if (!m) problem = 'AKV10000: Request is missing a Bearer or PoP token.';
  else if (!info) problem = 'AKV10046: Unable to resolve the key used for signature validation.';
  else if (info.expires_at <= nowSecs()) problem = "[TokenExpired] Error validating token: 'S2S12086'.";
  else if (info.resource !== VAULT_RESOURCE) problem = `AKV10022: Invalid audience. Expected ${VAULT_RESOURCE}, found: ${info.resource}.`;
  if (problem) {
    stats.keyvault.rejected_tokens += 1;
    kvChallenge(req, res, problem);
    return;
  }

  const url = new URL(req.url, 'https://vault.invalid');
  const sm = /^\/secrets\/([^/]+)(?:\/([^/]*))?\/?$/.exec(url.pathname);
  if (!sm || req.method !== 'GET') {
    kvError(req, res, req.method === 'GET' || !sm ? 404 : 405, 'NotFound',
      `The test double implements only GET /secrets/{name}[/{version}] (got ${req.method} ${url.pathname}).`);
    return;
  }
  if (!url.searchParams.get('api-version')) {
    kvError(req, res, 400, 'BadParameter', "The 'api-version' query parameter is required.");
    return;
  }
  const name = decodeURIComponent(sm[1]);
  const version = sm[2] ? decodeURIComponent(sm[2]) : '';
  if (!SECRET_NAME_RE.test(name)) {
    kvError(req, res, 400, 'BadParameter', `The request URI contains an invalid name: ${name}`);
    return;
  }
  bump(stats.keyvault.secret_gets, name);
  const entry = secrets.get(name);
  const nameId = version ? `${name}/${version}` : name;
  const v = entry && (version ? entry.versions.find((x) => x.version === version) : entry.versions[entry.versions.length - 1]);
  if (!v) {
    kvError(req, res, 404, 'SecretNotFound', `A secret with (name/id) ${nameId} was not found in this key vault. If you recently deleted this secret you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182`);
    return;
  }
  if (!v.enabled) {
    kvError(req, res, 403, 'Forbidden', 'Operation get is not allowed on a disabled secret.', 'SecretDisabled');
    return;
  }
  kvSend(req, res, 200, secretBody(req, name, v));
}

// ---------------------------------------------------------------------------
// Managed identity double (App Service protocol 2019-08-01, plain HTTP)
// ---------------------------------------------------------------------------

function miError(res, status, message, kind) {
  bump(stats.identity.errors, kind);
  const correlationId = guid();
  send(res, status, { statusCode: status, message, correlationId }, { 'x-correlation-id': correlationId, server: 'Kestrel' });
}

async function managedIdentity(req, res, url) {
  stats.identity.token_requests += 1;
  if (applyOutage('identity', req, res, (h) => send(res, 503, { statusCode: 503, message: 'Service Unavailable', correlationId: guid() }, { ...h, server: 'Kestrel' }))) return;
  await readBody(req).catch(() => Buffer.alloc(0));
  if (req.method !== 'GET') return miError(res, 405, `The HTTP method ${req.method} is not allowed; use GET.`, 'method_not_allowed');
  const q = url.searchParams;
  const header = req.headers['x-identity-header'];
  if (header !== config.identity_header) {
    return miError(res, 400, header === undefined
      ? 'The X-IDENTITY-HEADER header is required.'
      : 'The X-IDENTITY-HEADER header value is invalid.', header === undefined ? 'missing_identity_header' : 'wrong_identity_header');
  }
  const apiVersion = q.get('api-version');
  if (apiVersion !== '2019-08-01') {
    return miError(res, 400, apiVersion ? `The api-version ${apiVersion} is not supported by this endpoint; use 2019-08-01.` : 'The api-version query parameter is required.', 'bad_api_version');
  }
  const resource = q.get('resource');
  if (!resource) return miError(res, 400, 'The resource query parameter is required.', 'missing_resource');
  if (/\/\.default$/.test(resource)) {
    // A v2 scope passed as a v1 resource: Entra knows no such resource principal.
    return miError(res, 400, `AADSTS500011: The resource principal named ${resource} was not found in the tenant named ${config.tenant_id}.`, 'invalid_resource');
  }
  const selectors = [['client_id', 'client_id'], ['object_id', 'object_id'], ['principal_id', 'object_id'], ['mi_res_id', 'resource_id'], ['msi_res_id', 'resource_id']]
    .filter(([p]) => q.has(p));
  if (selectors.length > 1) return miError(res, 400, 'Only one of client_id, object_id/principal_id or mi_res_id may be given.', 'ambiguous_identity');
  let identity;
  if (selectors.length === 0) {
    identity = systemAssigned;
  } else {
    const [param, field] = selectors[0];
    const want = q.get(param);
    identity = userAssigned.find((u) => (field === 'resource_id' ? u[field].toLowerCase() === want.toLowerCase() : u[field] === want));
  }
  if (!identity) return miError(res, 400, 'Unable to load the proper Managed Identity.', 'identity_not_assigned');

  const { access_token, exp } = issueToken({
    resource,
    issuer: 'managed_identity',
    client_id: identity.client_id,
    object_id: identity.object_id,
    tenant: config.tenant_id,
    appidacr: '2',
    extra: identity.resource_id ? { xms_mirid: identity.resource_id } : {},
  });
  stats.identity.tokens_issued += 1;
  bump(stats.identity.by_resource, normResource(resource));
  bump(stats.identity.by_client_id, identity.client_id);
  send(res, 200, {
    access_token,
    expires_on: String(exp), // a STRING of unix seconds, as App Service sends it
    resource,
    token_type: 'Bearer',
    client_id: identity.client_id,
  }, { server: 'Kestrel' });
}

// ---------------------------------------------------------------------------
// Entra ID token endpoint double (HTTPS)
// ---------------------------------------------------------------------------

const entraTimestamp = () => new Date().toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');

function entraError(req, res, status, error, code, message, extraHeaders = {}) {
  const trace = guid();
  const correlation = req.headers['client-request-id'] || guid();
  const ts = entraTimestamp();
  bump(stats.entra.errors, `${error}/AADSTS${code}`);
  send(res, status, {
    error,
    error_description: `AADSTS${code}: ${message}\r\nTrace ID: ${trace}\r\nCorrelation ID: ${correlation}\r\nTimestamp: ${ts}`,
    error_codes: [code],
    timestamp: ts,
    trace_id: trace,
    correlation_id: correlation,
    error_uri: `https://${config.login_host}/error?code=${code}`,
  }, { ...entraHeaders(), ...extraHeaders });
}

const entraHeaders = () => ({ 'cache-control': 'no-store, no-cache', pragma: 'no-cache', expires: '-1', 'x-ms-request-id': guid(), 'strict-transport-security': 'max-age=31536000; includeSubDomains', 'x-content-type-options': 'nosniff' });

const JWT_BEARER = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';

async function entra(req, res) {
  const url = new URL(req.url, 'https://login.invalid');
  const origin = `https://${req.headers.host || `${config.login_host}:${entraPort}`}`;
  const tm = /^\/([^/]+)\/oauth2\/v2\.0\/token$/.exec(url.pathname);
  const dm = /^\/([^/]+)\/v2\.0\/\.well-known\/openid-configuration$/.exec(url.pathname);
  const km = /^\/([^/]+)\/discovery\/v2\.0\/keys$/.exec(url.pathname);
  if (dm || km) {
    stats.entra.discovery_requests += 1;
    await readBody(req).catch(() => Buffer.alloc(0));
    const tenant = decodeURIComponent((dm || km)[1]);
    if (!knownTenants.has(tenant.toLowerCase()) && !['common', 'organizations'].includes(tenant)) {
      // The real discovery endpoint answers an unknown tenant with 400 AADSTS90002 too.
      return entraError(req, res, 400, 'invalid_tenant', 90002, `Tenant '${tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant.`);
    }
    if (km) return send(res, 200, { keys: [jwk] }, entraHeaders());
    return send(res, 200, {
      token_endpoint: `${origin}/${tenant}/oauth2/v2.0/token`,
      token_endpoint_auth_methods_supported: ['client_secret_post', 'private_key_jwt', 'client_secret_basic'],
      jwks_uri: `${origin}/${tenant}/discovery/v2.0/keys`,
      response_modes_supported: ['query', 'fragment', 'form_post'],
      subject_types_supported: ['pairwise'],
      id_token_signing_alg_values_supported: ['RS256'],
      response_types_supported: ['code', 'id_token', 'code id_token', 'id_token token'],
      scopes_supported: ['openid', 'profile', 'email', 'offline_access'],
      issuer: `https://login.microsoftonline.com/${tenant}/v2.0`,
      request_uri_parameter_supported: false,
      authorization_endpoint: `${origin}/${tenant}/oauth2/v2.0/authorize`,
      tenant_region_scope: 'EU',
      cloud_instance_name: 'microsoftonline.com',
    }, entraHeaders());
  }
  const am = /^\/([^/]+)\/v2\.0\/adminconsent$/.exec(url.pathname);
  if (am) return adminConsent(req, res, url, decodeURIComponent(am[1]));
  const zm = /^\/([^/]+)\/oauth2\/v2\.0\/authorize$/.exec(url.pathname);
  if (zm) return authorize(req, res, url, decodeURIComponent(zm[1]));
  if (!tm) {
    await readBody(req).catch(() => Buffer.alloc(0));
    return send(res, 404, { error: 'not_found', error_description: `the Entra double serves /{tenant}/oauth2/v2.0/token, /{tenant}/v2.0/adminconsent and discovery only (got ${url.pathname})` });
  }

  stats.entra.token_requests += 1;
  if (applyOutage('entra', req, res, (h) => entraError(req, res, 503, 'temporarily_unavailable', 90033, 'A transient error has occurred. Please try again.', h))) return;
  const body = await readBody(req);
  const tenant = decodeURIComponent(tm[1]);
  if (req.method !== 'POST') {
    return entraError(req, res, 400, 'invalid_request', 900561, `The endpoint only accepts POST, OPTIONS requests. Received a ${req.method} request.`);
  }
  if (!knownTenants.has(tenant.toLowerCase())) {
    return entraError(req, res, 400, 'invalid_request', 90002, `Tenant '${tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant.`);
  }
  const ctype = String(req.headers['content-type'] || '').split(';')[0].trim().toLowerCase();
  if (ctype !== 'application/x-www-form-urlencoded') {
    return entraError(req, res, 400, 'invalid_request', 900144, "The request body must contain the following parameter: 'grant_type'.");
  }
  const form = new URLSearchParams(body.toString('utf8'));
  // client_secret_basic is allowed too: Authorization: Basic base64(urlencode(id):urlencode(secret))
  let basicId;
  let basicSecret;
  const basic = /^Basic\s+(\S+)$/i.exec(req.headers.authorization || '');
  if (basic) {
    const decoded = Buffer.from(basic[1], 'base64').toString('utf8');
    const i = decoded.indexOf(':');
    if (i > 0) {
      basicId = decodeURIComponent(decoded.slice(0, i));
      basicSecret = decodeURIComponent(decoded.slice(i + 1));
    }
  }
  const grantType = form.get('grant_type');
  if (!grantType) return entraError(req, res, 400, 'invalid_request', 900144, "The request body must contain the following parameter: 'grant_type'.");
  if (!['client_credentials', 'authorization_code', 'refresh_token'].includes(grantType)) {
    return entraError(req, res, 400, 'unsupported_grant_type', 70003, `The app requested an unsupported grant type '${grantType}'.`);
  }
  const clientId = form.get('client_id') || basicId;
  if (!clientId) return entraError(req, res, 400, 'invalid_request', 900144, "The request body must contain the following parameter: 'client_id'.");
  bump(stats.entra.requests_by_client, clientId);
  const client = entraClients.find((c) => c.client_id === clientId && c.tenant.toLowerCase() === tenant.toLowerCase() && !(c.ready_at > Date.now()));
  if (!client && multitenantApps.some((a) => a.client_id === clientId)) {
    return entraError(req, res, 401, 'invalid_client', 7000229, `The client application ${clientId} is missing service principal in the tenant ${tenant}. See instructions here: https://go.microsoft.com/fwlink/?linkid=2225119`);
  }
  if (!client) {
    return entraError(req, res, 400, 'unauthorized_client', 700016, `Application with identifier '${clientId}' was not found in the directory '${tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.`);
  }

  // Client authentication: a secret (post or basic) or a JWT-bearer client assertion.
  const secret = form.get('client_secret') ?? basicSecret;
  const assertion = form.get('client_assertion');
  const assertionType = form.get('client_assertion_type');
  let appidacr;
  if (secret !== null && secret !== undefined) {
    if (client.client_secret === undefined || !timingSafeEqualStr(secret, client.client_secret)) {
      return entraError(req, res, 401, 'invalid_client', 7000215, `Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '${clientId}'.`);
    }
    appidacr = '1';
  } else if (assertion !== null || assertionType !== null) {
    if (assertionType !== JWT_BEARER) {
      return entraError(req, res, 400, 'invalid_request', 700021, `Client assertion application identifier doesn't match 'client_id' parameter, or the client_assertion_type '${assertionType}' is not supported. Use '${JWT_BEARER}'.`);
    }
    const assertionHeader = (() => { try { return JSON.parse(Buffer.from(String(assertion || '').split('.')[0], 'base64url').toString('utf8')); } catch { return {}; } })();
    if (client.certificates && client.certificates.length && assertionHeader.x5t) {
      // private_key_jwt with one of the app's certificates (RFC 7523, Entra's certificate credentials).
      const problem = certificateProblem(assertion, assertionHeader, client, `https://${req.headers.host}${new URL(req.url, 'https://x').pathname}`);
      if (problem) return entraError(req, res, 401, 'invalid_client', problem.code, problem.message);
    } else if (client.federated && client.federated.length) {
      // A federated identity credential: the assertion is a token this double issued (a
      // managed identity's), checked like Entra checks it.
      const problem = federatedProblem(assertion, client.federated);
      if (problem) return entraError(req, res, 401, 'invalid_client', problem.code, problem.message);
    } else if (!(assertion && (
      (client.client_assertion !== undefined && timingSafeEqualStr(assertion, client.client_assertion))
      || (client.client_assertion === undefined && (client.accept_any_assertion || config.accept_any_assertion))))) {
      return entraError(req, res, 401, 'invalid_client', 700027, 'Client assertion failed signature validation.');
    }
    appidacr = '2';
  } else {
    return entraError(req, res, 401, 'invalid_client', 7000216, "'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' grant type.");
  }

  if (grantType !== 'client_credentials') return delegatedGrant(req, res, form, grantType, client, tenant);
  const scope = form.get('scope');
  if (!scope || !scope.trim()) {
    return entraError(req, res, 400, 'invalid_request', 900144, "The request body must contain the following parameter: 'scope'.");
  }
  const scopes = scope.trim().split(/\s+/);
  const resources = new Set(scopes.map((s) => (s.includes('/') ? normResource(s.slice(0, s.lastIndexOf('/'))) : s)));
  if (resources.size > 1) {
    return entraError(req, res, 400, 'invalid_scope', 28000, `Provided value for the input parameter scope is not valid because it contains more than one resource. Scope ${scope} is not valid.`);
  }
  if (scopes.length !== 1 || !scopes[0].endsWith('/.default')) {
    return entraError(req, res, 400, 'invalid_scope', 1002012, `The provided value for scope ${scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).`);
  }
  const resource = scopes[0].slice(0, -'/.default'.length);
  if (!/^[a-z][a-z0-9+.-]*:\/\/?[^\s]+$/i.test(resource) && !/^[0-9a-f-]{36}$/i.test(resource)) {
    return entraError(req, res, 400, 'invalid_scope', 70011, `The provided value for the input parameter 'scope' is not valid. The scope ${scope} is not valid.`);
  }

  const { access_token } = issueToken({
    resource,
    issuer: 'entra',
    client_id: client.client_id,
    object_id: client.object_id,
    tenant: client.tenant,
    appidacr,
  });
  stats.entra.tokens_issued += 1;
  bump(stats.entra.tokens_by_client, client.client_id);
  send(res, 200, {
    token_type: 'Bearer',
    expires_in: config.token_ttl_seconds - 1,
    ext_expires_in: config.token_ttl_seconds - 1,
    access_token,
  }, entraHeaders());
}

// ----- delegated sign-in (authorization code + PKCE, refresh tokens) ---------------
// One administrator per customer tenant signs in (config `admins`: {tenant: {upn, object_id}});
// the consent prompt is assumed granted once the app has a service principal there.
const admins = new Map(Object.entries(raw.admins && typeof raw.admins === 'object' ? raw.admins : {}).map(([t, a]) => [t.toLowerCase(), a]));
const adminOf = (tenant) => {
  const a = admins.get(tenant.toLowerCase()) || {};
  return { upn: String(a.upn || `admin@${tenant.slice(0, 8)}.example`), object_id: String(a.object_id || guidFrom(`admin-${tenant}`)) };
};
const codes = new Map(); // code -> { tenant, client_id, redirect_uri, scope, challenge, user, exp, used }
const refreshTokens = new Map(); // refresh token -> { tenant, client_id, user }

// A delegated scope list's resource: `https://org/user_impersonation offline_access` -> https://org
function delegatedResource(scope) {
  const resources = new Set(scope.split(/\s+/).filter((s) => s.includes('/')).map((s) => s.slice(0, s.lastIndexOf('/'))));
  return resources.size === 1 ? [...resources][0] : null;
}

async function authorize(req, res, url, tenant) {
  await readBody(req).catch(() => Buffer.alloc(0));
  const q = url.searchParams;
  const page = (code, message) => entraError(req, res, 400, 'invalid_request', code, message);
  if (!knownTenants.has(tenant.toLowerCase())) return page(90002, `Tenant '${tenant}' not found.`);
  const clientId = String(q.get('client_id') || '').toLowerCase();
  const app = multitenantApps.find((a) => a.client_id === clientId);
  if (!app) return page(700016, `Application with identifier '${q.get('client_id')}' was not found in the directory '${tenant}'.`);
  const redirect = q.get('redirect_uri');
  if (!redirect || !app.redirect_uris.includes(redirect)) return page(50011, `The redirect URI '${redirect}' specified in the request does not match the redirect URIs configured for the application '${clientId}'.`);
  const target = new URL(redirect);
  const fail = (error, description) => {
    target.searchParams.set('error', error);
    target.searchParams.set('error_description', description);
    if (q.has('state')) target.searchParams.set('state', q.get('state'));
    res.writeHead(302, { location: target.href, ...entraHeaders() });
    res.end();
  };
  if (q.get('response_type') !== 'code') return fail('unsupported_response_type', 'AADSTS700054: response_type must be code here.');
  const scope = String(q.get('scope') || '');
  if (!delegatedResource(scope)) return fail('invalid_scope', `AADSTS70011: The provided value for the input parameter 'scope' is not valid: ${scope}.`);
  if (q.get('code_challenge_method') !== 'S256' || !/^[A-Za-z0-9_-]{43}$/.test(q.get('code_challenge') || '')) return fail('invalid_request', 'AADSTS501491: Invalid size of Code_Challenge parameter (or method not S256).');
  if (!entraClients.some((c) => c.client_id === clientId && c.tenant.toLowerCase() === tenant.toLowerCase())) {
    return fail('invalid_client', `AADSTS650052: The app is trying to access a service that your organization '${tenant}' lacks a service principal for.`);
  }
  const code = crypto.randomBytes(32).toString('base64url');
  codes.set(code, { tenant, client_id: clientId, redirect_uri: redirect, scope, challenge: q.get('code_challenge'), user: adminOf(tenant), exp: nowSecs() + 600, used: false });
  stats.entra.authorizations = (stats.entra.authorizations || 0) + 1;
  target.searchParams.set('code', code);
  if (q.has('state')) target.searchParams.set('state', q.get('state'));
  target.searchParams.set('session_state', guid());
  res.writeHead(302, { location: target.href, ...entraHeaders() });
  res.end();
}

function delegatedGrant(req, res, form, grantType, client, tenant) {
  let grant;
  let scope = form.get('scope') || '';
  if (grantType === 'authorization_code') {
    const c = codes.get(form.get('code') || '');
    if (!c || c.used || c.exp <= nowSecs() || c.client_id !== client.client_id || c.tenant.toLowerCase() !== tenant.toLowerCase()) {
      if (c) c.used = true;
      return entraError(req, res, 400, 'invalid_grant', 70008, 'The provided authorization code or refresh token has expired due to inactivity, or was already redeemed.');
    }
    c.used = true;
    if (form.get('redirect_uri') !== c.redirect_uri) return entraError(req, res, 400, 'invalid_grant', 50148, 'The redirect_uri does not match the one used in the authorization request.');
    const verifier = form.get('code_verifier') || '';
    if (crypto.createHash('sha256').update(verifier).digest('base64url') !== c.challenge) {
      return entraError(req, res, 400, 'invalid_grant', 501481, 'The Code_Verifier does not match the code_challenge supplied in the authorization request.');
    }
    grant = { tenant: c.tenant, client_id: c.client_id, user: c.user };
    if (!scope) scope = c.scope;
  } else {
    grant = refreshTokens.get(form.get('refresh_token') || '');
    if (!grant || grant.client_id !== client.client_id || grant.tenant.toLowerCase() !== tenant.toLowerCase()) {
      return entraError(req, res, 400, 'invalid_grant', 9002313, 'Invalid request. Request is malformed or invalid: the refresh token is not valid.');
    }
  }
  const resource = delegatedResource(scope);
  if (!resource) return entraError(req, res, 400, 'invalid_scope', 70011, `The provided value for the input parameter 'scope' is not valid: ${scope}.`);
  const scp = scope.split(/\s+/).filter((s) => s.startsWith(`${resource}/`)).map((s) => s.slice(resource.length + 1)).join(' ');
  const { access_token } = issueToken({
    resource, issuer: 'entra', client_id: client.client_id, object_id: grant.user.object_id, tenant: grant.tenant, appidacr: '2',
    extra: { scp, upn: grant.user.upn, name: grant.user.upn },
  });
  const refresh_token = crypto.randomBytes(48).toString('base64url');
  refreshTokens.set(refresh_token, grant);
  stats.entra.delegated_tokens = (stats.entra.delegated_tokens || 0) + 1;
  send(res, 200, { token_type: 'Bearer', scope: scope.split(/\s+/).filter((s) => s !== 'offline_access').join(' '), expires_in: config.token_ttl_seconds - 1, ext_expires_in: config.token_ttl_seconds - 1, access_token, refresh_token }, entraHeaders());
}

// ----- the Global Discovery Service (instances the signed-in user reaches) ---------
// config `instances`: {tenant: [{ApiUrl, FriendlyName, UniqueName, IsUserSysAdmin?}]}
const DISCOVERY_RESOURCE = 'https://globaldisco.crm.dynamics.com';
const instances = new Map(Object.entries(raw.instances && typeof raw.instances === 'object' ? raw.instances : {}).map(([t, l]) => [t.toLowerCase(), l]));

async function discovery(req, res) {
  await readBody(req).catch(() => Buffer.alloc(0));
  const url = new URL(req.url, 'https://127.0.0.1');
  if (url.pathname !== '/api/discovery/v2.0/Instances') return send(res, 404, { error: { code: '0x80060888', message: `Resource not found for the segment ${url.pathname}.` } });
  if (req.method !== 'GET') return send(res, 405, { error: { code: '0x80060888', message: 'The HTTP method is not allowed.' } });
  const m = /^Bearer\s+(\S+)$/i.exec(String(req.headers.authorization || ''));
  const info = m && tokens.get(m[1]);
  if (!info || info.expires_at <= nowSecs() || info.resource !== DISCOVERY_RESOURCE) {
    return send(res, 401, { error: { code: '0x80040220', message: 'The bearer token is not valid for the discovery service.' } }, { 'www-authenticate': 'Bearer authorization_uri=https://login.microsoftonline.com/common/oauth2/authorize' });
  }
  const claims = JSON.parse(Buffer.from(m[1].split('.')[1], 'base64url').toString('utf8'));
  if (!claims.scp) return send(res, 403, { error: { code: '0x80040220', message: 'The discovery service lists the instances of a signed-in user; an app-only token has none.' } });
  stats.discovery_requests = (stats.discovery_requests || 0) + 1;
  const list = (instances.get(String(claims.tid).toLowerCase()) || []).map((i, n) => ({
    Id: i.Id || guidFrom(`org-${claims.tid}-${n}`), UniqueName: i.UniqueName || `org${n}`, UrlName: i.UrlName || `org${n}`,
    FriendlyName: i.FriendlyName || `Organisation ${n}`, State: 0, Version: '9.2.25063.00000', Url: i.Url || i.ApiUrl, ApiUrl: i.ApiUrl,
    LastUpdated: new Date().toISOString(), TenantId: claims.tid, EnvironmentId: i.EnvironmentId || guidFrom(`env-${claims.tid}-${n}`),
    Region: 'EUR', IsUserSysAdmin: i.IsUserSysAdmin !== false, TrialExpirationDate: null, OrganizationType: 0, DatacenterId: guidFrom('dc'), Purpose: '',
  }));
  send(res, 200, { '@odata.context': `https://${req.headers.host}/api/discovery/v2.0/$metadata#Instances`, value: list });
}

const seenAssertionIds = new Set();
function certificateProblem(assertion, header, client, tokenUrl) {
  const parts = String(assertion).split('.');
  if (parts.length !== 3 || header.alg !== 'RS256') return { code: 50027, message: 'JWT token is invalid or malformed (RS256 expected).' };
  const cert = client.certificates.find((c) => crypto.createHash('sha1').update(c.raw).digest('base64url') === header.x5t);
  if (!cert) return { code: 700027, message: `Client assertion contains an invalid signature. [Reason - The key was not found., Thumbprint of key used by client: '${header.x5t}']` };
  if (!crypto.verify('sha256', Buffer.from(`${parts[0]}.${parts[1]}`), cert.publicKey, Buffer.from(parts[2], 'base64url'))) {
    return { code: 700027, message: 'Client assertion failed signature validation.' };
  }
  let claims;
  try { claims = JSON.parse(Buffer.from(parts[1], 'base64url').toString('utf8')); } catch { return { code: 50027, message: 'JWT token is invalid or malformed.' }; }
  const now = nowSecs();
  if (!(claims.exp > now) || (claims.nbf && claims.nbf > now + 300)) return { code: 700024, message: 'Client assertion is not within its valid time range.' };
  if (claims.iss !== client.client_id || claims.sub !== client.client_id) return { code: 700021, message: "Client assertion application identifier doesn't match 'client_id' parameter." };
  if (claims.aud !== tokenUrl) return { code: 700021, message: `Client assertion audience claim does not match Realm issuer: ${claims.aud} is not ${tokenUrl}.` };
  if (!claims.jti || seenAssertionIds.has(claims.jti)) return { code: 700025, message: 'Client assertion was already used (jti replay).' };
  seenAssertionIds.add(claims.jti);
  return null;
}

function federatedProblem(assertion, federated) {
  const parts = String(assertion || '').split('.');
  if (parts.length !== 3) return { code: 50027, message: 'JWT token is invalid or malformed.' };
  const ok = crypto.verify('sha256', Buffer.from(`${parts[0]}.${parts[1]}`), publicKey, Buffer.from(parts[2], 'base64url'));
  if (!ok) return { code: 700027, message: 'Client assertion failed signature validation.' };
  let claims;
  try { claims = JSON.parse(Buffer.from(parts[1], 'base64url').toString('utf8')); } catch { return { code: 50027, message: 'JWT token is invalid or malformed.' }; }
  if (!(claims.exp > nowSecs())) return { code: 700024, message: 'Client assertion is not within its valid time range.' };
  const byIssuer = federated.filter((f) => f.issuer === claims.iss);
  if (!byIssuer.length) return { code: 700211, message: `No matching federated identity record found for presented assertion issuer '${claims.iss}'.` };
  const byAudience = byIssuer.filter((f) => f.audience === claims.aud);
  if (!byAudience.length) return { code: 700212, message: `No matching federated identity record found for presented assertion audience '${claims.aud}'.` };
  if (!byAudience.some((f) => f.subject === claims.sub)) return { code: 700213, message: `No matching federated identity record found for presented assertion subject '${claims.sub}'.` };
  return null;
}

// GET /{tenant}/v2.0/adminconsent: the administrator's consent prompt, answered at once
// as configured for the tenant. Problems Entra shows as its own error page (no redirect)
// answer 400 here; the administrator's answer goes back to redirect_uri.
async function adminConsent(req, res, url, tenant) {
  await readBody(req).catch(() => Buffer.alloc(0));
  stats.entra.admin_consents = (stats.entra.admin_consents || 0) + 1;
  const q = url.searchParams;
  const page = (code, message) => entraError(req, res, 400, 'invalid_request', code, message);
  if (req.method !== 'GET') return page(900561, `The endpoint only accepts GET requests. Received a ${req.method} request.`);
  if (tenant.toLowerCase() === 'common') return page(90130, 'Application is not supported over the /common or /consumers endpoints. Please use the /organizations or tenant-specific endpoint.');
  if (tenant !== 'organizations' && !knownTenants.has(tenant.toLowerCase())) return page(90002, `Tenant '${tenant}' not found.`);
  const clientId = String(q.get('client_id') || '').toLowerCase();
  const app = multitenantApps.find((a) => a.client_id === clientId);
  if (!app) return page(700016, `Application with identifier '${q.get('client_id')}' was not found in the directory '${tenant}'.`);
  const redirect = q.get('redirect_uri');
  if (!redirect || !app.redirect_uris.includes(redirect)) return page(50011, `The redirect URI '${redirect}' specified in the request does not match the redirect URIs configured for the application '${clientId}'.`);
  if (!q.get('scope')) return page(900144, "The request body must contain the following parameter: 'scope'.");
  const target = new URL(redirect);
  const decision = consentDecisions.get(tenant.toLowerCase()) || 'approve';
  target.searchParams.set('admin_consent', 'True');
  if (decision === 'decline') {
    target.searchParams.set('error', 'consent_required');
    target.searchParams.set('error_description', 'AADSTS65004: User declined to consent to access the app.\r\nTrace ID: ' + guid());
  } else {
    if (!entraClients.some((c) => c.client_id === app.client_id && c.tenant.toLowerCase() === tenant.toLowerCase())) {
      entraClients.push({ tenant, client_id: app.client_id, client_secret: app.client_secret, federated: app.federated, certificates: app.certificates, object_id: guidFrom(`sp-${tenant}-${app.client_id}`), ready_at: Date.now() + config.service_principal_delay_ms });
    }
    target.searchParams.set('tenant', tenant);
    target.searchParams.set('scope', q.get('scope'));
  }
  if (q.has('state')) target.searchParams.set('state', q.get('state'));
  res.writeHead(302, { location: target.href, ...entraHeaders() });
  res.end();
}

function timingSafeEqualStr(a, b) {
  const x = crypto.createHash('sha256').update(String(a)).digest();
  const y = crypto.createHash('sha256').update(String(b)).digest();
  return crypto.timingSafeEqual(x, y) && String(a) === String(b);
}

// ---------------------------------------------------------------------------
// control API (on the identity listener, under /__control/)
// ---------------------------------------------------------------------------

async function readJson(req) {
  const b = await readBody(req);
  if (!b.length) return {};
  try {
    const v = JSON.parse(b.toString('utf8'));
    if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new Error('not an object');
    return v;
  } catch {
    throw httpError(400, 'body must be a JSON object');
  }
}

function secretSummary(name) {
  const e = secrets.get(name);
  if (!e) return null;
  const cur = e.versions[e.versions.length - 1];
  return {
    name,
    version: cur.version,
    enabled: cur.enabled,
    id: `https://${config.vault_host}:${kvPort}/secrets/${name}/${cur.version}`,
    versions: e.versions.map((v) => ({ version: v.version, enabled: v.enabled, created: v.created })),
  };
}

function validTokens(resource) {
  const now = nowSecs();
  const want = resource ? normResource(resource) : undefined;
  const out = [];
  for (const [t, info] of tokens) {
    if (info.expires_at > now && (!want || info.resource === want)) out.push({ token: t, ...info });
  }
  return out;
}

function normalizeOutages(b) {
  const next = {};
  const topMode = b.mode === undefined ? '503' : b.mode;
  for (const [k, v] of Object.entries(b)) {
    if (['mode', 'count', 'retry_after'].includes(k)) continue;
    if (!['keyvault', 'identity', 'entra'].includes(k)) throw httpError(400, `unknown service ${JSON.stringify(k)} (keyvault, identity, entra)`);
    if (v === false || v === null) continue;
    const spec = v === true ? {} : v;
    if (typeof spec !== 'object') throw httpError(400, `${k} must be true, false or an object`);
    const mode = String(spec.mode === undefined ? topMode : spec.mode);
    if (!['503', 'drop'].includes(mode)) throw httpError(400, 'mode must be "503" or "drop"');
    const count = spec.count === undefined ? b.count : spec.count;
    if (count !== undefined && (!Number.isInteger(count) || count < 0)) throw httpError(400, 'count must be an integer >= 0');
    const retryAfter = spec.retry_after === undefined ? b.retry_after : spec.retry_after;
    if (retryAfter !== undefined && (!Number.isInteger(retryAfter) || retryAfter < 0)) throw httpError(400, 'retry_after must be an integer >= 0 (seconds)');
    next[k] = { mode, remaining: count === undefined ? null : count, retry_after: retryAfter };
  }
  return next;
}

async function control(req, res, url) {
  const p = url.pathname;
  const route = `${req.method} ${p}`;
  try {
    if (route === 'GET /__control/stats') return send(res, 200, stats);
    if (route === 'GET /__control/telemetry') return send(res, 200, telemetry);
    if (route === 'POST /__control/consent_decisions') {
      const b = await readJson(req);
      for (const [t, d] of Object.entries(b)) {
        if (!['approve', 'decline'].includes(d)) throw httpError(400, `decision for ${t} must be "approve" or "decline"`);
        consentDecisions.set(t.toLowerCase(), d);
      }
      return send(res, 200, { ok: true });
    }
    if (route === 'GET /__control/service_principals') {
      return send(res, 200, { service_principals: entraClients.map((c) => ({ tenant: c.tenant, client_id: c.client_id })) });
    }
    if (route === 'POST /__control/reset') {
      await readBody(req);
      stats = freshStats();
      return send(res, 200, { ok: true });
    }
    if (route === 'GET /__control/config') {
      return send(res, 200, {
        ...config,
        keyvault: keyvaultUrl,
        identity: identityUrl,
        entra: entraUrl,
        ca: tls.caPath,
        hostnames: tls.names,
        system_assigned: systemAssigned,
        user_assigned: userAssigned,
        entra_clients: entraClients.map(({ client_secret, client_assertion, ...c }) => c),
        known_tenants: [...knownTenants],
      });
    }
    if (route === 'GET /__control/secrets') {
      return send(res, 200, { secrets: [...secrets.keys()].sort().map(secretSummary) });
    }
    if (route === 'POST /__control/secrets') {
      const b = await readJson(req);
      if (typeof b.name !== 'string') throw httpError(400, '"name" is required');
      setSecret(b.name, b);
      return send(res, 200, secretSummary(b.name));
    }
    const sm = /^\/__control\/secrets\/([^/]+)$/.exec(p);
    if (sm && req.method === 'DELETE') {
      await readBody(req);
      const name = decodeURIComponent(sm[1]);
      if (!secrets.delete(name)) throw httpError(404, `no secret ${JSON.stringify(name)}`);
      return send(res, 200, { deleted: name });
    }
    if (sm && req.method === 'GET') {
      const s = secretSummary(decodeURIComponent(sm[1]));
      if (!s) throw httpError(404, 'no such secret');
      return send(res, 200, s);
    }
    if (route === 'POST /__control/outage') {
      outages = normalizeOutages(await readJson(req));
      return send(res, 200, outages);
    }
    if (route === 'GET /__control/outage') return send(res, 200, outages);
    if (route === 'DELETE /__control/outage') {
      await readBody(req);
      outages = {};
      return send(res, 200, outages);
    }
    if (route === 'GET /__control/tokens') {
      const list = validTokens(url.searchParams.get('resource'));
      return send(res, 200, {
        tokens: list.map((t) => t.token),
        details: list.map(({ token, ...info }) => ({ token, ...info })),
      });
    }
    if (route === 'POST /__control/tokens/expire') {
      const b = await readJson(req);
      let n = 0;
      for (const [t, info] of tokens) {
        if ((b.token === undefined || b.token === t) && (b.resource === undefined || info.resource === normResource(b.resource))) {
          info.expires_at = Math.min(info.expires_at, nowSecs());
          n += 1;
        }
      }
      return send(res, 200, { expired: n });
    }
    throw httpError(404, `no control route ${route}`);
  } catch (err) {
    send(res, err.status || 500, { error: err.status && err.status < 500 ? 'invalid_request' : 'server_error', error_description: err.message });
  }
}

async function identityListener(req, res) {
  const url = new URL(req.url, 'http://127.0.0.1');
  if (url.pathname.startsWith('/__control/')) return control(req, res, url);
  if (url.pathname === '/msi/token') return managedIdentity(req, res, url);
  await readBody(req).catch(() => Buffer.alloc(0));
  send(res, 404, { statusCode: 404, message: `No route for ${url.pathname}; the token endpoint is /msi/token.`, correlationId: guid() });
}


// ---------------------------------------------------------------------------
// Application Insights ingestion ("Breeze", the track endpoint the SDKs post to)
// ---------------------------------------------------------------------------
// POST /v2/track and /v2.1/track: a JSON array of envelopes (or one envelope per line),
// optionally gzip-compressed (Content-Encoding: gzip). Each envelope needs `name`, `time`,
// `iKey` (the resource's instrumentation key) and `data.baseType`. The answer is
// {itemsReceived, itemsAccepted, errors: [{index, statusCode, message}]}: 200 when all are
// accepted, 206 when some are, 400 when none is. With local authentication disabled, a
// request without `Authorization: Bearer` is refused 401, and a token that is not a live one
// for https://monitor.azure.com/ 403 (Monitoring Metrics Publisher is checked by Azure; here
// every live token of that audience passes).
const MONITOR_RESOURCE = 'https://monitor.azure.com';
const telemetry = { items: [], uploads: [] };

async function ingestion(req, res) {
  const url = new URL(req.url, 'https://127.0.0.1');
  if (url.pathname !== '/v2/track' && url.pathname !== '/v2.1/track') {
    await readBody(req).catch(() => Buffer.alloc(0));
    return send(res, 404, { itemsReceived: 0, itemsAccepted: 0, errors: [{ index: 0, statusCode: 404, message: `No route ${url.pathname}` }] });
  }
  if (req.method !== 'POST') {
    await readBody(req).catch(() => Buffer.alloc(0));
    return send(res, 405, { itemsReceived: 0, itemsAccepted: 0, errors: [{ index: 0, statusCode: 405, message: 'Only POST is allowed' }] }, { allow: 'POST' });
  }
  let raw = await readBody(req);
  const encoding = String(req.headers['content-encoding'] || '').toLowerCase();
  if (encoding === 'gzip') {
    try { raw = zlib.gunzipSync(raw); } catch (err) {
      return send(res, 400, { itemsReceived: 0, itemsAccepted: 0, errors: [{ index: 0, statusCode: 400, message: `Invalid gzip body: ${err.message}` }] });
    }
  } else if (encoding && encoding !== 'identity') {
    return send(res, 415, { itemsReceived: 0, itemsAccepted: 0, errors: [{ index: 0, statusCode: 415, message: `Unsupported Content-Encoding ${encoding}` }] });
  }
  let items;
  const text = raw.toString('utf8').trim();
  try {
    items = text.startsWith('[') ? JSON.parse(text) : text.split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l));
  } catch (err) {
    return send(res, 400, { itemsReceived: 0, itemsAccepted: 0, errors: [{ index: 0, statusCode: 400, message: `Invalid JSON: ${err.message}` }] });
  }
  if (!Array.isArray(items)) items = [items];
  const auth = String(req.headers.authorization || '');
  const upload = { at: new Date().toISOString(), authorization: 'none', items: items.length };
  if (auth) {
    const m = /^Bearer\s+(\S+)$/i.exec(auth);
    const info = m && tokens.get(m[1]);
    if (!m || !info || info.expires_at <= nowSecs()) {
      telemetry.uploads.push({ ...upload, authorization: 'invalid', status: 401 });
      return send(res, 401, { itemsReceived: items.length, itemsAccepted: 0, errors: items.map((_, index) => ({ index, statusCode: 401, message: 'The provided token is not valid or has expired.' })) });
    }
    if (info.resource !== MONITOR_RESOURCE) {
      telemetry.uploads.push({ ...upload, authorization: 'wrong-audience', status: 403 });
      return send(res, 403, { itemsReceived: items.length, itemsAccepted: 0, errors: items.map((_, index) => ({ index, statusCode: 403, message: `The token's audience ${info.resource} is not ${MONITOR_RESOURCE}/.` })) });
    }
    upload.authorization = 'bearer';
    upload.client_id = info.client_id;
  } else if (config.ingestion.disable_local_auth) {
    telemetry.uploads.push({ ...upload, status: 401 });
    return send(res, 401, { itemsReceived: items.length, itemsAccepted: 0, errors: items.map((_, index) => ({ index, statusCode: 401, message: 'Local authentication is disabled for this resource: an Authorization header with a Microsoft Entra token is required.' })) });
  }
  const errors = [];
  items.forEach((it, index) => {
    const problem = !it || typeof it !== 'object' ? 'the item is not an object'
      : typeof it.name !== 'string' || !it.name ? 'Field \'name\' on type \'Envelope\' is required but missing or empty.'
      : typeof it.time !== 'string' || Number.isNaN(Date.parse(it.time)) ? 'Field \'time\' on type \'Envelope\' is required but missing or empty.'
      : typeof it.iKey !== 'string' || it.iKey.toLowerCase() !== config.ingestion.instrumentation_key ? 'Invalid instrumentation key'
      : !it.data || typeof it.data.baseType !== 'string' ? 'Field \'baseType\' on type \'Data\' is required but missing or empty.'
      : null;
    if (problem) errors.push({ index, statusCode: 400, message: problem });
    else telemetry.items.push(it);
  });
  const accepted = items.length - errors.length;
  telemetry.uploads.push({ ...upload, status: errors.length === 0 ? 200 : accepted ? 206 : 400 });
  return send(res, errors.length === 0 ? 200 : accepted ? 206 : 400, { itemsReceived: items.length, itemsAccepted: accepted, errors });
}

// ---------------------------------------------------------------------------
// listeners
// ---------------------------------------------------------------------------

const guard = (fn) => (req, res) => {
  Promise.resolve(fn(req, res)).catch((err) => {
    log(`handler error: ${err.stack || err.message}`);
    if (!res.headersSent) send(res, err.status || 500, { error: 'server_error', error_description: err.message });
    else res.destroy();
  });
};

const tlsOptions = { key: tls.key, cert: Buffer.concat([tls.cert, tls.ca]), minVersion: 'TLSv1.2' };
const servers = [
  https.createServer(tlsOptions, guard(keyVault)),
  http.createServer(guard(identityListener)),
  https.createServer(tlsOptions, guard(entra)),
  https.createServer(tlsOptions, guard(ingestion)),
  https.createServer(tlsOptions, guard(discovery)),
];
for (const s of servers) {
  s.keepAliveTimeout = 5000;
  s.on('tlsClientError', (err) => log(`TLS handshake failed: ${err.message}`));
}
const listen = (server, port) => new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port || 0, '127.0.0.1', () => resolve(server.address().port));
});
let kvPort;
let idPort;
let entraPort;
let ingestionPort;
let discoveryPort;
try {
  kvPort = await listen(servers[0], config.ports.keyvault);
  idPort = await listen(servers[1], config.ports.identity);
  entraPort = await listen(servers[2], config.ports.entra);
  ingestionPort = await listen(servers[3], config.ports.ingestion);
  discoveryPort = await listen(servers[4], config.ports.discovery);
} catch (err) {
  fail(`cannot listen: ${err.message}`);
}
const keyvaultUrl = `https://${config.vault_host}:${kvPort}/`;
const identityUrl = `http://127.0.0.1:${idPort}/msi/token`;
const entraUrl = `https://${config.login_host}:${entraPort}`;
const ingestionUrl = `https://localhost:${ingestionPort}/`;
const discoveryUrl = `https://localhost:${discoveryPort}`;

// ---------------------------------------------------------------------------
// lifecycle
// ---------------------------------------------------------------------------

let stopping = false;
function shutdown(reason) {
  if (stopping) return;
  stopping = true;
  log(`stopping (${reason})`);
  if (tls.owned) {
    try { fs.rmSync(tls.dir, { recursive: true, force: true }); } catch { /* ignore */ }
  }
  let open = servers.length;
  for (const s of servers) {
    s.close(() => { open -= 1; if (open === 0) process.exit(0); });
    s.closeAllConnections();
  }
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
if (process.env.AZURE_PEER_IGNORE_STDIN !== '1') {
  process.stdin.on('end', () => shutdown('stdin closed'));
  process.stdin.on('close', () => shutdown('stdin closed'));
  process.stdin.on('error', () => shutdown('stdin error'));
  process.stdin.resume();
}

process.stdout.write(`${JSON.stringify({ ready: true, keyvault: keyvaultUrl, identity: identityUrl, entra: entraUrl, ingestion: ingestionUrl, discovery: discoveryUrl, instrumentation_key: config.ingestion.instrumentation_key, ca: tls.caPath })}\n`);
