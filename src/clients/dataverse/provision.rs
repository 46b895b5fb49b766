//! The Dataverse tables the product keeps its state in, and `handler provision`, which
//! creates them through the metadata API.
//!
//! Provisioning is idempotent: every table, column and alternate key is looked up
//! first and created only when missing, so a second run changes nothing. Alternate-key
//! indexes are built asynchronously by Dataverse; provisioning waits until each key is
//! `Active`, because an upsert by key fails until then.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use super::{Dataverse, DataverseError};

/// A column's Dataverse type.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Single line of text (`StringAttributeMetadata`).
    Text(u32),
    /// Multiple lines of text (`MemoAttributeMetadata`), for sealed tokens.
    Memo(u32),
    /// Whole number (`IntegerAttributeMetadata`).
    Integer,
    /// Big integer (`BigIntAttributeMetadata`), for Unix times.
    BigInt,
    /// Yes/No (`BooleanAttributeMetadata`).
    Boolean,
}

#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub name: &'static str,
    pub label: &'static str,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy)]
pub struct Table {
    /// Logical name without the prefix (`connection`).
    pub name: &'static str,
    pub label: &'static str,
    pub plural: &'static str,
    /// The primary name column (`name`), which is also the alternate key.
    pub columns: &'static [Column],
    /// Change tracking on (instances follow the table's changes through delta links).
    pub track_changes: bool,
}

const fn col(name: &'static str, label: &'static str, kind: Kind) -> Column {
    Column { name, label, kind }
}

/// Connections: one row per OAuth connection, tokens sealed in `tokens`.
pub const CONNECTIONS: Table = Table {
    track_changes: true,
    name: "connection",
    label: "OAuth connection",
    plural: "OAuth connections",
    columns: &[
        col("provider", "Provider", Kind::Text(64)),
        col("owner", "Owner", Kind::Text(200)),
        col("scopes", "Scopes", Kind::Memo(10_000)),
        col("status", "Status", Kind::Text(20)),
        col("statusdetail", "Status detail", Kind::Memo(4_000)),
        col("tokens", "Tokens (encrypted)", Kind::Memo(100_000)),
        col("accessexpiresat", "Access token expires at (Unix)", Kind::BigInt),
        col("hasrefreshtoken", "Has refresh token", Kind::Boolean),
        col("statehash", "Pending state hash", Kind::Text(64)),
        col("pendingsealed", "Pending authorization (encrypted)", Kind::Memo(4_000)),
        col("stateexpiresat", "Pending state expires at (Unix)", Kind::BigInt),
        col("leaseowner", "Refresh lease owner", Kind::Text(64)),
        col("leaseuntilms", "Refresh lease until (Unix ms)", Kind::BigInt),
        col("failures", "Consecutive refresh failures", Kind::Integer),
        col("nextattemptat", "Next refresh attempt (Unix)", Kind::BigInt),
        col("createdat", "Created at (Unix)", Kind::BigInt),
        col("updatedat", "Updated at (Unix)", Kind::BigInt),
        col("refreshedat", "Refreshed at (Unix)", Kind::BigInt),
        col("lastusedat", "Last used at (Unix)", Kind::BigInt),
        col("lastusedby", "Last used by", Kind::Text(400)),
    ],
};

/// Captures: one row per authorization code received for a state we did not issue.
pub const CAPTURES: Table = Table {
    track_changes: false,
    name: "capture",
    label: "OAuth capture",
    plural: "OAuth captures",
    columns: &[
        col("state", "State", Kind::Text(4_000)),
        col("code", "Code (encrypted)", Kind::Memo(20_000)),
        col("iss", "Issuer", Kind::Text(1_000)),
        col("error", "Error", Kind::Text(200)),
        col("errordescription", "Error description", Kind::Memo(4_000)),
        col("receivedat", "Received at (Unix)", Kind::BigInt),
        col("deliveredat", "Delivered at (Unix)", Kind::BigInt),
        col("claimuntilms", "Delivery claimed until (Unix ms)", Kind::BigInt),
        col("attempts", "Failed deliveries", Kind::Integer),
    ],
};

/// Expectations: one row per capture-mode state Dynamics registered before sending the
/// person to the provider (keyed by the state's SHA-256), so only expected callbacks are
/// kept.
pub const EXPECTATIONS: Table = Table {
    track_changes: false,
    name: "expectation",
    label: "OAuth expected state",
    plural: "OAuth expected states",
    columns: &[col("expiresat", "Expires at (Unix)", Kind::BigInt)],
};

