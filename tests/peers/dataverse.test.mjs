// End-to-end checks of the Dataverse Web API double (dataverse.mjs), using only fetch (and
// node:https for the TLS test) as the client.
// Run: cd tests/peers && node --test dataverse.test.mjs

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as http from 'node:http';
import * as https from 'node:https';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { spawnPeer } from './peer-process.mjs';
import { once } from 'node:events';

const PEER = fileURLToPath(new URL('./dataverse.mjs', import.meta.url));
const GUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const JSON_CT = 'application/json; odata.metadata=minimal';

const CONNECTION_TABLE = {
  logical_name: 'dc_connection',
  entity_set: 'dc_connections',
  primary_id: 'dc_connectionid',
  primary_name: 'dc_name',
  columns: [
    { name: 'dc_connectionkey', type: 'string', max_length: 100 },
    { name: 'dc_provider', type: 'string', max_length: 100 },
    { name: 'dc_status', type: 'string', max_length: 40 },
    { name: 'dc_owner', type: 'string', max_length: 200 },
    { name: 'dc_tokens', type: 'memo', max_length: 100000 },
    { name: 'dc_failures', type: 'integer' },
    { name: 'dc_expiresat', type: 'bigint' },
    { name: 'dc_refreshedon', type: 'datetime' },
    { name: 'dc_hasrefresh', type: 'boolean' },
  ],
  keys: [{ name: 'dc_connection_key', attributes: ['dc_connectionkey'] }],
};

const TENANT = '11111111-2222-3333-4444-555555555555';

// ---------------------------------------------------------------------------
// peer process helpers
// ---------------------------------------------------------------------------

async function startPeer(config, { env = {} } = {}) {
  const peer = await spawnPeer(PEER, 'DATAVERSE_PEER_CONFIG', config, { env });
  return { ...peer, url: peer.ready.url, port: peer.ready.port };
}

let peer;

before(async () => {
  peer = await startPeer({
    accepted_tokens: ['tok-a', 'tok-b'],
    tenant_id: TENANT,
    key_activation_ms: 300,
    tables: [CONNECTION_TABLE],
  });
});

after(async () => {
  await peer?.stop();
});

// Web API call with the usual Dataverse request headers.
async function api(p, { method = 'GET', token = 'tok-a', body, headers = {}, version = 'v9.2' } = {}) {
  const h = { Accept: 'application/json', 'OData-MaxVersion': '4.0', 'OData-Version': '4.0', 'If-None-Match': 'null', ...headers };
  if (token) h.Authorization = `Bearer ${token}`;
  let payload;
  if (body !== undefined) {
    h['Content-Type'] = 'application/json; charset=utf-8';
    payload = typeof body === 'string' ? body : JSON.stringify(body);
  }
  const url = p.startsWith('http') ? p : `${peer.url}/api/data/${version}/${p}`;
  const res = await fetch(url, { method, headers: h, body: payload });
  const text = await res.text();
  const ct = res.headers.get('content-type') || '';
  return { status: res.status, headers: res.headers, text, json: text && ct.includes('json') ? JSON.parse(text) : null };
}

async function ctl(p, body) {
  const res = await fetch(`${peer.url}/__control/${p}`, body === undefined ? {} : {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body),
  });
  return { status: res.status, json: await res.json() };
}

async function fresh() {
  await ctl('wipe', {});
  await ctl('reset', {});
}

const idFrom = (entityId) => /\(([0-9a-f-]{36})\)$/.exec(entityId)[1];
const rowsOf = async (set) => (await ctl(`tables/${set}`)).json.rows;

function assertDvError(r, status, code, message) {
  assert.equal(r.status, status, r.text);
  assert.equal(r.headers.get('content-type'), JSON_CT);
  assert.equal(r.headers.get('odata-version'), '4.0');
  assert.deepEqual(Object.keys(r.json), ['error']);
  assert.equal(r.json.error.code, code);
  if (message instanceof RegExp) assert.match(r.json.error.message, message);
  else if (message !== undefined) assert.equal(r.json.error.message, message);
}

// ---------------------------------------------------------------------------
// lifecycle and conventions
// ---------------------------------------------------------------------------

test('ready line is exactly {"ready":true,"url":"http://127.0.0.1:PORT","port":PORT} and stdout stays quiet', async () => {
  assert.match(peer.readyLine, /^\{"ready":true,"url":"http:\/\/127\.0\.0\.1:\d+","port":\d+\}$/);
  assert.equal(peer.url, `http://127.0.0.1:${peer.port}`);
  await api('WhoAmI');
  assert.equal(peer.stdoutAfterReady(), '');
});

test('a bad config exits with code 2 before the ready line', async () => {
  await assert.rejects(startPeer({ tables: [{ logical_name: 'Bad Name' }] }), (err) => err.code === 2 && /logical_name/.test(err.stderr));
});

test('the peer exits when its stdin closes', async () => {
  const p = await startPeer({});
  const exited = once(p.child, 'exit');
  p.child.stdin.end();
  const [code] = await exited;
  assert.equal(code, 0);
});

test('WhoAmI, versions v9.0/v9.1/v9.2, host-agnostic URLs and response headers', async () => {
  for (const version of ['v9.0', 'v9.1', 'v9.2']) {
    const r = await api('WhoAmI', { version });
    assert.equal(r.status, 200);
    assert.equal(r.headers.get('odata-version'), '4.0');
    assert.equal(r.headers.get('content-type'), JSON_CT);
    assert.equal(r.headers.get('x-ms-dop-hint'), '4');
    assert.match(r.headers.get('req_id'), GUID_RE);
    assert.deepEqual(Object.keys(r.json), ['@odata.context', 'BusinessUnitId', 'UserId', 'OrganizationId']);
    assert.equal(r.json['@odata.context'], `${peer.url}/api/data/${version}/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse`);
    for (const k of ['BusinessUnitId', 'UserId', 'OrganizationId']) assert.match(r.json[k], GUID_RE);
  }
  // WhoAmI() form, and a different Host header shows up in the URLs the double returns
  const body = await new Promise((resolve, reject) => {
    const req = http.request(`${peer.url}/api/data/v9.2/WhoAmI()`, { headers: { Authorization: 'Bearer tok-a', Host: 'contoso.crm.dynamics.com' } }, (res) => {
      let data = '';
      res.setEncoding('utf8').on('data', (d) => { data += d; }).on('end', () => resolve(JSON.parse(data)));
    });
    req.on('error', reject);
    req.end();
  });
  assert.equal(body['@odata.context'], 'http://contoso.crm.dynamics.com/api/data/v9.2/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse');
  // the user WhoAmI names exists as an application user
  const me = await api(`systemusers(${body.UserId})?$select=applicationid,accessmode,_businessunitid_value`);
  assert.equal(me.status, 200);
  assert.equal(me.json.accessmode, 4);
  assert.equal(me.json._businessunitid_value, body.BusinessUnitId);
});

// ---------------------------------------------------------------------------
// authentication
// ---------------------------------------------------------------------------

test('401 without a bearer token or with a token that is not accepted; requests counted per token', async () => {
  await fresh();
  const none = await api('WhoAmI', { token: null });
  assertDvError(none, 401, '');
  assert.equal(none.headers.get('www-authenticate'), `Bearer authorization_uri=https://login.microsoftonline.com/${TENANT}/oauth2/authorize`);
  const wrong = await api('dc_connections', { token: 'tok-zzz' });
  assertDvError(wrong, 401, '');
  assert.match(wrong.headers.get('www-authenticate'), /^Bearer authorization_uri=https:\/\/login\.microsoftonline\.com\/.+\/oauth2\/authorize$/);
  const basic = await api('WhoAmI', { token: null, headers: { Authorization: 'Basic dTpw' } });
  assert.equal(basic.status, 401);
  await api('WhoAmI', { token: 'tok-a' });
  await api('WhoAmI', { token: 'tok-a' });
  await api('WhoAmI', { token: 'tok-b' });
  const s = (await ctl('stats')).json;
  assert.deepEqual(s.tokens, { 'tok-a': 2, 'tok-b': 1 });
  assert.deepEqual(s.rejected_tokens, { 'tok-zzz': 1 });
  assert.equal(s.unauthenticated, 2);
  assert.equal(s.by_status['401'], 3);
  assert.equal(s.by_status['200'], 3);
});

