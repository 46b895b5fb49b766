// Test peer: an in-memory double of the Microsoft Dataverse Web API (Dynamics 365 CE) for the
// Rust integration tests. It follows /work/shared/reference/dataverse.md; see README.md in this
// folder ("Dataverse double") for the behaviours and the choices made on unconfirmed points.
//
// stdout carries exactly one line, the ready line; everything else goes to stderr.
// Node built-ins only.

import * as http from 'node:http';
import * as https from 'node:https';
import * as crypto from 'node:crypto';
import { readFileSync } from 'node:fs';

const toStderr = (...args) => console.error(...args);
console.log = toStderr;
console.info = toStderr;
console.debug = toStderr;

function fail(message) {
  process.stderr.write(`dataverse peer: ${message}\n`);
  process.exit(2);
}

// ---------------------------------------------------------------------------
// small helpers
// ---------------------------------------------------------------------------

const GUID_RE = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;
const isGuid = (s) => typeof s === 'string' && GUID_RE.test(s);
const newGuid = () => crypto.randomUUID();
const nowIso = () => new Date().toISOString().replace(/\.\d{3}Z$/, 'Z');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const etagOf = (version) => `W/"${version}"`;
const hasOwn = (o, k) => Object.prototype.hasOwnProperty.call(o, k);

// SQL Server's default Dataverse collation (Latin1_General_CI_AI) compares strings case- and
// accent-insensitively. Used by $filter, $orderby and alternate-key matching/uniqueness.
function fold(s) {
  return String(s).normalize('NFD').replace(/[\u0300-\u036f]/g, '').toLowerCase();
}

// Numbers that JavaScript cannot hold exactly (Int64 bounds in metadata) are written raw.
class RawNumber {
  constructor(text) { this.text = text; }
}
function toJson(value) {
  const raws = [];
  const text = JSON.stringify(value, (k, v) => {
    if (v instanceof RawNumber) {
      raws.push(v.text);
      return `\u0000RAW${raws.length - 1}\u0000`;
    }
    return v;
  });
  return raws.length ? text.replace(/"\\u0000RAW(\d+)\\u0000"/g, (m, i) => raws[Number(i)]) : text;
}

class DvError extends Error {
  constructor(status, code, message, headers) {
    super(message);
    this.status = status;
    this.code = code;
    this.headers = headers || {};
  }
}

// Error constructors. Codes/messages follow the reference (§3, §4, §5); where the reference is
// silent the README lists the choice.
const E = {
  urlSegment: (segment) => new DvError(400, '0x80060888',
    `URL was not parsed due to an ODataUnrecognizedPathException. Resource not found for the segment provided in the URL.${segment ? ` (segment '${segment}')` : ''}`),
  odata: (message, status = 400) => new DvError(status, '0x80060888', message),
  unsupported: (what) => new DvError(400, '0x80060888', `${what} is not supported by the Dataverse test double.`),
  payload: (table, inner) => new DvError(400, '0x80048d19',
    `Error identified in Payload provided by the user for Entity :'${table.entitySetName}', For more information on this error please follow this help link https://go.microsoft.com/fwlink/?linkid=2195293  ---->  InnerException : ${inner}`),
  unknownProperty: (table, prop) => E.payload(table,
    `Microsoft.OData.ODataException: The property '${prop}' does not exist on type 'Microsoft.Dynamics.CRM.${table.logicalName}'. Make sure to only use property names that are defined by the type or mark the type as open type.`),
  badLiteral: (table, value, edm) => E.payload(table,
    `Microsoft.OData.ODataException: Cannot convert the literal '${typeof value === 'string' ? value : JSON.stringify(value)}' to the expected type '${edm}'.`),
  validation: (message) => new DvError(400, '0x80044331', `A validation error occurred.  ${message}`),
  invalidArgument: (message) => new DvError(400, '0x80040203', message),
  notFoundById: (logicalName, id) => new DvError(404, '0x80040217', `Entity '${logicalName}' With Id = ${id} Does Not Exist`),
  notFoundByKey: (logicalName) => new DvError(404, '0x80048d02', `A record with the specified key values does not exist in ${logicalName} entity`),
  duplicate: () => new DvError(412, '0x80040237', 'A record with matching key values already exists.'),
  duplicateKey: (values, keyName) => new DvError(412, '0x80060892',
    `A record that has the attribute values ${values} already exists. The entity key ${keyName} requires that this set of attributes contains unique values. Select unique values and try again.`),
  versionMismatch: () => new DvError(412, '0x80060882', "The version of the existing record doesn't match the RowVersion property provided."),
  invalidKey: (logicalName) => new DvError(400, '0x80060888',
    `The key in the request URI is not valid for resource 'Microsoft.Dynamics.CRM.${logicalName}'. Ensure that the names and number of key properties match the declared or alternate key properties for the resource 'Microsoft.Dynamics.CRM.${logicalName}'.`),
  noProperty: (typeName, prop) => new DvError(400, '0x80060888', `Could not find a property named '${prop}' on type '${typeName}'.`),
  method: (method) => new DvError(405, '0x80060888', `The requested resource does not support http method '${method}'.`),
};

// Error-detail annotations (reference §3 "Not found", §4), added with odata.include-annotations.
const ERROR_NAMES = {
  '0x80040217': 'ObjectDoesNotExist',
  '0x80048d02': 'ObjectDoesNotExist',
  '0x80040237': 'DuplicateRecord',
  '0x80060892': 'DuplicateRecordEntityKey',
  '0x80060882': 'ConcurrencyVersionMismatch',
  '0x80040333': 'DuplicateRecordsFound',
  '0x80040203': 'InvalidArgument',
  '0x80072322': 'NumberOfRequestsExceeded',
  '0x80072321': 'ExecutionTimeExceeded',
  '0x80072326': 'ConcurrentRequestsExceeded',
};

// ---------------------------------------------------------------------------
// configuration
// ---------------------------------------------------------------------------

let raw = {};
if (process.env.DATAVERSE_PEER_CONFIG) {
  try {
    raw = JSON.parse(process.env.DATAVERSE_PEER_CONFIG);
  } catch (err) {
    fail(`DATAVERSE_PEER_CONFIG is not valid JSON: ${err.message}`);
  }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) fail('DATAVERSE_PEER_CONFIG must be a JSON object');
}

function cfgInt(name, dflt, min = 0) {
  const v = raw[name];
  if (v === undefined || v === null) return dflt;
  if (!Number.isInteger(v) || v < min) fail(`${name} must be an integer >= ${min}`);
  return v;
}
function cfgGuid(name, dflt) {
  const v = raw[name];
  if (v === undefined || v === null) return dflt;
  if (!isGuid(v)) fail(`${name} must be a GUID`);
  return v.toLowerCase();
}

const config = {
  tls: raw.tls ?? null,
  accepted_tokens: raw.accepted_tokens ?? [],
  tenant_id: raw.tenant_id ?? '5b7c1c4e-4a4e-4d7b-9d43-6f1f6cdd2a61',
  organization_id: cfgGuid('organization_id', '4faf1f34-f06d-e511-80d0-00155db07cb1'),
  business_unit_id: cfgGuid('business_unit_id', '0ee11cb0-9c1b-f111-8341-000d3a5b6dba'),
  user_id: cfgGuid('user_id', '61d1cce0-8458-f111-bec7-7ced8d6f9aa0'),
  application_id: cfgGuid('application_id', 'b0ce4ca4-5360-4605-a0ef-d918140e77da'),
  system_administrator_role_id: cfgGuid('system_administrator_role_id', '1be11cb0-9c1b-f111-8341-000d3a5b6dba'),
  key_activation_ms: cfgInt('key_activation_ms', 300),
  request_limit: cfgInt('request_limit', 6000, 1),
  first_version: cfgInt('first_version', 1000000, 1),
  max_page_size: Math.min(cfgInt('max_page_size', 5000, 1), 5000),
  max_body_bytes: cfgInt('max_body_bytes', 16 * 1024 * 1024, 1024),
  entity_set_names: raw.entity_set_names ?? 'append_s',
  // Check bearer JWTs as Dataverse does (the signature is the Entra double's business): the
  // audience must be this organisation, and an app-only token (`appid`, no `scp`) is let in
  // only when an enabled application user (systemuser with that applicationid) exists;
  // otherwise 403 0x80072560, "The user is not a member of the organization."
  enforce_application_users: raw.enforce_application_users === true,
  tables: raw.tables ?? [],
};
if (!Array.isArray(config.accepted_tokens) || config.accepted_tokens.some((t) => typeof t !== 'string' || !t)) {
  fail('accepted_tokens must be an array of non-empty strings');
}
if (typeof config.tenant_id !== 'string' || !config.tenant_id) fail('tenant_id must be a string');
if (!['append_s', 'english'].includes(config.entity_set_names)) fail('entity_set_names must be "append_s" or "english"');
if (!Array.isArray(config.tables)) fail('tables must be an array');
let tlsOptions = null;
if (config.tls !== null) {
  if (typeof config.tls !== 'object' || typeof config.tls.cert !== 'string' || typeof config.tls.key !== 'string') {
    fail('tls must be {"cert": "<PEM path>", "key": "<PEM path>"}');
  }
  try {
    tlsOptions = { cert: readFileSync(config.tls.cert), key: readFileSync(config.tls.key) };
  } catch (err) {
    fail(`tls: cannot read certificate or key: ${err.message}`);
  }
}

// ---------------------------------------------------------------------------
// metadata model
// ---------------------------------------------------------------------------

const ATTR_TYPES = {
  String: { odata: 'StringAttributeMetadata', typeName: 'StringType', edm: 'Edm.String', kind: 'string' },
  Memo: { odata: 'MemoAttributeMetadata', typeName: 'MemoType', edm: 'Edm.String', kind: 'string' },
  Integer: { odata: 'IntegerAttributeMetadata', typeName: 'IntegerType', edm: 'Edm.Int32', kind: 'number' },
  BigInt: { odata: 'BigIntAttributeMetadata', typeName: 'BigIntType', edm: 'Edm.Int64', kind: 'number' },
  DateTime: { odata: 'DateTimeAttributeMetadata', typeName: 'DateTimeType', edm: 'Edm.DateTimeOffset', kind: 'datetime' },
  Boolean: { odata: 'BooleanAttributeMetadata', typeName: 'BooleanType', edm: 'Edm.Boolean', kind: 'bool' },
  Decimal: { odata: 'DecimalAttributeMetadata', typeName: 'DecimalType', edm: 'Edm.Decimal', kind: 'number' },
  Double: { odata: 'DoubleAttributeMetadata', typeName: 'DoubleType', edm: 'Edm.Double', kind: 'number' },
  Picklist: { odata: 'PicklistAttributeMetadata', typeName: 'PicklistType', edm: 'Edm.Int32', kind: 'number' },
  State: { odata: 'StateAttributeMetadata', typeName: 'StateType', edm: 'Edm.Int32', kind: 'number' },
  Status: { odata: 'StatusAttributeMetadata', typeName: 'StatusType', edm: 'Edm.Int32', kind: 'number' },
  Uniqueidentifier: { odata: 'UniqueIdentifierAttributeMetadata', typeName: 'UniqueidentifierType', edm: 'Edm.Guid', kind: 'guid' },
  Lookup: { odata: 'LookupAttributeMetadata', typeName: 'LookupType', edm: 'Edm.Guid', kind: 'guid' },
  Owner: { odata: 'LookupAttributeMetadata', typeName: 'OwnerType', edm: 'Edm.Guid', kind: 'guid' },
};
const ODATA_TYPE_TO_ATTR = Object.fromEntries(
  Object.entries(ATTR_TYPES)
    .filter(([t]) => !['State', 'Status', 'Owner'].includes(t))
    .map(([t, d]) => [`Microsoft.Dynamics.CRM.${d.odata}`, t]),
);
// Column types creatable through POST .../Attributes (Lookup needs a relationship; Uniqueidentifier
// cannot be created).
const CREATABLE_TYPES = ['String', 'Memo', 'Integer', 'BigInt', 'DateTime', 'Boolean', 'Decimal', 'Double', 'Picklist'];
// Reference §7: alternate-key columns may be Decimal, Integer, String, DateTime, Lookup, Picklist.
const KEY_TYPES = ['Decimal', 'Integer', 'String', 'DateTime', 'Lookup', 'Picklist'];
const KEY_BYTES = { String: null, Decimal: 17, Integer: 4, DateTime: 8, Lookup: 16, Picklist: 4 };

const tables = new Map(); // logical name -> table
const bySet = new Map(); // entity set name -> table
let nextObjectTypeCode = 10000;

function label(text) {
  const mid = newGuid();
  const l = { '@odata.type': '#Microsoft.Dynamics.CRM.LocalizedLabel', Label: text, LanguageCode: 1033, IsManaged: false, MetadataId: mid, HasChanged: null };
  return { '@odata.type': '#Microsoft.Dynamics.CRM.Label', LocalizedLabels: [l], UserLocalizedLabel: l };
}
function normalizeLabel(v, what) {
  if (v === undefined || v === null) return null;
  if (typeof v !== 'object' || !Array.isArray(v.LocalizedLabels) || v.LocalizedLabels.length === 0) {
    throw E.invalidArgument(`${what} must be a Label with at least one LocalizedLabel.`);
  }
  const locs = v.LocalizedLabels.map((l) => {
    if (!l || typeof l.Label !== 'string' || !Number.isInteger(l.LanguageCode)) {
      throw E.invalidArgument(`${what}: every LocalizedLabel needs Label (string) and LanguageCode (integer).`);
    }
    return { '@odata.type': '#Microsoft.Dynamics.CRM.LocalizedLabel', Label: l.Label, LanguageCode: l.LanguageCode, IsManaged: false, MetadataId: newGuid(), HasChanged: null };
  });
  return { '@odata.type': '#Microsoft.Dynamics.CRM.Label', LocalizedLabels: locs, UserLocalizedLabel: locs[0] };
}
function labelText(l) {
  return l?.UserLocalizedLabel?.Label ?? l?.LocalizedLabels?.[0]?.Label ?? null;
}

function pluralize(logicalName) {
  if (config.entity_set_names === 'append_s') return `${logicalName}s`;
  if (/[^aeiou]y$/.test(logicalName)) return `${logicalName.slice(0, -1)}ies`;
  if (/(s|x|z|ch|sh)$/.test(logicalName)) return `${logicalName}es`;
  return `${logicalName}s`;
}

function makeAttr(table, spec) {
  const a = {
    metadataId: spec.metadataId || newGuid(),
    logicalName: spec.logicalName,
    schemaName: spec.schemaName || spec.logicalName,
    type: spec.type,
    maxLength: spec.maxLength ?? null,
    minValue: spec.minValue ?? null,
    maxValue: spec.maxValue ?? null,
    precision: spec.precision ?? null,
    format: spec.format ?? null,
    formatName: spec.formatName ?? null,
    dateTimeBehavior: spec.dateTimeBehavior ?? null,
    optionSet: spec.optionSet ?? null,
    options: spec.options ?? null,
    targets: spec.targets ?? null,
    isPrimaryId: !!spec.isPrimaryId,
    isPrimaryName: !!spec.isPrimaryName,
    isCustom: spec.isCustom ?? false,
    // 'ignore': silently dropped from write bodies (system-maintained); false: writable.
    readOnly: spec.readOnly ?? false,
    displayName: spec.displayName || label(spec.logicalName),
    description: spec.description || null,
    requiredLevel: spec.requiredLevel || 'None',
    solution: spec.solution || null,
    createdOn: nowIso(),
  };
  if (a.type === 'String') {
    a.maxLength = a.maxLength ?? 100;
    a.formatName = a.formatName ?? 'Text';
  } else if (a.type === 'Memo') {
    a.maxLength = a.maxLength ?? 2000;
  } else if (a.type === 'Integer') {
    a.minValue = a.minValue ?? -2147483648;
    a.maxValue = a.maxValue ?? 2147483647;
  } else if (a.type === 'Decimal') {
    a.precision = a.precision ?? 2;
    a.minValue = a.minValue ?? -100000000000;
    a.maxValue = a.maxValue ?? 100000000000;
  } else if (a.type === 'Double') {
    a.precision = a.precision ?? 2;
    a.minValue = a.minValue ?? -100000000000;
    a.maxValue = a.maxValue ?? 100000000000;
  } else if (a.type === 'DateTime') {
    a.format = a.format ?? 'DateAndTime';
    a.dateTimeBehavior = a.dateTimeBehavior ?? 'UserLocal';
  } else if (a.type === 'Boolean') {
    a.optionSet = a.optionSet ?? {
      '@odata.type': '#Microsoft.Dynamics.CRM.BooleanOptionSetMetadata',
      TrueOption: { Value: 1, Label: label('Yes') },
      FalseOption: { Value: 0, Label: label('No') },
      IsGlobal: false,
    };
  }
  table.attrs.set(a.logicalName, a);
  return a;
}

// The property name a column has in record bodies, $select, $filter and $orderby.
const propName = (a) => (a.type === 'Lookup' || a.type === 'Owner' ? `_${a.logicalName}_value` : a.logicalName);

