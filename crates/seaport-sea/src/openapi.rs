//! The OpenAPI 3.1 document of the service, generated from the handlers' annotations and the
//! types' schemas (utoipa), served at `/openapi.json`.

use axum::Json;
use utoipa::{OpenApi, ToSchema};

use crate::cases::domain::{Case, CreateCaseRequest};
use crate::trace::{SeenBy, Trace, TracedEvent};

/// RFC 9457 problem details (`application/problem+json`).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Problem {
    /// URI reference naming the problem type; `about:blank` means "see the status".
    #[schema(rename = "type")]
    pub ty: String,
    pub title: String,
    pub status: u16,
    pub detail: Option<String>,
    pub instance: Option<String>,
    /// Which inputs were wrong and why (RFC 9457 §3 example extension).
    #[schema(rename = "invalid-params")]
    pub invalid_params: Option<Vec<InvalidParam>>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct InvalidParam {
    pub name: String,
    pub reason: String,
}

/// The catalog's pagination block.
#[derive(ToSchema, serde::Serialize)]
#[allow(dead_code)]
pub struct Pagination {
    pub page: u64,
    pub limit: u64,
    pub total: u64,
    #[serde(rename = "totalPages")]
    pub total_pages: u64,
}

/// Offset mode (`?page=&limit=`).
#[derive(ToSchema, serde::Serialize)]
#[allow(dead_code)]
pub struct CasePage {
    pub data: Vec<Case>,
    pub pagination: Pagination,
}

/// Cursor mode (`?cursor=&limit=`).
#[derive(ToSchema, serde::Serialize)]
#[allow(dead_code)]
pub struct CaseCursorPage {
    pub data: Vec<Case>,
    /// Pass as `cursor` for the next page; null on the last page.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Health {
    pub status: String,
    /// The circuit breakers in front of outside dependencies (the CRM, when configured): state
    /// (`closed`, `open`, `half_open`) and counts. An open breaker does not make the service
    /// unhealthy: requests fall back.
    #[schema(value_type = Vec<Object>)]
    pub breakers: serde_json::Value,
}

/// The answer to an accepted (or already accepted) webhook delivery.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Received {
    /// Always `true`.
    pub received: bool,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Seaport sea cases service",
        description = "The reference service of Seaport: cases, their events, and the trace of what each request caused."
    ),
    paths(
        crate::cases::routes::create_case,
        crate::cases::routes::list_cases,
        crate::cases::routes::get_case,
        crate::trace::route,
        crate::app::healthz,
        crate::webhooks::stripe,
        crate::webhooks::github,
        crate::webhooks::standard,
        openapi_json,
    ),
    components(schemas(
        Problem,
        InvalidParam,
        Pagination,
        CasePage,
        CaseCursorPage,
        Case,
        CreateCaseRequest,
        Trace,
        TracedEvent,
        SeenBy,
        Health,
        Received
    ))
)]
pub struct ApiDoc;

/// The OpenAPI document of this service.
#[utoipa::path(get, path = "/openapi.json", tag = "meta", responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json", body = Object)))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