test('an empty accepted_tokens list accepts any non-empty bearer token', async () => {
  const p = await startPeer({});
  try {
    const ok = await fetch(`${p.url}/api/data/v9.2/WhoAmI`, { headers: { Authorization: 'Bearer anything-at-all' } });
    assert.equal(ok.status, 200);
    const empty = await fetch(`${p.url}/api/data/v9.2/WhoAmI`, { headers: { Authorization: 'Bearer ' } });
    assert.equal(empty.status, 401);
  } finally {
    await p.stop();
  }
});

// ---------------------------------------------------------------------------
// create
// ---------------------------------------------------------------------------

test('create without Prefer: 204, OData-EntityId, no body; the record reads back with ETag and @odata.etag', async () => {
  await fresh();
  const r = await api('dc_connections', { method: 'POST', body: { dc_name: 'Contoso', dc_connectionkey: 'k1', dc_failures: 0, dc_hasrefresh: true } });
  assert.equal(r.status, 204);
  assert.equal(r.text, '');
  assert.equal(r.headers.get('content-type'), null);
  assert.equal(r.headers.get('odata-version'), '4.0');
  const eid = r.headers.get('odata-entityid');
  assert.match(eid, new RegExp(`^${peer.url}/api/data/v9.2/dc_connections\\([0-9a-f-]{36}\\)$`));
  const id = idFrom(eid);
  const g = await api(`dc_connections(${id})`);
  assert.equal(g.status, 200);
  assert.equal(g.headers.get('content-type'), JSON_CT);
  assert.match(g.headers.get('etag'), /^W\/"\d+"$/);
  assert.equal(g.json['@odata.etag'], g.headers.get('etag'));
  assert.equal(g.json['@odata.context'], `${peer.url}/api/data/v9.2/$metadata#dc_connections/$entity`);
  assert.equal(g.json.dc_connectionid, id);
  assert.equal(g.json.dc_name, 'Contoso');
  assert.equal(g.json.dc_hasrefresh, true);
  assert.equal(g.json.dc_tokens, null, 'all columns come back, unset ones as null');
  assert.match(g.json.createdon, /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$/);
  assert.equal(g.json.statecode, 0);
  assert.equal(typeof g.json.versionnumber, 'number');
});

test('create with Prefer: return=representation and $select: 201, body, Preference-Applied, no OData-EntityId', async () => {
  await fresh();
  const r = await api('dc_connections?$select=dc_name,dc_failures', {
    method: 'POST',
    headers: { Prefer: 'return=representation' },
    body: { dc_name: 'Contoso Ltd', dc_failures: 3, dc_connectionkey: 'k2' },
  });
  assert.equal(r.status, 201);
  assert.equal(r.headers.get('content-type'), JSON_CT);
  assert.equal(r.headers.get('preference-applied'), 'return=representation');
  assert.equal(r.headers.get('odata-entityid'), null);
  assert.equal(r.headers.get('etag'), null, 'POST 201 carries the ETag in the body only (choice, see README)');
  assert.deepEqual(Object.keys(r.json), ['@odata.context', '@odata.etag', 'dc_name', 'dc_failures', 'dc_connectionid']);
  assert.equal(r.json['@odata.context'], `${peer.url}/api/data/v9.2/$metadata#dc_connections(dc_name,dc_failures)/$entity`);
  assert.match(r.json['@odata.etag'], /^W\/"\d+"$/);
  assert.match(r.json.dc_connectionid, GUID_RE);
});

test('create with a supplied primary key; a duplicate primary key is 412 0x80040237', async () => {
  await fresh();
  const id = '59d88f5e-6629-ed11-9db1-0022482746b6';
  const r = await api('dc_connections', { method: 'POST', body: { dc_connectionid: id, dc_name: 'a' } });
  assert.equal(r.status, 204);
  assert.equal(r.headers.get('odata-entityid'), `${peer.url}/api/data/v9.2/dc_connections(${id})`);
  const dup = await api('dc_connections', { method: 'POST', body: { dc_connectionid: id.toUpperCase(), dc_name: 'b' } });
  assertDvError(dup, 412, '0x80040237', 'A record with matching key values already exists.');
  assert.equal((await rowsOf('dc_connections')).length, 1);
  assert.equal((await rowsOf('dc_connections'))[0].dc_name, 'a');
});

test('a duplicate alternate-key value on create or update is 412 0x80060892 (case-insensitive collation)', async () => {
  await fresh();
  assert.equal((await api('dc_connections', { method: 'POST', body: { dc_connectionkey: 'Key-1' } })).status, 204);
  const dup = await api('dc_connections', { method: 'POST', body: { dc_connectionkey: 'key-1' } });
  assertDvError(dup, 412, '0x80060892', /^A record that has the attribute values key-1 already exists\. The entity key dc_connection_key requires that this set of attributes contains unique values\./);
  const other = await api('dc_connections', { method: 'POST', body: { dc_connectionkey: 'key-2' } });
  const otherId = idFrom(other.headers.get('odata-entityid'));
  const clash = await api(`dc_connections(${otherId})`, { method: 'PATCH', headers: { 'If-Match': '*' }, body: { dc_connectionkey: 'KEY-1' } });
  assertDvError(clash, 412, '0x80060892');
  // rows with a null key value are not indexed: several may exist
  assert.equal((await api('dc_connections', { method: 'POST', body: { dc_name: 'no key 1' } })).status, 204);
  assert.equal((await api('dc_connections', { method: 'POST', body: { dc_name: 'no key 2' } })).status, 204);
  assert.equal((await rowsOf('dc_connections')).length, 4);
});

test('unknown columns, wrong types and over-long strings are 400 and change nothing', async () => {
  await fresh();
  const unknown = await api('dc_connections', { method: 'POST', body: { dc_name: 'x', dc_nope: 1 } });
  assertDvError(unknown, 400, '0x80048d19', /The property 'dc_nope' does not exist on type 'Microsoft\.Dynamics\.CRM\.dc_connection'/);
  const wrongType = await api('dc_connections', { method: 'POST', body: { dc_failures: 'three' } });
  assertDvError(wrongType, 400, '0x80048d19', /Cannot convert the literal 'three' to the expected type 'Edm\.Int32'/);
  const wrongBool = await api('dc_connections', { method: 'POST', body: { dc_hasrefresh: 'true' } });
  assertDvError(wrongBool, 400, '0x80048d19', /Edm\.Boolean/);
  const badDate = await api('dc_connections', { method: 'POST', body: { dc_refreshedon: 'yesterday' } });
  assertDvError(badDate, 400, '0x80048d19', /Edm\.DateTimeOffset/);
  const tooLong = await api('dc_connections', { method: 'POST', body: { dc_status: 'x'.repeat(41) } });
  assertDvError(tooLong, 400, '0x80044331', /The length of the 'dc_status' attribute of the 'dc_connection' entity exceeded the maximum allowed length of '40'/);
  const lookupDirect = await api('dc_connections', { method: 'POST', body: { _ownerid_value: '59d88f5e-6629-ed11-9db1-0022482746b6' } });
  assert.equal(lookupDirect.status, 400);
  const notJson = await api('dc_connections', { method: 'POST', body: '{"dc_name":' });
  assertDvError(notJson, 400, '0x80048d19');
  assert.equal((await rowsOf('dc_connections')).length, 0);
  // system columns are maintained by the server; writes to them are ignored
  const r = await api('dc_connections', { method: 'POST', headers: { Prefer: 'return=representation' }, body: { createdon: '2000-01-01T00:00:00Z', dc_refreshedon: '2024-05-01T10:20:30.123+02:00', dc_expiresat: 1714551630123 } });
  assert.equal(r.status, 201);
  assert.notEqual(r.json.createdon, '2000-01-01T00:00:00Z');
  assert.equal(r.json.dc_refreshedon, '2024-05-01T08:20:30Z', 'DateTime is stored in UTC, to the second');
  assert.equal(r.json.dc_expiresat, 1714551630123);
  const empty = await api(`dc_connections(${r.json.dc_connectionid})?$select=dc_owner`, { method: 'PATCH', headers: { Prefer: 'return=representation' }, body: { dc_owner: '' } });
  assert.equal(empty.json.dc_owner, null, 'an empty string is stored as null');
});

