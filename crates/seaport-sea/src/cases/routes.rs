//! `POST /cases`, `GET /cases`, `GET /cases/{id}`.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, StatusCode, header};
use seaport::Event;
use seaport::http::idempotency::{self, IdempotencyKey, Lookup, StoredResponse};
use seaport::http::pagination::{Page, PageRequest};
use seaport::http::problem::parse_json;
use seaport::http::{Correlation, Problem};

use super::domain::CreateCaseRequest;
use super::{CASE_CREATED, SOURCE, repo};
use crate::app::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/cases", get(list_cases).post(create_case))
        .route("/cases/{id}", get(get_case))
}

/// The caller an idempotency key belongs to: `X-Client-Id` if given and well-formed. Until
/// authentication exists this is the only notion of a caller; keys of different clients never
/// meet.
fn caller_scope(headers: &HeaderMap) -> String {
    headers
        .get("x-client-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| seaport::http::correlation::valid_id(v))
        .map(|v| format!("client:{v}"))
        .unwrap_or_else(|| "anonymous".to_owned())
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

/// Open a case. One transaction writes the case, its `sea.cases.created` event (outbox) and the
/// stored response for the idempotency key; a repeat with the same key replays that response.
async fn create_case(
    State(app): State<AppState>,
    corr: Correlation,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let key = IdempotencyKey::required(&headers)?;
    let body = body.map_err(|r| Problem::new(r.status(), r.body_text()))?;
    require_json(&headers)?;
    let new_case = parse_json::<CreateCaseRequest>(&body)?.validate()?;
    let scope = caller_scope(&headers);
    let fingerprint = idempotency::fingerprint("POST", "/cases", &body);

    let mut tx = app.store.begin_write().await?;
    match idempotency::begin(&mut tx, &scope, &key, &fingerprint, app.idempotency_retention).await? {
        Lookup::Replay(stored) => return Ok(stored.replay()),
        Lookup::Mismatch => {
            return Err(
                Problem::unprocessable("this idempotency key was already used for a different request")
                    .with_type("/problems/idempotency-key-reused", "Idempotency key reused"),
            );
        }
        Lookup::New => {}
    }
    let case = repo::insert(&mut tx, new_case, &corr.correlation_id).await?;
    let event = Event::new(
        CASE_CREATED,
        SOURCE,
        serde_json::to_value(&case).expect("case serialises"),
    )
    .with_subject(&case.id)
    .correlated(&corr.correlation_id, Some(corr.request_id.clone()));
    app.outbox
        .insert_to(&mut tx, &app.topics.topic(CASE_CREATED), &event)
        .await?;
    let stored = StoredResponse {
        status: StatusCode::CREATED.as_u16(),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("location".into(), format!("/cases/{}", case.id)),
        ],
        body: serde_json::to_vec(&case).expect("case serialises"),
    };
    idempotency::complete(&mut tx, &scope, &key, &stored).await?;
    tx.commit().await?;
    let mut res = stored.replay();
    res.headers_mut().remove(idempotency::IDEMPOTENT_REPLAYED);
    Ok(res)
}

async fn list_cases(State(app): State<AppState>, RawQuery(query): RawQuery) -> Result<Response, Problem> {
    let req = PageRequest::from_query(query.as_deref())?;
    let (cases, total) = repo::list(&app.store, req.offset(), req.limit).await?;
    Ok(Json(Page::new(cases, req, total)).into_response())
}

async fn get_case(State(app): State<AppState>, Path(id): Path<String>) -> Result<Response, Problem> {
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(Problem::bad_request(format!("{id:?} is not a case id (a UUID)")));
    }
    match repo::get(&app.store, &id).await? {
        Some(case) => Ok(Json(case).into_response()),
        None => Err(Problem::not_found(format!("no case with id {id}"))),
    }
}
