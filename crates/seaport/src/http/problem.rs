//! RFC 9457 problem details: every error a client gets is `application/problem+json` with the
//! status it deserves.

use axum::extract::rejection::JsonRejection;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use serde_json::{Map, Value};

pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem details object.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Problem {
    /// A URI naming the problem type; `about:blank` means "see the status code".
    #[serde(rename = "type")]
    pub ty: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Extension members, e.g. `invalid-params`.
    #[serde(flatten)]
    pub extensions: Map<String, Value>,
}

impl Problem {
    /// A problem of type `about:blank` whose title is the status's reason phrase.
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Problem {
            ty: "about:blank".to_owned(),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: Some(detail.into()),
            instance: None,
            extensions: Map::new(),
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::BAD_REQUEST, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::NOT_FOUND, detail)
    }

    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, detail)
    }

    /// For failures that are ours, not the client's. The detail stays in the logs.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "internal error");
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the server failed to handle the request; it was logged",
        )
    }

    /// A typed problem: `ty` is a URI reference (e.g. `/problems/idempotency-key-missing`).
    pub fn with_type(mut self, ty: impl Into<String>, title: impl Into<String>) -> Self {
        self.ty = ty.into();
        self.title = title.into();
        self
    }

    pub fn with_instance(mut self, instance: impl Into<String>) -> Self {
        self.instance = Some(instance.into());
        self
    }

    pub fn with_extension(mut self, name: &str, value: Value) -> Self {
        self.extensions.insert(name.to_owned(), value);
        self
    }

    /// A problem listing every wrong input: the detail sums them up, `invalid-params` lists them.
    pub fn invalid(status: StatusCode, params: &[(&str, String)]) -> Self {
        let detail = params
            .iter()
            .map(|(n, r)| format!("{n} {r}"))
            .collect::<Vec<_>>()
            .join("; ");
        Problem::new(status, detail).with_invalid_params(params)
    }

    /// RFC 9457 §3's `invalid-params` extension: which inputs were wrong and why.
    pub fn with_invalid_params(self, params: &[(&str, String)]) -> Self {
        let list = params
            .iter()
            .map(|(n, r)| serde_json::json!({"name": n, "reason": r}))
            .collect();
        self.with_extension("invalid-params", Value::Array(list))
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::to_vec(&self).expect("a problem always serialises");
        let mut res = (status, body).into_response();
        res.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        res
    }
}

impl From<JsonRejection> for Problem {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::JsonDataError(e) => Problem::unprocessable(e.body_text()),
            JsonRejection::JsonSyntaxError(e) => Problem::bad_request(e.body_text()),
            JsonRejection::MissingJsonContentType(e) => Problem::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, e.body_text()),
            other => Problem::new(other.status(), other.body_text()),
        }
    }
}

impl From<axum::extract::rejection::PathRejection> for Problem {
    fn from(r: axum::extract::rejection::PathRejection) -> Self {
        Problem::new(r.status(), r.body_text())
    }
}

impl From<axum::extract::rejection::BytesRejection> for Problem {
    fn from(r: axum::extract::rejection::BytesRejection) -> Self {
        Problem::new(r.status(), r.body_text())
    }
}

/// Text the database refuses to store (PostgreSQL rejects U+0000 in `TEXT`, SQLSTATE 22021 /
/// 22P05) is the client's input, not our failure: a 400, as a safety net behind validation.
fn refused_text(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("22021") | Some("22P05")))
}

impl From<sqlx::Error> for Problem {
    fn from(e: sqlx::Error) -> Self {
        if refused_text(&e) {
            return Problem::bad_request("the request contains text that cannot be stored (a NUL character)");
        }
        Problem::internal(e)
    }
}

impl From<crate::outbox::OutboxError> for Problem {
    fn from(e: crate::outbox::OutboxError) -> Self {
        match e {
            crate::outbox::OutboxError::Storage(e) => e.into(),
            other => Problem::internal(other),
        }
    }
}

/// Parse a JSON request body, telling malformed JSON (400) from well-formed JSON of the wrong
/// shape (422), with the serde error's position in the detail.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            Problem::unprocessable(format!("request body does not match the expected shape: {e}"))
        }
        _ => Problem::bad_request(format!("request body is not valid JSON: {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_as_rfc9457() {
        let p = Problem::bad_request("page must be >= 1").with_invalid_params(&[("page", "must be >= 1".into())]);
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["type"], "about:blank");
        assert_eq!(v["title"], "Bad Request");
        assert_eq!(v["status"], 400);
        assert_eq!(v["invalid-params"][0]["name"], "page");
        let res = p.into_response();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        assert_eq!(res.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
    }

    #[test]
    fn json_errors_are_classified() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct T {
            a: String,
        }
        assert_eq!(parse_json::<T>(b"{").unwrap_err().status, 400);
        assert_eq!(parse_json::<T>(b"{}").unwrap_err().status, 422);
        assert_eq!(parse_json::<T>(br#"{"a": 1}"#).unwrap_err().status, 422);
        assert_eq!(parse_json::<T>(b"").unwrap_err().status, 400);
    }
}