test('unknown entity sets and unsupported query options are 400 0x80060888', async () => {
  const r = await api('dc_nothings');
  assertDvError(r, 400, '0x80060888', /Resource not found for the segment/);
  assertDvError(await api('dc_connections?$skip=10'), 400, '0x80060888', 'The query parameter $skip is not supported');
  assertDvError(await api('dc_connections?$apply=groupby((dc_name))'), 400, '0x80060888');
  assertDvError(await api('dc_connections?$select=dc_nope'), 400, '0x80060888', "Could not find a property named 'dc_nope' on type 'Microsoft.Dynamics.CRM.dc_connection'.");
  assertDvError(await api('$batch', { method: 'POST', body: {} }), 400, '0x80060888');
});

// ---------------------------------------------------------------------------
// retrieve
// ---------------------------------------------------------------------------

test('retrieve by id, by named primary key and by alternate key (with \'\' escaping); $select; single property', async () => {
  await fresh();
  const c = await api('dc_connections', { method: 'POST', body: { dc_connectionkey: "O'Bryan/1", dc_name: 'n', dc_provider: 'acme' } });
  const id = idFrom(c.headers.get('odata-entityid'));
  const byId = await api(`dc_connections(${id})?$select=dc_name`);
  assert.deepEqual(Object.keys(byId.json), ['@odata.context', '@odata.etag', 'dc_name', 'dc_connectionid']);
  assert.equal(byId.json['@odata.context'], `${peer.url}/api/data/v9.2/$metadata#dc_connections(dc_name)/$entity`);
  const named = await api(`dc_connections(dc_connectionid=${id})?$select=dc_name`);
  assert.equal(named.status, 200);
  const byKey = await api(`dc_connections(dc_connectionkey='O''Bryan/1')?$select=dc_provider`.replace('/', '%2F'));
  assert.equal(byKey.status, 200, byKey.text);
  assert.equal(byKey.json.dc_connectionid, id);
  assert.equal(byKey.json.dc_provider, 'acme');
  const byKeyCase = await api(`dc_connections(dc_connectionkey='o''bryan%2F1')`);
  assert.equal(byKeyCase.status, 200, 'key lookup is case-insensitive like the SQL collation');
  const prop = await api(`dc_connections(${id})/dc_provider`);
  assert.deepEqual(prop.json, { '@odata.context': `${peer.url}/api/data/v9.2/$metadata#dc_connections(${id})/dc_provider`, value: 'acme' });
});

test('retrieve 404 bodies: 0x80040217 by id, 0x80048d02 by alternate key; invalid key names are 400', async () => {
  await fresh();
  const missing = '5b4ced1c-88e1-ee11-904c-6045bd05e9d4';
  assertDvError(await api(`dc_connections(${missing})?$select=dc_name`), 404, '0x80040217', `Entity 'dc_connection' With Id = ${missing} Does Not Exist`);
  assertDvError(await api("dc_connections(dc_connectionkey='nope')"), 404, '0x80048d02', 'A record with the specified key values does not exist in dc_connection entity');
  assertDvError(await api("dc_connections(dc_provider='acme')"), 400, '0x80060888', /^The key in the request URI is not valid for resource 'Microsoft\.Dynamics\.CRM\.dc_connection'/);
  assert.equal((await api('dc_connections(not-a-guid)')).status, 400);
  // error-detail annotations on request
  const annotated = await api(`dc_connections(${missing})`, { headers: { Prefer: 'odata.include-annotations="*"' } });
  assert.equal(annotated.status, 404);
  assert.equal(annotated.json.error['@Microsoft.PowerApps.CDS.ErrorDetails.ApiExceptionMessageName'], 'ObjectDoesNotExist');
  assert.equal(annotated.json.error['@Microsoft.PowerApps.CDS.ErrorDetails.ApiExceptionHttpStatusCode'], '404');
  assert.match(annotated.json.error['@Microsoft.PowerApps.CDS.HelpLink'], /80040217/);
});

// ---------------------------------------------------------------------------
// update, upsert, conditional operations, delete
// ---------------------------------------------------------------------------

test('alternate-key upsert: create (201) then update (200) with representation; 204 + key-form OData-EntityId without', async () => {
  await fresh();
  const url = "dc_connections(dc_connectionkey='conn-1')?$select=dc_connectionid,dc_name,dc_connectionkey";
  const created = await api(url, { method: 'PATCH', headers: { Prefer: 'return=representation' }, body: { dc_name: 'first' } });
  assert.equal(created.status, 201);
  assert.equal(created.headers.get('preference-applied'), 'return=representation');
  assert.match(created.headers.get('etag'), /^W\/"\d+"$/);
  assert.equal(created.json['@odata.etag'], created.headers.get('etag'));
  assert.equal(created.json.dc_connectionkey, 'conn-1', 'the URL key value is copied into the new record');
  assert.equal(created.json['@odata.context'], `${peer.url}/api/data/v9.2/$metadata#dc_connections(dc_connectionid,dc_name,dc_connectionkey)/$entity`);
  const updated = await api(url, { method: 'PATCH', headers: { Prefer: 'return=representation' }, body: { dc_name: 'second', dc_connectionkey: 'ignored-on-update' } });
  assert.equal(updated.status, 200);
  assert.equal(updated.json.dc_connectionid, created.json.dc_connectionid);
  assert.equal(updated.json.dc_name, 'second');
  assert.equal(updated.json.dc_connectionkey, 'conn-1', 'key columns in the body are dropped on the update path');
  assert.ok(Number(updated.json['@odata.etag'].slice(3, -1)) > Number(created.json['@odata.etag'].slice(3, -1)));
  const plain = await api("dc_connections(dc_connectionkey='conn-1')", { method: 'PATCH', body: { dc_name: 'third' } });
  assert.equal(plain.status, 204);
  assert.equal(plain.text, '');
  assert.equal(plain.headers.get('odata-entityid'), `${peer.url}/api/data/v9.2/dc_connections(dc_connectionkey='conn-1')`);
  assert.equal(plain.headers.get('etag'), null);
  const plainCreate = await api("dc_connections(dc_connectionkey='conn-2')", { method: 'PATCH', body: { dc_name: 'made by upsert', dc_connectionkey: 'conn-2b' } });
  assert.equal(plainCreate.status, 204);
  const rows = await rowsOf('dc_connections');
  assert.equal(rows.length, 2);
  assert.ok(rows.some((r) => r.dc_connectionkey === 'conn-2b'), 'on the create path body key values win');
  // upsert by GUID creates a record with that id
  const gid = 'aaaaaaaa-6629-ed11-9db1-0022482746b6';
  const byGuid = await api(`dc_connections(${gid})`, { method: 'PATCH', body: { dc_name: 'guid upsert' } });
  assert.equal(byGuid.status, 204);
  assert.equal(byGuid.headers.get('odata-entityid'), `${peer.url}/api/data/v9.2/dc_connections(${gid})`);
  assert.equal((await api(`dc_connections(${gid})`)).json.dc_name, 'guid upsert');
});

test('If-Match: * is update-only (404, nothing created); If-None-Match: * is create-only (412 0x80040237)', async () => {
  await fresh();
  const missing = '11111111-6629-ed11-9db1-0022482746b6';
  assertDvError(await api(`dc_connections(${missing})`, { method: 'PATCH', headers: { 'If-Match': '*' }, body: { dc_name: 'x' } }),
    404, '0x80040217', `Entity 'dc_connection' With Id = ${missing} Does Not Exist`);
  assertDvError(await api("dc_connections(dc_connectionkey='ghost')", { method: 'PATCH', headers: { 'If-Match': '*' }, body: { dc_name: 'x' } }),
    404, '0x80048d02', 'A record with the specified key values does not exist in dc_connection entity');
  assert.equal((await rowsOf('dc_connections')).length, 0);

  const created = await api("dc_connections(dc_connectionkey='once')", { method: 'PATCH', headers: { 'If-None-Match': '*' }, body: { dc_name: 'one' } });
  assert.equal(created.status, 204);
  const again = await api("dc_connections(dc_connectionkey='once')", { method: 'PATCH', headers: { 'If-None-Match': '*' }, body: { dc_name: 'two' } });
  assertDvError(again, 412, '0x80040237', 'A record with matching key values already exists.');
  const rows = await rowsOf('dc_connections');
  assert.equal(rows.length, 1);
  assert.equal(rows[0].dc_name, 'one');
  const upd = await api("dc_connections(dc_connectionkey='once')", { method: 'PATCH', headers: { 'If-Match': '*' }, body: { dc_name: 'updated' } });
  assert.equal(upd.status, 204);
  assert.equal((await rowsOf('dc_connections'))[0].dc_name, 'updated');
});

