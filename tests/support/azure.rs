//! Key Vault, the App Service managed-identity endpoint and the Entra token endpoint
//! (tests/peers/azure.mjs), over TLS with a test CA where the real services use TLS.

use reqwest::Method;
use serde_json::{Value, json};

use super::peer::NodePeer;

pub const TENANT: &str = "7d5c3b1a-0c4e-4f6a-9b2d-1e8f00d1c0de";
pub const DATAVERSE_APP: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
pub const DATAVERSE_APP_SECRET: &str = "dataverse-app-secret-for-tests";

pub struct AzureDoubles {
    peer: NodePeer,
    /// `https://dctest.vault.azure.net:PORT/`
    pub keyvault: String,
    /// `http://127.0.0.1:PORT/msi/token`
    pub identity: String,
    /// `https://login.microsoftonline.com:PORT`
    pub entra: String,
    /// `https://localhost:PORT/`: the Application Insights ingestion endpoint.
    pub ingestion: String,
    /// `https://localhost:PORT`: the Global Discovery Service.
    pub discovery: String,
    /// The Application Insights resource's instrumentation key.
    pub instrumentation_key: String,
    /// The test CA's PEM file, for `SSL_CERT_FILE`.
    pub ca: String,
    control_base: String,
}

impl AzureDoubles {
    pub fn start(extra: Value) -> AzureDoubles {
        let mut config = json!({
            "tenant_id": TENANT,
            "identity_header": "test-identity-header",
            "entra_clients": [{ "tenant": TENANT, "client_id": DATAVERSE_APP, "client_secret": DATAVERSE_APP_SECRET }],
        });
        if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        let peer = NodePeer::start("azure.mjs", "AZURE_PEER_CONFIG", &config);
        let identity = peer.field("identity");
        let control_base = identity.trim_end_matches("/msi/token").to_string();
        AzureDoubles {
            keyvault: peer.field("keyvault"),
            entra: peer.field("entra"),
            ingestion: peer.field("ingestion"),
            discovery: peer.field("discovery"),
            instrumentation_key: peer.field("instrumentation_key"),
            ca: peer.field("ca"),
            identity,
            control_base,
            peer,
        }
    }

    /// The Entra endpoint under `localhost`, which needs no hosts-file entry.
    pub fn authority_host(&self) -> String {
        let port = self.entra.rsplit(':').next().unwrap_or_default();
        format!("https://localhost:{port}")
    }

    /// The settings that make the handler authenticate to Dataverse with a client secret
    /// against the Entra double.
    pub fn dataverse_client_secret_settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SSL_CERT_FILE", self.ca.clone()),
            ("AZURE_AUTHORITY_HOST", self.authority_host()),
            ("DATAVERSE_CREDENTIAL", "client_secret".into()),
            ("DATAVERSE_TENANT_ID", TENANT.into()),
            ("DATAVERSE_CLIENT_ID", DATAVERSE_APP.into()),
            ("DATAVERSE_CLIENT_SECRET", DATAVERSE_APP_SECRET.into()),
        ]
    }

    pub async fn control(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        self.peer.control(&self.control_base, method, path, body).await
    }

    /// Tokens the doubles issued for a resource (still valid).
    pub async fn tokens_for(&self, resource: &str) -> Vec<String> {
        let v = self.control(Method::GET, &format!("tokens?resource={}", urlenc(resource)), None).await;
        v["tokens"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect()
    }

    /// What the ingestion endpoint received: `items` (accepted envelopes) and `uploads`.
    pub async fn telemetry(&self) -> Value {
        self.control(Method::GET, "telemetry", None).await
    }

    pub async fn stats(&self) -> Value {
        self.control(Method::GET, "stats", None).await
    }
}

fn urlenc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
