//! Setting the product up in a customer's organisation, with its administrator's own
//! (delegated) token: the app cannot create its own application user with its own token,
//! because until that user exists the organisation refuses the app.
//!
//! Each step reads first and writes only what is missing, so a second run changes
//! nothing: the tables ([`super::provision`]), the product's security role in the root
//! business unit with exactly the privileges it needs on the product's own tables (create,
//! read, write, delete, append, append to; organisation-wide, since the app acts for every
//! user's connections), the application user for the app id (non-interactive), and the
//! role on that user. Steps from `../shared/reference/multi-tenant.md` §4 and §5.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use super::provision::{CORE_TABLES, Report, Schema, provision};
use super::{Dataverse, DataverseError, literal};

/// The verbs the product uses on its tables; not Assign or Share.
const VERBS: [&str; 6] = ["Create", "Read", "Write", "Delete", "Append", "AppendTo"];

/// What a least-privilege role carries besides its tables: read on the organisation
/// (organisation-owned: Global is its only depth), on users and on business units (the
/// app user's own business unit: Local), as Microsoft's minimum-privilege guidance and
/// the App Opener role carry them ("Minimum privileges for common tasks",
/// learn.microsoft.com/power-platform/admin/create-edit-security-role). No Microsoft page
/// says `WhoAmI` needs more than a role; a user without any role is refused everything
/// (`0x80042F09`), and these reads keep the app's own user record and organisation
/// readable, which the platform reads on a caller's behalf.
pub const BASELINE: [(&str, &str); 3] =
    [("prvReadOrganization", "Global"), ("prvReadUser", "Local"), ("prvReadBusinessUnit", "Local")];

/// The name of the product's security role.
pub const ROLE_NAME: &str = "Dynamics Companion";

/// Runs every step; returns what was done and what was already there.
pub async fn onboard(dv: &Dataverse, schema: &Schema, app_id: &str) -> Result<Report, DataverseError> {
    // A customer's organisation holds connections, captures and expectations, never the
    // tenants table (only the deployment's own store has tenants).
    let mut report = provision(dv, schema, &CORE_TABLES, Duration::from_secs(600)).await?;
    let bu = root_business_unit(dv).await?;
    let role = match find_role(dv, &bu).await? {
        Some(id) => {
            report.saw(format!("role {ROLE_NAME:?} exists"));
            id
        }
        None => {
            let body = json!({ "name": ROLE_NAME, "businessunitid@odata.bind": format!("/businessunits({bu})") });
            dv.raw(Method::POST, "roles", Some(&body), "create role").await?;
            report.did(format!("created role {ROLE_NAME:?}"));
            find_role(dv, &bu).await?.ok_or_else(|| missing("roles", "the role just created is not found"))?
        }
    };
    grant_privileges(dv, schema, &role, &mut report).await?;
    let user = match find_application_user(dv, app_id).await? {
        Some(id) => {
            report.saw(format!("application user for {app_id} exists"));
            id
        }
        None => {
            let body = json!({
                "applicationid": app_id,
                "accessmode": 4,
                "isdisabled": false,
                "businessunitid@odata.bind": format!("/businessunits({bu})"),
            });
            dv.raw(Method::POST, "systemusers", Some(&body), "create application user").await?;
            report.did(format!("created the application user for {app_id}"));
            find_application_user(dv, app_id)
                .await?
                .ok_or_else(|| missing("systemusers", "the application user just created is not found"))?
        }
    };
    let roles = dv
        .raw(
            Method::GET,
            &format!("systemusers({user})/systemuserroles_association?$select=roleid"),
            None,
            "read user roles",
        )
        .await?
        .unwrap_or(Value::Null);
    let has_role = rows(&roles).iter().any(|r| r["roleid"].as_str().is_some_and(|id| id.eq_ignore_ascii_case(&role)));
    if has_role {
        report.saw(format!("the application user has role {ROLE_NAME:?}"));
    } else {
        let body = json!({ "@odata.id": format!("{}roles({role})", dv.api_url()) });
        dv.raw(
            Method::POST,
            &format!("systemusers({user})/systemuserroles_association/$ref"),
            Some(&body),
            "assign role",
        )
        .await?;
        report.did(format!("gave the application user role {ROLE_NAME:?}"));
    }
    Ok(report)
}

fn missing(table: &str, message: &str) -> DataverseError {
    DataverseError::Service {
        table: table.into(),
        operation: "onboard",
        status: 404,
        code: String::new(),
        message: message.into(),
    }
}