function makeTable(spec) {
  const logicalName = spec.logicalName;
  const t = {
    metadataId: spec.metadataId || newGuid(),
    logicalName,
    schemaName: spec.schemaName || logicalName,
    entitySetName: spec.entitySetName || pluralize(logicalName),
    primaryId: spec.primaryId || `${logicalName}id`,
    primaryName: spec.primaryName,
    displayName: spec.displayName || label(logicalName),
    displayCollectionName: spec.displayCollectionName || label(`${logicalName}s`),
    description: spec.description || null,
    ownershipType: spec.ownershipType || 'UserOwned',
    hasActivities: spec.hasActivities ?? false,
    hasNotes: spec.hasNotes ?? false,
    isCustom: spec.isCustom ?? true,
    builtin: !!spec.builtin,
    objectTypeCode: spec.objectTypeCode ?? nextObjectTypeCode++,
    solution: spec.solution || null,
    createdOn: nowIso(),
    attrs: new Map(),
    keys: new Map(), // logical name -> key
    rows: new Map(), // lower-case id -> row
    navCollections: spec.navCollections || {},
  };
  makeAttr(t, { logicalName: t.primaryId, schemaName: spec.primaryIdSchemaName, type: 'Uniqueidentifier', isPrimaryId: true, readOnly: false, requiredLevel: 'SystemRequired' });
  if (t.primaryName) {
    makeAttr(t, {
      logicalName: t.primaryName,
      schemaName: spec.primaryNameSchemaName,
      type: 'String',
      maxLength: spec.primaryNameMaxLength ?? 100,
      isPrimaryName: true,
      isCustom: t.isCustom,
      displayName: spec.primaryNameDisplayName,
      requiredLevel: spec.primaryNameRequiredLevel || 'None',
      formatName: 'Text',
    });
  }
  const sys = { isCustom: false, readOnly: 'ignore' };
  makeAttr(t, { logicalName: 'createdon', schemaName: 'CreatedOn', type: 'DateTime', ...sys });
  makeAttr(t, { logicalName: 'modifiedon', schemaName: 'ModifiedOn', type: 'DateTime', ...sys });
  makeAttr(t, { logicalName: 'versionnumber', schemaName: 'VersionNumber', type: 'BigInt', ...sys });
  if (!t.builtin) {
    makeAttr(t, { logicalName: 'statecode', schemaName: 'statecode', type: 'State', isCustom: false, options: [0, 1] });
    makeAttr(t, { logicalName: 'statuscode', schemaName: 'statuscode', type: 'Status', isCustom: false, options: [1, 2] });
    if (t.ownershipType === 'UserOwned') {
      makeAttr(t, { logicalName: 'ownerid', schemaName: 'OwnerId', type: 'Owner', targets: ['systemuser', 'team'], isCustom: false });
    }
    makeAttr(t, { logicalName: 'createdby', schemaName: 'CreatedBy', type: 'Lookup', targets: ['systemuser'], ...sys });
    makeAttr(t, { logicalName: 'modifiedby', schemaName: 'ModifiedBy', type: 'Lookup', targets: ['systemuser'], ...sys });
  }
  return t;
}

function registerTable(t) {
  tables.set(t.logicalName, t);
  bySet.set(t.entitySetName, t);
}

function makeKey(table, { schemaName, logicalName, attributes, status, displayName, solution }) {
  const k = {
    metadataId: newGuid(),
    schemaName,
    logicalName: logicalName || schemaName.toLowerCase(),
    attributes,
    displayName: displayName || label(schemaName),
    createdAt: Date.now(),
    status: status || 'Pending',
    solution: solution || null,
  };
  table.keys.set(k.logicalName, k);
  return k;
}

// Alternate-key index builds are asynchronous (reference §7): Pending, then InProgress, then
// Active -- or Failed when existing rows already violate uniqueness. Evaluated lazily.
function refreshKeys(table) {
  const now = Date.now();
  for (const k of table.keys.values()) {
    if (k.status === 'Active' || k.status === 'Failed') continue;
    const age = now - k.createdAt;
    if (age >= config.key_activation_ms) {
      k.status = findDuplicateForKey(table, k) ? 'Failed' : 'Active';
    } else if (age >= config.key_activation_ms / 2) {
      k.status = 'InProgress';
    }
  }
}
function activeKeys(table) {
  refreshKeys(table);
  return [...table.keys.values()].filter((k) => k.status === 'Active');
}
function keySignature(table, key, values) {
  const parts = [];
  for (const name of key.attributes) {
    const v = values[name];
    if (v === null || v === undefined) return null; // rows with a null key column are not indexed
    parts.push(typeof v === 'string' ? fold(v) : JSON.stringify(v));
  }
  return JSON.stringify(parts);
}
function findDuplicateForKey(table, key) {
  const seen = new Set();
  for (const row of table.rows.values()) {
    const sig = keySignature(table, key, row.values);
    if (sig === null) continue;
    if (seen.has(sig)) return true;
    seen.add(sig);
  }
  return false;
}
function checkKeyUniqueness(table, values, exceptId) {
  for (const key of activeKeys(table)) {
    const sig = keySignature(table, key, values);
    if (sig === null) continue;
    for (const row of table.rows.values()) {
      if (row.id === exceptId) continue;
      if (keySignature(table, key, row.values) === sig) {
        const shown = key.attributes.map((n) => String(values[n])).join(', ');
        throw E.duplicateKey(shown, key.schemaName);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// built-in tables (application users, §6) and configured tables
// ---------------------------------------------------------------------------

function setupBuiltins() {
  const bu = makeTable({ logicalName: 'businessunit', entitySetName: 'businessunits', primaryName: 'name', primaryNameMaxLength: 160, ownershipType: 'BusinessOwned', isCustom: false, builtin: true, objectTypeCode: 10 });
  makeAttr(bu, { logicalName: 'parentbusinessunitid', type: 'Lookup', targets: ['businessunit'] });
  const role = makeTable({ logicalName: 'role', entitySetName: 'roles', primaryName: 'name', ownershipType: 'BusinessOwned', isCustom: false, builtin: true, objectTypeCode: 1036 });
  makeAttr(role, { logicalName: 'businessunitid', type: 'Lookup', targets: ['businessunit'] });
  const su = makeTable({
    logicalName: 'systemuser', entitySetName: 'systemusers', primaryName: 'fullname', primaryNameMaxLength: 200, ownershipType: 'BusinessOwned', isCustom: false, builtin: true, objectTypeCode: 8,
    navCollections: { systemuserroles_association: 'role' },
  });
  su.attrs.get('fullname').readOnly = 'ignore';
  makeAttr(su, { logicalName: 'applicationid', type: 'Uniqueidentifier' });
  makeAttr(su, { logicalName: 'accessmode', type: 'Picklist', options: [0, 1, 2, 3, 4, 5] });
  makeAttr(su, { logicalName: 'isdisabled', type: 'Boolean' });
  makeAttr(su, { logicalName: 'firstname', type: 'String', maxLength: 256 });
  makeAttr(su, { logicalName: 'lastname', type: 'String', maxLength: 256 });
  makeAttr(su, { logicalName: 'domainname', type: 'String', maxLength: 1024 });
  makeAttr(su, { logicalName: 'internalemailaddress', type: 'String', maxLength: 100 });
  makeAttr(su, { logicalName: 'azureactivedirectoryobjectid', type: 'Uniqueidentifier', readOnly: 'ignore' });
  makeAttr(su, { logicalName: 'businessunitid', type: 'Lookup', targets: ['businessunit'] });
  // Privileges: Dataverse makes eight per table (prv{Verb}{SchemaName}) when it is created.
  const priv = makeTable({ logicalName: 'privilege', entitySetName: 'privileges', primaryName: 'name', primaryNameMaxLength: 200, ownershipType: 'OrganizationOwned', isCustom: false, builtin: true, objectTypeCode: 1023 });
  makeAttr(priv, { logicalName: 'accessright', type: 'Integer' });
  for (const t of [bu, role, su, priv]) registerTable(t);
}

const PRIVILEGE_VERBS = [['Create', 32], ['Read', 1], ['Write', 2], ['Delete', 65536], ['Append', 4], ['AppendTo', 16], ['Assign', 524288], ['Share', 262144]];
function addTablePrivileges(t) {
  const priv = tables.get('privilege');
  for (const [verb, right] of PRIVILEGE_VERBS) insertRow(priv, newGuid(), { name: `prv${verb}${t.schemaName}`, accessright: right });
}

// Role privileges (AddPrivilegesRole / RetrieveRolePrivilegesRole): role id -> Map(privilege id -> depth name).
const rolePrivileges = new Map();
const DEPTHS = ['Basic', 'Local', 'Deep', 'Global'];
function depthName(d) {
  if (typeof d === 'number' && Number.isInteger(d) && d >= 0 && d < 4) return DEPTHS[d];
  if (typeof d === 'string') {
    if (/^[0-3]$/.test(d)) return DEPTHS[Number(d)];
    const hit = DEPTHS.find((x) => x.toLowerCase() === d.toLowerCase());
    if (hit) return hit;
  }
  return null;
}

function addPrivilegesRole(ctx, roleKey, body) {
  const role = tables.get('role');
  const found = findRow(role, roleKey);
  if (!found.row) throw notFound(role, found);
  if (!body || !Array.isArray(body.Privileges) || body.Privileges.length === 0) throw E.invalidArgument('AddPrivilegesRole: Privileges must be a non-empty array of RolePrivilege.');
  const priv = tables.get('privilege');
  const held = rolePrivileges.get(found.row.id) || new Map();
  for (const [i, p] of body.Privileges.entries()) {
    const id = String(p && p.PrivilegeId || '').toLowerCase();
    if (!isGuid(id) || !priv.rows.has(id)) throw E.invalidArgument(`AddPrivilegesRole: Privileges[${i}].PrivilegeId ${p && p.PrivilegeId} is not a privilege.`);
    const depth = depthName(p.Depth);
    if (!depth) throw E.invalidArgument(`AddPrivilegesRole: Privileges[${i}].Depth ${JSON.stringify(p.Depth)} is not Basic, Local, Deep or Global.`);
    held.set(id, depth);
  }
  rolePrivileges.set(found.row.id, held);
  stats.role_privilege_writes = (stats.role_privilege_writes || 0) + 1;
  send(ctx, 204);
}

function retrieveRolePrivileges(ctx, keyRaw) {
  const m = /^RoleId=([0-9a-fA-F-]{36})$/.exec(String(keyRaw || '').trim());
  if (!m) throw E.invalidArgument('RetrieveRolePrivilegesRole: the RoleId parameter (a GUID) is required.');
  const role = tables.get('role');
  const row = role.rows.get(m[1].toLowerCase());
  if (!row) throw new DvError(404, '0x80040217', `role With Id = ${m[1]} Does Not Exist`);
  const priv = tables.get('privilege');
  const held = rolePrivileges.get(row.id) || new Map();
  send(ctx, 200, {
    '@odata.context': `${ctx.base}$metadata#Microsoft.Dynamics.CRM.RetrieveRolePrivilegesRoleResponse`,
    RolePrivileges: [...held].map(([id, depth]) => ({ Depth: depth, PrivilegeId: id, BusinessUnitId: row.values.businessunitid, PrivilegeName: priv.rows.get(id)?.values.name })),
  });
}

function seedBuiltinRows() {
  const bu = tables.get('businessunit');
  const role = tables.get('role');
  const su = tables.get('systemuser');
  insertRow(bu, config.business_unit_id, { name: 'org', parentbusinessunitid: null });
  insertRow(role, config.system_administrator_role_id, { name: 'System Administrator', businessunitid: config.business_unit_id });
  insertRow(su, config.user_id, {
    fullname: '# dynamics-companion', applicationid: config.application_id, accessmode: 4, isdisabled: false,
    azureactivedirectoryobjectid: newGuid(), businessunitid: config.business_unit_id,
  });
  associations.clear();
  rolePrivileges.clear();
  associations.set(config.user_id, new Set([config.system_administrator_role_id]));
  // A few of the organisation's own privileges (a real one has hundreds): the reads of
  // the user, business unit and organisation tables a least-privilege role carries.
  const priv = tables.get('privilege');
  for (const name of ['prvReadUser', 'prvReadBusinessUnit', 'prvReadOrganization']) insertRow(priv, newGuid(), { name, accessright: 1 });
}

const COLUMN_TYPE_ALIASES = {
  string: 'String', text: 'String', memo: 'Memo', multiline: 'Memo', integer: 'Integer', int: 'Integer',
  bigint: 'BigInt', datetime: 'DateTime', date: 'DateTime', boolean: 'Boolean', bool: 'Boolean',
  decimal: 'Decimal', double: 'Double', float: 'Double', picklist: 'Picklist', uniqueidentifier: 'Uniqueidentifier',
  guid: 'Uniqueidentifier', lookup: 'Lookup',
};

function setupConfiguredTables() {
  config.tables.forEach((spec, i) => {
    const where = `tables[${i}]`;
    if (!spec || typeof spec.logical_name !== 'string' || !/^[a-z][a-z0-9_]*$/.test(spec.logical_name)) {
      fail(`${where}.logical_name must be a lower-case logical name`);
    }
    if (tables.has(spec.logical_name)) fail(`${where}: table ${spec.logical_name} is declared twice`);
    const t = makeTable({
      logicalName: spec.logical_name,
      schemaName: spec.schema_name,
      entitySetName: spec.entity_set,
      primaryId: spec.primary_id,
      primaryName: spec.primary_name || `${spec.logical_name.split('_')[0]}_name`,
      primaryNameMaxLength: spec.primary_name_max_length,
      ownershipType: spec.ownership_type || 'UserOwned',
      isCustom: true,
    });
    if (bySet.has(t.entitySetName)) fail(`${where}: entity set ${t.entitySetName} is used twice`);
    for (const [j, c] of (spec.columns || []).entries()) {
      const col = typeof c === 'string' ? { name: c } : c;
      const name = col?.name ?? col?.logical_name;
      if (typeof name !== 'string' || !/^[a-z][a-z0-9_]*$/.test(name)) fail(`${where}.columns[${j}] needs a lower-case name`);
      if (t.attrs.has(name)) continue; // the primary name may be listed again
      const type = COLUMN_TYPE_ALIASES[String(col.type ?? 'string').toLowerCase()];
      if (!type) fail(`${where}.columns[${j}].type ${JSON.stringify(col.type)} is not one of ${Object.keys(COLUMN_TYPE_ALIASES).join(', ')}`);
      makeAttr(t, {
        logicalName: name,
        schemaName: col.schema_name,
        type,
        isCustom: true,
        maxLength: col.max_length,
        minValue: col.min_value,
        maxValue: col.max_value,
        precision: col.precision,
        format: col.format,
        options: col.options,
        targets: type === 'Lookup' ? [col.target] : undefined,
      });
    }
    for (const [j, k] of (spec.keys || []).entries()) {
      if (!k || typeof k.name !== 'string' || !Array.isArray(k.attributes) || k.attributes.length === 0) {
        fail(`${where}.keys[${j}] must be {"name": "...", "attributes": ["..."]}`);
      }
      for (const a of k.attributes) if (!t.attrs.has(a)) fail(`${where}.keys[${j}]: no column ${a}`);
      makeKey(t, { schemaName: k.name, attributes: k.attributes, status: k.status || 'Active' });
    }
    registerTable(t);
  });
}

// ---------------------------------------------------------------------------
// record storage
// ---------------------------------------------------------------------------

let lastVersion = config.first_version;
const nextVersion = () => ++lastVersion;
const associations = new Map(); // systemuserid -> Set(roleid)

function defaultValues(table) {
  const v = {};
  for (const a of table.attrs.values()) v[a.logicalName] = null;
  if (table.attrs.has('statecode')) v.statecode = 0;
  if (table.attrs.has('statuscode')) v.statuscode = 1;
  return v;
}

// Inserts without validation (seed rows); returns the row.
function insertRow(table, id, values) {
  const now = nowIso();
  const version = nextVersion();
  const row = { id: id.toLowerCase(), version, values: { ...defaultValues(table), ...values } };
  row.values[table.primaryId] = row.id;
  row.values.createdon = now;
  row.values.modifiedon = now;
  row.values.versionnumber = version;
  table.rows.set(row.id, row);
  return row;
}

// Validates one value for a column; returns the normalized stored value.
function coerceValue(table, a, value) {
  if (value === null) return null;
  const edm = ATTR_TYPES[a.type].edm;
  switch (a.type) {
    case 'String':
    case 'Memo':
      if (typeof value !== 'string') throw E.badLiteral(table, value, edm);
      if (value === '') return null; // the platform stores an empty string as null
      if (value.length > a.maxLength) {
        throw E.validation(`The length of the '${a.logicalName}' attribute of the '${table.logicalName}' entity exceeded the maximum allowed length of '${a.maxLength}'.`);
      }
      return value;
    case 'Integer':
    case 'Picklist':
    case 'State':
    case 'Status':
    case 'BigInt': {
      if (typeof value !== 'number' || !Number.isInteger(value)) throw E.badLiteral(table, value, edm);
      if (a.type === 'BigInt' && !Number.isSafeInteger(value)) {
        throw E.unsupported(`BigInt values beyond +/-2^53 (column '${a.logicalName}')`);
      }
      if (a.type !== 'BigInt' && (value < -2147483648 || value > 2147483647)) throw E.badLiteral(table, value, edm);
      if (a.options && !a.options.includes(value)) {
        throw E.invalidArgument(`${value} is not a valid value for the '${a.logicalName}' attribute of the '${table.logicalName}' entity.`);
      }
      if (a.minValue !== null && (value < a.minValue || value > a.maxValue)) {
        throw E.validation(`The value ${value} of '${a.logicalName}' on record of type '${table.logicalName}' is outside the valid range. Accepted range: ${a.minValue} to ${a.maxValue}`);
      }
      return value;
    }
    case 'Decimal':
    case 'Double': {
      if (typeof value !== 'number' || !Number.isFinite(value)) throw E.badLiteral(table, value, edm);
      if (value < a.minValue || value > a.maxValue) {
        throw E.validation(`The value ${value} of '${a.logicalName}' on record of type '${table.logicalName}' is outside the valid range. Accepted range: ${a.minValue} to ${a.maxValue}`);
      }
      const f = 10 ** a.precision;
      return Math.round(value * f) / f;
    }
    case 'Boolean':
      if (typeof value !== 'boolean') throw E.badLiteral(table, value, edm);
      return value;
    case 'DateTime': {
      if (typeof value !== 'string') throw E.badLiteral(table, value, edm);
      const m = /^(\d{4}-\d{2}-\d{2})(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2}))?$/.exec(value);
      if (!m || Number.isNaN(Date.parse(m[2] ? value : `${m[1]}T00:00:00Z`))) throw E.badLiteral(table, value, edm);
      if (a.format === 'DateOnly') return m[1];
      return new Date(Date.parse(m[2] ? value : `${m[1]}T00:00:00Z`)).toISOString().replace(/\.\d{3}Z$/, 'Z');
    }
    case 'Uniqueidentifier':
      if (!isGuid(value)) throw E.badLiteral(table, value, edm);
      return value.toLowerCase();
    default:
      throw E.badLiteral(table, value, edm);
  }
}

// Turns a write body into {changes, id}. Throws before anything is changed.
function parseWriteBody(table, body) {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    throw E.payload(table, 'Microsoft.OData.ODataException: The request body must be a JSON object.');
  }
  const changes = {};
  let id = null;
  for (const [prop, value] of Object.entries(body)) {
    const at = prop.indexOf('@');
    if (at === 0) continue; // @odata.type, @odata.etag, ...
    if (at > 0) {
      const nav = prop.slice(0, at);
      const annotation = prop.slice(at + 1);
      if (annotation !== 'odata.bind') continue; // instance annotations are ignored
      const a = [...table.attrs.values()].find((x) => (x.type === 'Lookup' || x.type === 'Owner') && (x.logicalName === nav || x.schemaName === nav));
      if (!a || a.readOnly) throw E.unknownProperty(table, nav);
      if (value === null) {
        changes[a.logicalName] = null;
        continue;
      }
      changes[a.logicalName] = resolveBind(table, a, value);
      continue;
    }
    const a = table.attrs.get(prop);
    if (!a || a.type === 'Lookup' || a.type === 'Owner') {
      if (/^_.+_value$/.test(prop) && [...table.attrs.values()].some((x) => propName(x) === prop)) {
        throw E.payload(table, `Microsoft.Crm.CrmException: CRM do not support direct update of Entity Reference properties, Use Navigation properties instead.`);
      }
      throw E.unknownProperty(table, prop);
    }
    if (a.isPrimaryId) {
      if (value === null) continue;
      if (!isGuid(value)) throw E.badLiteral(table, value, 'Edm.Guid');
      id = value.toLowerCase();
      continue;
    }
    if (a.readOnly === 'ignore') continue;
    changes[a.logicalName] = coerceValue(table, a, value);
  }
  return { changes, id };
}

function resolveBind(table, a, value) {
  if (typeof value !== 'string') throw E.badLiteral(table, value, 'Edm.String');
  const m = /^(?:.*\/api\/data\/v9\.[0-2]\/|\/)?([A-Za-z_][A-Za-z0-9_]*)\(([0-9a-fA-F-]{36})\)$/.exec(value);
  if (!m || !isGuid(m[2])) throw E.payload(table, `Microsoft.OData.ODataException: The value '${value}' of ${a.logicalName}@odata.bind is not a valid entity reference.`);
  const target = bySet.get(m[1]);
  if (!target || (a.targets && !a.targets.includes(target.logicalName))) {
    throw E.payload(table, `Microsoft.OData.ODataException: The entity set '${m[1]}' is not a valid target of ${a.logicalName}.`);
  }
  const id = m[2].toLowerCase();
  if (!target.rows.has(id)) throw E.notFoundById(target.logicalName, id);
  return id;
}

function createRow(table, changes, id, ctx) {
  id = id || newGuid();
  if (table.rows.has(id)) throw E.duplicate();
  const values = { ...defaultValues(table), ...changes };
  applySystemRules(table, values, null, ctx);
  checkKeyUniqueness(table, values, id);
  const now = nowIso();
  const version = nextVersion();
  values[table.primaryId] = id;
  values.createdon = now;
  values.modifiedon = now;
  values.versionnumber = version;
  if (table.attrs.has('ownerid')) values.ownerid = changes.ownerid ?? ctx.userId;
  if (table.attrs.has('createdby')) values.createdby = ctx.userId;
  if (table.attrs.has('modifiedby')) values.modifiedby = ctx.userId;
  const row = { id, version, values };
  table.rows.set(id, row);
  return row;
}

function updateRow(table, row, changes, ctx) {
  const values = { ...row.values, ...changes };
  applySystemRules(table, values, row, ctx);
  checkKeyUniqueness(table, values, row.id);
  const version = nextVersion();
  values.modifiedon = nowIso();
  values.versionnumber = version;
  if (table.attrs.has('modifiedby')) values.modifiedby = ctx.userId;
  row.values = values;
  row.version = version;
  return row;
}

// Table-specific server rules (application users, §6).
function applySystemRules(table, values, existing, ctx) {
  if (table.logicalName !== 'systemuser') return;
  if (values.applicationid) {
    for (const r of table.rows.values()) {
      if (r.id !== existing?.id && r.values.applicationid === values.applicationid) throw E.duplicate();
    }
    if (!existing) {
      values.fullname = values.fullname || `# ${values.applicationid}`;
      values.azureactivedirectoryobjectid = newGuid();
    }
  }
  if (!existing && !values.businessunitid) values.businessunitid = config.business_unit_id;
  values.fullname = values.fullname || [values.firstname, values.lastname].filter(Boolean).join(' ') || null;
}

function renderRow(table, row, select) {
  const out = { '@odata.etag': etagOf(row.version) };
  const attrs = select ? select.map((p) => propToAttr(table, p)) : [...table.attrs.values()];
  for (const a of attrs) out[propName(a)] = row.values[a.logicalName] ?? null;
  out[table.primaryId] = row.id;
  return out;
}

function propToAttr(table, prop) {
  for (const a of table.attrs.values()) if (propName(a) === prop) return a;
  return null;
}

// ---------------------------------------------------------------------------
// URL parsing: resource path and literals
// ---------------------------------------------------------------------------

// Parses `a(b)/c('x')/d` into [{name, keyRaw}] (keyRaw null without parentheses).
function parseSegments(path) {
  const segs = [];
  let i = 0;
  while (i < path.length) {
    let name = '';
    while (i < path.length && path[i] !== '(' && path[i] !== '/') name += path[i++];
    let keyRaw = null;
    if (path[i] === '(') {
      i++;
      let inStr = false;
      keyRaw = '';
      for (;;) {
        if (i >= path.length) throw E.odata(`Bad Request - Error in query syntax: unbalanced parentheses in '${path}'.`);
        const c = path[i];
        if (inStr) {
          if (c === "'" && path[i + 1] === "'") { keyRaw += "''"; i += 2; continue; }
          if (c === "'") inStr = false;
        } else if (c === "'") inStr = true;
        else if (c === ')') { i++; break; }
        keyRaw += c;
        i++;
      }
    }
    segs.push({ name, keyRaw });
    if (i < path.length) {
      if (path[i] !== '/') throw E.odata(`Bad Request - Error in query syntax in '${path}'.`);
      i++;
      if (i === path.length) segs.push({ name: '', keyRaw: null });
    }
  }
  return segs;
}

// A single literal as it appears in keys and $filter.
function parseLiteral(text) {
  const s = text.trim();
  if (s.startsWith("'")) {
    if (s.length < 2 || !s.endsWith("'")) return null;
    const inner = s.slice(1, -1);
    if (inner.replace(/''/g, '').includes("'")) return null;
    return { t: 'string', v: inner.replace(/''/g, "'") };
  }
  if (isGuid(s)) return { t: 'guid', v: s.toLowerCase() };
  if (s === 'true' || s === 'false') return { t: 'bool', v: s === 'true' };
  if (s === 'null') return { t: 'null', v: null };
  if (/^-?\d+(\.\d+)?([eE][+-]?\d+)?[mMlLdDfF]?$/.test(s)) return { t: 'number', v: Number(s.replace(/[mMlLdDfF]$/, '')) };
  return null;
}

function splitTopLevel(s, sep) {
  const out = [];
  let depth = 0;
  let inStr = false;
  let cur = '';
  for (let i = 0; i < s.length; i++) {
    const c = s[i];
    if (inStr) {
      if (c === "'" && s[i + 1] === "'") { cur += "''"; i++; continue; }
      if (c === "'") inStr = false;
    } else if (c === "'") inStr = true;
    else if (c === '(') depth++;
    else if (c === ')') depth--;
    else if (c === sep && depth === 0) { out.push(cur); cur = ''; continue; }
    cur += c;
  }
  out.push(cur);
  return out;
}

// Key segment: bare GUID, or name=literal pairs.
function parseKey(keyRaw) {
  const s = keyRaw.trim();
  if (isGuid(s)) return { kind: 'id', id: s.toLowerCase() };
  const pairs = [];
  for (const part of splitTopLevel(s, ',')) {
    const eq = part.indexOf('=');
    if (eq <= 0) return null;
    const name = part.slice(0, eq).trim();
    const lit = parseLiteral(part.slice(eq + 1));
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name) || !lit || lit.t === 'null') return null;
    pairs.push([name, lit]);
  }
  return pairs.length ? { kind: 'pairs', pairs } : null;
}