test('optimistic concurrency: If-Match W/"n" mismatch is 412 0x80060882 and changes nothing; a match updates and bumps the ETag', async () => {
  await fresh();
  const c = await api('dc_connections', { method: 'POST', headers: { Prefer: 'return=representation' }, body: { dc_name: 'v1' } });
  const id = c.json.dc_connectionid;
  const etag1 = c.json['@odata.etag'];
  const ok = await api(`dc_connections(${id})?$select=dc_name`, { method: 'PATCH', headers: { 'If-Match': etag1, Prefer: 'return=representation' }, body: { dc_name: 'v2' } });
  assert.equal(ok.status, 200);
  const etag2 = ok.headers.get('etag');
  assert.notEqual(etag2, etag1);
  const stale = await api(`dc_connections(${id})`, { method: 'PATCH', headers: { 'If-Match': etag1 }, body: { dc_name: 'lost update' } });
  assertDvError(stale, 412, '0x80060882', "The version of the existing record doesn't match the RowVersion property provided.");
  const now = await api(`dc_connections(${id})`);
  assert.equal(now.json.dc_name, 'v2');
  assert.equal(now.headers.get('etag'), etag2);
  const plain = await api(`dc_connections(${id})`, { method: 'PATCH', headers: { 'If-Match': etag2 }, body: { dc_name: 'v3' } });
  assert.equal(plain.status, 204);
  assert.equal(plain.headers.get('odata-entityid'), `${peer.url}/api/data/v9.2/dc_connections(${id})`);
  // GET with If-None-Match: 304 while unchanged, 200 with the new ETag after a change
  const cur = await api(`dc_connections(${id})`);
  const notModified = await api(`dc_connections(${id})`, { headers: { 'If-None-Match': cur.headers.get('etag') } });
  assert.equal(notModified.status, 304);
  assert.equal(notModified.text, '');
  const changed = await api(`dc_connections(${id})`, { headers: { 'If-None-Match': etag1 } });
  assert.equal(changed.status, 200);
});

test('versions increase on every change, across records', async () => {
  await fresh();
  const seen = [];
  const a = await api('dc_connections', { method: 'POST', headers: { Prefer: 'return=representation' }, body: { dc_name: 'a' } });
  seen.push(a.json.versionnumber);
  const b = await api('dc_connections', { method: 'POST', headers: { Prefer: 'return=representation' }, body: { dc_name: 'b' } });
  seen.push(b.json.versionnumber);
  for (let i = 0; i < 3; i++) {
    const u = await api(`dc_connections(${a.json.dc_connectionid})`, { method: 'PATCH', headers: { Prefer: 'return=representation' }, body: { dc_failures: i } });
    seen.push(u.json.versionnumber);
    assert.equal(u.json['@odata.etag'], `W/"${u.json.versionnumber}"`);
  }
  for (let i = 1; i < seen.length; i++) assert.ok(seen[i] > seen[i - 1], `versions ${seen}`);
});

test('DELETE: If-Match mismatch 412, then 204, then 404; by alternate key too', async () => {
  await fresh();
  const c = await api('dc_connections', { method: 'POST', headers: { Prefer: 'return=representation' }, body: { dc_name: 'd', dc_connectionkey: 'del' } });
  const id = c.json.dc_connectionid;
  await api(`dc_connections(${id})`, { method: 'PATCH', body: { dc_name: 'changed' } });
  assertDvError(await api(`dc_connections(${id})`, { method: 'DELETE', headers: { 'If-Match': c.json['@odata.etag'] } }), 412, '0x80060882');
  assert.equal((await rowsOf('dc_connections')).length, 1);
  const cur = (await api(`dc_connections(${id})`)).headers.get('etag');
  const del = await api(`dc_connections(${id})`, { method: 'DELETE', headers: { 'If-Match': cur } });
  assert.equal(del.status, 204);
  assertDvError(await api(`dc_connections(${id})`, { method: 'DELETE' }), 404, '0x80040217');
  await api('dc_connections', { method: 'POST', body: { dc_connectionkey: 'del2' } });
  assert.equal((await api("dc_connections(dc_connectionkey='del2')", { method: 'DELETE' })).status, 204);
  assertDvError(await api("dc_connections(dc_connectionkey='del2')", { method: 'DELETE' }), 404, '0x80048d02');
});

// ---------------------------------------------------------------------------
// queries
// ---------------------------------------------------------------------------

async function seedQueryRows() {
  await fresh();
  const rows = [
    { dc_connectionkey: 'c1', dc_provider: 'acme', dc_status: 'active', dc_failures: 0, dc_expiresat: 100, dc_hasrefresh: true, dc_owner: "O'Bryan" },
    { dc_connectionkey: 'c2', dc_provider: 'acme', dc_status: 'pending', dc_failures: 2, dc_expiresat: 200, dc_hasrefresh: false, dc_owner: null },
    { dc_connectionkey: 'c3', dc_provider: 'globex', dc_status: 'active', dc_failures: 5, dc_expiresat: 300, dc_hasrefresh: true, dc_owner: 'alice' },
    { dc_connectionkey: 'c4', dc_provider: 'ACME', dc_status: 'needs_reauth', dc_failures: 1, dc_expiresat: null, dc_hasrefresh: true, dc_owner: 'bob' },
    { dc_connectionkey: 'c5', dc_provider: 'initech', dc_status: 'active', dc_failures: 0, dc_expiresat: 50, dc_hasrefresh: true, dc_owner: 'Zoë' },
  ];
  const r = await ctl('tables/dc_connections', { rows });
  assert.equal(r.status, 200);
}

const keysOf = (r) => r.json.value.map((x) => x.dc_connectionkey);
const q = (s) => `dc_connections?${s}`;

test('$filter: eq ne lt le gt ge, and/or/not, parentheses, null, numbers, quoted strings with \'\', booleans', async () => {
  await seedQueryRows();
  const run = async (filter, extra = '') => {
    const r = await api(q(`$select=dc_connectionkey&$orderby=dc_connectionkey&$filter=${encodeURIComponent(filter)}${extra}`));
    assert.equal(r.status, 200, `${filter}: ${r.text}`);
    return keysOf(r);
  };
  assert.deepEqual(await run("dc_provider eq 'acme'"), ['c1', 'c2', 'c4'], 'string comparison is case-insensitive');
  assert.deepEqual(await run("dc_provider ne 'acme'"), ['c3', 'c5']);
  assert.deepEqual(await run('dc_failures gt 1'), ['c2', 'c3']);
  assert.deepEqual(await run('dc_failures ge 1'), ['c2', 'c3', 'c4']);
  assert.deepEqual(await run('dc_failures lt 1'), ['c1', 'c5']);
  assert.deepEqual(await run('dc_failures le 1'), ['c1', 'c4', 'c5']);
  assert.deepEqual(await run('dc_expiresat eq null'), ['c4']);
  assert.deepEqual(await run('dc_expiresat ne null'), ['c1', 'c2', 'c3', 'c5']);
  assert.deepEqual(await run('dc_expiresat lt 250'), ['c1', 'c2', 'c5'], 'null matches no comparison');
  assert.deepEqual(await run("dc_owner ne 'bob'"), ['c1', 'c3', 'c5'], 'ne does not match null (SQL semantics)');
  assert.deepEqual(await run("dc_owner eq 'O''Bryan'"), ['c1']);
  assert.deepEqual(await run("dc_owner eq 'zoe'"), ['c5'], 'accent-insensitive like Latin1_General_CI_AI');
  assert.deepEqual(await run('dc_hasrefresh eq false'), ['c2']);
  assert.deepEqual(await run("dc_status eq 'active' and dc_hasrefresh eq true and (dc_provider eq 'acme' or dc_provider eq 'initech')"), ['c1', 'c5']);
  assert.deepEqual(await run("(dc_status eq 'pending' or dc_status eq 'needs_reauth') and dc_failures gt 0"), ['c2', 'c4']);
  assert.deepEqual(await run("not (dc_status eq 'active')"), ['c2', 'c4']);
  assert.deepEqual(await run("contains(dc_owner,'ryan') or startswith(dc_provider,'glo')"), ['c1', 'c3']);
  assert.deepEqual(await run('dc_expiresat lt 1000', '&$top=2'), ['c1', 'c2']);
  // $orderby desc and null ordering (nulls first ascending)
  const ord = await api(q('$select=dc_connectionkey&$orderby=dc_expiresat asc,dc_connectionkey desc'));
  assert.deepEqual(keysOf(ord), ['c4', 'c5', 'c1', 'c2', 'c3']);
  const ord2 = await api(q('$select=dc_connectionkey&$orderby=dc_failures desc,dc_connectionkey'));
  assert.deepEqual(keysOf(ord2), ['c3', 'c2', 'c4', 'c1', 'c5']);
  // rows carry @odata.etag and the primary key; the collection has @odata.context
  const one = await api(q("$select=dc_provider&$filter=dc_connectionkey eq 'c1'"));
  assert.equal(one.json['@odata.context'], `${peer.url}/api/data/v9.2/$metadata#dc_connections(dc_provider)`);
  assert.deepEqual(Object.keys(one.json.value[0]), ['@odata.etag', 'dc_provider', 'dc_connectionid']);
  const counted = await api(q("$count=true&$filter=dc_provider eq 'acme'&$top=1"));
  assert.equal(counted.json['@odata.count'], 3);
  assert.equal(counted.json.value.length, 1);
});

