//! Key rotation to the end: every sealed token set and pending authorization sealed
//! again with the current key, so a retired key can be removed from
//! `TOKEN_ENCRYPTION_KEYS` without waiting for each token to happen to be refreshed.
//!
//! A pass walks the connections in list order and re-seals through
//! [`Connections::modify`], the same version-checked write as a refresh: when a refresh
//! lands in between, the write conflicts, the record is read again, and what is sealed
//! now (by the refresh, with the current key already) is what the pass looks at.

use std::collections::BTreeMap;

use super::authorize::pending_aad;
use super::{ConnectionError, Connections};
use crate::domain::oauth::TokenSet;
use crate::domain::{Connection, ListFilter};
use crate::support::crypto::Keyring;

const PAGE: usize = 500;

/// What one pass found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResealReport {
    /// The key everything is sealed with now.
    pub current_key: String,
    pub scanned: usize,
    pub resealed: usize,
    pub failed: usize,
    /// Records still sealed (at least in part) with each older key after the pass.
    pub remaining: BTreeMap<String, usize>,
}

impl ResealReport {
    /// Whether no record needs an older key any more.
    pub fn done(&self) -> bool {
        self.remaining.is_empty()
    }

    pub fn line(&self) -> String {
        let remaining = if self.remaining.is_empty() {
            "none".to_string()
        } else {
            self.remaining.iter().map(|(k, n)| format!("{n} under {k}")).collect::<Vec<_>>().join(", ")
        };
        format!(
            "reseal: {} connections scanned, {} sealed again with {}, {} failed; still under an older key: {remaining}",
            self.scanned, self.resealed, self.current_key, self.failed
        )
    }
}

/// The older keys a record's sealed fields use.
fn older_keys<'a>(c: &'a Connection, current: &str) -> Vec<&'a str> {
    let fields = [c.tokens.as_deref(), c.pending.as_ref().map(|p| p.sealed.as_str())];
    let mut keys: Vec<&str> =
        fields.into_iter().flatten().filter_map(Keyring::sealed_with).filter(|k| *k != current).collect();
    keys.dedup();
    keys
}

impl Connections {
    /// One pass over every connection, re-sealing at most `budget` of them (0 only counts).
    pub async fn reseal(&self, budget: usize) -> Result<ResealReport, ConnectionError> {
        let keys = self.deps.keys.clone();
        let current = keys.current_id();
        let mut report = ResealReport { current_key: current.clone(), ..Default::default() };
        let mut after = None;
        loop {
            let page =
                self.deps.store.list(&ListFilter { limit: PAGE, after: after.clone(), ..Default::default() }).await?;
            let full = page.len() == PAGE;
            after = page.last().map(|c| (c.created_at, c.id.clone()));
            for c in page {
                report.scanned += 1;
                let old = older_keys(&c, &current);
                if old.is_empty() {
                    continue;
                }
                let count = |report: &mut ResealReport, old: &[&str]| {
                    for k in old {
                        *report.remaining.entry(k.to_string()).or_default() += 1;
                    }
                };
                if report.resealed >= budget {
                    count(&mut report, &old);
                    continue;
                }
                let id = c.id.clone();
                let written = self
                    .modify(&id, Some(c.clone()), |c| {
                        if let Some(sealed) = &c.tokens
                            && let Some(again) = keys.reseal(sealed, &TokenSet::aad(&c.id))?
                        {
                            c.tokens = Some(again);
                        }
                        if let Some(p) = c.pending.as_mut()
                            && let Some(again) = keys.reseal(&p.sealed, &pending_aad(&c.id))?
                        {
                            p.sealed = again;
                        }
                        Ok::<(), ConnectionError>(())
                    })
                    .await;
                match written {
                    Ok(_) => report.resealed += 1,
                    // Deleted meanwhile: nothing is left to re-seal.
                    Err(ConnectionError::NotFound(_)) => {}
                    Err(e) => {
                        tracing::warn!(connection = %id, error = %e, "reseal failed");
                        report.failed += 1;
                        count(&mut report, &old);
                    }
                }
            }
            if !full {
                break;
            }
        }
        *self.last_reseal.lock().unwrap_or_else(|e| e.into_inner()) = Some(report.clone());
        Ok(report)
    }

    /// The id of the key new seals use.
    pub fn current_key(&self) -> String {
        self.deps.keys.current_id()
    }

    /// The last pass's report, for health and the operator.
    pub fn last_reseal(&self) -> Option<ResealReport> {
        self.last_reseal.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
