//! `POST /cases`, `GET /cases`, `GET /cases/{id}`.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, StatusCode, header};
use seaport::Event;
use seaport::http::pagination::{CursorPage, ListRequest, Page};
use seaport::http::problem::parse_json;
use seaport::http::{Correlation, Problem};
use seaport::http::{IdempotencyLayer, IdempotentTx};
use seaport::store::Tx;

use super::domain::{Case, CreateCaseRequest, NewCase};
use super::{CASE_CREATED, SOURCE, repo};
use crate::app::AppState;
use crate::crm::{self, CheckedCustomer, CrmError, CustomerCheck, CustomerId};

pub fn router(app: &AppState) -> Router<AppState> {
    // Only POST is idempotency-protected; keys are scoped by `X-Client-Id` (no authentication yet).
    let idempotency = IdempotencyLayer::new(app.store.clone()).retention(app.idempotency_retention);
    Router::new()
        .route("/cases", get(list_cases).merge(post(create_case).layer(idempotency)))
        .route("/cases/{id}", get(get_case))
}

/// The same routes with `POST /cases` *not* behind the Idempotency-Key layer: only for
/// `seaport bench-http`, which measures what the layer costs. Never serve this.
///
/// What differs from [`router`]: no key is read, held or written, the response is not
/// buffered and stored; the handler begins its transaction from the pool and commits it itself
/// instead of the layer doing both. Parsing, validation, the CRM
/// check and every write of the case (case row, outbox event) run the same code as
/// [`create_case`] (`prepare_case`, `write_case`).
pub fn router_without_idempotency() -> Router<AppState> {
    Router::new()
        .route("/cases", get(list_cases).merge(post(create_case_unguarded)))
        .route("/cases/{id}", get(get_case))
}

fn require_json(headers: &HeaderMap) -> Result<(), Problem> {
    match headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("")) {
        None => Ok(()),
        Some(ct) => {
            let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            if mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")) {
                Ok(())
            } else {
                Err(Problem::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("expected application/json, got {ct:?}"),
                ))
            }
        }
    }
}

#[utoipa::path(
    post,
    path = "/cases",
    tag = "cases",
    request_body(content = CreateCaseRequest, content_type = "application/json"),
    params(
        ("Idempotency-Key" = String, Header, description = "IETF Idempotency-Key: a bare key or an sf-string `\"key\"`, 1-255 printable ASCII. The catalog's `X-Idempotency-Key` is accepted instead (if both are sent they must agree).",
            pattern = r"^[!#-~]([ !#-~]{0,253}[!#-~])?$"),
        ("X-Client-Id" = Option<String>, Header, description = "The caller; idempotency keys are scoped to it."),
        ("X-Correlation-Id" = Option<String>, Header, description = "Correlation id to continue; a fresh one is made if absent or invalid."),
        ("X-Causation-Id" = Option<String>, Header, description = "What caused this request upstream."),
        ("traceparent" = Option<String>, Header, description = "W3C Trace Context."),
    ),
    responses(
        (status = 201, description = "Created (or replayed, with Idempotent-Replayed: true)", body = Case,
            headers(("Location" = String, description = "/cases/{id}"), ("Idempotent-Replayed" = String, description = "`true` on a replay"))),
        (status = 400, description = "Missing or malformed idempotency key, or malformed JSON", content_type = "application/problem+json", body = crate::openapi::Problem),
        (status = 409, description = "A request with this key is still in flight", content_type = "application/problem+json", body = crate::openapi::Problem, headers(("Retry-After" = String))),
        (status = 413, description = "Body over 2 MiB", content_type = "application/problem+json", body = crate::openapi::Problem),
        (status = 415, description = "Not JSON", content_type = "application/problem+json", body = crate::openapi::Problem),
        (status = 422, description = "Missing or invalid fields, a customer the CRM does not know, or the key was used for another request", content_type = "application/problem+json", body = crate::openapi::Problem),
    )
)]
/// Open a case. Behind the Idempotency-Key layer: the case, its `sea.cases.created` event
/// (outbox) and the stored response commit in one transaction; a repeat replays the response.
pub async fn create_case(
    State(app): State<AppState>,
    corr: Correlation,
    idempotent: IdempotentTx,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let (new_case, checked) = prepare_case(&app, &corr, &headers, &body).await?;
    let mut tx = idempotent.get().await?;
    write_case(&app, &mut tx, new_case, &checked, &corr).await
}

/// [`create_case`] without the Idempotency-Key layer (see [`router_without_idempotency`]).
async fn create_case_unguarded(
    State(app): State<AppState>,
    corr: Correlation,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let (new_case, checked) = prepare_case(&app, &corr, &headers, &body).await?;
    let mut tx = app.store.begin_write().await?;
    let res = write_case(&app, &mut tx, new_case, &checked, &corr).await?;
    tx.commit().await?;
    Ok(res)
}