// ---------------------------------------------------------------------------
// $filter: tokenizer, parser, evaluator
// ---------------------------------------------------------------------------

const OP_KIND = { eq: 'Equal', ne: 'NotEqual', gt: 'GreaterThan', ge: 'GreaterThanOrEqual', lt: 'LessThan', le: 'LessThanOrEqual' };
const KEYWORDS = new Set(['and', 'or', 'not', ...Object.keys(OP_KIND)]);
const FUNCS = new Set(['contains', 'startswith', 'endswith']);

function tokenizeFilter(src) {
  const toks = [];
  let i = 0;
  const err = (pos) => E.odata(`Syntax error at position ${pos} in '${src}'.`);
  while (i < src.length) {
    const c = src[i];
    if (/\s/.test(c)) { i++; continue; }
    if (c === '(' || c === ')' || c === ',') { toks.push({ k: c, pos: i }); i++; continue; }
    if (c === "'") {
      let j = i + 1;
      let v = '';
      for (;;) {
        if (j >= src.length) throw E.odata(`There is an unterminated string literal at position ${i} in '${src}'.`);
        if (src[j] === "'" && src[j + 1] === "'") { v += "'"; j += 2; continue; }
        if (src[j] === "'") break;
        v += src[j++];
      }
      toks.push({ k: 'lit', lit: { t: 'string', v }, pos: i });
      i = j + 1;
      continue;
    }
    const rest = src.slice(i);
    let m = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(?![0-9A-Za-z_-])/.exec(rest);
    if (m) { toks.push({ k: 'lit', lit: { t: 'guid', v: m[0].toLowerCase() }, pos: i }); i += m[0].length; continue; }
    m = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})/.exec(rest);
    if (m) {
      const ms = Date.parse(m[0]);
      if (Number.isNaN(ms)) throw err(i);
      toks.push({ k: 'lit', lit: { t: 'datetime', v: ms }, pos: i });
      i += m[0].length;
      continue;
    }
    m = /^\d{4}-\d{2}-\d{2}(?![0-9T])/.exec(rest);
    if (m) { toks.push({ k: 'lit', lit: { t: 'date', v: m[0] }, pos: i }); i += m[0].length; continue; }
    m = /^-?\d+(\.\d+)?([eE][+-]?\d+)?[mMlLdDfF]?(?![A-Za-z0-9_])/.exec(rest);
    if (m) { toks.push({ k: 'lit', lit: { t: 'number', v: Number(m[0].replace(/[mMlLdDfF]$/, '')) }, pos: i }); i += m[0].length; continue; }
    m = /^[A-Za-z_][A-Za-z0-9_.]*(\/[A-Za-z_][A-Za-z0-9_.]*)*/.exec(rest);
    if (m) {
      const word = m[0];
      // enum literal: Microsoft.Dynamics.CRM.AttributeTypeCode'String'
      if (src[i + word.length] === "'" && word.includes('.')) {
        const end = src.indexOf("'", i + word.length + 1);
        if (end < 0) throw E.odata(`There is an unterminated string literal at position ${i + word.length} in '${src}'.`);
        toks.push({ k: 'lit', lit: { t: 'string', v: src.slice(i + word.length + 1, end), enumType: word }, pos: i });
        i = end + 1;
        continue;
      }
      if (word.includes('.') && src[i + word.length] === '(') throw E.unsupported(`The function '${word}' in $filter`);
      if (word === 'true' || word === 'false') toks.push({ k: 'lit', lit: { t: 'bool', v: word === 'true' }, pos: i });
      else if (word === 'null') toks.push({ k: 'lit', lit: { t: 'null', v: null }, pos: i });
      else if (KEYWORDS.has(word)) toks.push({ k: 'kw', v: word, pos: i });
      else toks.push({ k: 'id', v: word, pos: i });
      i += word.length;
      continue;
    }
    throw err(i);
  }
  return toks;
}

// schema: { typeName, resolve(prop) -> {kind, edm, get(row)} | null }
function parseFilter(src, schema) {
  const toks = tokenizeFilter(src);
  let p = 0;
  const peek = () => toks[p];
  const err = (t) => E.odata(`Syntax error at position ${t ? t.pos : src.length} in '${src}'.`);
  const expectKind = (k) => {
    const t = toks[p];
    if (!t || t.k !== k) throw err(t);
    p++;
    return t;
  };
  function parseOr() {
    let left = parseAnd();
    while (peek()?.k === 'kw' && peek().v === 'or') { p++; left = { op: 'or', a: left, b: parseAnd() }; }
    return left;
  }
  function parseAnd() {
    let left = parseUnary();
    while (peek()?.k === 'kw' && peek().v === 'and') { p++; left = { op: 'and', a: left, b: parseUnary() }; }
    return left;
  }
  function parseUnary() {
    const t = peek();
    if (t?.k === 'kw' && t.v === 'not') { p++; return { op: 'not', a: parseUnary() }; }
    return parsePrimary();
  }
  function operand() {
    const t = peek();
    if (!t) throw err(t);
    if (t.k === 'lit') { p++; return { lit: t.lit, pos: t.pos }; }
    if (t.k === 'id') {
      p++;
      if (t.v.includes('/')) throw E.unsupported(`Navigation paths in $filter ('${t.v}')`);
      if (peek()?.k === '(') throw E.unsupported(`The function '${t.v}' in $filter`);
      const prop = schema.resolve(t.v);
      if (!prop) throw E.noProperty(schema.typeName, t.v);
      return { prop, name: t.v, pos: t.pos };
    }
    throw err(t);
  }
  function parsePrimary() {
    const t = peek();
    if (!t) throw err(t);
    if (t.k === '(') {
      p++;
      const e = parseOr();
      expectKind(')');
      return e;
    }
    if (t.k === 'id' && FUNCS.has(t.v) && toks[p + 1]?.k === '(') {
      p += 2;
      const a = operand();
      expectKind(',');
      const b = operand();
      expectKind(')');
      if (!a.prop || a.prop.kind !== 'string') throw E.odata(`The function '${t.v}' needs a string property as its first argument.`);
      if (!b.lit || b.lit.t !== 'string') throw E.odata(`The function '${t.v}' needs a string literal as its second argument.`);
      return { op: t.v, prop: a.prop, v: fold(b.lit.v) };
    }
    const left = operand();
    const opTok = peek();
    if (!opTok || opTok.k !== 'kw' || !OP_KIND[opTok.v]) {
      if (left.prop && left.prop.kind === 'bool' && (!opTok || opTok.k === ')' || (opTok.k === 'kw' && (opTok.v === 'and' || opTok.v === 'or')))) {
        return { op: 'eq', prop: left.prop, lit: { t: 'bool', v: true } };
      }
      throw err(opTok);
    }
    p++;
    const right = operand();
    let prop;
    let lit;
    let op = opTok.v;
    if (left.prop && right.lit) { prop = left.prop; lit = right.lit; } else if (left.lit && right.prop) {
      prop = right.prop;
      lit = left.lit;
      op = { gt: 'lt', ge: 'le', lt: 'gt', le: 'ge' }[op] || op;
    } else if (left.prop && right.prop) throw E.unsupported('Comparing two columns in $filter');
    else throw err(opTok);
    checkOperandTypes(prop, lit, op);
    return { op, prop, lit };
  }
  const tree = parseOr();
  if (p !== toks.length) throw err(toks[p]);
  return tree;
}

const LIT_EDM = { string: 'Edm.String', number: 'Edm.Int32', bool: 'Edm.Boolean', guid: 'Edm.Guid', datetime: 'Edm.DateTimeOffset', date: 'Edm.Date' };
function checkOperandTypes(prop, lit, op) {
  if (lit.t === 'null') return;
  const ok = {
    string: ['string'],
    enum: ['string'],
    number: ['number'],
    bool: ['bool'],
    guid: ['guid'],
    datetime: ['datetime', 'date'],
    date: ['date', 'datetime'],
    navigation: [],
  }[prop.kind];
  if (!ok || !ok.includes(lit.t)) {
    throw E.odata(`A binary operator with incompatible types was detected. Found operand types '${prop.edm}' and '${LIT_EDM[lit.t]}' for operator kind '${OP_KIND[op]}'.`);
  }
}

function cmpValues(kind, a, b) {
  // a, b non-null; returns -1/0/1
  if (kind === 'string' || kind === 'enum') { a = fold(a); b = fold(b); }
  if (kind === 'datetime' || kind === 'date') {
    a = typeof a === 'number' ? a : Date.parse(a.length === 10 ? `${a}T00:00:00Z` : a);
    b = typeof b === 'number' ? b : Date.parse(b.length === 10 ? `${b}T00:00:00Z` : b);
  }
  if (kind === 'bool') { a = a ? 1 : 0; b = b ? 1 : 0; }
  return a < b ? -1 : a > b ? 1 : 0;
}