test('$filter: unsupported or invalid syntax is a 400, never silently ignored', async () => {
  await seedQueryRows();
  const bad = async (filter, code = '0x80060888', message) => {
    const r = await api(q(`$filter=${encodeURIComponent(filter)}`));
    assertDvError(r, 400, code, message);
    return r;
  };
  await bad("dc_provider eqq 'acme'", '0x80060888', /^Syntax error at position \d+ in /);
  await bad("dc_provider eq 'acme", '0x80060888', /unterminated string literal/);
  await bad("dc_nope eq 'x'", '0x80060888', "Could not find a property named 'dc_nope' on type 'Microsoft.Dynamics.CRM.dc_connection'.");
  await bad("dc_failures eq '1'", '0x80060888', "A binary operator with incompatible types was detected. Found operand types 'Edm.Int32' and 'Edm.String' for operator kind 'Equal'.");
  await bad('dc_provider eq 5', '0x80060888', /incompatible types/);
  await bad("Microsoft.Dynamics.CRM.In(PropertyName='dc_status',PropertyValues=['a'])", '0x80060888', /not supported by the Dataverse test double/);
  await bad("owninguser/fullname eq 'x'", '0x80060888', /not supported by the Dataverse test double/);
  await bad("(dc_provider eq 'acme'", '0x80060888', /Syntax error/);
  await bad("dc_provider eq 'acme' dc_status eq 'x'", '0x80060888', /Syntax error/);
  await bad('', '0x80060888');
  await bad('dc_name eq dc_provider', '0x80060888', /not supported/);
  assertDvError(await api(q('$orderby=dc_provider sideways')), 400, '0x80060888');
  assertDvError(await api(q('$top=-1')), 400, '0x80060888');
  assertDvError(await api(q('$expand=dc_nothing')), 400, '0x80060888');
});

test('paging: Prefer odata.maxpagesize gives pages with @odata.nextLink carrying a $skiptoken cookie', async () => {
  await fresh();
  const rows = Array.from({ length: 23 }, (_, i) => ({ dc_connectionkey: `p${String(i).padStart(2, '0')}`, dc_failures: i % 4, dc_provider: i % 2 ? 'odd' : 'even' }));
  await ctl('tables/dc_connections', { rows });
  const seen = [];
  let url = q("$select=dc_connectionkey,dc_failures&$filter=dc_provider eq 'even' or dc_failures ge 0&$orderby=dc_failures desc,dc_connectionkey");
  let pages = 0;
  const PAGE = 5;
  while (url) {
    const r = await api(url, { headers: { Prefer: `odata.maxpagesize=${PAGE}` } });
    assert.equal(r.status, 200, r.text);
    assert.equal(r.headers.get('preference-applied'), `odata.maxpagesize=${PAGE}`);
    assert.ok(r.json.value.length <= PAGE);
    seen.push(...r.json.value.map((x) => x.dc_connectionkey));
    url = r.json['@odata.nextLink'];
    if (url) {
      assert.ok(url.startsWith(`${peer.url}/api/data/v9.2/dc_connections?`), url);
      assert.match(url, /\$skiptoken=%3Ccookie%20pagenumber=%22\d+%22%20pagingcookie=%22.+%22%20istracking=%22False%22%20\/%3E$/);
      assert.ok(!/\$skip=/.test(url));
      // a rewritten row does not shift later pages (keyset paging)
      if (pages === 0) await api("dc_connections(dc_connectionkey='p22')", { method: 'PATCH', body: { dc_name: 'touched' } });
    }
    pages++;
  }
  assert.equal(pages, 5);
  const expected = rows
    .slice()
    .sort((a, b) => b.dc_failures - a.dc_failures || (a.dc_connectionkey < b.dc_connectionkey ? -1 : 1))
    .map((r) => r.dc_connectionkey);
  assert.deepEqual(seen, expected);
  // without the preference the default page (5000) holds everything and there is no nextLink
  const all = await api(q('$select=dc_connectionkey'));
  assert.equal(all.json.value.length, 23);
  assert.equal(all.json['@odata.nextLink'], undefined);
  assert.equal(all.headers.get('preference-applied'), null);
  // a tampered skiptoken is a 400
  assertDvError(await api(q('$skiptoken=%3Ccookie%20bogus%20/%3E')), 400, '0x80060888');
});

// ---------------------------------------------------------------------------
// metadata provisioning
// ---------------------------------------------------------------------------

const SOLUTION = { 'MSCRM.SolutionUniqueName': 'DynamicsCompanion' };
const label = (text) => ({
  '@odata.type': 'Microsoft.Dynamics.CRM.Label',
  LocalizedLabels: [{ '@odata.type': 'Microsoft.Dynamics.CRM.LocalizedLabel', Label: text, LanguageCode: 1033 }],
});
const CAPTURE_COLUMNS = [
  { '@odata.type': 'Microsoft.Dynamics.CRM.StringAttributeMetadata', SchemaName: 'dc_CaptureKey', MaxLength: 100, FormatName: { Value: 'Text' } },
  { '@odata.type': 'Microsoft.Dynamics.CRM.MemoAttributeMetadata', SchemaName: 'dc_Code', MaxLength: 10000 },
  { '@odata.type': 'Microsoft.Dynamics.CRM.IntegerAttributeMetadata', SchemaName: 'dc_Attempts', MinValue: 0, MaxValue: 1000 },
  { '@odata.type': 'Microsoft.Dynamics.CRM.BigIntAttributeMetadata', SchemaName: 'dc_ReceivedAt' },
  { '@odata.type': 'Microsoft.Dynamics.CRM.DateTimeAttributeMetadata', SchemaName: 'dc_ExpiresOn', Format: 'DateAndTime', DateTimeBehavior: { Value: 'TimeZoneIndependent' } },
  {
    '@odata.type': 'Microsoft.Dynamics.CRM.BooleanAttributeMetadata',
    SchemaName: 'dc_Consumed',
    OptionSet: { '@odata.type': 'Microsoft.Dynamics.CRM.BooleanOptionSetMetadata', TrueOption: { Value: 1, Label: label('Yes') }, FalseOption: { Value: 0, Label: label('No') } },
  },
].map((c) => ({ ...c, DisplayName: label(c.SchemaName.slice(3)), RequiredLevel: { Value: 'None' } }));

