//! The anti-corruption layer in front of the CRM: the only code that knows the CRM's wire model
//! (`cust_id`, `full_name`, `email_address`). It translates into the domain's [`Customer`] with
//! validated value objects, or fails with a typed [`TranslationError`]; the CRM's types never
//! leave this file.

use serde::Deserialize;

use super::customer::{Customer, CustomerId, Email, InvalidValue};

/// The CRM's customer record, as it sends it. Every field optional so that a missing field is
/// reported as such instead of as an opaque parse error; unknown fields are ignored (the CRM may
/// add some at any time).
#[derive(Debug, Deserialize)]
struct CrmCustomer {
    cust_id: Option<String>,
    full_name: Option<String>,
    email_address: Option<String>,
}

/// Why a CRM answer could not be turned into a domain customer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TranslationError {
    #[error("the CRM's answer is not a customer record: {0}")]
    Malformed(String),
    #[error("the CRM's record lacks {0}")]
    MissingField(&'static str),
    #[error("the CRM's {field} is invalid: {reason}")]
    Invalid { field: &'static str, reason: InvalidValue },
    #[error("asked the CRM for customer {asked}, it answered with {got}")]
    WrongCustomer { asked: String, got: String },
}

/// Translate a CRM answer (the raw body) for customer `asked`.
pub fn translate(asked: &CustomerId, body: &[u8]) -> Result<Customer, TranslationError> {
    let record: CrmCustomer = serde_json::from_slice(body).map_err(|e| {
        let mut msg = e.to_string();
        msg.truncate(200);
        TranslationError::Malformed(msg)
    })?;
    let raw_id = record.cust_id.ok_or(TranslationError::MissingField("cust_id"))?;
    let id = CustomerId::parse(&raw_id).map_err(|reason| TranslationError::Invalid {
        field: "cust_id",
        reason,
    })?;
    if &id != asked {
        return Err(TranslationError::WrongCustomer {
            asked: asked.to_string(),
            got: id.to_string(),
        });
    }
    let name = record.full_name.ok_or(TranslationError::MissingField("full_name"))?;
    let email = record
        .email_address
        .ok_or(TranslationError::MissingField("email_address"))?;
    let email = Email::parse(&email).map_err(|reason| TranslationError::Invalid {
        field: "email_address",
        reason,
    })?;
    Customer::new(id, &name, email).map_err(|reason| TranslationError::Invalid {
        field: "full_name",
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> CustomerId {
        CustomerId::parse(s).unwrap()
    }

    #[test]
    fn maps_a_good_record() {
        let c = translate(
            &id("C-1"),
            br#"{"cust_id":"C-1","full_name":" Ada Lovelace ","email_address":"Ada@Example.com","extra":1}"#,
        )
        .unwrap();
        assert_eq!(
            (c.id.as_str(), c.name.as_str(), c.email.as_str()),
            ("C-1", "Ada Lovelace", "Ada@example.com")
        );
    }

    #[test]
    fn each_kind_of_bad_record_is_a_typed_error() {
        let asked = id("C-1");
        let t = |body: &str| translate(&asked, body.as_bytes()).unwrap_err();
        assert!(matches!(t("not json"), TranslationError::Malformed(_)));
        assert!(matches!(t("[1,2]"), TranslationError::Malformed(_)));
        assert!(matches!(t(r#"{"cust_id": 7}"#), TranslationError::Malformed(_)));
        assert_eq!(
            t(r#"{"full_name":"A","email_address":"a@b.co"}"#),
            TranslationError::MissingField("cust_id")
        );
        assert_eq!(
            t(r#"{"cust_id":"C-1","email_address":"a@b.co"}"#),
            TranslationError::MissingField("full_name")
        );
        assert_eq!(
            t(r#"{"cust_id":"C-1","full_name":"A"}"#),
            TranslationError::MissingField("email_address")
        );
        assert!(matches!(
            t(r#"{"cust_id":"C-1","full_name":"A","email_address":"nope"}"#),
            TranslationError::Invalid {
                field: "email_address",
                ..
            }
        ));
        assert!(matches!(
            t(r#"{"cust_id":"C-1","full_name":"  ","email_address":"a@b.co"}"#),
            TranslationError::Invalid { field: "full_name", .. }
        ));
        assert!(matches!(
            t(r#"{"cust_id":"","full_name":"A","email_address":"a@b.co"}"#),
            TranslationError::Invalid { field: "cust_id", .. }
        ));
        assert_eq!(
            t(r#"{"cust_id":"C-2","full_name":"A","email_address":"a@b.co"}"#),
            TranslationError::WrongCustomer {
                asked: "C-1".into(),
                got: "C-2".into()
            }
        );
    }
}