function evalFilter(node, row) {
  switch (node.op) {
    case 'and': return evalFilter(node.a, row) && evalFilter(node.b, row);
    case 'or': return evalFilter(node.a, row) || evalFilter(node.b, row);
    case 'not': return !evalFilter(node.a, row);
    case 'contains':
    case 'startswith':
    case 'endswith': {
      const v = node.prop.get(row);
      if (v === null || v === undefined) return false;
      const f = fold(v);
      return node.op === 'contains' ? f.includes(node.v) : node.op === 'startswith' ? f.startsWith(node.v) : f.endsWith(node.v);
    }
    default: {
      const v = node.prop.get(row);
      const lit = node.lit;
      if (lit.t === 'null') {
        if (node.op === 'eq') return v === null || v === undefined;
        if (node.op === 'ne') return !(v === null || v === undefined);
        return false;
      }
      // SQL three-valued logic: a null column matches no comparison with a value, `ne` included.
      if (v === null || v === undefined) return false;
      const c = cmpValues(node.prop.kind, v, lit.v);
      switch (node.op) {
        case 'eq': return c === 0;
        case 'ne': return c !== 0;
        case 'gt': return c > 0;
        case 'ge': return c >= 0;
        case 'lt': return c < 0;
        case 'le': return c <= 0;
        default: return false;
      }
    }
  }
}

function recordSchema(table) {
  return {
    typeName: `Microsoft.Dynamics.CRM.${table.logicalName}`,
    resolve(prop) {
      const a = propToAttr(table, prop);
      if (!a) {
        // a single-valued navigation property (the lookup's name) can only be compared with null
        const nav = table.attrs.get(prop);
        if (nav && (nav.type === 'Lookup' || nav.type === 'Owner')) {
          return { kind: 'navigation', edm: `Microsoft.Dynamics.CRM.${nav.targets?.[0] || 'crmbaseentity'}`, get: (row) => row.values[nav.logicalName], attr: nav };
        }
        return null;
      }
      const d = ATTR_TYPES[a.type];
      const kind = a.type === 'DateTime' && a.format === 'DateOnly' ? 'date' : d.kind;
      return { kind, edm: kind === 'date' ? 'Edm.Date' : d.edm, get: (row) => row.values[a.logicalName], attr: a };
    },
  };
}

// Metadata objects are plain JSON; property kinds come from a sample object of the type.
const METADATA_ENUMS = new Set(['OwnershipType', 'AttributeType', 'EntityKeyIndexStatus', 'TableType']);
function objectSchema(typeName, sample) {
  return {
    typeName,
    has: (prop) => hasOwn(sample, prop) && !prop.startsWith('@'),
    resolve(prop) {
      if (!hasOwn(sample, prop) || prop.startsWith('@')) return null;
      const v = sample[prop];
      let kind;
      if (METADATA_ENUMS.has(prop)) kind = 'enum';
      else if (typeof v === 'boolean') kind = 'bool';
      else if (typeof v === 'number') kind = 'number';
      else if (prop === 'MetadataId') kind = 'guid';
      else if (typeof v === 'string' || v === null) kind = 'string';
      else return null; // complex properties (labels) cannot be filtered here
      const edm = { enum: 'Edm.Enum', bool: 'Edm.Boolean', number: 'Edm.Int32', guid: 'Edm.Guid', string: 'Edm.String' }[kind];
      return { kind, edm, get: (o) => o[prop] };
    },
  };
}

// ---------------------------------------------------------------------------
// query options
// ---------------------------------------------------------------------------

const KNOWN_OPTIONS = new Set(['$select', '$filter', '$top', '$orderby', '$count', '$expand', '$skiptoken', '$format', '$id', '$deltatoken']);

function queryOptions(params) {
  const o = {};
  for (const [k, v] of params) {
    if (!k.startsWith('$')) continue; // custom query parameters (e.g. SolutionUniqueName) are not OData options
    if (k === '$skip') throw E.odata('The query parameter $skip is not supported');
    if (!KNOWN_OPTIONS.has(k)) throw E.odata(`The query parameter ${k} is not supported`);
    if (hasOwn(o, k)) throw E.odata(`Query option '${k}' was specified more than once, but it must be specified at most once.`);
    o[k] = v;
  }
  return o;
}

function parseSelect(text, schema) {
  if (text === undefined) return null;
  const names = text.split(',').map((s) => s.trim()).filter(Boolean);
  if (!names.length) throw E.odata(`Syntax error: $select is empty.`);
  for (const n of names) if (!(schema.has ? schema.has(n) : schema.resolve(n))) throw E.noProperty(schema.typeName, n);
  return [...new Set(names)];
}

function parseOrderby(text, schema) {
  if (text === undefined) return [];
  return splitTopLevel(text, ',').map((part) => {
    const m = /^\s*([A-Za-z_][A-Za-z0-9_]*)(?:\s+(asc|desc))?\s*$/.exec(part);
    if (!m) throw E.odata(`Syntax error in $orderby '${text}'.`);
    const prop = schema.resolve(m[1]);
    if (!prop) throw E.noProperty(schema.typeName, m[1]);
    return { name: m[1], prop, desc: m[2] === 'desc' };
  });
}

function parseTop(text) {
  if (text === undefined) return null;
  if (!/^\d+$/.test(text)) throw E.odata(`Invalid value '${text}' for $top query option found. The $top query option requires a non-negative integer value.`);
  const n = Number(text);
  if (n > 5000) throw E.odata(`The $top query option value ${n} exceeds the maximum of 5000.`);
  return n;
}

function parseCount(text) {
  if (text === undefined) return false;
  if (text !== 'true' && text !== 'false') throw E.odata(`'${text}' is not a valid count option.`);
  return text === 'true';
}

// Nested options inside $expand=Nav($select=a,b;$filter=...)
function parseExpand(text) {
  if (text === undefined) return [];
  return splitTopLevel(text, ',').map((part) => {
    const m = /^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$/.exec(part);
    if (!m) throw E.odata(`Syntax error in $expand '${text}'.`);
    const opts = {};
    if (m[2]) {
      for (const o of splitTopLevel(m[2], ';')) {
        const eq = o.indexOf('=');
        const k = o.slice(0, eq).trim();
        if (eq < 0 || !['$select', '$filter', '$orderby', '$top'].includes(k)) throw E.odata(`Syntax error in $expand '${text}'.`);
        opts[k] = o.slice(eq + 1);
      }
    }
    return { name: m[1], opts };
  });
}

function sortRows(list, orderby, getId) {
  list.sort((x, y) => {
    for (const o of orderby) {
      const c = cmpNullable(o.prop.kind, o.prop.get(x), o.prop.get(y));
      if (c !== 0) return o.desc ? -c : c;
    }
    return cmpNullable('string', getId(x), getId(y));
  });
}
function cmpNullable(kind, a, b) {
  const an = a === null || a === undefined;
  const bn = b === null || b === undefined;
  if (an && bn) return 0;
  if (an) return -1; // SQL Server sorts NULL first ascending
  if (bn) return 1;
  return cmpValues(kind, a, b);
}

// Paging cookie shaped like the real one (reference §1, page-results): the skiptoken is
// <cookie pagenumber="N" pagingcookie="<url-encoded inner cookie>" istracking="False" />
// and the inner cookie carries the sort values and id of the last row returned (keyset paging).
function makeSkiptoken(table, orderby, lastRow, firstRow, page) {
  const enc = (v) => encodeURIComponent(JSON.stringify(v ?? null));
  let inner = `<cookie page="${page}">`;
  for (const o of orderby) inner += `<${o.name} last="${enc(o.prop.get(lastRow))}" first="${enc(o.prop.get(firstRow))}" />`;
  inner += `<${table.primaryId} last="{${lastRow.id.toUpperCase()}}" first="{${firstRow.id.toUpperCase()}}" />`;
  inner += '</cookie>';
  return `<cookie pagenumber="${page + 1}" pagingcookie="${encodeURIComponent(inner)}" istracking="False" />`;
}
function parseSkiptoken(token, table, orderby) {
  const bad = () => E.odata(`The $skiptoken value is not valid for this query.`);
  const m = /^<cookie pagenumber="(\d+)" pagingcookie="([^"]*)" istracking="False" \/>$/.exec(token);
  if (!m) throw bad();
  let inner;
  try { inner = decodeURIComponent(m[2]); } catch { throw bad(); }
  const parts = [...inner.matchAll(/<([A-Za-z0-9_]+) last="([^"]*)" first="([^"]*)" \/>/g)];
  if (parts.length !== orderby.length + 1) throw bad();
  const vals = [];
  for (let i = 0; i < orderby.length; i++) {
    if (parts[i][1] !== orderby[i].name) throw bad();
    try { vals.push(JSON.parse(decodeURIComponent(parts[i][2]))); } catch { throw bad(); }
  }
  const idPart = parts[orderby.length];
  const idm = /^\{([0-9A-Fa-f-]{36})\}$/.exec(idPart[2]);
  if (idPart[1] !== table.primaryId || !idm) throw bad();
  return { page: Number(m[1]), vals, id: idm[1].toLowerCase() };
}

// ---------------------------------------------------------------------------
// HTTP plumbing
// ---------------------------------------------------------------------------

function parsePrefer(header) {
  const prefs = {};
  if (!header) return prefs;
  for (const part of splitPrefer(header)) {
    const s = part.trim();
    if (!s) continue;
    const eq = s.indexOf('=');
    const name = (eq < 0 ? s : s.slice(0, eq)).trim().toLowerCase();
    let value = eq < 0 ? true : s.slice(eq + 1).trim();
    if (typeof value === 'string' && value.startsWith('"') && value.endsWith('"')) value = value.slice(1, -1);
    prefs[name] = value;
  }
  return prefs;
}
function splitPrefer(s) {
  const out = [];
  let cur = '';
  let q = false;
  for (const c of s) {
    if (c === '"') q = !q;
    if (c === ',' && !q) { out.push(cur); cur = ''; continue; }
    cur += c;
  }
  out.push(cur);
  return out;
}

function wantsErrorAnnotations(prefs) {
  const v = prefs['odata.include-annotations'];
  if (typeof v !== 'string') return false;
  return v.split(',').map((s) => s.trim()).some((pat) => {
    if (pat === '*') return true;
    const target = 'Microsoft.PowerApps.CDS.ErrorDetails.X';
    if (pat.endsWith('*')) return target.startsWith(pat.slice(0, -1)) || 'Microsoft.PowerApps.CDS.HelpLink'.startsWith(pat.slice(0, -1));
    return pat.startsWith('Microsoft.PowerApps.CDS.');
  });
}

function baseHeaders(ctx) {
  const h = {
    'OData-Version': '4.0',
    REQ_ID: ctx.reqId,
    'x-ms-service-request-id': ctx.reqId,
    'x-ms-dop-hint': '4',
    'Cache-Control': 'no-cache',
    Expires: '-1',
  };
  if (ctx.token) {
    const used = stats.tokens[ctx.token] || 0;
    h['x-ms-ratelimit-burst-remaining-xrm-requests'] = String(Math.max(0, config.request_limit - used));
  }
  return h;
}

const JSON_CT = 'application/json; odata.metadata=minimal';

function send(ctx, status, body, headers = {}) {
  const { res } = ctx;
  if (res.headersSent || res.destroyed) return;
  const h = { ...baseHeaders(ctx), ...headers };
  if (ctx.applied.length && status < 300) h['Preference-Applied'] = ctx.applied.join(',');
  if (body === undefined || body === null) {
    res.writeHead(status, h);
    res.end();
    return;
  }
  const text = typeof body === 'string' ? body : toJson(body);
  h['Content-Type'] = h['Content-Type'] || JSON_CT;
  h['Content-Length'] = Buffer.byteLength(text);
  res.writeHead(status, h);
  res.end(text);
}

function sendError(ctx, err) {
  const error = { code: err.code, message: err.message };
  if (ctx.prefs && wantsErrorAnnotations(ctx.prefs)) {
    const hex = String(err.code || '').replace(/^0x/, '');
    error['@Microsoft.PowerApps.CDS.ErrorDetails.ApiExceptionSourceKey'] = 'Plugin/Microsoft.Crm.Common.ObjectModel';
    error['@Microsoft.PowerApps.CDS.ErrorDetails.ApiExceptionMessageName'] = ERROR_NAMES[err.code] || 'Unknown';
    error['@Microsoft.PowerApps.CDS.ErrorDetails.ApiExceptionHttpStatusCode'] = String(err.status);
    error['@Microsoft.PowerApps.CDS.ErrorDetails.ApiExceptionCategory'] = err.status >= 500 ? 'ServerError' : 'ClientError';
    error['@Microsoft.PowerApps.CDS.HelpLink'] = `http://go.microsoft.com/fwlink/?LinkID=398563&error=Microsoft.Crm.CrmException%3a${hex}&client=platform`;
    error['@Microsoft.PowerApps.CDS.TraceText'] = '';
    error['@Microsoft.PowerApps.CDS.InnerError.Message'] = err.message;
  }
  ctx.applied = [];
  send(ctx, err.status, { error }, err.headers);
}

async function readBody(req, limit) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw new DvError(413, '0x8004418A', 'The request message is too large.');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

// ---------------------------------------------------------------------------
// control state: stats and faults
// ---------------------------------------------------------------------------

function freshStats() {
  return {
    requests: 0,
    by_method: {},
    by_entity_set: {},
    by_status: {},
    by_operation: {},
    metadata_writes: 0,
    metadata_writes_by_kind: {},
    metadata_write_log: [],
    publishes: 0,
    faults_injected: 0,
    faults_by_status: {},
    dropped_connections: 0,
    tokens: {},
    rejected_tokens: {},
    unauthenticated: 0,
    in_flight: 0,
    peak_in_flight: 0,
  };
}
let stats = freshStats();
let faults = null;
let rng = null;

function bump(map, key, n = 1) {
  map[key] = (map[key] || 0) + n;
}

function countMetadataWrite(kind, what) {
  stats.metadata_writes += 1;
  bump(stats.metadata_writes_by_kind, kind);
  stats.metadata_write_log.push(what);
}

// mulberry32: small, seedable, reproducible.
function makeRng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const THROTTLE = {
  requests: () => ({ code: '0x80072322', message: `Number of requests exceeded the limit of ${config.request_limit} over time window of 300 seconds.` }),
  execution_time: () => ({ code: '0x80072321', message: 'Combined execution time of incoming requests exceeded limit of 1,200,000 milliseconds over time window of 300 seconds. Decrease number of concurrent requests or reduce the duration of requests and try again later.' }),
  concurrency: () => ({ code: '0x80072326', message: 'Number of concurrent requests exceeded the limit of 52.' }),
};

function normalizeFaults(b) {
  const bad = (m) => Object.assign(new Error(m), { status: 400 });
  if (b === null || typeof b !== 'object' || Array.isArray(b)) throw bad('faults must be a JSON object');
  if (Object.keys(b).length === 0) return null;
  const known = ['rate', 'statuses', 'retry_after_seconds', 'delay_ms', 'drop_connection_rate', 'count', 'seed', 'methods', 'entity_sets', 'throttle'];
  for (const k of Object.keys(b)) if (!known.includes(k)) throw bad(`unknown fault field "${k}" (known: ${known.join(', ')})`);
  const rate = b.rate ?? 0;
  const drop = b.drop_connection_rate ?? 0;
  if (typeof rate !== 'number' || rate < 0 || rate > 1) throw bad('rate must be a number in [0, 1]');
  if (typeof drop !== 'number' || drop < 0 || drop > 1) throw bad('drop_connection_rate must be a number in [0, 1]');
  const statuses = b.statuses ?? [429];
  if (!Array.isArray(statuses) || !statuses.length || statuses.some((s) => !Number.isInteger(s) || s < 400 || s > 599)) {
    throw bad('statuses must be a non-empty array of HTTP error statuses');
  }
  const retry = b.retry_after_seconds ?? 1;
  if (!Number.isInteger(retry) || retry < 0) throw bad('retry_after_seconds must be an integer >= 0');
  const delay = b.delay_ms ?? 0;
  if (!Number.isInteger(delay) || delay < 0) throw bad('delay_ms must be an integer >= 0');
  const count = b.count ?? null;
  if (count !== null && (!Number.isInteger(count) || count < 0)) throw bad('count must be null or an integer >= 0');
  const seed = b.seed ?? crypto.randomInt(0, 2 ** 31);
  if (!Number.isInteger(seed)) throw bad('seed must be an integer');
  const methods = b.methods ?? null;
  if (methods !== null && (!Array.isArray(methods) || methods.some((m) => typeof m !== 'string'))) throw bad('methods must be an array of strings');
  const sets = b.entity_sets ?? null;
  if (sets !== null && (!Array.isArray(sets) || sets.some((m) => typeof m !== 'string'))) throw bad('entity_sets must be an array of strings');
  const throttle = b.throttle ?? 'requests';
  if (!THROTTLE[throttle]) throw bad(`throttle must be one of ${Object.keys(THROTTLE).join(', ')}`);
  return {
    rate, statuses, retry_after_seconds: retry, delay_ms: delay, drop_connection_rate: drop, count, remaining: count, seed,
    methods: methods && methods.map((m) => m.toUpperCase()), entity_sets: sets, throttle,
  };
}

function setFaults(b) {
  faults = normalizeFaults(b);
  rng = faults ? makeRng(faults.seed) : null;
}

// ---------------------------------------------------------------------------
// the Web API
// ---------------------------------------------------------------------------

const API_RE = /^\/api\/data\/(v9\.[0-2])(\/.*)?$/;