// What a `provision` command does: look, create what is missing, wait for the key index.
async function provision() {
  const seenStatuses = [];
  const ent = await api("EntityDefinitions(LogicalName='dc_capture')?$select=LogicalName,EntitySetName,PrimaryIdAttribute");
  if (ent.status === 404) {
    const r = await api('EntityDefinitions', {
      method: 'POST',
      headers: SOLUTION,
      body: {
        '@odata.type': 'Microsoft.Dynamics.CRM.EntityMetadata',
        SchemaName: 'dc_Capture',
        DisplayName: label('Capture'),
        DisplayCollectionName: label('Captures'),
        Description: label('OAuth redirects captured for Dynamics'),
        OwnershipType: 'OrganizationOwned',
        IsActivity: false,
        HasActivities: false,
        HasNotes: false,
        Attributes: [{
          '@odata.type': 'Microsoft.Dynamics.CRM.StringAttributeMetadata',
          SchemaName: 'dc_Name',
          RequiredLevel: { Value: 'None' },
          MaxLength: 100,
          FormatName: { Value: 'Text' },
          DisplayName: label('Name'),
          IsPrimaryName: true,
        }],
      },
    });
    assert.equal(r.status, 204, r.text);
    assert.match(r.headers.get('odata-entityid'), new RegExp(`^${peer.url}/api/data/v9.2/EntityDefinitions\\([0-9a-f-]{36}\\)$`));
  } else {
    assert.equal(ent.status, 200, ent.text);
  }
  const attrs = await api("EntityDefinitions(LogicalName='dc_capture')/Attributes?$select=LogicalName");
  assert.equal(attrs.status, 200, attrs.text);
  const have = new Set(attrs.json.value.map((a) => a.LogicalName));
  for (const col of CAPTURE_COLUMNS) {
    if (have.has(col.SchemaName.toLowerCase())) continue;
    const r = await api("EntityDefinitions(LogicalName='dc_capture')/Attributes", { method: 'POST', headers: SOLUTION, body: col });
    assert.equal(r.status, 204, r.text);
    assert.match(r.headers.get('odata-entityid'), /EntityDefinitions\([0-9a-f-]{36}\)\/Attributes\([0-9a-f-]{36}\)$/);
  }
  const keys = await api("EntityDefinitions(LogicalName='dc_capture')/Keys?$select=SchemaName,KeyAttributes,EntityKeyIndexStatus");
  assert.equal(keys.status, 200, keys.text);
  if (!keys.json.value.some((k) => k.SchemaName === 'dc_capture_key')) {
    const r = await api("EntityDefinitions(LogicalName='dc_capture')/Keys", {
      method: 'POST', headers: SOLUTION, body: { SchemaName: 'dc_capture_key', DisplayName: label('Capture key'), KeyAttributes: ['dc_capturekey'] },
    });
    assert.equal(r.status, 204, r.text);
    assert.match(r.headers.get('odata-entityid'), /\/Keys\([0-9a-f-]{36}\)$/);
  }
  const deadline = Date.now() + 5000;
  for (;;) {
    const k = await api("EntityDefinitions(LogicalName='dc_capture')/Keys(LogicalName='dc_capture_key')?$select=EntityKeyIndexStatus");
    assert.equal(k.status, 200, k.text);
    seenStatuses.push(k.json.EntityKeyIndexStatus);
    if (k.json.EntityKeyIndexStatus === 'Active') break;
    assert.ok(['Pending', 'InProgress'].includes(k.json.EntityKeyIndexStatus));
    assert.ok(Date.now() < deadline, 'key never became Active');
    await new Promise((r) => setTimeout(r, 40));
  }
  return seenStatuses;
}

test('metadata provisioning: table, columns, key (Pending -> Active), idempotent second run with zero metadata writes', async () => {
  await ctl('wipe', { metadata: true });
  await ctl('reset', {});
  // absent at first
  assertDvError(await api("EntityDefinitions(LogicalName='dc_capture')"), 404, '0x80040217', /dc_capture/);
  const byFilter = await api("EntityDefinitions?$select=LogicalName,EntitySetName,PrimaryIdAttribute&$filter=LogicalName eq 'dc_capture'");
  assert.equal(byFilter.status, 200);
  assert.deepEqual(byFilter.json.value, []);
  assertDvError(await api('dc_captures'), 400, '0x80060888');

  const statuses = await provision();
  assert.equal(statuses[0], 'Pending', `statuses seen: ${statuses}`);
  assert.equal(statuses.at(-1), 'Active');
  const s1 = (await ctl('stats')).json;
  assert.equal(s1.metadata_writes, 1 + CAPTURE_COLUMNS.length + 1, JSON.stringify(s1.metadata_write_log));
  assert.deepEqual(s1.metadata_writes_by_kind, { entity: 1, attribute: CAPTURE_COLUMNS.length, key: 1 });

  const again = await provision();
  assert.deepEqual(again, ['Active']);
  assert.equal((await ctl('stats')).json.metadata_writes, s1.metadata_writes, 'a second provision run changes nothing');

  // shape of the definitions
  const ent = await api("EntityDefinitions?$select=LogicalName,EntitySetName,PrimaryIdAttribute,PrimaryNameAttribute&$filter=LogicalName eq 'dc_capture'");
  assert.equal(ent.json.value.length, 1);
  assert.deepEqual(ent.json.value[0], { MetadataId: ent.json.value[0].MetadataId, LogicalName: 'dc_capture', EntitySetName: 'dc_captures', PrimaryIdAttribute: 'dc_captureid', PrimaryNameAttribute: 'dc_name' });
  const one = await api("EntityDefinitions(LogicalName='dc_capture')?$expand=Keys($select=KeyAttributes,EntityKeyIndexStatus)");
  assert.equal(one.json.EntitySetName, 'dc_captures');
  assert.equal(one.json.OwnershipType, 'OrganizationOwned');
  assert.equal(one.json.DisplayName.UserLocalizedLabel.Label, 'Capture');
  assert.deepEqual(one.json.Keys.map((k) => [k.KeyAttributes, k.EntityKeyIndexStatus]), [[['dc_capturekey'], 'Active']]);
  const types = {
    dc_capturekey: 'StringAttributeMetadata', dc_code: 'MemoAttributeMetadata', dc_attempts: 'IntegerAttributeMetadata',
    dc_receivedat: 'BigIntAttributeMetadata', dc_expireson: 'DateTimeAttributeMetadata', dc_consumed: 'BooleanAttributeMetadata',
    dc_name: 'StringAttributeMetadata', dc_captureid: 'UniqueIdentifierAttributeMetadata',
  };
  for (const [name, t] of Object.entries(types)) {
    const a = await api(`EntityDefinitions(LogicalName='dc_capture')/Attributes(LogicalName='${name}')`);
    assert.equal(a.status, 200, a.text);
    assert.equal(a.json['@odata.type'], `#Microsoft.Dynamics.CRM.${t}`);
    assert.equal(a.json.LogicalName, name);
  }
  const str = await api("EntityDefinitions(LogicalName='dc_capture')/Attributes(LogicalName='dc_capturekey')/Microsoft.Dynamics.CRM.StringAttributeMetadata?$select=MaxLength");
  assert.equal(str.json.MaxLength, 100);
  const big = await api("EntityDefinitions(LogicalName='dc_capture')/Attributes(LogicalName='dc_receivedat')");
  assert.match(big.text, /"MaxValue":9223372036854775807/);
  const strings = await api("EntityDefinitions(LogicalName='dc_capture')/Attributes?$select=LogicalName&$filter=AttributeType eq Microsoft.Dynamics.CRM.AttributeTypeCode'String'");
  assert.deepEqual(strings.json.value.map((a) => a.LogicalName).sort(), ['dc_capturekey', 'dc_name']);
  const ctlView = (await ctl('tables/dc_captures')).json;
  assert.equal(ctlView.solution, 'DynamicsCompanion');

  // the new table works, with its key
  const c = await api("dc_captures(dc_capturekey='abc')", { method: 'PATCH', headers: { 'If-None-Match': '*' }, body: { dc_code: 'sealed', dc_attempts: 1, dc_receivedat: 1714551630123, dc_consumed: false, dc_expireson: '2030-01-01T00:00:00Z' } });
  assert.equal(c.status, 204, c.text);
  assertDvError(await api('dc_captures', { method: 'POST', body: { dc_capturekey: 'ABC' } }), 412, '0x80060892');
  assertDvError(await api('dc_captures', { method: 'POST', body: { dc_attempts: 1001 } }), 400, '0x80044331', /outside the valid range/);
  const ts = await api("dc_captures?$select=dc_capturekey&$filter=dc_expireson gt 2029-12-31T00:00:00Z and dc_receivedat eq 1714551630123");
  assert.deepEqual(ts.json.value.map((x) => x.dc_capturekey), ['abc']);
});

