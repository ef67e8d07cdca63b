//! A case, and the validation of a request to open one.

use seaport::http::Problem;
use serde::{Deserialize, Serialize};

pub const MAX_TITLE: usize = 200;
pub const MAX_DESCRIPTION: usize = 10_000;
pub const MAX_CUSTOMER_ID: usize = 128;

/// A support case, as stored and as returned by the API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Case {
    pub id: String,
    pub title: String,
    pub description: Option<String>,
    pub customer_id: String,
    pub status: String,
    pub correlation_id: String,
    pub created_at: String,
    /// How the customer was checked when the case was opened: `verified` (the CRM answered),
    /// `cached` (the CRM could not be asked; its last answer was used), `unverified`.
    #[schema(value_type = crate::crm::CustomerCheck)]
    pub customer_check: String,
    /// The customer's name and email as known when the case was opened (absent if unverified).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_email: Option<String>,
    /// When a payment for the case was confirmed (RFC 3339); absent while unpaid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paid_at: Option<String>,
}

/// The body of `POST /cases`. Unknown fields are refused so typos do not pass silently.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCaseRequest {
    /// 1 to 200 characters after trimming.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub title: String,
    /// 1 to 128 printable characters after trimming.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    )]
    pub customer_id: String,
    /// Up to 10,000 characters.
    #[serde(default)]
    #[schema(max_length = 10000)]
    pub description: Option<String>,
}

/// A validated request to open a case.
#[derive(Clone, Debug, PartialEq)]
pub struct NewCase {
    pub title: String,
    pub customer_id: String,
    pub description: Option<String>,
}

impl CreateCaseRequest {
    /// Check every field and report all problems at once (RFC 9457 `invalid-params`, 422).
    pub fn validate(self) -> Result<NewCase, Problem> {
        let mut invalid: Vec<(&str, String)> = Vec::new();
        let title = self.title.trim().to_owned();
        if title.is_empty() {
            invalid.push(("title", "must not be empty".into()));
        } else if title.chars().any(char::is_control) {
            invalid.push(("title", "must not contain control characters".into()));
        } else if title.chars().count() > MAX_TITLE {
            invalid.push(("title", format!("must be at most {MAX_TITLE} characters")));
        }
        let customer_id = self.customer_id.trim().to_owned();
        if customer_id.is_empty() {
            invalid.push(("customer_id", "must not be empty".into()));
        } else if customer_id.chars().count() > MAX_CUSTOMER_ID || customer_id.chars().any(char::is_control) {
            invalid.push((
                "customer_id",
                format!("must be at most {MAX_CUSTOMER_ID} printable characters"),
            ));
        }
        let description = self.description.map(|d| d.trim().to_owned()).filter(|d| !d.is_empty());
        if description
            .as_ref()
            .is_some_and(|d| d.chars().count() > MAX_DESCRIPTION)
        {
            invalid.push(("description", format!("must be at most {MAX_DESCRIPTION} characters")));
        } else if description
            .as_ref()
            .is_some_and(|d| d.chars().any(|c| c.is_control() && c != '\n' && c != '\r' && c != '\t'))
        {
            invalid.push((
                "description",
                "must not contain control characters other than line breaks and tabs".into(),
            ));
        }
        if invalid.is_empty() {
            Ok(NewCase {
                title,
                customer_id,
                description,
            })
        } else {
            Err(Problem::invalid(http::StatusCode::UNPROCESSABLE_ENTITY, &invalid))
        }
    }
}