async function handleApi(req, res, m, url) {
  const ctx = {
    req, res, url, version: m[1], reqId: newGuid(), applied: [], prefs: null, token: null, userId: config.user_id,
    host: req.headers.host || `127.0.0.1:${port}`,
  };
  ctx.base = `${scheme}://${ctx.host}/api/data/${ctx.version}/`;
  const rest = (m[2] || '/').slice(1);
  let path;
  try {
    path = decodeURIComponent(rest);
  } catch {
    path = rest;
  }
  const resource = (path.split(/[(/]/)[0] || '(service document)');
  const method = req.method.toUpperCase();
  stats.requests += 1;
  // Requests being served at once, from arrival (latency included) to the end of the answer.
  const counted = stats;
  counted.in_flight += 1;
  counted.peak_in_flight = Math.max(counted.peak_in_flight, counted.in_flight);
  res.on('close', () => { counted.in_flight -= 1; });
  bump(stats.by_method, method);
  bump(stats.by_entity_set, resource);
  bump(stats.by_operation, `${method} ${resource}`);
  res.on('finish', () => bump(stats.by_status, String(res.statusCode)));
  try {
    ctx.prefs = parsePrefer(req.headers.prefer);
  } catch {
    ctx.prefs = {};
  }

  // latency first (the network), then authentication, then service protection
  if (faults && faults.delay_ms > 0 && faultApplies(method, resource)) await sleep(faults.delay_ms);

  const auth = req.headers.authorization || '';
  const bm = /^Bearer\s+(\S+)\s*$/i.exec(auth);
  const tenantHeader = { 'WWW-Authenticate': `Bearer authorization_uri=https://login.microsoftonline.com/${config.tenant_id}/oauth2/authorize` };
  if (!bm) {
    stats.unauthenticated += 1;
    req.resume();
    sendError(ctx, new DvError(401, '', 'The request is not authenticated (RequestIsNotAuthenticated): an Authorization: Bearer <token> header is required.', tenantHeader));
    return;
  }
  if (config.accepted_tokens.length && !config.accepted_tokens.includes(bm[1])) {
    bump(stats.rejected_tokens, bm[1]);
    req.resume();
    sendError(ctx, new DvError(401, '', 'The bearer token is not valid for this organization (InvalidAuthTicket).', tenantHeader));
    return;
  }
  ctx.token = bm[1];
  bump(stats.tokens, ctx.token);
  if (config.enforce_application_users) {
    let claims = null;
    try { claims = JSON.parse(Buffer.from(bm[1].split('.')[1] || '', 'base64url').toString('utf8')); } catch { claims = null; }
    const here = `${scheme}://${ctx.host}`.toLowerCase();
    const aud = claims && typeof claims.aud === 'string' ? claims.aud.replace(/\/+$/, '').toLowerCase() : null;
    if (!claims || aud !== here || !(claims.exp > Date.now() / 1000)) {
      bump(stats.rejected_tokens, 'audience-or-expiry');
      req.resume();
      sendError(ctx, new DvError(401, '', `The bearer token is not valid for this organization (InvalidAuthTicket): audience ${claims && claims.aud} is not ${here}.`, tenantHeader));
      return;
    }
    if (claims.appid && !claims.scp) {
      const su = tables.get('systemuser');
      const user = [...su.rows.values()].find((r) => String(r.values.applicationid || '').toLowerCase() === String(claims.appid).toLowerCase());
      // A disabled application user is refused with its own code (Dataverse's error
      // reference: 0x80040225, "The specified user is either disabled or is not a member
      // of any business unit").
      if (user && user.values.isdisabled === true) {
        stats.disabled_users = (stats.disabled_users || 0) + 1;
        req.resume();
        sendError(ctx, new DvError(403, '0x80040225', `The specified user(Id = ${user.id}) is disabled. Consider enabling this user.`));
        return;
      }
      if (!user) {
        stats.not_members = (stats.not_members || 0) + 1;
        req.resume();
        sendError(ctx, new DvError(403, '0x80072560', 'The user is not a member of the organization.'));
        return;
      }
      // An application user without any security role is refused every request
      // (Dataverse's web service error codes: 0x80042F09 UserNotAssignedRoles).
      if (!(associations.get(user.id)?.size > 0)) {
        stats.users_without_roles = (stats.users_without_roles || 0) + 1;
        req.resume();
        sendError(ctx, new DvError(403, '0x80042F09', `The user (Id = ${user.id}) has not been assigned any roles.`));
        return;
      }
      ctx.userId = user.id;
    }
  }

  if (faults && faultApplies(method, resource)) {
    // Always draw three numbers so the sequence is reproducible from the seed.
    const r1 = rng();
    const r2 = rng();
    const r3 = rng();
    const budget = faults.remaining === null || faults.remaining > 0;
    if (budget && r1 < faults.drop_connection_rate) {
      if (faults.remaining !== null) faults.remaining -= 1;
      stats.faults_injected += 1;
      stats.dropped_connections += 1;
      bump(stats.faults_by_status, 'dropped');
      req.socket.destroy();
      return;
    }
    if (budget && r2 < faults.rate) {
      if (faults.remaining !== null) faults.remaining -= 1;
      const status = faults.statuses[Math.floor(r3 * faults.statuses.length)];
      stats.faults_injected += 1;
      bump(stats.faults_by_status, String(status));
      req.resume();
      if (status === 429) {
        const t = THROTTLE[faults.throttle]();
        sendError(ctx, new DvError(429, t.code, t.message, { 'Retry-After': String(faults.retry_after_seconds) }));
      } else {
        const messages = {
          500: 'An unexpected error occurred.',
          502: 'Bad Gateway',
          503: 'The service is temporarily unavailable. Try again later.',
          504: 'The operation has timed out.',
        };
        const headers = status === 503 ? { 'Retry-After': String(faults.retry_after_seconds) } : {};
        sendError(ctx, new DvError(status, status === 500 ? '0x80040216' : '', messages[status] || `Injected fault ${status}.`, headers));
      }
      return;
    }
  }

  try {
    let body = null;
    if (method === 'POST' || method === 'PATCH' || method === 'PUT') {
      const text = await readBody(req, config.max_body_bytes);
      const ct = req.headers['content-type'];
      if (text.length && ct && !/^application\/json\b/i.test(ct)) {
        throw new DvError(415, '0x80060888', `The content type '${ct}' is not supported; use application/json.`);
      }
      if (text.trim().length) {
        try {
          body = JSON.parse(text);
        } catch (err) {
          throw new DvError(400, '0x80048d19', `Error identified in Payload provided by the user: the request body is not valid JSON (${err.message}).`);
        }
      }
    } else {
      req.resume();
    }
    const params = new URLSearchParams(url.search);
    route(ctx, method, path, params, body);
  } catch (err) {
    if (err instanceof DvError) sendError(ctx, err);
    else {
      process.stderr.write(`dataverse peer: internal error: ${err?.stack || err}\n`);
      sendError(ctx, new DvError(500, '0x80040216', `An unexpected error occurred. (${err?.message || err})`));
    }
  }
}

function faultApplies(method, resource) {
  if (faults.methods && !faults.methods.includes(method)) return false;
  if (faults.entity_sets && !faults.entity_sets.includes(resource)) return false;
  return true;
}

function route(ctx, method, path, params, body) {
  const segs = parseSegments(path);
  if (segs.length === 0 || (segs.length === 1 && segs[0].name === '' && segs[0].keyRaw === null)) {
    if (method !== 'GET') throw E.method(method);
    return serviceDocument(ctx);
  }
  const [first] = segs;
  if (segs.some((s, i) => s.name === '' && i < segs.length - 1)) throw E.urlSegment('');
  if (segs.length === 1 && first.name === '$metadata') {
    if (method !== 'GET') throw E.method(method);
    return csdl(ctx);
  }
  if (first.name === '$batch') throw E.unsupported('$batch');
  if (first.name === 'WhoAmI' && segs.length === 1 && (first.keyRaw === null || first.keyRaw === '')) {
    if (method !== 'GET') throw E.method(method);
    return send(ctx, 200, {
      '@odata.context': `${ctx.base}$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse`,
      BusinessUnitId: config.business_unit_id,
      UserId: ctx.userId,
      OrganizationId: config.organization_id,
    });
  }
  if ((first.name === 'PublishXml' || first.name === 'PublishAllXml') && segs.length === 1) {
    if (method !== 'POST') throw E.method(method);
    stats.publishes += 1;
    return send(ctx, 204);
  }
  if (first.name === 'EntityDefinitions') return metadataRoute(ctx, method, segs, params, body);
  if (first.name === 'RetrieveRolePrivilegesRole' && segs.length === 1) {
    if (method !== 'GET') throw E.method(method);
    return retrieveRolePrivileges(ctx, first.keyRaw);
  }
  if (first.name === 'roles' && segs.length === 2 && segs[1].name === 'Microsoft.Dynamics.CRM.AddPrivilegesRole' && first.keyRaw) {
    if (method !== 'POST') throw E.method(method);
    return addPrivilegesRole(ctx, first.keyRaw, body);
  }
  const table = bySet.get(first.name);
  if (!table) throw E.urlSegment(first.name);
  return dataRoute(ctx, method, table, segs, params, body);
}

function serviceDocument(ctx) {
  const value = [...bySet.keys()].sort().map((name) => ({ name, kind: 'EntitySet', url: name }));
  value.push({ name: 'EntityDefinitions', kind: 'EntitySet', url: 'EntityDefinitions' });
  send(ctx, 200, { '@odata.context': `${ctx.base}$metadata`, value });
}

function csdl(ctx) {
  const esc = (s) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/"/g, '&quot;');
  let types = '';
  let sets = '';
  for (const t of tables.values()) {
    types += `<EntityType Name="${esc(t.logicalName)}"><Key><PropertyRef Name="${esc(t.primaryId)}" /></Key>`;
    for (const a of t.attrs.values()) types += `<Property Name="${esc(propName(a))}" Type="${ATTR_TYPES[a.type].edm}" />`;
    types += '</EntityType>';
    sets += `<EntitySet Name="${esc(t.entitySetName)}" EntityType="Microsoft.Dynamics.CRM.${esc(t.logicalName)}" />`;
  }
  const xml = `<?xml version="1.0" encoding="utf-8"?><edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx"><edmx:DataServices><Schema Namespace="Microsoft.Dynamics.CRM" Alias="mscrm" xmlns="http://docs.oasis-open.org/odata/ns/edm">${types}<EntityContainer Name="System">${sets}</EntityContainer></Schema></edmx:DataServices></edmx:Edmx>`;
  send(ctx, 200, xml, { 'Content-Type': 'application/xml' });
}

// ----- records --------------------------------------------------------------

function findRow(table, keyRaw) {
  const key = parseKey(keyRaw);
  if (!key) throw E.odata(`Bad Request - Error in query syntax: the key '${keyRaw}' is not valid.`);
  if (key.kind === 'id') return { key, row: table.rows.get(key.id) || null, id: key.id };
  // `(primaryid=<guid>)` is the named form of the primary key
  if (key.pairs.length === 1 && key.pairs[0][0] === table.primaryId) {
    const lit = key.pairs[0][1];
    if (lit.t !== 'guid') throw E.invalidKey(table.logicalName);
    return { key: { kind: 'id', id: lit.v }, row: table.rows.get(lit.v) || null, id: lit.v };
  }
  const names = key.pairs.map(([n]) => n);
  if (new Set(names).size !== names.length) throw E.invalidKey(table.logicalName);
  const k = activeKeys(table).find((x) => x.attributes.length === names.length && x.attributes.every((a) => names.includes(a)));
  if (!k) throw E.invalidKey(table.logicalName);
  const values = {};
  for (const [name, lit] of key.pairs) {
    const a = table.attrs.get(name);
    const kind = ATTR_TYPES[a.type].kind;
    const okLit = { string: 'string', number: 'number', guid: 'guid', datetime: 'string' }[kind];
    if (lit.t !== okLit) throw E.invalidKey(table.logicalName);
    values[name] = kind === 'datetime' ? coerceValue(table, a, lit.v) : lit.v;
  }
  const sig = keySignature(table, k, values);
  let row = null;
  for (const r of table.rows.values()) {
    if (keySignature(table, k, r.values) === sig) { row = r; break; }
  }
  return { key, row, keyValues: values, keyDef: k };
}

function entityIdUrl(ctx, table, keyRaw) {
  return `${ctx.base}${table.entitySetName}(${keyRaw})`;
}

function notFound(table, found) {
  return found.key.kind === 'id' ? E.notFoundById(table.logicalName, found.id) : E.notFoundByKey(table.logicalName);
}

function contextUrl(ctx, table, select, entity) {
  return `${ctx.base}$metadata#${table.entitySetName}${select ? `(${select.join(',')})` : ''}${entity ? '/$entity' : ''}`;
}

// If-Match / If-None-Match values: '*' or a list of (weak) ETags.
function parseEtagList(h) {
  if (h === undefined) return null;
  const s = h.trim();
  if (s === '*') return '*';
  if (s.toLowerCase() === 'null' || s === '') return null;
  return s.split(',').map((x) => x.trim().replace(/^W\//, '').replace(/^"|"$/g, ''));
}

function dataRoute(ctx, method, table, segs, params, body) {
  const [first] = segs;
  const opts = queryOptions(params);
  const schema = recordSchema(table);

  // collection
  if (first.keyRaw === null && segs.length === 1) {
    if (method === 'GET') return queryCollection(ctx, table, opts, schema);
    if (method === 'POST') return createRecord(ctx, table, opts, schema, body);
    throw E.method(method);
  }
  if (first.keyRaw === null) throw E.urlSegment(segs[1].name);

  // one record
  if (segs.length === 1) {
    if (method === 'GET') return retrieveRecord(ctx, table, first.keyRaw, opts, schema);
    if (method === 'PATCH') return patchRecord(ctx, table, first.keyRaw, opts, schema, body);
    if (method === 'DELETE') return deleteRecord(ctx, table, first.keyRaw);
    throw E.method(method);
  }

  // navigation: systemusers(id)/systemuserroles_association[/$ref]
  const nav = segs[1];
  if (table.navCollections[nav.name] && nav.keyRaw === null) {
    return navCollection(ctx, method, table, first.keyRaw, nav.name, segs.slice(2), params, body);
  }

  // single property: GET/PUT/DELETE {set}(id)/prop
  if (segs.length === 2 && nav.keyRaw === null) {
    const a = table.attrs.get(nav.name) || propToAttr(table, nav.name);
    if (!a) throw E.urlSegment(nav.name);
    const found = findRow(table, first.keyRaw);
    if (!found.row) throw notFound(table, found);
    if (method === 'GET') {
      const v = found.row.values[a.logicalName];
      if (v === null || v === undefined) return send(ctx, 204);
      return send(ctx, 200, { '@odata.context': `${ctx.base}$metadata#${table.entitySetName}(${found.row.id})/${propName(a)}`, value: v });
    }
    if (method === 'PUT' || method === 'DELETE') {
      if (a.type === 'Lookup' || a.type === 'Owner' || a.isPrimaryId || a.readOnly) throw E.method(method);
      let v = null;
      if (method === 'PUT') {
        if (!body || typeof body !== 'object' || !hasOwn(body, 'value')) throw E.payload(table, 'Microsoft.OData.ODataException: A "value" property is required.');
        v = coerceValue(table, a, body.value);
      }
      checkIfMatch(ctx, found.row);
      updateRow(table, found.row, { [a.logicalName]: v }, ctx);
      return send(ctx, 204);
    }
    throw E.method(method);
  }
  throw E.urlSegment(segs[segs.length - 1].name);
}

function checkIfMatch(ctx, row) {
  const ifMatch = parseEtagList(ctx.req.headers['if-match']);
  if (ifMatch && ifMatch !== '*' && !ifMatch.includes(String(row.version))) throw E.versionMismatch();
}

function wantsRepresentation(ctx) {
  return ctx.prefs.return === 'representation';
}

function createRecord(ctx, table, opts, schema, body) {
  if (opts.$filter !== undefined || opts.$top !== undefined || opts.$orderby !== undefined) throw E.odata('Query options $filter, $top and $orderby are not allowed on POST.');
  if (opts.$expand !== undefined) throw E.unsupported('$expand');
  const select = parseSelect(opts.$select, schema);
  if (body === null) throw E.payload(table, 'Microsoft.OData.ODataException: The request body is empty.');
  const { changes, id } = parseWriteBody(table, body);
  const row = createRow(table, changes, id, ctx);
  if (wantsRepresentation(ctx)) {
    ctx.applied.push('return=representation');
    return send(ctx, 201, { '@odata.context': contextUrl(ctx, table, select, true), ...renderRow(table, row, select) });
  }
  send(ctx, 204, null, { 'OData-EntityId': entityIdUrl(ctx, table, row.id) });
}

function retrieveRecord(ctx, table, keyRaw, opts, schema) {
  for (const k of ['$filter', '$top', '$orderby', '$skiptoken', '$count']) {
    if (opts[k] !== undefined) throw E.odata(`The query option ${k} is not allowed when retrieving a single record.`);
  }
  const select = parseSelect(opts.$select, schema);
  const expand = parseExpand(opts.$expand);
  const found = findRow(table, keyRaw);
  if (!found.row) throw notFound(table, found);
  const ifNoneMatch = parseEtagList(ctx.req.headers['if-none-match']);
  if (ifNoneMatch && !expand.length && !ctx.prefs['odata.include-annotations']) {
    if (ifNoneMatch === '*' || ifNoneMatch.includes(String(found.row.version))) {
      return send(ctx, 304, null, { ETag: etagOf(found.row.version) });
    }
  }
  const out = { '@odata.context': contextUrl(ctx, table, select, true), ...renderRow(table, found.row, select) };
  applyExpand(ctx, table, [found.row], [out], expand);
  send(ctx, 200, out, { ETag: etagOf(found.row.version) });
}

function patchRecord(ctx, table, keyRaw, opts, schema, body) {
  if (opts.$expand !== undefined) { /* $expand is ignored on PATCH (reference §3) */ }
  const select = parseSelect(opts.$select, schema);
  if (body === null) throw E.payload(table, 'Microsoft.OData.ODataException: The request body is empty.');
  const found = findRow(table, keyRaw);
  const ifMatch = parseEtagList(ctx.req.headers['if-match']);
  const ifNoneMatch = parseEtagList(ctx.req.headers['if-none-match']);
  const parsed = parseWriteBody(table, body);
  let row = found.row;
  let created = false;
  if (row) {
    if (ifNoneMatch === '*') throw E.duplicate();
    if (ifMatch && ifMatch !== '*' && !ifMatch.includes(String(row.version))) throw E.versionMismatch();
    const changes = { ...parsed.changes };
    if (parsed.id && parsed.id !== row.id) throw E.invalidArgument(`The primary key ${table.primaryId} in the body does not match the record addressed by the URL.`);
    // upsert by alternate key: on the update path the key columns in the body are dropped
    if (found.keyDef) for (const a of found.keyDef.attributes) delete changes[a];
    updateRow(table, row, changes, ctx);
  } else {
    if (ifMatch) throw notFound(table, found);
    const changes = { ...parsed.changes };
    let id = found.key.kind === 'id' ? found.id : parsed.id;
    if (found.key.kind === 'id' && parsed.id && parsed.id !== found.id) {
      throw E.invalidArgument(`The primary key ${table.primaryId} in the body does not match the record addressed by the URL.`);
    }
    // upsert by alternate key: on the create path body values win; missing ones come from the URL
    if (found.keyValues) for (const [k, v] of Object.entries(found.keyValues)) if (!hasOwn(changes, k)) changes[k] = v;
    row = createRow(table, changes, id || null, ctx);
    created = true;
  }
  if (wantsRepresentation(ctx)) {
    ctx.applied.push('return=representation');
    return send(ctx, created ? 201 : 200, { '@odata.context': contextUrl(ctx, table, select, true), ...renderRow(table, row, select) }, { ETag: etagOf(row.version) });
  }
  send(ctx, 204, null, { 'OData-EntityId': entityIdUrl(ctx, table, keyRaw) });
}

function deleteRecord(ctx, table, keyRaw) {
  const found = findRow(table, keyRaw);
  if (!found.row) throw notFound(table, found);
  if (table.builtin && [config.user_id, config.business_unit_id, config.system_administrator_role_id].includes(found.row.id)) {
    throw new DvError(403, '0x80040220', `The built-in ${table.logicalName} record ${found.row.id} cannot be deleted in the test double.`);
  }
  checkIfMatch(ctx, found.row);
  table.rows.delete(found.row.id);
  // Change tracking reports deletions by primary id, at the version they happened.
  (table.deleted ||= []).push({ id: found.row.id, version: nextVersion() });
  if (table.logicalName === 'systemuser') associations.delete(found.row.id);
  send(ctx, 204);
}

// Change tracking (reference §10): the first GET with `Prefer: odata.track-changes` returns
// every row and an `@odata.deltaLink` ending in `$deltatoken=<version>!<timestamp>`; a GET on
// that link returns the rows changed since, and deleted rows as `$deletedEntity` entries by
// primary id. `$filter`, `$orderby`, `$expand` and `$top` are refused with it.
let deltaTokensExpiredUpTo = -1;
function trackChanges(ctx, table, opts, schema, select) {
  if (!table.changeTracking) {
    throw new DvError(400, '0x80044352', `Change tracking is not enabled for the entity ${table.logicalName}.`);
  }
  for (const o of ['$filter', '$orderby', '$expand', '$top']) {
    if (opts[o] !== undefined) throw E.odata(`The query option ${o} is not allowed with change tracking.`);
  }
  let since = null;
  if (opts.$deltatoken !== undefined) {
    const m = /^(\d+)!/.exec(opts.$deltatoken);
    if (!m) throw new DvError(400, '0x80044353', 'The delta token is not valid.');
    since = Number(m[1]);
    // Change-tracking data is kept for a retention period; a token older than it is
    // refused and the client must run the initial sync again ("Use change tracking to
    // synchronize data with external systems"). POST /__control/expire_delta_tokens
    // ages every token issued so far past it.
    if (since <= deltaTokensExpiredUpTo) {
      stats.expired_delta_tokens = (stats.expired_delta_tokens || 0) + 1;
      throw new DvError(400, '0x80044352', 'The delta token has expired: its change tracking data is no longer retained. Perform a full sync (a request without the delta token).');
    }
  }
  const changed = [...table.rows.values()].filter((r) => since === null || r.version > since);
  changed.sort((a, b) => a.version - b.version);
  const value = changed.map((r) => renderRow(table, r, select));
  if (since !== null) {
    for (const d of table.deleted || []) {
      if (d.version > since) {
        value.push({ '@odata.context': `${ctx.base}$metadata#${table.entitySetName}/$deletedEntity`, id: d.id, reason: 'deleted' });
      }
    }
  }
  const token = `${lastVersion}!${new Date().toISOString().replace(/[-:]/g, '').slice(0, 15)}`;
  const selectPart = opts.$select !== undefined ? `$select=${encodeURIComponent(opts.$select)}&` : '';
  const out = {
    '@odata.context': `${contextUrl(ctx, table, select, false)}/$delta`,
    value,
    '@odata.deltaLink': `${ctx.base}${table.entitySetName}?${selectPart}$deltatoken=${encodeURIComponent(token)}`,
  };
  if (ctx.prefs['odata.track-changes']) ctx.applied.push('odata.track-changes');
  send(ctx, 200, out);
}

function queryCollection(ctx, table, opts, schema) {
  const select = parseSelect(opts.$select, schema);
  const filter = opts.$filter !== undefined ? parseFilter(opts.$filter, schema) : null;
  const orderby = parseOrderby(opts.$orderby, schema);
  const top = parseTop(opts.$top);
  const count = parseCount(opts.$count);
  const expand = parseExpand(opts.$expand);
  if (opts.$filter !== undefined && !opts.$filter.trim()) throw E.odata('The $filter query option is empty.');
  if (ctx.prefs['odata.track-changes'] || opts.$deltatoken !== undefined) return trackChanges(ctx, table, opts, schema, select);

  let rows = [...table.rows.values()];
  if (filter) rows = rows.filter((r) => evalFilter(filter, r));
  const total = rows.length;
  sortRows(rows, orderby, (r) => r.id);

  let pageSize = config.max_page_size;
  const asked = ctx.prefs['odata.maxpagesize'];
  let pagingApplied = false;
  if (asked !== undefined) {
    const n = Number(asked);
    if (!Number.isInteger(n) || n <= 0) throw E.odata(`The odata.maxpagesize preference value '${asked}' is not valid.`);
    if (n <= 5000 && top === null) {
      pageSize = Math.min(n, config.max_page_size);
      pagingApplied = true;
    }
  }
  let start = 0;
  let page = 1;
  if (opts.$skiptoken !== undefined) {
    if (top !== null) throw E.odata('$skiptoken cannot be combined with $top.');
    const cur = parseSkiptoken(opts.$skiptoken, table, orderby);
    page = cur.page;
    const cursor = { values: {}, id: cur.id };
    const cmp = (r) => {
      for (let i = 0; i < orderby.length; i++) {
        const o = orderby[i];
        const c = cmpNullable(o.prop.kind, o.prop.get(r), cur.vals[i]);
        if (c !== 0) return o.desc ? -c : c;
      }
      return cmpNullable('string', r.id, cursor.id);
    };
    start = rows.findIndex((r) => cmp(r) > 0);
    if (start < 0) start = rows.length;
  }
  let pageRows;
  let more = false;
  if (top !== null) {
    pageRows = rows.slice(0, top);
  } else {
    pageRows = rows.slice(start, start + pageSize);
    more = start + pageSize < rows.length;
  }
  const value = pageRows.map((r) => renderRow(table, r, select));
  applyExpand(ctx, table, pageRows, value, expand);
  const out = { '@odata.context': contextUrl(ctx, table, select, false) };
  if (count) out['@odata.count'] = Math.min(total, 5000);
  out.value = value;
  if (more && pageRows.length) {
    const token = makeSkiptoken(table, orderby, pageRows[pageRows.length - 1], pageRows[0], page);
    const kept = ctx.url.search.replace(/^\?/, '').split('&').filter((p) => p && !/^(\$|%24)skiptoken=/i.test(p));
    const enc = encodeURIComponent(token).replace(/%3D/g, '=').replace(/%2F/g, '/');
    kept.push(`$skiptoken=${enc}`);
    out['@odata.nextLink'] = `${ctx.base}${table.entitySetName}?${kept.join('&')}`;
  }
  if (pagingApplied) ctx.applied.push(`odata.maxpagesize=${pageSize}`);
  send(ctx, 200, out);
}

function applyExpand(ctx, table, rows, outs, expand) {
  for (const e of expand) {
    const targetName = table.navCollections[e.name];
    if (!targetName) throw E.unsupported(`$expand=${e.name}`);
    const target = tables.get(targetName);
    const schema = recordSchema(target);
    const select = parseSelect(e.opts.$select, schema);
    const filter = e.opts.$filter ? parseFilter(e.opts.$filter, schema) : null;
    rows.forEach((r, i) => {
      const ids = [...(associations.get(r.id) || [])];
      let related = ids.map((id) => target.rows.get(id)).filter(Boolean);
      if (filter) related = related.filter((x) => evalFilter(filter, x));
      outs[i][e.name] = related.map((x) => renderRow(target, x, select));
    });
  }
}

function navCollection(ctx, method, table, keyRaw, navName, rest, params, body) {
  const target = tables.get(table.navCollections[navName]);
  const found = findRow(table, keyRaw);
  if (!found.row) throw notFound(table, found);
  const set = associations.get(found.row.id) || new Set();
  associations.set(found.row.id, set);
  if (rest.length === 0) {
    if (method !== 'GET') throw E.method(method);
    const opts = queryOptions(params);
    const select = parseSelect(opts.$select, recordSchema(target));
    const value = [...set].map((id) => target.rows.get(id)).filter(Boolean).map((r) => renderRow(target, r, select));
    return send(ctx, 200, { '@odata.context': contextUrl(ctx, target, select, false), value });
  }
  if (rest.length !== 1 || rest[0].name !== '$ref' || rest[0].keyRaw !== null) throw E.urlSegment(rest[0]?.name);
  const refId = (value) => {
    const m = typeof value === 'string' && new RegExp(`${target.entitySetName}\\(([0-9a-fA-F-]{36})\\)$`).exec(value);
    if (!m || !isGuid(m[1])) throw E.invalidArgument(`The reference '${value}' is not a ${target.entitySetName} URL.`);
    return m[1].toLowerCase();
  };
  if (method === 'POST') {
    const id = refId(body && body['@odata.id']);
    if (!target.rows.has(id)) throw E.notFoundById(target.logicalName, id);
    set.add(id);
    return send(ctx, 204);
  }
  if (method === 'DELETE') {
    const id = refId(params.get('$id'));
    set.delete(id);
    return send(ctx, 204);
  }
  throw E.method(method);
}

// ----- metadata -------------------------------------------------------------

function entityJson(t) {
  return {
    MetadataId: t.metadataId,
    LogicalName: t.logicalName,
    SchemaName: t.schemaName,
    EntitySetName: t.entitySetName,
    LogicalCollectionName: t.entitySetName,
    CollectionSchemaName: `${t.schemaName}s`,
    PrimaryIdAttribute: t.primaryId,
    PrimaryNameAttribute: t.primaryName || null,
    ObjectTypeCode: t.objectTypeCode,
    OwnershipType: t.ownershipType,
    TableType: 'Standard',
    IsCustomEntity: t.isCustom,
    IsManaged: false,
    IsActivity: false,
    IsIntersect: false,
    IsPrivate: false,
    HasActivities: t.hasActivities,
    HasNotes: t.hasNotes,
    IsOptimisticConcurrencyEnabled: true,
    ChangeTrackingEnabled: !!t.changeTracking,
    IsValidForAdvancedFind: true,
    IntroducedVersion: '1.0',
    CreatedOn: t.createdOn,
    DisplayName: t.displayName,
    DisplayCollectionName: t.displayCollectionName,
    Description: t.description || label(''),
  };
}

function attrJson(t, a) {
  const d = ATTR_TYPES[a.type];
  const o = {
    '@odata.type': `#Microsoft.Dynamics.CRM.${d.odata}`,
    MetadataId: a.metadataId,
    LogicalName: a.logicalName,
    SchemaName: a.schemaName,
    EntityLogicalName: t.logicalName,
    AttributeType: a.type,
    AttributeTypeName: { Value: d.typeName },
    IsPrimaryId: a.isPrimaryId,
    IsPrimaryName: a.isPrimaryName,
    IsCustomAttribute: a.isCustom,
    IsLogical: false,
    IsManaged: false,
    IsValidForCreate: !a.readOnly,
    IsValidForUpdate: !a.readOnly && !a.isPrimaryId,
    IsValidForRead: true,
    SourceType: 0,
    IntroducedVersion: '1.0',
    RequiredLevel: { Value: a.requiredLevel, CanBeChanged: true, ManagedPropertyLogicalName: 'canmodifyrequirementlevelsettings' },
    DisplayName: a.displayName,
    Description: a.description || label(''),
    CreatedOn: a.createdOn,
  };
  switch (a.type) {
    case 'String':
      Object.assign(o, { MaxLength: a.maxLength, DatabaseLength: a.maxLength * 2, Format: 'Text', FormatName: { Value: a.formatName } });
      break;
    case 'Memo':
      Object.assign(o, { MaxLength: a.maxLength, DatabaseLength: a.maxLength * 2, Format: 'TextArea' });
      break;
    case 'Integer':
      Object.assign(o, { MinValue: a.minValue, MaxValue: a.maxValue, Format: 'None' });
      break;
    case 'BigInt':
      Object.assign(o, { MinValue: new RawNumber('-9223372036854775808'), MaxValue: new RawNumber('9223372036854775807') });
      break;
    case 'Decimal':
    case 'Double':
      Object.assign(o, { MinValue: a.minValue, MaxValue: a.maxValue, Precision: a.precision });
      break;
    case 'DateTime':
      Object.assign(o, {
        Format: a.format, DateTimeBehavior: { Value: a.dateTimeBehavior }, CanChangeDateTimeBehavior: { Value: true },
        MinSupportedValue: '1753-01-01T00:00:00Z', MaxSupportedValue: '9999-12-30T23:59:59Z',
      });
      break;
    case 'Boolean':
      Object.assign(o, { DefaultValue: false, OptionSet: a.optionSet });
      break;
    case 'Picklist':
    case 'State':
    case 'Status':
      Object.assign(o, { OptionSet: { IsGlobal: false, Options: (a.options || []).map((v) => ({ Value: v, Label: label(String(v)) })) } });
      break;
    case 'Lookup':
    case 'Owner':
      Object.assign(o, { Targets: a.targets || [] });
      break;
    default:
      break;
  }
  return o;
}

function keyJson(t, k) {
  refreshKeys(t);
  return {
    MetadataId: k.metadataId,
    LogicalName: k.logicalName,
    SchemaName: k.schemaName,
    EntityLogicalName: t.logicalName,
    KeyAttributes: k.attributes,
    DisplayName: k.displayName,
    EntityKeyIndexStatus: k.status,
    AsyncJob: null,
    IsManaged: false,
    IsCustomizable: { Value: true, CanBeChanged: true, ManagedPropertyLogicalName: 'iscustomizable' },
    IntroducedVersion: '1.0',
  };
}

const ENTITY_TYPE = 'Microsoft.Dynamics.CRM.EntityMetadata';
const ATTRIBUTE_TYPE = 'Microsoft.Dynamics.CRM.AttributeMetadata';
const KEY_TYPE = 'Microsoft.Dynamics.CRM.EntityKeyMetadata';

// Metadata key segments: (LogicalName='x'), (<MetadataId>), (MetadataId=<guid>)
function resolveMetadataKey(keyRaw, items, kind) {
  const key = parseKey(keyRaw);
  if (!key) throw E.odata(`Bad Request - Error in query syntax: the key '${keyRaw}' is not valid.`);
  let match;
  let shown;
  if (key.kind === 'id') {
    match = items.find((x) => x.metadataId === key.id);
    shown = key.id;
  } else if (key.pairs.length === 1 && key.pairs[0][0] === 'LogicalName' && key.pairs[0][1].t === 'string') {
    match = items.find((x) => x.logicalName === key.pairs[0][1].v);
    shown = key.pairs[0][1].v;
  } else if (key.pairs.length === 1 && key.pairs[0][0] === 'MetadataId' && key.pairs[0][1].t === 'guid') {
    match = items.find((x) => x.metadataId === key.pairs[0][1].v);
    shown = key.pairs[0][1].v;
  } else {
    throw E.odata(`The key in the request URI is not valid for resource '${kind}'.`);
  }
  return { match, shown };
}

function metadataNotFound(what, name) {
  if (what === 'entity') return new DvError(404, '0x80040217', `Could not find an entity with name ${name} and id 00000000-0000-0000-0000-000000000000.`);
  if (what === 'attribute') return new DvError(404, '0x80040217', `Could not find attribute with name ${name}.`);
  return new DvError(404, '0x80040217', `Could not find entity key with name ${name}.`);
}

function selectObject(o, select, keep = []) {
  if (!select) return o;
  const out = {};
  if (o['@odata.type']) out['@odata.type'] = o['@odata.type'];
  for (const k of [...select, ...keep]) if (hasOwn(o, k)) out[k] = o[k];
  return out;
}

function listObjects(ctx, objs, opts, typeName, sample, contextBase, keep) {
  const schema = objectSchema(typeName, sample);
  const select = parseSelect(opts.$select, schema);
  const filter = opts.$filter !== undefined ? parseFilter(opts.$filter, schema) : null;
  const orderby = parseOrderby(opts.$orderby, schema);
  const top = parseTop(opts.$top);
  let list = filter ? objs.filter((o) => evalFilter(filter, o)) : objs.slice();
  if (orderby.length) sortRows(list, orderby, (o) => o.MetadataId);
  if (top !== null) list = list.slice(0, top);
  return {
    '@odata.context': `${contextBase}${select ? `(${select.join(',')})` : ''}`,
    value: list.map((o) => selectObject(o, select, keep)),
  };
}

function checkMetadataOptions(opts, allowed) {
  for (const k of Object.keys(opts)) if (!allowed.includes(k)) throw E.odata(`The query option ${k} is not supported here.`);
}

function metadataRoute(ctx, method, segs, params, body) {
  const opts = queryOptions(params);
  const [first] = segs;
  const solution = ctx.req.headers['mscrm.solutionuniquename'] || params.get('SolutionUniqueName') || null;
  const allTables = [...tables.values()];

  if (first.keyRaw === null) {
    if (segs.length !== 1) throw E.urlSegment(segs[1].name);
    if (method === 'GET') {
      checkMetadataOptions(opts, ['$select', '$filter', '$expand', '$orderby', '$top']);
      const expand = parseExpand(opts.$expand);
      const sample = entityJson(allTables[0]);
      const out = listObjects(ctx, allTables.map(entityJson), opts, ENTITY_TYPE, sample, `${ctx.base}$metadata#EntityDefinitions`, ['MetadataId']);
      if (expand.length) {
        out.value.forEach((o) => Object.assign(o, expandEntity(ctx, tables.get(o.LogicalName) || allTables.find((t) => t.metadataId === o.MetadataId), expand)));
      }
      return send(ctx, 200, out);
    }
    if (method === 'POST') return createEntity(ctx, body, solution);
    throw E.method(method);
  }

  const { match: table, shown } = resolveMetadataKey(first.keyRaw, allTables, ENTITY_TYPE);
  if (!table) throw metadataNotFound('entity', shown);
  refreshKeys(table);

  if (segs.length === 1) {
    if (method === 'GET') {
      checkMetadataOptions(opts, ['$select', '$expand']);
      const schema = objectSchema(ENTITY_TYPE, entityJson(table));
      const select = parseSelect(opts.$select, schema);
      const expand = parseExpand(opts.$expand);
      const out = {
        '@odata.context': `${ctx.base}$metadata#EntityDefinitions${select ? `(${select.join(',')})` : ''}/$entity`,
        ...selectObject(entityJson(table), select, ['MetadataId']),
        ...expandEntity(ctx, table, expand),
      };
      return send(ctx, 200, out);
    }
    if (method === 'PUT') return updateEntity(ctx, table, body);
    if (method === 'DELETE') {
      if (table.builtin) throw new DvError(403, '0x80040220', `The system table ${table.logicalName} cannot be deleted.`);
      tables.delete(table.logicalName);
      bySet.delete(table.entitySetName);
      countMetadataWrite('entity_delete', `DELETE EntityDefinitions ${table.logicalName}`);
      return send(ctx, 204);
    }
    throw E.method(method);
  }

  const sub = segs[1];
  const eidBase = `${ctx.base}$metadata#EntityDefinitions('${table.metadataId}')`;
  if (sub.name === 'Attributes') {
    const attrs = [...table.attrs.values()];
    if (sub.keyRaw === null) {
      const cast = segs[2]?.name;
      if (segs.length > 3 || (cast && !ODATA_TYPE_TO_ATTR[cast])) throw E.urlSegment(cast);
      if (method === 'GET') {
        checkMetadataOptions(opts, ['$select', '$filter', '$orderby', '$top']);
        const castType = cast ? ODATA_TYPE_TO_ATTR[cast] : null;
        const objs = attrs.filter((a) => !castType || a.type === castType).map((a) => attrJson(table, a));
        const sample = castType ? (objs[0] || attrJson(table, { ...attrs[0], type: castType })) : attrJson(table, attrs[0]);
        const typeName = castType ? `Microsoft.Dynamics.CRM.${ATTR_TYPES[castType].odata}` : ATTRIBUTE_TYPE;
        const baseSample = castType ? sample : Object.fromEntries(Object.entries(sample).filter(([k]) => BASE_ATTR_PROPS.has(k)));
        return send(ctx, 200, listObjects(ctx, objs, opts, typeName, baseSample, `${eidBase}/Attributes${cast ? `/${cast}` : ''}`, ['MetadataId']));
      }
      if (method === 'POST') {
        if (cast) throw E.method(method);
        return createAttribute(ctx, table, body, solution);
      }
      throw E.method(method);
    }
    const { match: attr, shown: aname } = resolveMetadataKey(sub.keyRaw, attrs, ATTRIBUTE_TYPE);
    if (!attr) throw metadataNotFound('attribute', aname);
    const cast = segs[2]?.name;
    if (segs.length > 3 || (cast && ODATA_TYPE_TO_ATTR[cast] !== attr.type)) throw E.urlSegment(cast);
    if (method === 'GET') {
      checkMetadataOptions(opts, ['$select']);
      const full = attrJson(table, attr);
      const schemaSample = cast ? full : Object.fromEntries(Object.entries(full).filter(([k]) => BASE_ATTR_PROPS.has(k)));
      const select = parseSelect(opts.$select, objectSchema(cast || ATTRIBUTE_TYPE, schemaSample));
      return send(ctx, 200, { '@odata.context': `${eidBase}/Attributes${cast ? `/${cast}` : ''}/$entity`, ...selectObject(full, select, ['MetadataId']) });
    }
    if (method === 'PUT') return updateAttribute(ctx, table, attr, body);
    if (method === 'DELETE') {
      if (attr.isPrimaryId || attr.isPrimaryName || !attr.isCustom) throw E.invalidArgument(`The attribute ${attr.logicalName} cannot be deleted.`);
      for (const k of table.keys.values()) {
        if (k.attributes.includes(attr.logicalName)) throw E.invalidArgument(`The attribute ${attr.logicalName} is used by the entity key ${k.schemaName} and cannot be deleted.`);
      }
      table.attrs.delete(attr.logicalName);
      for (const r of table.rows.values()) delete r.values[attr.logicalName];
      countMetadataWrite('attribute_delete', `DELETE Attribute ${table.logicalName}.${attr.logicalName}`);
      return send(ctx, 204);
    }
    throw E.method(method);
  }
  if (sub.name === 'Keys') {
    if (segs.length > 2) throw E.urlSegment(segs[2].name);
    const keys = [...table.keys.values()];
    if (sub.keyRaw === null) {
      if (method === 'GET') {
        checkMetadataOptions(opts, ['$select', '$filter', '$orderby', '$top']);
        const objs = keys.map((k) => keyJson(table, k));
        const sample = keyJson(table, keys[0] || { metadataId: '', logicalName: '', schemaName: '', attributes: [], status: 'Active' });
        return send(ctx, 200, listObjects(ctx, objs, opts, KEY_TYPE, sample, `${eidBase}/Keys`, ['MetadataId']));
      }
      if (method === 'POST') return createKey(ctx, table, body, solution);
      throw E.method(method);
    }
    const { match: key, shown: kname } = resolveMetadataKey(sub.keyRaw, keys, KEY_TYPE);
    if (!key) throw metadataNotFound('key', kname);
    if (method === 'GET') {
      checkMetadataOptions(opts, ['$select']);
      const select = parseSelect(opts.$select, objectSchema(KEY_TYPE, keyJson(table, key)));
      return send(ctx, 200, { '@odata.context': `${eidBase}/Keys/$entity`, ...selectObject(keyJson(table, key), select, ['MetadataId']) });
    }
    if (method === 'DELETE') {
      table.keys.delete(key.logicalName);
      countMetadataWrite('key_delete', `DELETE Key ${table.logicalName}.${key.schemaName}`);
      return send(ctx, 204);
    }
    throw E.method(method);
  }
  throw E.urlSegment(sub.name);
}

const BASE_ATTR_PROPS = new Set([
  'MetadataId', 'LogicalName', 'SchemaName', 'EntityLogicalName', 'AttributeType', 'AttributeTypeName', 'IsPrimaryId', 'IsPrimaryName',
  'IsCustomAttribute', 'IsLogical', 'IsManaged', 'IsValidForCreate', 'IsValidForUpdate', 'IsValidForRead', 'SourceType', 'IntroducedVersion',
  'RequiredLevel', 'DisplayName', 'Description', 'CreatedOn',
]);

function expandEntity(ctx, table, expand) {
  const out = {};
  for (const e of expand) {
    const opts = e.opts;
    if (e.name === 'Attributes') {
      const objs = [...table.attrs.values()].map((a) => attrJson(table, a));
      const baseSample = Object.fromEntries(Object.entries(objs[0]).filter(([k]) => BASE_ATTR_PROPS.has(k)));
      out.Attributes = listObjects(ctx, objs, opts, ATTRIBUTE_TYPE, baseSample, '', ['MetadataId']).value;
    } else if (e.name === 'Keys') {
      const keys = [...table.keys.values()];
      const sample = keyJson(table, keys[0] || { metadataId: '', logicalName: '', schemaName: '', attributes: [], status: 'Active' });
      out.Keys = listObjects(ctx, keys.map((k) => keyJson(table, k)), opts, KEY_TYPE, sample, '', ['MetadataId']).value;
    } else {
      throw E.unsupported(`$expand=${e.name} on EntityDefinitions`);
    }
  }
  return out;
}

function checkSchemaName(name, what) {
  if (typeof name !== 'string' || !name) throw E.invalidArgument(`${what}: SchemaName is required.`);
  if (!/^[A-Za-z][A-Za-z0-9]*_[A-Za-z0-9_]+$/.test(name)) {
    throw E.invalidArgument(`${what}: SchemaName '${name}' must start with a customization prefix followed by an underscore and contain only letters, digits and underscores.`);
  }
}

function metadataDuplicate(message) {
  return new DvError(412, '0x80040237', message);
}

function checkOdataType(body, expected, what) {
  const t = body['@odata.type'];
  if (t === undefined) return;
  const norm = String(t).replace(/^#/, '');
  if (norm !== expected) throw E.invalidArgument(`${what}: @odata.type must be ${expected}, not ${t}.`);
}

function createEntity(ctx, body, solution) {
  if (!body || typeof body !== 'object' || Array.isArray(body)) throw E.invalidArgument('The request body must be an EntityMetadata object.');
  checkOdataType(body, ENTITY_TYPE, 'EntityMetadata');
  checkSchemaName(body.SchemaName, 'EntityMetadata');
  const logicalName = body.SchemaName.toLowerCase();
  if (body.LogicalName !== undefined && body.LogicalName !== logicalName) throw E.invalidArgument(`LogicalName must be the lower-case SchemaName (${logicalName}).`);
  const displayName = normalizeLabel(body.DisplayName, 'DisplayName');
  const displayCollectionName = normalizeLabel(body.DisplayCollectionName, 'DisplayCollectionName');
  if (!displayName) throw E.invalidArgument('EntityMetadata: DisplayName is required.');
  if (!displayCollectionName) throw E.invalidArgument('EntityMetadata: DisplayCollectionName is required.');
  const ownership = body.OwnershipType;
  if (!['UserOwned', 'OrganizationOwned'].includes(ownership)) throw E.invalidArgument('EntityMetadata: OwnershipType must be UserOwned or OrganizationOwned.');
  if (body.IsActivity === true) throw E.unsupported('Creating activity tables');
  if (!Array.isArray(body.Attributes) || body.Attributes.length === 0) {
    throw E.invalidArgument('EntityMetadata: Attributes must contain the primary name attribute (a StringAttributeMetadata with IsPrimaryName true).');
  }
  const primaries = body.Attributes.filter((a) => a && a.IsPrimaryName === true);
  if (primaries.length !== 1 || body.Attributes.length !== 1) {
    throw E.invalidArgument('EntityMetadata: Attributes must contain exactly one attribute, the primary name attribute (IsPrimaryName true). Add other columns with POST EntityDefinitions(...)/Attributes.');
  }
  const pa = primaries[0];
  checkOdataType(pa, 'Microsoft.Dynamics.CRM.StringAttributeMetadata', 'Primary name attribute');
  if (pa['@odata.type'] === undefined) throw E.invalidArgument('Primary name attribute: @odata.type Microsoft.Dynamics.CRM.StringAttributeMetadata is required.');
  checkSchemaName(pa.SchemaName, 'Primary name attribute');
  if (pa.FormatName !== undefined && pa.FormatName?.Value !== 'Text') throw E.invalidArgument('Primary name attribute: FormatName must be {"Value":"Text"}.');
  const paMax = pa.MaxLength ?? 100;
  if (!Number.isInteger(paMax) || paMax < 1 || paMax > 4000) throw E.invalidArgument('Primary name attribute: MaxLength must be 1..4000.');
  const entitySetName = body.EntitySetName ?? pluralize(logicalName);
  if (typeof entitySetName !== 'string' || !/^[A-Za-z_][A-Za-z0-9_]*$/.test(entitySetName)) throw E.invalidArgument('EntitySetName is not valid.');
  if (tables.has(logicalName)) throw metadataDuplicate(`An entity with the specified name already exists: ${logicalName}. Specify a unique name.`);
  if (bySet.has(entitySetName)) throw metadataDuplicate(`The entity set name ${entitySetName} is already used by another entity.`);
  const t = makeTable({
    logicalName,
    schemaName: body.SchemaName,
    entitySetName,
    primaryName: pa.SchemaName.toLowerCase(),
    primaryNameSchemaName: pa.SchemaName,
    primaryNameMaxLength: paMax,
    primaryNameDisplayName: normalizeLabel(pa.DisplayName, 'DisplayName') || undefined,
    primaryNameRequiredLevel: pa.RequiredLevel?.Value,
    primaryIdSchemaName: `${body.SchemaName}Id`,
    displayName,
    displayCollectionName,
    description: normalizeLabel(body.Description, 'Description'),
    ownershipType: ownership,
    hasActivities: body.HasActivities ?? false,
    hasNotes: body.HasNotes ?? false,
    isCustom: true,
    solution,
  });
  if (body.ChangeTrackingEnabled !== undefined && typeof body.ChangeTrackingEnabled !== 'boolean') {
    throw E.invalidArgument('EntityMetadata: ChangeTrackingEnabled must be a boolean.');
  }
  t.changeTracking = body.ChangeTrackingEnabled === true;
  registerTable(t);
  addTablePrivileges(t);
  countMetadataWrite('entity', `POST EntityDefinitions ${logicalName}`);
  send(ctx, 204, null, { 'OData-EntityId': `${ctx.base}EntityDefinitions(${t.metadataId})` });
}

function updateEntity(ctx, table, body) {
  if (!body || typeof body !== 'object') throw E.invalidArgument('The request body must be an EntityMetadata object.');
  if (body.SchemaName !== undefined && body.SchemaName !== table.schemaName) throw E.invalidArgument('SchemaName cannot be changed.');
  if (body.DisplayName) table.displayName = normalizeLabel(body.DisplayName, 'DisplayName');
  if (body.DisplayCollectionName) table.displayCollectionName = normalizeLabel(body.DisplayCollectionName, 'DisplayCollectionName');
  if (body.Description) table.description = normalizeLabel(body.Description, 'Description');
  if (typeof body.HasNotes === 'boolean') table.hasNotes = body.HasNotes;
  if (typeof body.HasActivities === 'boolean') table.hasActivities = body.HasActivities;
  if (body.ChangeTrackingEnabled !== undefined) {
    if (typeof body.ChangeTrackingEnabled !== 'boolean') throw E.invalidArgument('EntityMetadata: ChangeTrackingEnabled must be a boolean.');
    // Once enabled, change tracking cannot be turned off (use-change-tracking-synchronize-data-external-systems).
    if (table.changeTracking && !body.ChangeTrackingEnabled) throw E.invalidArgument('Change tracking cannot be disabled once it is enabled.');
    table.changeTracking = body.ChangeTrackingEnabled;
  }
  countMetadataWrite('entity_update', `PUT EntityDefinitions ${table.logicalName}`);
  send(ctx, 204);
}

function attrSpecFromBody(table, body, existing) {
  const odataType = String(body['@odata.type'] || '').replace(/^#/, '');
  const type = ODATA_TYPE_TO_ATTR[odataType];
  if (!type) throw E.invalidArgument(`@odata.type '${body['@odata.type'] ?? ''}' is not a supported AttributeMetadata type.`);
  if (!existing && !CREATABLE_TYPES.includes(type)) {
    throw E.unsupported(`Creating ${odataType} columns through POST .../Attributes${type === 'Lookup' ? ' (create lookups with RelationshipDefinitions)' : ''}`);
  }
  if (existing && type !== existing.type) throw E.invalidArgument('The type of an attribute cannot be changed.');
  const int = (v, name, lo, hi, dflt) => {
    if (v === undefined || v === null) return dflt;
    if (typeof v !== 'number' || !Number.isFinite(v) || v < lo || v > hi || (Number.isInteger(lo) && Number.isInteger(hi) && !Number.isInteger(v) && name !== 'MinValue' && name !== 'MaxValue')) {
      throw E.invalidArgument(`${name} must be between ${lo} and ${hi}.`);
    }
    return v;
  };
  const spec = { type };
  switch (type) {
    case 'String':
      spec.maxLength = int(body.MaxLength, 'MaxLength', 1, 4000, existing?.maxLength ?? 100);
      if (body.FormatName !== undefined && typeof body.FormatName?.Value !== 'string') throw E.invalidArgument('FormatName must be {"Value": "..."}');
      spec.formatName = body.FormatName?.Value ?? existing?.formatName ?? 'Text';
      break;
    case 'Memo':
      spec.maxLength = int(body.MaxLength, 'MaxLength', 1, 1048576, existing?.maxLength ?? 2000);
      break;
    case 'Integer':
      spec.minValue = int(body.MinValue, 'MinValue', -2147483648, 2147483647, existing?.minValue ?? -2147483648);
      spec.maxValue = int(body.MaxValue, 'MaxValue', -2147483648, 2147483647, existing?.maxValue ?? 2147483647);
      if (spec.minValue > spec.maxValue) throw E.invalidArgument('MinValue must not exceed MaxValue.');
      break;
    case 'Decimal':
      spec.precision = int(body.Precision, 'Precision', 0, 10, existing?.precision ?? 2);
      spec.minValue = int(body.MinValue, 'MinValue', -100000000000, 100000000000, existing?.minValue ?? -100000000000);
      spec.maxValue = int(body.MaxValue, 'MaxValue', -100000000000, 100000000000, existing?.maxValue ?? 100000000000);
      break;
    case 'Double':
      spec.precision = int(body.Precision, 'Precision', 0, 5, existing?.precision ?? 2);
      spec.minValue = int(body.MinValue, 'MinValue', -100000000000, 100000000000, existing?.minValue ?? -100000000000);
      spec.maxValue = int(body.MaxValue, 'MaxValue', -100000000000, 100000000000, existing?.maxValue ?? 100000000000);
      break;
    case 'DateTime': {
      const fmt = body.Format ?? existing?.format ?? 'DateAndTime';
      if (!['DateOnly', 'DateAndTime'].includes(fmt)) throw E.invalidArgument('Format must be DateOnly or DateAndTime.');
      spec.format = fmt;
      const beh = body.DateTimeBehavior?.Value ?? existing?.dateTimeBehavior ?? 'UserLocal';
      if (!['UserLocal', 'DateOnly', 'TimeZoneIndependent'].includes(beh)) throw E.invalidArgument('DateTimeBehavior must be UserLocal, DateOnly or TimeZoneIndependent.');
      spec.dateTimeBehavior = beh;
      break;
    }
    case 'Boolean': {
      const os = body.OptionSet ?? existing?.optionSet;
      if (!os || typeof os !== 'object' || !os.TrueOption || !os.FalseOption) {
        throw E.invalidArgument('BooleanAttributeMetadata: OptionSet with TrueOption and FalseOption is required.');
      }
      spec.optionSet = os;
      break;
    }
    case 'Picklist': {
      const opts = body.OptionSet?.Options;
      if (!existing && (!Array.isArray(opts) || !opts.length || opts.some((o) => !Number.isInteger(o?.Value)))) {
        throw E.invalidArgument('PicklistAttributeMetadata: OptionSet.Options with integer Values is required.');
      }
      spec.options = opts ? opts.map((o) => o.Value) : existing.options;
      break;
    }
    default:
      break;
  }
  return spec;
}

function createAttribute(ctx, table, body, solution) {
  if (!body || typeof body !== 'object' || Array.isArray(body)) throw E.invalidArgument('The request body must be an AttributeMetadata object.');
  if (table.builtin) throw new DvError(403, '0x80040220', `Columns cannot be added to the system table ${table.logicalName} in the test double.`);
  checkSchemaName(body.SchemaName, 'AttributeMetadata');
  const logicalName = body.SchemaName.toLowerCase();
  if (body.LogicalName !== undefined && body.LogicalName !== logicalName) throw E.invalidArgument(`LogicalName must be the lower-case SchemaName (${logicalName}).`);
  const displayName = normalizeLabel(body.DisplayName, 'DisplayName');
  if (!displayName) throw E.invalidArgument('AttributeMetadata: DisplayName is required.');
  if (body.IsPrimaryName === true) throw E.invalidArgument('The primary name attribute is created with the table.');
  const spec = attrSpecFromBody(table, body, null);
  const required = body.RequiredLevel?.Value ?? 'None';
  if (!['None', 'Recommended', 'ApplicationRequired', 'SystemRequired'].includes(required)) throw E.invalidArgument('RequiredLevel.Value is not valid.');
  if (table.attrs.has(logicalName)) throw metadataDuplicate(`An attribute with the specified name ${logicalName} already exists on entity ${table.logicalName}. Specify a unique name.`);
  const a = makeAttr(table, {
    ...spec,
    logicalName,
    schemaName: body.SchemaName,
    isCustom: true,
    displayName,
    description: normalizeLabel(body.Description, 'Description'),
    requiredLevel: required,
    solution,
  });
  for (const r of table.rows.values()) r.values[logicalName] = null;
  countMetadataWrite('attribute', `POST Attribute ${table.logicalName}.${logicalName}`);
  send(ctx, 204, null, { 'OData-EntityId': `${ctx.base}EntityDefinitions(${table.metadataId})/Attributes(${a.metadataId})` });
}

function updateAttribute(ctx, table, attr, body) {
  if (!body || typeof body !== 'object') throw E.invalidArgument('The request body must be an AttributeMetadata object.');
  if (!attr.isCustom && !attr.isPrimaryName) throw E.invalidArgument(`The system attribute ${attr.logicalName} cannot be updated.`);
  if (body.SchemaName !== undefined && body.SchemaName !== attr.schemaName) throw E.invalidArgument('SchemaName cannot be changed.');
  const spec = attrSpecFromBody(table, { '@odata.type': `Microsoft.Dynamics.CRM.${ATTR_TYPES[attr.type].odata}`, ...body }, attr);
  Object.assign(attr, spec);
  if (body.DisplayName) attr.displayName = normalizeLabel(body.DisplayName, 'DisplayName');
  if (body.RequiredLevel?.Value) attr.requiredLevel = body.RequiredLevel.Value;
  countMetadataWrite('attribute_update', `PUT Attribute ${table.logicalName}.${attr.logicalName}`);
  send(ctx, 204);
}

function createKey(ctx, table, body, solution) {
  if (!body || typeof body !== 'object' || Array.isArray(body)) throw E.invalidArgument('The request body must be an EntityKeyMetadata object.');
  checkOdataType(body, KEY_TYPE, 'EntityKeyMetadata');
  checkSchemaName(body.SchemaName, 'EntityKeyMetadata');
  const attrs = body.KeyAttributes;
  if (!Array.isArray(attrs) || attrs.length === 0 || attrs.some((a) => typeof a !== 'string')) {
    throw E.invalidArgument('EntityKeyMetadata: KeyAttributes must be a non-empty array of attribute logical names.');
  }
  const logicalName = body.SchemaName.toLowerCase();
  if (table.keys.has(logicalName)) throw metadataDuplicate(`An entity key with the name ${logicalName} already exists on entity ${table.logicalName}.`);
  if (new Set(attrs).size !== attrs.length) throw E.invalidArgument('EntityKeyMetadata: KeyAttributes contains duplicates.');
  if (attrs.length > 16) throw E.invalidArgument('An entity key can contain at most 16 attributes.');
  let bytes = 0;
  for (const name of attrs) {
    const a = table.attrs.get(name);
    if (!a) throw E.invalidArgument(`The attribute ${name} does not exist on entity ${table.logicalName}.`);
    if (!KEY_TYPES.includes(a.type)) {
      throw E.invalidArgument(`The attribute ${name} of type ${a.type} cannot be part of an entity key (allowed: ${KEY_TYPES.join(', ')}).`);
    }
    bytes += a.type === 'String' ? a.maxLength * 2 : KEY_BYTES[a.type];
  }
  if (bytes > 900) throw E.invalidArgument(`The total size of the key attributes (${bytes} bytes) exceeds the 900-byte index limit.`);
  const sameSet = [...table.keys.values()].find((k) => k.attributes.length === attrs.length && k.attributes.every((a) => attrs.includes(a)));
  if (sameSet) throw metadataDuplicate(`The entity key ${sameSet.schemaName} already uses the same attributes.`);
  if (table.keys.size >= 10) throw E.invalidArgument('A table can have at most 10 alternate keys.');
  const k = makeKey(table, {
    schemaName: body.SchemaName,
    attributes: attrs.slice(),
    displayName: normalizeLabel(body.DisplayName, 'DisplayName') || undefined,
    status: config.key_activation_ms === 0 ? (findDuplicateForKeyAttrs(table, attrs) ? 'Failed' : 'Active') : 'Pending',
    solution,
  });
  countMetadataWrite('key', `POST Key ${table.logicalName}.${k.schemaName}`);
  send(ctx, 204, null, { 'OData-EntityId': `${ctx.base}EntityDefinitions(${table.metadataId})/Keys(${k.metadataId})` });
}
function findDuplicateForKeyAttrs(table, attributes) {
  return findDuplicateForKey(table, { attributes });
}

// ---------------------------------------------------------------------------
// control API (no auth, JSON in and out)
// ---------------------------------------------------------------------------

function controlJson(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Cache-Control': 'no-store', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

async function readControlJson(req) {
  const text = await readBody(req, 16 * 1024 * 1024).catch((err) => { throw Object.assign(err, { status: 413 }); });
  if (!text.trim()) return {};
  try {
    return JSON.parse(text);
  } catch (err) {
    throw Object.assign(new Error(`invalid JSON body: ${err.message}`), { status: 400 });
  }
}

function tableSummary(t) {
  refreshKeys(t);
  return {
    logical_name: t.logicalName,
    entity_set: t.entitySetName,
    primary_id: t.primaryId,
    primary_name: t.primaryName,
    builtin: t.builtin,
    solution: t.solution,
    change_tracking: !!t.changeTracking,
    rows: t.rows.size,
    columns: [...t.attrs.values()].map((a) => ({ name: a.logicalName, type: a.type, max_length: a.maxLength ?? undefined, solution: a.solution ?? undefined })),
    keys: [...t.keys.values()].map((k) => ({ name: k.schemaName, attributes: k.attributes, status: k.status, solution: k.solution })),
  };
}

function wipe(metadataToo) {
  if (metadataToo) {
    tables.clear();
    bySet.clear();
    setupBuiltins();
    setupConfiguredTables();
  } else {
    for (const t of tables.values()) t.rows.clear();
  }
  seedBuiltinRows();
}

async function handleControl(req, res, url) {
  const route = `${req.method} ${url.pathname}`;
  try {
    if (route === 'GET /__control/stats') return controlJson(res, 200, stats);
    if (route === 'POST /__control/reset') {
      await readControlJson(req);
      stats = freshStats();
      setFaults({});
      return controlJson(res, 200, { ok: true });
    }
    if (route === 'GET /__control/faults') return controlJson(res, 200, faults || {});
    if (route === 'POST /__control/faults') {
      setFaults(await readControlJson(req));
      return controlJson(res, 200, faults || {});
    }
    if (route === 'POST /__control/wipe') {
      const b = await readControlJson(req);
      wipe(b && b.metadata === true);
      return controlJson(res, 200, { ok: true });
    }
    const rp = /^\/__control\/roles\/([0-9a-fA-F-]{36})\/privileges$/.exec(url.pathname);
    if (rp && req.method === 'GET') {
      const priv = tables.get('privilege');
      const held = rolePrivileges.get(rp[1].toLowerCase()) || new Map();
      return controlJson(res, 200, { privileges: [...held].map(([id, depth]) => ({ name: priv.rows.get(id)?.values.name, depth })) });
    }
    const ur = /^\/__control\/users\/([0-9a-fA-F-]{36})\/roles$/.exec(url.pathname);
    if (ur && req.method === 'POST') {
      // An administrator assigns a role to a user (Power Platform admin center).
      const b = await readControlJson(req);
      const set = associations.get(ur[1].toLowerCase()) || new Set();
      for (const r of b.roles || []) set.add(String(r).toLowerCase());
      associations.set(ur[1].toLowerCase(), set);
      return controlJson(res, 200, { roles: [...set] });
    }
    if (route === 'POST /__control/expire_delta_tokens') {
      await readControlJson(req);
      deltaTokensExpiredUpTo = lastVersion;
      return controlJson(res, 200, { expired_up_to: deltaTokensExpiredUpTo });
    }
    const ct = /^\/__control\/tables\/([^/]+)\/change_tracking$/.exec(url.pathname);
    if (ct && req.method === 'POST') {
      // Test set-up only: a table as an older version of the product provisioned it, without
      // change tracking (Dataverse itself cannot turn it off once on).
      const t = bySet.get(decodeURIComponent(ct[1])) || tables.get(decodeURIComponent(ct[1]));
      if (!t) return controlJson(res, 404, { error: 'not_found', error_description: `no table or entity set ${ct[1]}` });
      const b = await readControlJson(req);
      t.changeTracking = b.enabled === true;
      return controlJson(res, 200, { change_tracking: t.changeTracking });
    }
    if (route === 'GET /__control/tables') return controlJson(res, 200, { tables: [...tables.values()].map(tableSummary) });
    if (route === 'GET /__control/config') {
      return controlJson(res, 200, { ...config, tls: config.tls ? { cert: config.tls.cert, key: config.tls.key } : null, url: origin, port });
    }
    if (route === 'POST /__control/config') {
      const b = await readControlJson(req);
      if (b.key_activation_ms !== undefined) {
        if (!Number.isInteger(b.key_activation_ms) || b.key_activation_ms < 0) throw Object.assign(new Error('key_activation_ms must be an integer >= 0'), { status: 400 });
        config.key_activation_ms = b.key_activation_ms;
      }
      if (b.accepted_tokens !== undefined) {
        if (!Array.isArray(b.accepted_tokens) || b.accepted_tokens.some((t) => typeof t !== 'string' || !t)) throw Object.assign(new Error('accepted_tokens must be an array of non-empty strings'), { status: 400 });
        config.accepted_tokens = b.accepted_tokens;
      }
      if (b.enforce_application_users !== undefined) config.enforce_application_users = b.enforce_application_users === true;
      return controlJson(res, 200, { key_activation_ms: config.key_activation_ms, accepted_tokens: config.accepted_tokens, enforce_application_users: config.enforce_application_users });
    }
    const tm = /^\/__control\/tables\/([^/]+)$/.exec(url.pathname);
    if (tm) {
      const t = bySet.get(decodeURIComponent(tm[1])) || tables.get(decodeURIComponent(tm[1]));
      if (!t) return controlJson(res, 404, { error: 'not_found', error_description: `no table or entity set ${tm[1]}` });
      if (req.method === 'GET') {
        refreshKeys(t);
        return controlJson(res, 200, {
          ...tableSummary(t),
          rows: [...t.rows.values()].map((r) => ({ ...r.values, '@version': r.version })),
        });
      }
      if (req.method === 'POST') {
        // seed rows through the normal validation, without touching stats or faults
        const b = await readControlJson(req);
        if (!Array.isArray(b.rows)) throw Object.assign(new Error('"rows" must be an array'), { status: 400 });
        const ctx = { userId: config.user_id };
        const ids = [];
        for (const rowBody of b.rows) {
          // A row naming an existing primary id changes that row (an administrator's edit).
          const pid = typeof rowBody[t.primaryId] === 'string' ? rowBody[t.primaryId].toLowerCase() : null;
          if (pid && t.rows.has(pid)) {
            const row = t.rows.get(pid);
            for (const [k, v] of Object.entries(rowBody)) if (k !== t.primaryId && !k.startsWith('@')) row.values[k] = v;
            row.version = nextVersion();
            row.values.versionnumber = row.version;
            ids.push(pid);
            continue;
          }
          try {
            const { changes, id } = parseWriteBody(t, rowBody);
            ids.push(createRow(t, changes, id, ctx).id);
          } catch (err) {
            if (err instanceof DvError) return controlJson(res, err.status, { error: { code: err.code, message: err.message }, inserted: ids });
            throw err;
          }
        }
        return controlJson(res, 200, { inserted: ids });
      }
    }
    return controlJson(res, 404, { error: 'not_found', error_description: `no control route ${route}` });
  } catch (err) {
    return controlJson(res, err.status || 500, { error: err.status ? 'invalid_request' : 'server_error', error_description: err.message });
  }
}

// ---------------------------------------------------------------------------
// server
// ---------------------------------------------------------------------------

setupBuiltins();
setupConfiguredTables();
seedBuiltinRows();

const scheme = tlsOptions ? 'https' : 'http';
async function onRequest(req, res) {
  let url;
  try {
    url = new URL(req.url, 'http://x');
  } catch {
    res.writeHead(400);
    res.end();
    return;
  }
  if (url.pathname.startsWith('/__control/')) return handleControl(req, res, url);
  const m = API_RE.exec(url.pathname);
  if (!m) {
    req.resume();
    const text = JSON.stringify({ error: { code: '0x80060888', message: `Resource not found: ${url.pathname} is not under /api/data/v9.x/.` } });
    res.writeHead(404, { 'Content-Type': JSON_CT, 'OData-Version': '4.0', 'Content-Length': Buffer.byteLength(text) });
    res.end(text);
    return;
  }
  return handleApi(req, res, m, url);
}

const server = tlsOptions ? https.createServer(tlsOptions, onRequest) : http.createServer(onRequest);
server.keepAliveTimeout = 1000;
server.on('clientError', (err, socket) => socket.destroy());
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(0, '127.0.0.1', resolve);
});
const { port } = server.address();
const origin = `${scheme}://127.0.0.1:${port}`;

// ---------------------------------------------------------------------------
// lifecycle
// ---------------------------------------------------------------------------

let stopping = false;
function shutdown(reason) {
  if (stopping) return;
  stopping = true;
  process.stderr.write(`dataverse peer: stopping (${reason})\n`);
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
if (process.env.DATAVERSE_PEER_IGNORE_STDIN !== '1') {
  process.stdin.on('end', () => shutdown('stdin closed'));
  process.stdin.on('close', () => shutdown('stdin closed'));
  process.stdin.on('error', () => shutdown('stdin error'));
  process.stdin.resume();
}

process.stdout.write(`${JSON.stringify({ ready: true, url: origin, port })}\n`);
