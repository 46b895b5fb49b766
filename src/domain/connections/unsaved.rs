//! A grant whose tokens could not be stored (the store failed after the code was spent):
//! withdrawn at the provider (RFC 7009) so nothing is left alive there, its revocation
//! retried while it fails, and what happened written on the connection once the store
//! answers again.

use std::sync::Arc;
use std::time::Duration;

use crate::domain::oauth::catalog::Provider;
use crate::domain::oauth::{TokenEndpoint, TokenHint, TokenSet};
use crate::domain::{ConnectionStore, Status, StoreError};
use crate::support::time::Clock;

/// How long, and how often, a failure that could not be written is tried again; and how
/// a revocation that failed is retried meanwhile.
const RECORD_FOR: Duration = Duration::from_secs(600);
const RECORD_EVERY: Duration = Duration::from_secs(5);
const REVOKE_RETRY: crate::support::outbound::Backoff =
    crate::support::outbound::Backoff::new(Duration::from_secs(2), Duration::from_secs(60)).jittered();

/// What became of revoking a grant we could not keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Withdrawal {
    Revoked,
    /// The provider has no revocation endpoint: the grant may still be alive there.
    NoEndpoint,
    /// The provider refused or could not be reached; the error as said.
    Failed(String),
}

impl Withdrawal {
    fn said(&self) -> String {
        match self {
            Withdrawal::Revoked => "the grant was revoked at the provider.".into(),
            Withdrawal::NoEndpoint => {
                "the provider has no revocation endpoint, so the grant may still be alive there.".into()
            }
            Withdrawal::Failed(e) => format!(
                "revoking the grant at the provider failed ({e}), so it may still be alive there: remove the app's access in the provider's account settings."
            ),
        }
    }
}

/// Revokes a grant we could not keep (RFC 7009): the refresh token, which ends it, or the
/// access token when there is none. Once.
pub(super) async fn withdraw(endpoint: &dyn TokenEndpoint, provider: &Provider, tokens: &TokenSet) -> Withdrawal {
    if provider.revocation_url.is_none() {
        return Withdrawal::NoEndpoint;
    }
    let (token, hint) = match &tokens.refresh_token {
        Some(rt) => (rt, TokenHint::RefreshToken),
        None => (&tokens.access_token, TokenHint::AccessToken),
    };
    match endpoint.revoke(provider, token, hint).await {
        Ok(()) => Withdrawal::Revoked,
        Err(e) => {
            tracing::warn!(provider = %provider.name, error = %e, "the unsaved grant could not be revoked");
            Withdrawal::Failed(e.to_string())
        }
    }
}

/// A grant whose tokens could not be stored, settled in the background: its revocation
/// retried with back-off while it fails (a provider answering `503` once must not leave
/// the grant alive), and what happened written truthfully on the connection once the
/// store answers again. Both give up after [`RECORD_FOR`], saying so in the log.
pub(super) struct Unsaved {
    pub(super) store: Arc<dyn ConnectionStore>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) endpoint: Arc<dyn TokenEndpoint>,
    pub(super) provider: Arc<Provider>,
    pub(super) tokens: TokenSet,
    pub(super) id: String,
    /// Why the store refused the tokens.
    pub(super) why: String,
}

impl Unsaved {
    pub(super) async fn settle(self, mut withdrawal: Withdrawal) {
        let give_up = self.clock.now_millis() + RECORD_FOR.as_millis() as i64;
        let (mut recorded, mut attempt) = (false, 0);
        while self.clock.now_millis() < give_up {
            let failed = matches!(withdrawal, Withdrawal::Failed(_));
            if !failed && recorded {
                return;
            }
            attempt += 1;
            self.clock.sleep(if failed { REVOKE_RETRY.wait(attempt, None) } else { RECORD_EVERY }).await;
            if failed {
                withdrawal = withdraw(self.endpoint.as_ref(), &self.provider, &self.tokens).await;
                if withdrawal == Withdrawal::Revoked {
                    tracing::info!(connection = %self.id, "the unsaved grant was revoked at the provider on a later try");
                    recorded = false;
                }
            }
            if !recorded {
                recorded = self.record(&withdrawal).await;
            }
        }
        if matches!(withdrawal, Withdrawal::Failed(_)) {
            tracing::error!(connection = %self.id, provider = %self.provider.name, "the unsaved grant could not be revoked; it may still be alive at the provider");
        }
        if !recorded {
            tracing::warn!(connection = %self.id, "the store stayed unavailable; the failed authorization was not recorded");
        }
    }

    /// Writes what happened on the connection; true once written (or the record is gone).
    async fn record(&self, withdrawal: &Withdrawal) -> bool {
        let detail = format!(
            "The provider granted access, but the tokens could not be stored ({}); {} Authorize again.",
            self.why,
            withdrawal.said()
        );
        let Ok(Some(mut c)) = self.store.get(&self.id).await else { return false };
        let expected = c.version.clone();
        if c.tokens.is_none() {
            c.status = Status::Failed;
        }
        c.status_detail = Some(detail);
        c.updated_at = self.clock.now();
        match self.store.update(&c, &expected).await {
            Ok(_) => {
                tracing::info!(connection = %self.id, "the failed authorization is recorded on the connection");
                true
            }
            Err(StoreError::NotFound(_)) => true,
            Err(_) => false,
        }
    }
}