test('metadata: duplicates and invalid definitions are rejected; a Pending key is not yet usable in URLs', async () => {
  await ctl('wipe', { metadata: true });
  await ctl('reset', {});
  await ctl('config', { key_activation_ms: 300 });
  await provision();
  const before = (await ctl('stats')).json.metadata_writes;
  const dupTable = await api('EntityDefinitions', {
    method: 'POST',
    body: { SchemaName: 'dc_Capture', DisplayName: label('x'), DisplayCollectionName: label('xs'), OwnershipType: 'UserOwned', Attributes: [{ '@odata.type': 'Microsoft.Dynamics.CRM.StringAttributeMetadata', SchemaName: 'dc_Name', IsPrimaryName: true, DisplayName: label('n') }] },
  });
  assertDvError(dupTable, 412, '0x80040237', /already exists/);
  assertDvError(await api("EntityDefinitions(LogicalName='dc_capture')/Attributes", { method: 'POST', body: CAPTURE_COLUMNS[0] }), 412, '0x80040237');
  assertDvError(await api("EntityDefinitions(LogicalName='dc_capture')/Keys", { method: 'POST', body: { SchemaName: 'dc_capture_key', KeyAttributes: ['dc_code'] } }), 412, '0x80040237');
  assertDvError(await api("EntityDefinitions(LogicalName='dc_capture')/Keys", { method: 'POST', body: { SchemaName: 'dc_other_key', KeyAttributes: ['dc_code'] } }), 400, '0x80040203', /Memo cannot be part of an entity key/);
  assertDvError(await api("EntityDefinitions(LogicalName='dc_capture')/Keys", { method: 'POST', body: { SchemaName: 'dc_other_key', KeyAttributes: ['dc_receivedat'] } }), 400, '0x80040203', /BigInt cannot be part/);
  assertDvError(await api("EntityDefinitions(LogicalName='dc_capture')/Attributes", { method: 'POST', body: { '@odata.type': 'Microsoft.Dynamics.CRM.StringAttributeMetadata', SchemaName: 'nounderscore', DisplayName: label('n') } }), 400, '0x80040203', /customization prefix/);
  assertDvError(await api("EntityDefinitions(LogicalName='dc_capture')/Attributes", { method: 'POST', body: { '@odata.type': 'Microsoft.Dynamics.CRM.BooleanAttributeMetadata', SchemaName: 'dc_Flag', DisplayName: label('f') } }), 400, '0x80040203', /OptionSet/);
  assertDvError(await api("EntityDefinitions(LogicalName='dc_nothing')/Attributes"), 404, '0x80040217');
  assertDvError(await api("EntityDefinitions(LogicalName='dc_capture')/Attributes(LogicalName='dc_nothing')"), 404, '0x80040217');
  assert.equal((await ctl('stats')).json.metadata_writes, before, 'rejected metadata writes are not counted');

  // a second key is Pending for a while: not usable in URLs, then usable
  await ctl('config', { key_activation_ms: 800 });
  const r = await api("EntityDefinitions(LogicalName='dc_capture')/Keys", { method: 'POST', headers: SOLUTION, body: { SchemaName: 'dc_attempts_key', KeyAttributes: ['dc_attempts'] } });
  assert.equal(r.status, 204);
  const pending = await api("EntityDefinitions(LogicalName='dc_capture')/Keys(LogicalName='dc_attempts_key')");
  assert.equal(pending.json.EntityKeyIndexStatus, 'Pending');
  assertDvError(await api('dc_captures(dc_attempts=7)'), 400, '0x80060888', /The key in the request URI is not valid/);
  const deadline = Date.now() + 5000;
  while ((await api("EntityDefinitions(LogicalName='dc_capture')/Keys(LogicalName='dc_attempts_key')")).json.EntityKeyIndexStatus !== 'Active') {
    assert.ok(Date.now() < deadline, 'key never became Active');
    await new Promise((res) => setTimeout(res, 40));
  }
  assertDvError(await api('dc_captures(dc_attempts=7)'), 404, '0x80048d02');

  // a key over data that already holds duplicates fails
  await api('dc_captures', { method: 'POST', body: { dc_code: 'dup' } });
  await api('dc_captures', { method: 'POST', body: { dc_code: 'dup' } });
  await api("EntityDefinitions(LogicalName='dc_capture')/Attributes", { method: 'POST', body: { '@odata.type': 'Microsoft.Dynamics.CRM.StringAttributeMetadata', SchemaName: 'dc_Tag', DisplayName: label('t'), MaxLength: 50 } });
  await api('dc_captures', { method: 'POST', body: { dc_tag: 'same' } });
  await api('dc_captures', { method: 'POST', body: { dc_tag: 'SAME' } });
  await ctl('config', { key_activation_ms: 0 });
  await api("EntityDefinitions(LogicalName='dc_capture')/Keys", { method: 'POST', body: { SchemaName: 'dc_tag_key', KeyAttributes: ['dc_tag'] } });
  const failed = await api("EntityDefinitions(LogicalName='dc_capture')/Keys(LogicalName='dc_tag_key')?$select=EntityKeyIndexStatus");
  assert.equal(failed.json.EntityKeyIndexStatus, 'Failed');
  await ctl('config', { key_activation_ms: 300 });
});

// ---------------------------------------------------------------------------
// application users (§6)
// ---------------------------------------------------------------------------

test('application users: create a systemuser, assign a role with $ref, look it up by applicationid', async () => {
  await fresh();
  const who = (await api('WhoAmI')).json;
  const root = await api('businessunits?$select=businessunitid,name&$filter=parentbusinessunitid eq null');
  assert.deepEqual(root.json.value.map((b) => b.businessunitid), [who.BusinessUnitId]);
  const appId = 'c0ffee00-5360-4605-a0ef-d918140e77da';
  const r = await api('systemusers', { method: 'POST', body: { applicationid: appId, accessmode: 4, isdisabled: false, 'businessunitid@odata.bind': `/businessunits(${who.BusinessUnitId})` } });
  assert.equal(r.status, 204, r.text);
  const userId = idFrom(r.headers.get('odata-entityid'));
  const roles = await api("roles?$select=roleid,name&$filter=name eq 'System Administrator'");
  const roleId = roles.json.value[0].roleid;
  const ref = await api(`systemusers(${userId})/systemuserroles_association/$ref`, { method: 'POST', body: { '@odata.id': `${peer.url}/api/data/v9.2/roles(${roleId})` } });
  assert.equal(ref.status, 204);
  const found = await api(`systemusers?$select=applicationid,systemuserid,fullname,isdisabled,_businessunitid_value&$expand=systemuserroles_association($select=roleid,name)&$filter=applicationid eq ${appId}`);
  assert.equal(found.status, 200, found.text);
  assert.equal(found.json.value.length, 1);
  assert.equal(found.json.value[0].systemuserid, userId);
  assert.equal(found.json.value[0]._businessunitid_value, who.BusinessUnitId);
  assert.deepEqual(found.json.value[0].systemuserroles_association.map((x) => x.roleid), [roleId]);
  assertDvError(await api('systemusers', { method: 'POST', body: { applicationid: appId, accessmode: 4 } }), 412, '0x80040237');
  const unref = await api(`systemusers(${userId})/systemuserroles_association/$ref?$id=${peer.url}/api/data/v9.2/roles(${roleId})`, { method: 'DELETE' });
  assert.equal(unref.status, 204);
});

// ---------------------------------------------------------------------------
// faults, latency, stats, control API
// ---------------------------------------------------------------------------

