//! The portal companion's domain: who a portal user is ([`identity`]), the contact
//! behind them, and which connections are theirs.
//!
//! A contact only ever reaches its own connections (owner `contact:{id}`); the web
//! layer answers 404 for anything else, whatever the verb, so ids cannot be probed.
//! Portal users never receive a token.

pub mod identity;

use std::sync::Arc;
use std::time::Duration;

use crate::connections::{ConnectionError, Connections};
use crate::dataverse::{Dataverse, DataverseError, Key};
use crate::outbound::Cache;
use crate::store::Connection;
use identity::{PortalUser, PortalVerifier};

const CONTACT_CACHE: Duration = Duration::from_secs(60);
/// Contacts come from traffic: bounded, least recently used first out.
const MAX_CONTACTS: usize = 10_000;

/// Why the portal could not answer.
#[derive(Debug, thiserror::Error)]
pub enum PortalError {
    #[error("the contact record was not found")]
    ContactNotFound,
    #[error("{0}")]
    Dataverse(#[from] DataverseError),
}

/// The signed-in contact, as Dataverse has it (or as the token says, without Dataverse).
#[derive(Debug, Clone)]
pub enum Contact {
    FromToken(PortalUser),
    FromDataverse {
        contact_id: String,
        name: Option<String>,
        first_name: Option<String>,
        last_name: Option<String>,
        email: Option<String>,
    },
}

/// The portal's long-lived parts.
pub struct Portal {
    pub verifier: PortalVerifier,
    /// Dataverse with our S2S identity, where contacts are read.
    dataverse: Option<Arc<Dataverse>>,
    contacts: Cache<String, Contact>,
}

impl Portal {
    pub fn new(verifier: PortalVerifier, dataverse: Option<Arc<Dataverse>>) -> Portal {
        Portal { verifier, dataverse, contacts: Cache::new(MAX_CONTACTS) }
    }

    /// The contact, read from Dataverse with our S2S identity (cached a minute), or
    /// from the token's claims where no Dataverse is configured.
    pub async fn contact(&self, user: &PortalUser) -> Result<Contact, PortalError> {
        let Some(dv) = &self.dataverse else {
            return Ok(Contact::FromToken(user.clone()));
        };
        self.contacts
            .get_or_try_insert_with(&user.contact_id, || async {
                let rec = dv
                    .get(
                        "contacts",
                        &Key::Id(&user.contact_id),
                        &["contactid", "fullname", "firstname", "lastname", "emailaddress1"],
                    )
                    .await?
                    .ok_or(PortalError::ContactNotFound)?;
                let text = |k: &str| rec.str(k).map(str::to_string);
                let contact = Contact::FromDataverse {
                    contact_id: user.contact_id.clone(),
                    name: text("fullname"),
                    first_name: text("firstname"),
                    last_name: text("lastname"),
                    email: text("emailaddress1"),
                };
                Ok((contact, CONTACT_CACHE))
            })
            .await
    }
}

/// The owner value of a portal user's connections.
pub fn owner(u: &PortalUser) -> String {
    format!("contact:{}", u.contact_id)
}

/// The id of a contact's one connection to a provider: connecting again re-authorizes it.
pub fn connection_id(u: &PortalUser, provider: &str) -> String {
    format!("portal-{}-{}", u.contact_id, provider)
}

/// The connection, if it exists and belongs to this contact; `None` otherwise.
pub async fn own(connections: &Connections, u: &PortalUser, id: &str) -> Result<Option<Connection>, ConnectionError> {
    match connections.get(id).await {
        // Owners compare without case, as Dataverse compares them.
        Ok(c) if c.owner.as_deref().is_some_and(|o| o.eq_ignore_ascii_case(&owner(u))) => Ok(Some(c)),
        Ok(_) | Err(ConnectionError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}
