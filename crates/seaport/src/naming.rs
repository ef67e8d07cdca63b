//! The catalog's naming conventions for durable consumers:
//!
//! - **consumer group** `{service}__{context}`: every worker of the service binds the *same*
//!   durable name and they share the messages (e.g. `sea_service__context`);
//! - **fan-out** `{consumer}__from_{source}`: each consumer binds its *own* name and gets every
//!   message (e.g. `analytics__from_sea`).
//!
//! Parts are lowercase ASCII letters, digits and single underscores, so the double underscore
//! separates them unambiguously (and the names are valid JetStream durable names).

/// What a conventional durable name says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DurableName {
    Group { service: String, context: String },
    FanOut { consumer: String, source: String },
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{0:?} is not a valid name part: use lowercase letters, digits and single underscores")]
    Part(String),
    #[error(
        "{0:?} follows neither convention: `{{service}}__{{context}}` (consumer group) or `{{consumer}}__from_{{source}}` (fan-out)"
    )]
    Convention(String),
}

fn valid_part(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 100
        && !p.starts_with('_')
        && !p.ends_with('_')
        && !p.contains("__")
        && p.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn check(p: &str) -> Result<&str, NameError> {
    if valid_part(p) {
        Ok(p)
    } else {
        Err(NameError::Part(p.to_owned()))
    }
}

/// `{service}__{context}`: the shared durable of a consumer group.
pub fn group(service: &str, context: &str) -> Result<String, NameError> {
    Ok(format!("{}__{}", check(service)?, check(context)?))
}

/// `{consumer}__from_{source}`: a fan-out consumer's own durable.
pub fn fan_out(consumer: &str, source: &str) -> Result<String, NameError> {
    Ok(format!("{}__from_{}", check(consumer)?, check(source)?))
}

/// Read a durable name by the conventions.
pub fn parse(name: &str) -> Result<DurableName, NameError> {
    let (left, right) = name
        .split_once("__")
        .ok_or_else(|| NameError::Convention(name.to_owned()))?;
    check(left)?;
    if let Some(source) = right.strip_prefix("from_") {
        check(source)?;
        return Ok(DurableName::FanOut {
            consumer: left.to_owned(),
            source: source.to_owned(),
        });
    }
    check(right)?;
    Ok(DurableName::Group {
        service: left.to_owned(),
        context: right.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_reads_both_conventions() {
        assert_eq!(group("sea_service", "context").unwrap(), "sea_service__context");
        assert_eq!(fan_out("analytics", "sea").unwrap(), "analytics__from_sea");
        assert_eq!(
            parse("analytics__from_sea").unwrap(),
            DurableName::FanOut {
                consumer: "analytics".into(),
                source: "sea".into()
            }
        );
        assert_eq!(
            parse("sea_service__context").unwrap(),
            DurableName::Group {
                service: "sea_service".into(),
                context: "context".into()
            }
        );
        for bad in [
            "analytics",
            "Analytics__from_sea",
            "a__b__c",
            "a___b",
            "__x",
            "x__",
            "a-b__c",
            "a__from_",
            "",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(group("Sea", "x").is_err());
        assert!(fan_out("a__b", "sea").is_err());
        // Every conventional name is a valid durable name on both brokers.
        assert!(crate::broker::valid_durable(&fan_out("notifications", "sea").unwrap()));
    }
}