test('faults: 429 with Retry-After and the service-protection body; a faulted write changes nothing', async () => {
  await fresh();
  const c = await api('dc_connections', { method: 'POST', headers: { Prefer: 'return=representation' }, body: { dc_name: 'stable', dc_connectionkey: 'f1' } });
  const id = c.json.dc_connectionid;
  const before = await rowsOf('dc_connections');
  const set = await ctl('faults', { rate: 1, statuses: [429], retry_after_seconds: 7, methods: ['PATCH', 'POST', 'DELETE'], seed: 1 });
  assert.equal(set.status, 200);
  const r = await api(`dc_connections(${id})`, { method: 'PATCH', body: { dc_name: 'should not land' } });
  assertDvError(r, 429, '0x80072322', 'Number of requests exceeded the limit of 6000 over time window of 300 seconds.');
  assert.equal(r.headers.get('retry-after'), '7');
  const p = await api('dc_connections', { method: 'POST', body: { dc_name: 'no' } });
  assert.equal(p.status, 429);
  const d = await api(`dc_connections(${id})`, { method: 'DELETE' });
  assert.equal(d.status, 429);
  assert.deepEqual(await rowsOf('dc_connections'), before, 'faulted requests have no effect');
  assert.equal((await api(`dc_connections(${id})`)).status, 200, 'GET is not in the faulted methods');
  const s = (await ctl('stats')).json;
  assert.equal(s.faults_injected, 3);
  assert.equal(s.faults_by_status['429'], 3);
  assert.equal(s.by_status['429'], 3);
  // other throttle kinds and 503
  await ctl('faults', { rate: 1, statuses: [429], throttle: 'concurrency' });
  assertDvError(await api('WhoAmI'), 429, '0x80072326', 'Number of concurrent requests exceeded the limit of 52.');
  await ctl('faults', { rate: 1, statuses: [503], count: 1 });
  const u = await api('WhoAmI');
  assertDvError(u, 503, '');
  assert.equal((await api('WhoAmI')).status, 200, 'count limits the number of injected faults');
  // {} clears
  await ctl('faults', {});
  assert.deepEqual((await ctl('faults')).json, {});
  assert.equal((await api(`dc_connections(${id})`, { method: 'PATCH', body: { dc_name: 'lands' } })).status, 204);
  assert.equal((await rowsOf('dc_connections'))[0].dc_name, 'lands');
  assertDvError(await api('WhoAmI', { token: null }), 401, '', undefined);
});

test('faults are seeded and reproducible; 401 comes before faults', async () => {
  await fresh();
  const run = async () => {
    await ctl('faults', { rate: 0.5, statuses: [429, 503], seed: 42 });
    const out = [];
    for (let i = 0; i < 24; i++) out.push((await api('WhoAmI')).status);
    return out;
  };
  const a = await run();
  const b = await run();
  assert.deepEqual(a, b);
  assert.ok(a.includes(200) && a.includes(429) && a.includes(503), `statuses: ${a}`);
  await ctl('faults', { rate: 1, statuses: [429] });
  assert.equal((await api('WhoAmI', { token: null })).status, 401);
  await ctl('faults', {});
  const bad = await ctl('faults', { rate: 2 });
  assert.equal(bad.status, 400);
  const unknown = await ctl('faults', { sttuses: [429] });
  assert.equal(unknown.status, 400);
});

test('a dropped connection gets no response and changes nothing', async () => {
  await fresh();
  await ctl('faults', { drop_connection_rate: 1, methods: ['POST'], count: 1 });
  await assert.rejects(api('dc_connections', { method: 'POST', body: { dc_name: 'lost' } }), TypeError);
  assert.equal((await rowsOf('dc_connections')).length, 0);
  const s = (await ctl('stats')).json;
  assert.equal(s.dropped_connections, 1);
  assert.equal(s.faults_by_status.dropped, 1);
  assert.equal((await api('dc_connections', { method: 'POST', body: { dc_name: 'kept' } })).status, 204);
  assert.equal((await rowsOf('dc_connections')).length, 1);
  await ctl('faults', {});
});

test('latency: delay_ms slows Web API requests but not the control API', async () => {
  await fresh();
  await ctl('faults', { delay_ms: 250 });
  let t0 = Date.now();
  assert.equal((await api('WhoAmI')).status, 200);
  assert.ok(Date.now() - t0 >= 240, `took ${Date.now() - t0} ms`);
  t0 = Date.now();
  await ctl('stats');
  assert.ok(Date.now() - t0 < 200, 'the control API is not delayed');
  await ctl('faults', {});
});

test('stats count per method, entity set, operation and status; reset zeroes counters, keeps data, clears faults; wipe clears data', async () => {
  await fresh();
  await api('dc_connections', { method: 'POST', body: { dc_name: 'a', dc_connectionkey: 's1' } });
  await api("dc_connections(dc_connectionkey='s1')", { method: 'PATCH', body: { dc_name: 'b' } });
  await api("dc_connections(dc_connectionkey='zz')");
  await api("dc_connections?$filter=dc_name eq 'b'");
  await api("EntityDefinitions(LogicalName='dc_connection')?$select=LogicalName");
  const s = (await ctl('stats')).json;
  assert.equal(s.requests, 5);
  assert.deepEqual(s.by_method, { POST: 1, PATCH: 1, GET: 3 });
  assert.deepEqual(s.by_entity_set, { dc_connections: 4, EntityDefinitions: 1 });
  assert.deepEqual(s.by_operation, { 'POST dc_connections': 1, 'PATCH dc_connections': 1, 'GET dc_connections': 2, 'GET EntityDefinitions': 1 });
  assert.deepEqual(s.by_status, { 204: 2, 404: 1, 200: 2 });
  assert.deepEqual(s.tokens, { 'tok-a': 5 });
  assert.equal(s.metadata_writes, 0);
  await ctl('faults', { rate: 1 });
  await ctl('reset', {});
  const z = (await ctl('stats')).json;
  assert.equal(z.requests, 0);
  assert.deepEqual(z.tokens, {});
  assert.deepEqual((await ctl('faults')).json, {});
  assert.equal((await rowsOf('dc_connections')).length, 1, 'reset keeps data');
  const dump = (await ctl('tables/dc_connections')).json;
  assert.equal(dump.entity_set, 'dc_connections');
  assert.deepEqual(dump.keys, [{ name: 'dc_connection_key', attributes: ['dc_connectionkey'], status: 'Active', solution: null }]);
  assert.equal(dump.rows[0].dc_name, 'b', 'rows are dumped as stored');
  assert.equal(typeof dump.rows[0]['@version'], 'number');
  await ctl('wipe', {});
  assert.equal((await rowsOf('dc_connections')).length, 0);
  assert.equal((await api('WhoAmI')).status, 200, 'wipe re-seeds the built-in user');
  const tablesList = (await ctl('tables')).json.tables.map((t) => t.entity_set);
  assert.ok(tablesList.includes('dc_connections') && tablesList.includes('systemusers'));
});

test('service document and $metadata', async () => {
  const doc = await api('');
  assert.equal(doc.status, 200);
  assert.ok(doc.json.value.some((v) => v.name === 'dc_connections' && v.kind === 'EntitySet' && v.url === 'dc_connections'));
  const md = await api('$metadata');
  assert.equal(md.status, 200);
  assert.match(md.text, /<EntitySet Name="dc_connections" EntityType="Microsoft\.Dynamics\.CRM\.dc_connection" \/>/);
});

// ---------------------------------------------------------------------------
// HTTPS mode
// ---------------------------------------------------------------------------

test('HTTPS mode with a throwaway self-signed certificate', async (t) => {
  const which = spawnSync('openssl', ['version'], { encoding: 'utf8' });
  if (which.error || which.status !== 0) {
    t.skip('openssl is not installed: cannot generate a throwaway certificate, HTTPS mode not tested');
    return;
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dv-peer-tls-'));
  try {
    const cert = path.join(dir, 'cert.pem');
    const key = path.join(dir, 'key.pem');
    const gen = spawnSync('openssl', [
      'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '1',
      '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost',
    ], { encoding: 'utf8' });
    assert.equal(gen.status, 0, gen.stderr);
    const p = await startPeer({ tls: { cert, key }, accepted_tokens: ['tls-token'] });
    try {
      assert.match(p.readyLine, /^\{"ready":true,"url":"https:\/\/127\.0\.0\.1:\d+","port":\d+\}$/);
      const ca = fs.readFileSync(cert);
      const get = (p2) => new Promise((resolve, reject) => {
        const req = https.request(`${p.url}${p2}`, { ca, headers: { Authorization: 'Bearer tls-token', Accept: 'application/json' } }, (res) => {
          let data = '';
          res.setEncoding('utf8');
          res.on('data', (d) => { data += d; });
          res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: data }));
        });
        req.on('error', reject);
        req.end();
      });
      const who = await get('/api/data/v9.2/WhoAmI');
      assert.equal(who.status, 200);
      assert.equal(JSON.parse(who.body)['@odata.context'], `${p.url}/api/data/v9.2/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse`);
      // an untrusting client fails the handshake
      await assert.rejects(fetch(`${p.url}/api/data/v9.2/WhoAmI`, { headers: { Authorization: 'Bearer tls-token' } }));
    } finally {
      await p.stop();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