/// Tenants: one row per customer organisation a multi-tenant deployment serves, keyed
/// by the Entra tenant id. Only in the deployment's own (home) store.
pub const TENANTS: Table = Table {
    track_changes: false,
    name: "tenant",
    label: "Customer tenant",
    plural: "Customer tenants",
    columns: &[
        col("orgurl", "Organisation URL", Kind::Text(400)),
        col("status", "Status", Kind::Text(20)),
        col("statusdetail", "Status detail", Kind::Memo(4_000)),
        col("statehash", "Consent state hash", Kind::Text(64)),
        col("stateexpiresat", "Consent state expires at (Unix)", Kind::BigInt),
        col("startedby", "Onboarding started by", Kind::Text(200)),
        col("consentedat", "Consented at (Unix)", Kind::BigInt),
        col("onboardedat", "Onboarded at (Unix)", Kind::BigInt),
        col("createdat", "Created at (Unix)", Kind::BigInt),
        col("updatedat", "Updated at (Unix)", Kind::BigInt),
    ],
};

/// What every deployment reads and writes; [`verify`] checks these.
pub const CORE_TABLES: [Table; 3] = [CONNECTIONS, CAPTURES, EXPECTATIONS];

/// What `provision` creates: the core tables and the (small, possibly empty) tenants
/// table, so a deployment can start serving other organisations without a new schema.
pub const TABLES: [Table; 4] = [CONNECTIONS, CAPTURES, EXPECTATIONS, TENANTS];

/// Names under a publisher prefix (`dc` gives `dc_connection`, `dc_connections`, ...).
#[derive(Debug, Clone)]
pub struct Schema {
    prefix: String,
}

