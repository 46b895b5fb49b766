//! Bringing in a connection that another token keeper holds: its refresh token and, if
//! known, the access token and its expiry. A customer moving to this product must not
//! have to ask every user to authorize again.
//!
//! The imported refresh token is trusted only once the provider accepted it: the record is
//! written first (so a rotating provider's new refresh token lands on a record that
//! exists, through the same leased, version-checked refresh as every other), then
//! refreshed once. When the provider refuses it (`invalid_grant`) the record is removed
//! and the caller told; when the provider cannot be reached, the record stays and the
//! timer verifies it later, because the provider may have rotated the token already.

use secrecy::SecretString;

use super::refresh::apply_tokens;
use super::{CachedToken, ConnectionError, Connections, InvalidInput};
use crate::domain::oauth::TokenSet;
use crate::domain::{Connection, Status};

/// The earliest `expires_at` an import may name (2000-01-01), and how far ahead at most.
const EARLIEST_EXPIRY: i64 = 946_684_800;
const LATEST_EXPIRY_AHEAD: i64 = 10 * 365 * 24 * 3600;

/// What a caller brings.
#[derive(Debug)]
pub struct Import {
    pub provider: String,
    pub connection_id: Option<String>,
    pub owner: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub refresh_token: SecretString,
    pub access_token: Option<SecretString>,
    /// Unix seconds; only with `access_token`.
    pub expires_at: Option<i64>,
}

/// The imported connection after its verifying refresh, and the token it got.
#[derive(Debug)]
pub struct Imported {
    pub connection: Connection,
    pub token: CachedToken,
}

impl Connections {
    pub async fn import(&self, req: Import) -> Result<Imported, ConnectionError> {
        use secrecy::ExposeSecret;
        let (provider, id, scopes) =
            self.new_record(&req.provider, req.connection_id, req.owner.as_deref(), req.scopes)?;
        let invalid = |why: &str| ConnectionError::Invalid(InvalidInput::ImportedTokens, why.into());
        let refresh = req.refresh_token.expose_secret();
        if refresh.is_empty() || refresh.len() > 8192 || refresh.chars().any(char::is_control) {
            return Err(invalid("refresh_token must be the provider's refresh token (1-8192 printable characters)."));
        }
        if req.expires_at.is_some() && req.access_token.is_none() {
            return Err(invalid("expires_at describes an access_token; send both or neither."));
        }
        let t = self.deps.clock.now();
        if let Some(at) = req.expires_at
            && !(EARLIEST_EXPIRY..=t.saturating_add(LATEST_EXPIRY_AHEAD)).contains(&at)
        {
            return Err(invalid("expires_at must be a time between 2000 and ten years from now."));
        }
        // Not obtained by us: the access token is kept but never served as it is, and the
        // record is due at once, so until the provider has accepted the refresh token (the
        // verifying refresh below, or the timer's when the provider cannot be reached now)
        // no caller gets a token that was only brought in.
        let tokens = TokenSet {
            access_token: req.access_token.unwrap_or_else(|| SecretString::from(String::new())),
            token_type: "Bearer".into(),
            refresh_token: Some(req.refresh_token),
            expires_at: req.expires_at.unwrap_or(t).min(t),
            scope: None,
        };
        let mut conn = Connection::new(&id, &provider.name, req.owner, scopes, Status::Active, t);
        apply_tokens(&mut conn, &tokens, &self.deps.keys, t);
        // Not obtained by us: the first refresh must happen whatever the expiry says.
        conn.refreshed_at = None;
        conn.status_detail = Some("Imported; not verified with the provider yet.".into());
        let key = id.to_ascii_lowercase();
        self.importing().insert(key.clone());
        let verified = self.verify_import(&mut conn, &provider.name).await;
        self.importing().remove(&key);
        let connection = verified?;
        self.status_changed(&connection.connection, None);
        Ok(connection)
    }

    /// Stores the imported record and refreshes it once; events are held back meanwhile.
    async fn verify_import(&self, conn: &mut Connection, provider: &str) -> Result<Imported, ConnectionError> {
        let id = conn.id.clone();
        self.insert_new(conn).await?;
        match self.access_token(&id, true).await {
            Ok(token) => {
                tracing::info!(connection = %id, provider, "connection imported and verified");
                let connection = self.get(&id).await?;
                Ok(Imported { connection, token })
            }
            Err(ConnectionError::NeedsReauth { detail, .. }) => {
                // Refused for good: take the record away again (nobody heard of it).
                if let Ok(c) = self.get(&id).await {
                    let _ = self.deps.store.delete(&id, &c.version).await;
                }
                self.cache.remove(&id);
                tracing::warn!(connection = %id, provider, "import refused by the provider");
                Err(ConnectionError::ImportRefused { detail })
            }
            Err(e) => Err(e),
        }
    }
}