fn rows(v: &Value) -> Vec<Value> {
    v["value"].as_array().cloned().unwrap_or_default()
}

async fn root_business_unit(dv: &Dataverse) -> Result<String, DataverseError> {
    let found = dv
        .raw(
            Method::GET,
            "businessunits?$select=businessunitid&$filter=_parentbusinessunitid_value eq null",
            None,
            "read root business unit",
        )
        .await?
        .unwrap_or(Value::Null);
    match rows(&found).as_slice() {
        [one] => one["businessunitid"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| missing("businessunits", "the root business unit has no id")),
        other => Err(missing("businessunits", &format!("expected one root business unit, found {}", other.len()))),
    }
}

async fn find_role(dv: &Dataverse, bu: &str) -> Result<Option<String>, DataverseError> {
    let path =
        format!("roles?$select=roleid,name&$filter=name eq {} and _businessunitid_value eq {bu}", literal(ROLE_NAME));
    let found = dv.raw(Method::GET, &path, None, "read role").await?.unwrap_or(Value::Null);
    Ok(rows(&found).first().and_then(|r| r["roleid"].as_str()).map(str::to_string))
}

async fn find_application_user(dv: &Dataverse, app_id: &str) -> Result<Option<String>, DataverseError> {
    let path = format!("systemusers?$select=systemuserid,applicationid&$filter=applicationid eq {app_id}");
    let found = dv.raw(Method::GET, &path, None, "read application user").await?.unwrap_or(Value::Null);
    Ok(rows(&found).first().and_then(|r| r["systemuserid"].as_str()).map(str::to_string))
}

/// The product role's privileges with their depths: on the product's tables,
/// `prv{Verb}{SchemaName}` in the schema name's casing (`prvReaddc_Connection`), Global
/// (the app acts for every user's connections); then [`BASELINE`].
pub fn privileges(schema: &Schema) -> Vec<(String, &'static str)> {
    let tables = CORE_TABLES
        .iter()
        .flat_map(|t| VERBS.iter().map(move |v| (format!("prv{v}{}", schema.table_schema_name(t)), "Global")));
    tables.chain(BASELINE.iter().map(|(n, d)| (n.to_string(), *d))).collect()
}

async fn grant_privileges(
    dv: &Dataverse,
    schema: &Schema,
    role: &str,
    report: &mut Report,
) -> Result<(), DataverseError> {
    let wanted_all = privileges(schema);
    let filter = wanted_all.iter().map(|(n, _)| format!("name eq {}", literal(n))).collect::<Vec<_>>().join(" or ");
    let found = dv
        .raw(Method::GET, &format!("privileges?$select=privilegeid,name&$filter={filter}"), None, "read privileges")
        .await?
        .unwrap_or(Value::Null);
    let found = rows(&found);
    if found.len() != wanted_all.len() {
        let named: Vec<&str> = found.iter().filter_map(|p| p["name"].as_str()).collect();
        let absent: Vec<&str> = wanted_all
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !named.iter().any(|f| f.eq_ignore_ascii_case(n)))
            .collect();
        return Err(missing("privileges", &format!("the organisation has no privilege {}", absent.join(", "))));
    }
    let held = dv
        .raw(Method::GET, &format!("RetrieveRolePrivilegesRole(RoleId={role})"), None, "read role privileges")
        .await?
        .unwrap_or(Value::Null);
    let held: Vec<(String, String)> = held["RolePrivileges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["PrivilegeId"].as_str()?.to_ascii_lowercase(), p["Depth"].as_str()?.to_string())))
        .collect();
    let depth_of = |name: &str| wanted_all.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, d)| *d);
    let wanted: Vec<Value> = found
        .iter()
        .filter_map(|p| Some((p["privilegeid"].as_str()?, depth_of(p["name"].as_str()?)?)))
        .filter(|(id, want)| !held.iter().any(|(h, depth)| h.eq_ignore_ascii_case(id) && depth == want))
        .map(|(id, depth)| json!({ "PrivilegeId": id, "Depth": depth }))
        .collect();
    if wanted.is_empty() {
        report.saw(format!("role {ROLE_NAME:?} has its {} privileges", wanted_all.len()));
        return Ok(());
    }
    let n = wanted.len();
    dv.raw(
        Method::POST,
        &format!("roles({role})/Microsoft.Dynamics.CRM.AddPrivilegesRole"),
        Some(&json!({ "Privileges": wanted })),
        "add role privileges",
    )
    .await?;
    report.did(format!("gave role {ROLE_NAME:?} {n} privileges (the product's tables; read on users, business units and the organisation)"));
    Ok(())
}
