//! The portal companion's domain: who a portal user is ([`identity`]), the contact
//! behind them, and which connections are theirs.
//!
//! A contact only ever reaches its own connections (owner `contact:{id}`); the web
//! layer answers 404 for anything else, whatever the verb, so ids cannot be probed.
//! Portal users never receive a token.

pub mod identity;

use std::sync::Arc;
use std::time::Duration;

use crate::clients::dataverse::{Dataverse, DataverseError, Key};
use crate::domain::Connection;
use crate::domain::connections::{ConnectionError, Connections};
use crate::support::cache::Cache;
use identity::{ExternalUser, PortalUser, PortalVerifier, Verified};

const CONTACT_CACHE: Duration = Duration::from_secs(60);
/// How long a person's mapping to their contact is reused (a record changed in Dynamics
/// is seen after this).
const MAPPING_CACHE: Duration = Duration::from_secs(300);
/// Contacts come from traffic: bounded, least recently used first out.
const MAX_CONTACTS: usize = 10_000;

/// Why the portal could not answer.
#[derive(Debug, thiserror::Error)]
pub enum PortalError {
    #[error("the contact record was not found")]
    ContactNotFound,
    #[error("{0}")]
    Auth(#[from] crate::clients::auth::AuthError),
    /// More than one contact fits the signed-in person: acting for either could be wrong.
    #[error("{0}")]
    Ambiguous(String),
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
    /// `issuer|subject` → contact id, for people whose token names no contact.
    mapped: Cache<String, String>,
    lookup_column: Option<String>,
}

impl Portal {
    pub fn new(verifier: PortalVerifier, dataverse: Option<Arc<Dataverse>>, lookup_column: Option<String>) -> Portal {
        Portal {
            verifier,
            dataverse,
            contacts: Cache::new(MAX_CONTACTS),
            mapped: Cache::new(MAX_CONTACTS),
            lookup_column,
        }
    }

    /// The portal user behind an `Authorization` header: from the token, or (for an OIDC
    /// issuer's token that names no contact) found in Dynamics: first the portal's
    /// external identity records (`adx_externalidentity`: the issuer and subject), then a
    /// contact whose lookup column equals the lookup claim. Refused when none or more
    /// than one contact fits.
    pub async fn user(&self, authorization: Option<&str>) -> Result<PortalUser, PortalError> {
        let external = match self.verifier.verify(authorization).await? {
            Verified::User(u) => return Ok(u),
            Verified::Unmapped(x) => x,
        };
        let key = format!("{}|{}", external.issuer, external.subject);
        let contact_id = self
            .mapped
            .get_or_try_insert_with(&key, || async {
                Ok::<_, PortalError>((self.find_contact(&external).await?, MAPPING_CACHE))
            })
            .await?;
        Ok(PortalUser { contact_id, name: external.name, email: external.email })
    }

    async fn find_contact(&self, x: &ExternalUser) -> Result<String, PortalError> {
        let unmapped = || {
            PortalError::Auth(crate::clients::auth::AuthError::Unauthenticated(format!(
                "The token has no {} claim naming the contact, and no contact in Dynamics is linked to this sign-in ({} {}).",
                x.missing_claim, x.issuer, x.subject
            )))
        };
        let Some(dv) = &self.dataverse else { return Err(unmapped()) };
        let filter = format!(
            "adx_username eq {} and adx_identityprovidername eq {}",
            crate::clients::dataverse::literal(&x.subject),
            crate::clients::dataverse::literal(&x.issuer)
        );
        let rows = dv.query("adx_externalidentities", &filter, &["_adx_contactid_value"], None, 10).await?;
        let mut ids: Vec<String> =
            rows.iter().filter_map(|r| r.str("_adx_contactid_value")).filter_map(identity::normalize_guid).collect();
        ids.sort();
        ids.dedup();
        match ids.as_slice() {
            [one] => return Ok(one.clone()),
            [] => {}
            many => {
                return Err(PortalError::Ambiguous(format!(
                    "{} contacts are linked to this sign-in in Dynamics; ask the site's administrator to keep one.",
                    many.len()
                )));
            }
        }
        let (Some(column), Some(value)) = (&self.lookup_column, &x.lookup) else { return Err(unmapped()) };
        let filter = format!("{column} eq {}", crate::clients::dataverse::literal(value));
        let rows = dv.query("contacts", &filter, &["contactid"], None, 2).await?;
        match rows.as_slice() {
            [one] => one.str("contactid").and_then(identity::normalize_guid).ok_or(PortalError::ContactNotFound),
            [] => Err(unmapped()),
            _ => Err(PortalError::Ambiguous(format!(
                "More than one contact in Dynamics has this {column}; ask the site's administrator to link your sign-in to yours."
            ))),
        }
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
