//! The CRM integration of the cases service (the catalog's Anti-Corruption Layer and Circuit
//! Breaker, live): `POST /cases` looks the customer up through the [`client`] (behind a circuit
//! breaker, with correlation headers), which speaks the CRM's model only through the
//! [`adapter`]. When the CRM is down or the breaker is open, the last record cached from the CRM
//! is used; with none, the case is opened "unverified". The case records which it was.

pub mod adapter;
pub mod client;
pub mod customer;
pub mod demo;

use seaport::http::Correlation;
use seaport::store::{Conn, Db};
use seaport::{on_conn, on_pool};
use serde::{Deserialize, Serialize};

pub use client::{CrmClient, CrmError};
pub use customer::{Customer, CustomerId, Email};

/// How the customer of a new case was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CustomerCheck {
    /// The CRM answered just now.
    Verified,
    /// The CRM could not be asked (down, too slow, breaker open); its last answer was used.
    Cached,
    /// No CRM configured, or it could not be asked and nothing was cached.
    Unverified,
}

impl CustomerCheck {
    pub fn as_str(self) -> &'static str {
        match self {
            CustomerCheck::Verified => "verified",
            CustomerCheck::Cached => "cached",
            CustomerCheck::Unverified => "unverified",
        }
    }
}

/// The outcome of a lookup: how, and what we know.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckedCustomer {
    pub check: CustomerCheck,
    pub customer: Option<Customer>,
}

/// Look `id` up: the CRM if it can be asked, else the cache, else unverified. `Err` only for
/// an answer the caller must see: the CRM says the customer does not exist.
pub async fn check_customer(
    crm: Option<&CrmClient>,
    db: &Db,
    id: &CustomerId,
    corr: &Correlation,
) -> Result<CheckedCustomer, CrmError> {
    let Some(crm) = crm else {
        return Ok(CheckedCustomer {
            check: CustomerCheck::Unverified,
            customer: None,
        });
    };
    match crm.customer(id, corr).await {
        Ok(customer) => Ok(CheckedCustomer {
            check: CustomerCheck::Verified,
            customer: Some(customer),
        }),
        Err(e @ CrmError::NotFound(_)) => Err(e),
        Err(e) => {
            let cached = cached(db, id).await.unwrap_or_else(|db_error| {
                tracing::warn!(error = %db_error, "cannot read the CRM cache");
                None
            });
            tracing::warn!(customer = %id, error = %e, cached = cached.is_some(), "CRM lookup failed; using the fallback");
            Ok(CheckedCustomer {
                check: if cached.is_some() {
                    CustomerCheck::Cached
                } else {
                    CustomerCheck::Unverified
                },
                customer: cached,
            })
        }
    }
}

/// Keep the CRM's latest answer for `customer` (in the caller's transaction).
pub async fn remember<'c>(tx: impl Into<Conn<'c>>, customer: &Customer, at: &str) -> Result<(), sqlx::Error> {
    on_conn!(tx, c => sqlx::query(
        "INSERT INTO crm_customers (customer_id, name, email, fetched_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (customer_id) DO UPDATE SET name = excluded.name, email = excluded.email, fetched_at = excluded.fetched_at",
    )
    .bind(customer.id.as_str())
    .bind(&customer.name)
    .bind(customer.email.as_str())
    .bind(at)
    .execute(c)
    .await
    .map(|_| ()))
}

/// The last answer the CRM gave for `id`, if any.
pub async fn cached(db: &Db, id: &CustomerId) -> Result<Option<Customer>, sqlx::Error> {
    let row: Option<(String, String)> = on_pool!(db, p => sqlx::query_as("SELECT name, email FROM crm_customers WHERE customer_id = $1")
        .bind(id.as_str())
        .fetch_optional(p)
        .await?);
    // What we stored was valid when stored; if a rule got stricter since, treat it as absent.
    Ok(row.and_then(|(name, email)| Customer::new(id.clone(), &name, Email::parse(&email).ok()?).ok()))
}
