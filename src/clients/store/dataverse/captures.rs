//! Captures and the states Dynamics registered, as rows of their Dataverse tables.

use async_trait::async_trait;
use serde_json::{Value, json};

use super::{DataverseStore, map_err};
use crate::clients::dataverse::{Condition, Key, Record, literal};
use crate::domain::{Capture, CaptureStore, ExpectationStore, StoreResult};

impl DataverseStore {
    fn capture_from(&self, r: Record) -> Capture {
        let s = |n: &str| r.str(&self.c(n)).map(str::to_string);
        Capture {
            key: s("name").unwrap_or_default(),
            state: s("state").unwrap_or_default(),
            code: s("code"),
            iss: s("iss"),
            error: s("error"),
            error_description: s("errordescription"),
            received_at: r.i64(&self.c("receivedat")).unwrap_or(0),
            delivered_at: r.i64(&self.c("deliveredat")),
            claim_until_ms: r.i64(&self.c("claimuntilms")),
            attempts: r.i64(&self.c("attempts")).unwrap_or(0).clamp(0, u32::MAX as i64) as u32,
        }
    }
}

#[async_trait]
impl CaptureStore for DataverseStore {
    async fn insert_capture(&self, cap: &Capture) -> StoreResult<bool> {
        let fields = json!({
            self.c("state"): cap.state,
            self.c("code"): cap.code,
            self.c("iss"): cap.iss,
            self.c("error"): cap.error,
            self.c("errordescription"): cap.error_description,
            self.c("receivedat"): cap.received_at,
            self.c("deliveredat"): cap.delivered_at,
            self.c("claimuntilms"): cap.claim_until_ms,
            self.c("attempts"): cap.attempts,
        });
        match self
            .dv
            .write(&self.captures, &Key::Alternate(&self.key, &cap.key), &fields, Condition::NotExists, &[&self.key])
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(412) => Ok(false),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn captures_by_state(&self, state: &str) -> StoreResult<Vec<Capture>> {
        let filter = format!("{} eq {}", self.c("state"), literal(state));
        let order = format!("{} asc", self.c("receivedat"));
        let rows = self
            .dv
            .query(&self.captures, &filter, &Self::select(&self.capture_columns), Some(&order), 100)
            .await
            .map_err(map_err)?;
        // States are case-sensitive; Dataverse's `eq` is not.
        Ok(rows.into_iter().map(|r| self.capture_from(r)).filter(|c| c.state == state).collect())
    }

    async fn undelivered_captures(&self, limit: usize, ready_at_ms: Option<i64>) -> StoreResult<Vec<Capture>> {
        let mut filter = format!("{} eq null", self.c("deliveredat"));
        if let Some(at) = ready_at_ms {
            let claim = self.c("claimuntilms");
            filter = format!("{filter} and ({claim} eq null or {claim} le {at})");
        }
        let order = format!("{} asc", self.c("receivedat"));
        let rows = self
            .dv
            .query(&self.captures, &filter, &Self::select(&self.capture_columns), Some(&order), limit)
            .await
            .map_err(map_err)?;
        Ok(rows.into_iter().map(|r| self.capture_from(r)).collect())
    }

    async fn claim_capture(&self, key: &str, now_ms: i64, until_ms: i64) -> StoreResult<bool> {
        // Read the row with its ETag, then write the claim only over that version: of any
        // number of instances claiming at once, one write matches and the others get 412.
        let cols = [self.key.clone(), self.c("deliveredat"), self.c("claimuntilms")];
        let Some(rec) = self
            .dv
            .get(&self.captures, &Key::Alternate(&self.key, key), &Self::select(&cols))
            .await
            .map_err(map_err)?
        else {
            return Ok(false);
        };
        let free = rec.i64(&self.c("deliveredat")).is_none()
            && rec.i64(&self.c("claimuntilms")).is_none_or(|until| until <= now_ms);
        if !free {
            return Ok(false);
        }
        let fields = json!({ self.c("claimuntilms"): until_ms });
        match self
            .dv
            .write(
                &self.captures,
                &Key::Alternate(&self.key, key),
                &fields,
                Condition::Version(&rec.etag),
                &[&self.key],
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.status(), Some(412) | Some(404)) => Ok(false),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn release_capture(&self, key: &str, not_before_ms: i64, attempts: u32) -> StoreResult<()> {
        let fields = json!({ self.c("claimuntilms"): not_before_ms, self.c("attempts"): attempts });
        self.dv
            .write(&self.captures, &Key::Alternate(&self.key, key), &fields, Condition::Exists, &[&self.key])
            .await
            .map(|_| ())
            .map_err(map_err)
    }

    async fn mark_capture_delivered(&self, key: &str, at: i64) -> StoreResult<()> {
        let fields = json!({ self.c("deliveredat"): at, self.c("claimuntilms"): Value::Null });
        self.dv
            .write(&self.captures, &Key::Alternate(&self.key, key), &fields, Condition::Exists, &[&self.key])
            .await
            .map(|_| ())
            .map_err(map_err)
    }

    async fn purge_captures(&self, before: i64) -> StoreResult<u64> {
        let filter = format!("{} lt {before} and {} ne null", self.c("receivedat"), self.c("deliveredat"));
        self.delete_where(&self.captures, &filter).await
    }
}

#[async_trait]
impl ExpectationStore for DataverseStore {
    async fn expect_state(&self, state_hash: &str, expires_at: i64) -> StoreResult<()> {
        let fields = json!({ self.c("expiresat"): expires_at });
        self.dv
            .write(&self.expectations, &Key::Alternate(&self.key, state_hash), &fields, Condition::None, &[&self.key])
            .await
            .map(|_| ())
            .map_err(map_err)
    }

    async fn expected_until(&self, state_hash: &str) -> StoreResult<Option<i64>> {
        let expires = self.c("expiresat");
        let rec = self
            .dv
            .get(&self.expectations, &Key::Alternate(&self.key, state_hash), &[self.key.as_str(), expires.as_str()])
            .await
            .map_err(map_err)?;
        Ok(rec.and_then(|r| r.i64(&expires)))
    }

    async fn purge_expectations(&self, now: i64) -> StoreResult<u64> {
        let filter = format!("{} lt {now}", self.c("expiresat"));
        self.delete_where(&self.expectations, &filter).await
    }
}