impl Schema {
    pub fn new(prefix: &str) -> Schema {
        Schema { prefix: prefix.to_ascii_lowercase() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn table(&self, t: &Table) -> String {
        format!("{}_{}", self.prefix, t.name)
    }

    pub fn entity_set(&self, t: &Table) -> String {
        format!("{}_{}s", self.prefix, t.name)
    }

    /// A column's logical name (`dc_provider`); `name` is the primary name / key column.
    pub fn column(&self, name: &str) -> String {
        format!("{}_{}", self.prefix, name)
    }

    /// The primary id column Dataverse adds (`dc_connectionid`).
    pub fn primary_id(&self, t: &Table) -> String {
        format!("{}id", self.table(t))
    }

    /// A table's schema name (`dc_Connection`), which privilege names follow.
    pub fn table_schema_name(&self, t: &Table) -> String {
        self.schema_name(t.name)
    }

    fn schema_name(&self, name: &str) -> String {
        let mut chars = name.chars();
        let first = chars.next().map(|c| c.to_ascii_uppercase()).into_iter();
        format!("{}_{}", self.prefix, first.chain(chars).collect::<String>())
    }

    fn key_name(&self, t: &Table) -> String {
        format!("{}_{}_key", self.prefix, t.name)
    }
}

fn label(text: &str) -> Value {
    json!({
        "@odata.type": "Microsoft.Dynamics.CRM.Label",
        "LocalizedLabels": [{ "@odata.type": "Microsoft.Dynamics.CRM.LocalizedLabel", "Label": text, "LanguageCode": 1033 }]
    })
}

fn attribute(schema: &Schema, c: &Column) -> Value {
    let mut body = match c.kind {
        Kind::Text(max) => json!({
            "@odata.type": "Microsoft.Dynamics.CRM.StringAttributeMetadata",
            "MaxLength": max,
            "FormatName": { "Value": "Text" },
        }),
        Kind::Memo(max) => json!({
            "@odata.type": "Microsoft.Dynamics.CRM.MemoAttributeMetadata",
            "MaxLength": max,
            "Format": "TextArea",
        }),
        Kind::Integer => json!({
            "@odata.type": "Microsoft.Dynamics.CRM.IntegerAttributeMetadata",
            "MinValue": 0,
            "MaxValue": 2147483647,
            "Format": "None",
        }),
        Kind::BigInt => json!({ "@odata.type": "Microsoft.Dynamics.CRM.BigIntAttributeMetadata" }),
        Kind::Boolean => json!({
            "@odata.type": "Microsoft.Dynamics.CRM.BooleanAttributeMetadata",
            "DefaultValue": false,
            "OptionSet": {
                "@odata.type": "Microsoft.Dynamics.CRM.BooleanOptionSetMetadata",
                "TrueOption": { "Value": 1, "Label": label("Yes") },
                "FalseOption": { "Value": 0, "Label": label("No") },
                "OptionSetType": "Boolean",
            },
        }),
    };
    if let Some(obj) = body.as_object_mut() {
        obj.insert("SchemaName".into(), Value::String(schema.schema_name(c.name)));
        obj.insert("DisplayName".into(), label(c.label));
        obj.insert("RequiredLevel".into(), json!({ "Value": "None" }));
    }
    body
}

fn table_body(schema: &Schema, t: &Table) -> Value {
    json!({
        "@odata.type": "Microsoft.Dynamics.CRM.EntityMetadata",
        "SchemaName": schema.schema_name(t.name),
        "EntitySetName": schema.entity_set(t),
        "ChangeTrackingEnabled": t.track_changes,
        "DisplayName": label(t.label),
        "DisplayCollectionName": label(t.plural),
        "Description": label("Kept by Dynamics Companion; do not edit by hand."),
        "OwnershipType": "OrganizationOwned",
        "IsActivity": false,
        "HasActivities": false,
        "HasNotes": false,
        "Attributes": [{
            "@odata.type": "Microsoft.Dynamics.CRM.StringAttributeMetadata",
            "SchemaName": schema.schema_name("name"),
            "IsPrimaryName": true,
            "MaxLength": 160,
            "FormatName": { "Value": "Text" },
            "DisplayName": label("Key"),
            "RequiredLevel": { "Value": "ApplicationRequired" },
        }],
    })
}

/// What provisioning did, one line per action, for the operator.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<String>,
    pub changes: usize,
}

impl Report {
    pub(super) fn did(&mut self, line: String) {
        self.changes += 1;
        self.lines.push(line);
    }
    pub(super) fn saw(&mut self, line: String) {
        self.lines.push(line);
    }
}

/// Creates whatever of `tables` is missing and waits for their alternate keys: the
/// deployment's own store gets [`TABLES`] (with the tenants table), a customer's
/// organisation [`CORE_TABLES`] only.
pub async fn provision(
    dv: &Dataverse,
    schema: &Schema,
    tables: &[Table],
    key_timeout: Duration,
) -> Result<Report, DataverseError> {
    let mut report = Report::default();
    for t in tables.iter().copied() {
        let logical = schema.table(&t);
        let def = format!("EntityDefinitions(LogicalName='{logical}')");
        provision_table(dv, schema, &t, &mut report).await?;
        provision_columns(dv, schema, &t, &mut report).await?;
        let key_name = provision_key(dv, schema, &t, &mut report).await?;
        wait_for_key(dv, &logical, &def, &key_name, key_timeout, &mut report).await?;
        report.saw(format!("table {logical}: key {key_name} is active"));
    }
    Ok(report)
}

/// The table, created when missing; change tracking turned on where the table needs it.
async fn provision_table(
    dv: &Dataverse,
    schema: &Schema,
    t: &Table,
    report: &mut Report,
) -> Result<(), DataverseError> {
    let logical = schema.table(&t);
    let def = format!("EntityDefinitions(LogicalName='{logical}')");
    let existing = dv
        .raw(Method::GET, &format!("{def}?$select=LogicalName,EntitySetName,ChangeTrackingEnabled"), None, "read table")
        .await?;
    match existing {
        // A table made by a version before the change feed: turn tracking on (it cannot
        // be turned off again, which is what the feed needs anyway).
        Some(e) if t.track_changes && e.get("ChangeTrackingEnabled") != Some(&Value::Bool(true)) => {
            let Some(mut full) = dv.raw(Method::GET, &def, None, "read table").await? else {
                return Err(DataverseError::Service {
                    table: logical.clone(),
                    operation: "read table",
                    status: 404,
                    code: String::new(),
                    message: "the table vanished while provisioning".into(),
                });
            };
            if let Some(m) = full.as_object_mut() {
                m.retain(|k, _| !k.starts_with("@odata"));
                m.insert("ChangeTrackingEnabled".into(), Value::Bool(true));
            }
            dv.raw(Method::PUT, &def, Some(&full), "turn on change tracking").await?;
            report.did(format!("table {logical}: exists; change tracking turned on"));
        }
        Some(_) => report.saw(format!("table {logical}: exists")),
        None => {
            dv.raw(Method::POST, "EntityDefinitions", Some(&table_body(schema, t)), "create table").await?;
            report.did(format!("table {logical}: created (entity set {})", schema.entity_set(&t)));
        }
    }

    Ok(())
}

/// The table's columns, each created when missing.
async fn provision_columns(
    dv: &Dataverse,
    schema: &Schema,
    t: &Table,
    report: &mut Report,
) -> Result<(), DataverseError> {
    let logical = schema.table(t);
    let def = format!("EntityDefinitions(LogicalName='{logical}')");
    let attrs = dv.raw(Method::GET, &format!("{def}/Attributes?$select=LogicalName"), None, "read columns").await?;
    let have: Vec<String> = attrs
        .as_ref()
        .and_then(|v| v.get("value"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|x| x.get("LogicalName").and_then(Value::as_str).map(str::to_string)).collect())
        .unwrap_or_default();
    let mut created = Vec::new();
    for c in t.columns {
        let name = schema.column(c.name);
        if !have.contains(&name) {
            dv.raw(Method::POST, &format!("{def}/Attributes"), Some(&attribute(schema, c)), "create column").await?;
            created.push(name);
        }
    }
    if created.is_empty() {
        report.saw(format!("table {logical}: all {} columns exist", t.columns.len()));
    } else {
        report.did(format!("table {logical}: created columns {}", created.join(", ")));
    }

    Ok(())
}

/// The alternate key on the name column, created when missing; its name.
async fn provision_key(
    dv: &Dataverse,
    schema: &Schema,
    t: &Table,
    report: &mut Report,
) -> Result<String, DataverseError> {
    let logical = schema.table(t);
    let def = format!("EntityDefinitions(LogicalName='{logical}')");
    let key_name = schema.key_name(t);
    let keys_path = format!("{def}/Keys?$select=SchemaName,LogicalName,KeyAttributes,EntityKeyIndexStatus");
    let keys = dv.raw(Method::GET, &keys_path, None, "read keys").await?;
    let has_key = key_status(keys.as_ref(), &key_name).is_some();
    if has_key {
        report.saw(format!("table {logical}: key {key_name} exists"));
    } else {
        let body = json!({
            "SchemaName": key_name,
            "DisplayName": label("Key"),
            "KeyAttributes": [schema.column("name")],
        });
        dv.raw(Method::POST, &format!("{def}/Keys"), Some(&body), "create key").await?;
        report.did(format!("table {logical}: created key {key_name} on {}", schema.column("name")));
    }
    Ok(key_name)
}

/// Waits for a key's index to become active (also after an earlier run that stopped
/// before it was).
async fn wait_for_key(
    dv: &Dataverse,
    logical: &str,
    def: &str,
    key_name: &str,
    key_timeout: Duration,
    report: &mut Report,
) -> Result<(), DataverseError> {
    let keys_path = format!("{def}/Keys?$select=SchemaName,LogicalName,KeyAttributes,EntityKeyIndexStatus");
    let deadline = tokio::time::Instant::now() + key_timeout;
    let mut announced = false;
    loop {
        let keys = dv.raw(Method::GET, &keys_path, None, "read keys").await?;
        match key_status(keys.as_ref(), &key_name).as_deref() {
            Some("Active") => break,
            Some("Failed") => {
                return Err(DataverseError::Service {
                    table: logical.to_string(),
                    operation: "create key",
                    status: 500,
                    code: String::new(),
                    message: format!(
                        "the index of key {key_name} failed to build; reactivate it (ReactivateEntityKey) and run provision again"
                    ),
                });
            }
            status => {
                if !announced {
                    report.saw(format!(
                        "table {logical}: waiting for key {key_name} to become active ({})",
                        status.unwrap_or("unknown")
                    ));
                    announced = true;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(DataverseError::Unreachable {
                        table: logical.to_string(),
                        operation: "create key",
                        reason: format!(
                            "key {key_name} was not active after {} s; run provision again later",
                            key_timeout.as_secs()
                        ),
                    });
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    Ok(())
}

/// Whether the tables and their alternate keys exist and are active: one metadata read
/// per table. `Ok(Err(what))` names what is missing.
pub async fn verify(dv: &Dataverse, schema: &Schema) -> Result<Result<(), SchemaGap>, DataverseError> {
    for t in CORE_TABLES {
        let logical = schema.table(&t);
        let key_name = schema.key_name(&t);
        let path = format!(
            "EntityDefinitions(LogicalName='{logical}')/Keys?$select=SchemaName,LogicalName,KeyAttributes,EntityKeyIndexStatus"
        );
        let Some(keys) = dv.raw(Method::GET, &path, None, "read keys").await? else {
            return Ok(Err(SchemaGap::NoTable(logical)));
        };
        match key_status(Some(&keys), &key_name).as_deref() {
            Some("Active") => {}
            Some(status) => {
                return Ok(Err(SchemaGap::KeyInactive { table: logical, key: key_name, status: status.to_string() }));
            }
            None => return Ok(Err(SchemaGap::NoKey { table: logical, key: key_name })),
        }
    }
    Ok(Ok(()))
}

/// What [`verify`] found missing from an organisation's tables.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaGap {
    #[error("table {0} does not exist")]
    NoTable(String),
    #[error("table {table} has no key {key}")]
    NoKey { table: String, key: String },
    #[error("key {key} of table {table} is not active ({status})")]
    KeyInactive { table: String, key: String, status: String },
}

fn key_status(keys: Option<&Value>, schema_name: &str) -> Option<String> {
    keys?.get("value")?.as_array()?.iter().find_map(|k| {
        let name = k.get("SchemaName").and_then(Value::as_str)?;
        name.eq_ignore_ascii_case(schema_name)
            .then(|| k.get("EntityKeyIndexStatus").and_then(Value::as_str).unwrap_or("Pending").to_string())
    })
}
