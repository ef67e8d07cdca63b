//! The domain's view of a customer: validated value objects. Nothing here knows the CRM's field
//! names; the adapter translates into these types or fails with a typed error.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a value does not make a valid domain object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidValue {
    #[error("customer id must be 1 to 128 printable characters")]
    CustomerId,
    #[error("email address {0:?} is not valid")]
    Email(String),
    #[error("customer name must be 1 to 200 printable characters")]
    Name,
}

/// A customer id: 1-128 printable characters, surrounding whitespace trimmed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CustomerId(String);

impl CustomerId {
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        let s = raw.trim();
        if s.is_empty() || s.chars().count() > 128 || s.chars().any(char::is_control) {
            return Err(InvalidValue::CustomerId);
        }
        Ok(CustomerId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CustomerId {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<CustomerId> for String {
    fn from(c: CustomerId) -> String {
        c.0
    }
}

impl fmt::Display for CustomerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An email address, checked the way delivery systems check it in practice: one `@`, a local
/// part of 1-64 characters, a domain of dot-separated labels (letters, digits, hyphens, not at
/// a label's ends) with at least one dot, 254 characters at most, no spaces or controls. The
/// domain is lower-cased (it is case-insensitive); the local part is kept as given.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        let s = raw.trim();
        let bad = || InvalidValue::Email(s.chars().take(100).collect());
        if s.len() > 254 {
            return Err(bad());
        }
        let (local, domain) = s.split_once('@').ok_or_else(bad)?;
        let local_ok = !local.is_empty()
            && local.len() <= 64
            && !local.starts_with('.')
            && !local.ends_with('.')
            && !local.contains("..")
            && local.chars().all(|c| {
                c.is_ascii_alphanumeric()
                    || "!#$%&'*+-/=?^_`{|}~.".contains(c)
                    || !c.is_ascii() && !c.is_control() && !c.is_whitespace()
            });
        let labels: Vec<&str> = domain.split('.').collect();
        let domain_ok = labels.len() >= 2
            && labels.iter().all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if !local_ok || !domain_ok {
            return Err(bad());
        }
        Ok(Email(format!("{local}@{}", domain.to_ascii_lowercase())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Email {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Email> for String {
    fn from(e: Email) -> String {
        e.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A customer as the cases context knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub id: CustomerId,
    pub name: String,
    pub email: Email,
}

impl Customer {
    pub fn new(id: CustomerId, name: &str, email: Email) -> Result<Self, InvalidValue> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
            return Err(InvalidValue::Name);
        }
        Ok(Customer {
            id,
            name: name.to_owned(),
            email,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        for ok in [
            "a@b.co",
            "first.last+tag@example.COM",
            "x_y@sub.example-1.org",
            "ünï@example.com",
        ] {
            assert!(Email::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(Email::parse("A@Example.COM").unwrap().as_str(), "A@example.com");
        for bad in [
            "",
            "plain",
            "@example.com",
            "a@",
            "a@b",
            "a@@b.com",
            "a b@example.com",
            "a@exa mple.com",
            ".a@example.com",
            "a..b@example.com",
            "a@-example.com",
            "a@example..com",
            "a@exam\tple.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Email::parse(&format!("{}@example.com", "a".repeat(65))).is_err());
    }

    #[test]
    fn customer_ids() {
        assert_eq!(CustomerId::parse("  C-1 ").unwrap().as_str(), "C-1");
        assert!(CustomerId::parse("").is_err());
        assert!(CustomerId::parse("a\u{0}b").is_err());
        assert!(CustomerId::parse(&"x".repeat(129)).is_err());
    }
}
