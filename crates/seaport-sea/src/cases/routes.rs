//! `POST /cases`, `GET /cases`, `GET /cases/{id}`.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, StatusCode, header};
use seaport::Event;
use seaport::http::pagination::{CursorPage, ListRequest, Page};
use seaport::http::problem::parse_json;
use seaport::http::{Correlation, Problem};
use seaport::http::{IdempotencyLayer, IdempotentTx};

use super::domain::CreateCaseRequest;
use super::{CASE_CREATED, SOURCE, repo};
use crate::app::AppState;

pub fn router(app: &AppState) -> Router<AppState> {
    // Only POST is idempotency-protected; keys are scoped by `X-Client-Id` (no authentication yet).
    let idempotency = IdempotencyLayer::new(app.store.clone()).retention(app.idempotency_retention);
    Router::new()
        .route("/cases", get(list_cases).merge(post(create_case).layer(idempotency)))
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

/// Open a case. Behind the Idempotency-Key layer: the case, its `sea.cases.created` event
/// (outbox) and the stored response commit in one transaction; a repeat replays the response.
async fn create_case(
    State(app): State<AppState>,
    corr: Correlation,
    idempotent: IdempotentTx,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    require_json(&headers)?;
    let new_case = parse_json::<CreateCaseRequest>(&body)?.validate()?;
    let mut tx = idempotent.get().await?;
    let case = repo::insert(&mut *tx, new_case, &corr.correlation_id).await?;
    let event = Event::new(
        CASE_CREATED,
        SOURCE,
        serde_json::to_value(&case).expect("case serialises"),
    )
    .with_subject(&case.id)
    .correlated(&corr.correlation_id, Some(corr.request_id.clone()));
    app.outbox
        .insert_to(&mut *tx, &app.topics.topic(CASE_CREATED), &event)
        .await?;
    let location = format!("/cases/{}", case.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(case)).into_response())
}

/// List cases: offset paging (`?page=&limit=`, with a `Link` header) or keyset paging
/// (`?cursor=&limit=`).
async fn list_cases(State(app): State<AppState>, RawQuery(query): RawQuery) -> Result<Response, Problem> {
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

async fn get_case(State(app): State<AppState>, Path(id): Path<String>) -> Result<Response, Problem> {
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(Problem::bad_request(format!("{id:?} is not a case id (a UUID)")));
    }
    match repo::get(&app.store, &id).await? {
        Some(case) => Ok(Json(case).into_response()),
        None => Err(Problem::not_found(format!("no case with id {id}"))),
    }
}