/// Everything before the transaction: read and validate the request, check the customer.
async fn prepare_case(
    app: &AppState,
    corr: &Correlation,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(NewCase, CheckedCustomer), Problem> {
    require_json(headers)?;
    let new_case = parse_json::<CreateCaseRequest>(body)?.validate()?;
    let customer_id = CustomerId::parse(&new_case.customer_id)
        .map_err(|e| Problem::invalid(StatusCode::UNPROCESSABLE_ENTITY, &[("customer_id", e.to_string())]))?;
    // Asked before the transaction begins: a slow CRM must not hold the database's write lock.
    let checked = crm::check_customer(app.crm.as_ref(), &app.store, &customer_id, corr)
        .await
        .map_err(|e| match e {
            CrmError::NotFound(_) => Problem::invalid(
                StatusCode::UNPROCESSABLE_ENTITY,
                &[("customer_id", "no such customer in the CRM".to_owned())],
            ),
            other => Problem::internal(other.to_string()),
        })?;
    Ok((new_case, checked))
}

/// The writes of a new case in `tx` (committed by the caller): the CRM's answer, the case row
/// and its `sea.cases.created` event (outbox); the `201` response.
async fn write_case(
    app: &AppState,
    tx: &mut Tx,
    new_case: NewCase,
    checked: &CheckedCustomer,
    corr: &Correlation,
) -> Result<Response, Problem> {
    if let (CustomerCheck::Verified, Some(customer)) = (checked.check, &checked.customer) {
        crm::remember(&mut *tx, customer, &crate::consumers::now()).await?;
    }
    let case = repo::insert(&mut *tx, new_case, checked, &corr.correlation_id).await?;
    let event = Event::new(
        CASE_CREATED,
        SOURCE,
        serde_json::to_value(&case).expect("case serialises"),
    )
    .with_subject(&case.id);
    // Correlation id, this request as causation, and the request's trace context.
    let event = corr.stamp(event);
    app.outbox
        .insert_to(&mut *tx, &app.topics.topic(CASE_CREATED), &event)
        .await?;
    let location = format!("/cases/{}", case.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(case)).into_response())
}

#[utoipa::path(
    get,
    path = "/cases",
    tag = "cases",
    params(
        ("page" = Option<u64>, Query, description = "Offset mode: page number, from 1", minimum = 1, maximum = 1000000000),
        ("limit" = Option<u64>, Query, description = "Page size, 1-100, default 20", minimum = 1, maximum = 100),
        ("cursor" = Option<String>, Query, description = "Cursor mode: empty for the first page, then next_cursor; not combinable with page"),
    ),
    responses(
        (status = 200, description = "One page (offset mode, with an RFC 8288 Link header; or cursor mode)",
            body = inline(CasePageAny), headers(("Link" = String, description = "first, prev, next, last (offset mode)"))),
        (status = 400, description = "Invalid paging parameters (listed in invalid-params) or cursor", content_type = "application/problem+json", body = crate::openapi::Problem),
    )
)]
/// List cases: offset paging (`?page=&limit=`, with a `Link` header) or keyset paging
/// (`?cursor=&limit=`).
pub async fn list_cases(State(app): State<AppState>, RawQuery(query): RawQuery) -> Result<Response, Problem> {
    match ListRequest::from_query(query.as_deref())? {
        ListRequest::Offset(req) => {
            let (cases, total) = repo::list(&app.store, req.offset(), req.limit).await?;
            let page = Page::new(cases, req, total);
            let link = page.link_header("/cases");
            Ok(([(header::LINK, link)], Json(page)).into_response())
        }
        ListRequest::Cursor { cursor, limit } => {
            let after = match cursor {
                Some(c) => app.cursors.decode(&c)?,
                None => 0,
            };
            let mut rows = repo::list_after(&app.store, after, limit + 1).await?;
            let more = rows.len() as u64 > limit;
            rows.truncate(limit as usize);
            let next_cursor = if more {
                rows.last().map(|(seq, _)| app.cursors.encode(*seq))
            } else {
                None
            };
            Ok(Json(CursorPage {
                data: rows.into_iter().map(|(_, c)| c).collect(),
                next_cursor,
            })
            .into_response())
        }
    }
}

#[utoipa::path(
    get,
    path = "/cases/{id}",
    tag = "cases",
    params(("id" = String, Path, description = "The case id (a UUID)",
        pattern = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 200, description = "The case", body = Case),
        (status = 400, description = "Not a UUID", content_type = "application/problem+json", body = crate::openapi::Problem),
        (status = 404, description = "No such case", content_type = "application/problem+json", body = crate::openapi::Problem),
    )
)]
pub async fn get_case(
    State(app): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let Path(id) = id.map_err(Problem::from)?;
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(Problem::bad_request(format!("{id:?} is not a case id (a UUID)")));
    }
    match repo::get(&app.store, &id).await? {
        Some(case) => Ok(Json(case).into_response()),
        None => Err(Problem::not_found(format!("no case with id {id}"))),
    }
}

/// Either page shape of `GET /cases`.
#[derive(utoipa::ToSchema, serde::Serialize)]
#[allow(dead_code)]
#[schema(as = CaseList)]
#[serde(untagged)]
pub enum CasePageAny {
    #[schema(title = "offset")]
    Offset(crate::openapi::CasePage),
    #[schema(title = "cursor")]
    Cursor(crate::openapi::CaseCursorPage),
}
