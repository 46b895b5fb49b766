//! The Dataverse Web API double (tests/peers/dataverse.mjs).

use reqwest::Method;
use serde_json::{Value, json};

use super::peer::NodePeer;

pub struct DataverseDouble {
    peer: NodePeer,
    /// The environment URL (`http://127.0.0.1:PORT`), what `DATAVERSE_URL` takes.
    pub url: String,
}

impl DataverseDouble {
    /// An empty organisation: the tables come from `provision`.
    pub fn start() -> DataverseDouble {
        DataverseDouble::with_config(json!({ "key_activation_ms": 50 }))
    }

    pub fn with_config(config: Value) -> DataverseDouble {
        let peer = NodePeer::start("dataverse.mjs", "DATAVERSE_PEER_CONFIG", &config);
        let url = peer.field("url");
        DataverseDouble { peer, url }
    }

    async fn control(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        self.peer.control(&self.url, method, path, body).await
    }

    /// `{"rate": 0.3, "statuses": [429, 503], "retry_after_seconds": 1, ...}`; `{}` clears.
    pub async fn faults(&self, plan: Value) -> Value {
        self.control(Method::POST, "faults", Some(plan)).await
    }

    pub async fn stats(&self) -> Value {
        self.control(Method::GET, "stats", None).await
    }

    /// Web API requests so far.
    pub async fn requests(&self) -> u64 {
        self.stats().await["requests"].as_u64().unwrap_or(0)
    }

    pub async fn reset(&self) {
        self.control(Method::POST, "reset", Some(json!({}))).await;
    }

    /// Rows as stored, for checks of what is at rest.
    pub async fn rows(&self, entity_set: &str) -> Vec<Value> {
        self.control(Method::GET, &format!("tables/{entity_set}"), None).await["rows"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Every table's summary (columns, keys, change tracking), by logical name.
    pub async fn tables(&self) -> Value {
        let all = self.control(Method::GET, "tables", None).await;
        let by_name: serde_json::Map<String, Value> = all["tables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| Some((t["logical_name"].as_str()?.to_string(), t.clone())))
            .collect();
        Value::Object(by_name)
    }

    /// Checks bearer tokens as Dataverse does: this organisation's audience, and an
    /// application user for an app-only token (403 0x80072560 otherwise).
    pub async fn enforce_application_users(&self, on: bool) {
        self.control(Method::POST, "config", Some(json!({ "enforce_application_users": on }))).await;
    }

    /// Adds the application user of an Entra app with the System Administrator role, as
    /// an administrator would.
    pub async fn add_application_user(&self, app_id: &str) {
        let user = self.add_application_user_without_role(app_id).await;
        self.make_system_administrator(&user).await;
    }

    /// Gives a user the System Administrator role, as an administrator would.
    pub async fn make_system_administrator(&self, user_id: &str) {
        let admin_role = self.control(Method::GET, "config", None).await["system_administrator_role_id"].clone();
        self.control(Method::POST, &format!("users/{user_id}/roles"), Some(json!({ "roles": [admin_role] }))).await;
    }

    /// Adds the application user of an Entra app and no role; returns its id.
    pub async fn add_application_user_without_role(&self, app_id: &str) -> String {
        let row = json!({ "applicationid": app_id, "accessmode": 4, "isdisabled": false });
        let r = self.control(Method::POST, "tables/systemusers", Some(json!({ "rows": [row] }))).await;
        r["inserted"][0].as_str().expect("the user was added").to_string()
    }

    /// A role's privileges as `(name, depth)`.
    pub async fn role_privileges(&self, role_id: &str) -> Vec<(String, String)> {
        let r = self.control(Method::GET, &format!("roles/{role_id}/privileges"), None).await;
        r["privileges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| (p["name"].as_str().unwrap_or("").to_string(), p["depth"].as_str().unwrap_or("").to_string()))
            .collect()
    }

    /// Disables (or enables again) an Entra app's application user, as an administrator would.
    pub async fn set_application_user_disabled(&self, app_id: &str, disabled: bool) {
        let users = self.rows("systemusers").await;
        for u in users.iter().filter(|u| u["applicationid"].as_str().is_some_and(|a| a.eq_ignore_ascii_case(app_id))) {
            let mut row = u.clone();
            row["isdisabled"] = json!(disabled);
            self.control(Method::POST, "tables/systemusers", Some(json!({ "rows": [row] }))).await;
        }
    }

    /// Every delta token issued so far is past Dataverse's change-tracking retention.
    pub async fn expire_delta_tokens(&self) {
        self.control(Method::POST, "expire_delta_tokens", Some(json!({}))).await;
    }

    /// Test set-up: a table without change tracking, as an older version provisioned it.
    pub async fn set_change_tracking(&self, entity_set: &str, enabled: bool) {
        self.control(
            Method::POST,
            &format!("tables/{entity_set}/change_tracking"),
            Some(json!({ "enabled": enabled })),
        )
        .await;
    }

    pub async fn set_accepted_tokens(&self, tokens: &[String]) {
        self.control(Method::POST, "config", Some(json!({ "accepted_tokens": tokens }))).await;
    }
}
