//! `GET /trace/{correlation_id}`: the causal tree of everything one request caused: the events
//! (from the audit log), which consumers processed each (their inboxes) and what they did.

use std::collections::{BTreeMap, HashSet};

use axum::Json;
use axum::extract::{Path, State};
use seaport::http::Problem;
use seaport::on_pool;
use seaport::store::Db;
use serde::Serialize;

use crate::app::AppState;

#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Trace {
    pub correlation_id: String,
    /// Events in causal order (depth-first from the roots, siblings in log order).
    pub events: Vec<TracedEvent>,
}

#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct TracedEvent {
    pub id: String,
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub ty: String,
    pub source: String,
    pub subject: Option<String>,
    pub time: Option<String>,
    /// The request or event that caused this one.
    pub causation_id: Option<String>,
    /// 0 for events caused directly by the request, 1 for their consequences, ...
    pub depth: usize,
    pub consumers: Vec<SeenBy>,
}

#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct SeenBy {
    pub consumer: String,
    pub processed_at: String,
    pub effects: Vec<String>,
}

type EventRow = (String, String, String, Option<String>, Option<String>, Option<String>);

pub async fn load(db: &Db, correlation_id: &str) -> Result<Trace, sqlx::Error> {
    let (rows, inbox, effects) = on_pool!(db, p => {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT event_id, event_type, source, subject, event_time, causation_id FROM audit_log
             WHERE correlation_id = $1 ORDER BY seq",
        )
        .bind(correlation_id)
        .fetch_all(p)
        .await?;
        let inbox: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT consumer, message_id, processed_at FROM seaport_inbox WHERE correlation_id = $1
             ORDER BY processed_at, consumer",
        )
        .bind(correlation_id)
        .fetch_all(p)
        .await?;
        let effects: Vec<(String, String, String)> =
            sqlx::query_as("SELECT consumer, event_id, effect FROM consumer_effects WHERE correlation_id = $1 ORDER BY id")
                .bind(correlation_id)
                .fetch_all(p)
                .await?;
        (rows, inbox, effects)
    });
    let mut events: Vec<TracedEvent> = rows
        .into_iter()
        .map(|(id, ty, source, subject, time, causation_id)| TracedEvent {
            id,
            ty,
            source,
            subject,
            time,
            causation_id,
            depth: 0,
            consumers: Vec::new(),
        })
        .collect();
    let mut seen: BTreeMap<String, Vec<SeenBy>> = BTreeMap::new();
    for (consumer, message_id, at) in inbox {
        let processed_at = chrono::DateTime::from_timestamp_millis(at)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default();
        seen.entry(message_id).or_default().push(SeenBy {
            consumer,
            processed_at,
            effects: Vec::new(),
        });
    }
    for (consumer, event_id, effect) in effects {
        if let Some(s) = seen
            .get_mut(&event_id)
            .and_then(|v| v.iter_mut().find(|s| s.consumer == consumer))
        {
            s.effects.push(effect);
        }
    }
    for e in &mut events {
        e.consumers = seen.remove(&e.id).unwrap_or_default();
    }
    Ok(Trace {
        correlation_id: correlation_id.to_owned(),
        events: causal_order(events),
    })
}

/// Depth-first from the roots (events whose cause is not an event of this trace), children in
/// log order. Events in a cycle (impossible unless ids were forged) are appended at the end.
fn causal_order(events: Vec<TracedEvent>) -> Vec<TracedEvent> {
    let ids: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let is_root: Vec<bool> = events
        .iter()
        .map(|e| e.causation_id.as_deref().is_none_or(|c| !ids.contains(c)))
        .collect();
    let mut placed = vec![false; events.len()];
    let mut order: Vec<(usize, usize)> = Vec::new();
    let mut stack: Vec<(usize, usize)> = (0..events.len())
        .rev()
        .filter(|&i| is_root[i])
        .map(|i| (i, 0))
        .collect();
    while let Some((i, depth)) = stack.pop() {
        if placed[i] {
            continue;
        }
        placed[i] = true;
        order.push((i, depth));
        for (j, e) in events.iter().enumerate().rev() {
            if !placed[j] && e.causation_id.as_deref() == Some(events[i].id.as_str()) {
                stack.push((j, depth + 1));
            }
        }
    }
    order.extend((0..events.len()).filter(|&i| !placed[i]).map(|i| (i, 0)));
    let mut slots: Vec<Option<TracedEvent>> = events.into_iter().map(Some).collect();
    order
        .into_iter()
        .map(|(i, depth)| {
            let mut e = slots[i].take().expect("each event placed once");
            e.depth = depth;
            e
        })
        .collect()
}

#[utoipa::path(
    get,
    path = "/trace/{correlation_id}",
    tag = "trace",
    params(("correlation_id" = String, Path, description = "1-128 of A-Z a-z 0-9 - _ . : @ / + =", pattern = r"^[A-Za-z0-9._:@/+=-]{1,128}$")),
    responses(
        (status = 200, description = "Events and effects in causal order", body = Trace),
        (status = 400, description = "Not a valid correlation id", content_type = "application/problem+json", body = crate::openapi::Problem),
        (status = 404, description = "Nothing recorded for this correlation id", content_type = "application/problem+json", body = crate::openapi::Problem),
    )
)]
pub async fn route(
    State(app): State<AppState>,
    correlation_id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Trace>, Problem> {
    let Path(correlation_id) = correlation_id.map_err(Problem::from)?;
    if !seaport::http::correlation::valid_id(&correlation_id) {
        return Err(Problem::bad_request("not a valid correlation id"));
    }
    let trace = load(&app.store, &correlation_id).await?;
    if trace.events.is_empty() {
        return Err(Problem::not_found(format!(
            "no events recorded for correlation id {correlation_id} (yet)"
        )));
    }
    Ok(Json(trace))
}
