//! The admin console: server-rendered HTML pages for operators, served under `/admin` by the api
//! role. No JavaScript and nothing from another origin (a strict `Content-Security-Policy`), so
//! it works offline and an attacker-controlled string shown on it (a dead letter's payload or
//! error) can never become markup: every interpolated value goes through [`Escaped`].
//!
//! - `GET /admin`: outbox backlog and lag, each consumer's pending / unacknowledged messages and
//!   dead letters, the circuit breakers, the dead letters with a replay form each, a correlation
//!   id lookup;
//! - `GET /admin/trace/{correlation_id}` (and `GET /admin/trace?correlation_id=`): the causal tree
//!   of one correlation id as nested lists (the data of `GET /trace`, [`crate::trace::load`]);
//! - `POST /admin/dead-letters/{id}/replay`: the replay of `seaport dlq replay ID`
//!   ([`seaport::dead_letters::replay`]), only with the admin token (form field `token`).
//!
//! Read-only unless the service was started with `--admin-token`: the token is the one thing
//! that lets a browser change anything, so it is compared in constant time, never logged, and
//! a wrong or missing one is a `403`. It also makes the replay form useless to a cross-site
//! request forgery (the forger does not know it).

use std::collections::{BTreeMap, HashSet};
use std::fmt::{self, Write as _};

use axum::Extension;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use seaport::dead_letters::{DeadLetter, ReplayError};
use seaport::http::Problem;
use seaport::on_pool;
use subtle::ConstantTimeEq;

use crate::app::AppState;
use crate::observe::CONSUMERS;
use crate::trace::Trace;

/// The policy of every console page: nothing loads but the inline style, forms post only here,
/// no framing.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Dead letters shown on the overview (newest first); the rest are counted, and listed by
/// `seaport dlq list`.
const MAX_DEAD_LETTERS_SHOWN: usize = 200;
/// Longest error text shown in the table (errors are free text and can be long).
const MAX_ERROR_CHARS: usize = 500;
/// Shorter admin tokens are refused: the token is the only guard of the replay.
pub const MIN_TOKEN_LEN: usize = 16;

/// The token that enables replay in the console. `Debug` is redacted and there is no `Display`,
/// so it cannot end up in a log line or an error message.
#[derive(Clone)]
pub struct AdminToken(Box<str>);

impl AdminToken {
    /// From the `--admin-token` value: blank means none (read-only console); shorter than
    /// [`MIN_TOKEN_LEN`] is refused. Errors name the flag, never the token.
    pub fn configure(value: Option<&str>) -> anyhow::Result<Option<AdminToken>> {
        let Some(token) = value.map(str::trim).filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        anyhow::ensure!(
            token.len() >= MIN_TOKEN_LEN,
            "--admin-token must be at least {MIN_TOKEN_LEN} characters"
        );
        anyhow::ensure!(
            !token.chars().any(char::is_control),
            "--admin-token must not contain control characters"
        );
        Ok(Some(AdminToken(token.into())))
    }

    /// Does `given` equal the token? Constant-time in the contents (a length mismatch returns
    /// early, which tells only the length).
    pub fn matches(&self, given: &str) -> bool {
        self.0.as_bytes().ct_eq(given.as_bytes()).into()
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// `s`, HTML-escaped (`& < > " '`) when displayed: safe as element content and inside a quoted
/// attribute value.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = 0;
        // The escaped characters are ASCII, so byte positions are always char boundaries.
        for (i, b) in self.0.bytes().enumerate() {
            let entity = match b {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                b'\'' => "&#x27;",
                _ => continue,
            };
            f.write_str(&self.0[last..i])?;
            f.write_str(entity)?;
            last = i + 1;
        }
        f.write_str(&self.0[last..])
    }
}

/// Short for `Escaped(s)`.
pub fn esc(s: &str) -> Escaped<'_> {
    Escaped(s)
}

/// The console's routes (the api role's router merges them). Replay is allowed only when an
/// [`AdminToken`] is in the request extensions (`app::start` adds the configured one).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin", get(overview))
        .route("/admin/trace", get(trace_query))
        .route("/admin/trace/{correlation_id}", get(trace_page))
        .route("/admin/dead-letters/{id}/replay", post(replay))
}

/// An HTML page with the console's security headers.
fn html(status: StatusCode, page: String) -> Response {
    let mut res = (status, page).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
header{background:#0b3954;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.5rem;align-items:baseline}
header a{color:#fff;text-decoration:none;font-weight:600}
main{padding:1rem 1.2rem;max-width:1400px}
h2{margin:1.4rem 0 .5rem;font-size:1.1rem}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{border:1px solid #d5d9de;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#eef1f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.error{max-width:32rem;overflow-wrap:anywhere;font-family:ui-monospace,monospace;font-size:12px}
code{font-family:ui-monospace,monospace;font-size:12px;overflow-wrap:anywhere}
.cards{display:flex;gap:1rem;flex-wrap:wrap}
.card{background:#fff;border:1px solid #d5d9de;padding:.6rem 1rem;min-width:9rem}
.card b{display:block;font-size:1.4rem}
.flash{background:#e3f6e8;border:1px solid #7cc48f;padding:.5rem 1rem}
.refused{background:#fdecea;border:1px solid #e0796b;padding:.5rem 1rem}
.note{color:#5a6470}
.state-dead{color:#b3261e;font-weight:600}
.state-replayed{color:#8a6100;font-weight:600}
.state-processed{color:#1e7b34;font-weight:600}
.breaker-open{color:#b3261e;font-weight:600}
.breaker-half_open{color:#8a6100;font-weight:600}
.breaker-closed{color:#1e7b34}
form.replay{display:flex;gap:.3rem}
form.replay input{width:9rem}
ul.tree,ul.children{list-style:none;padding-left:1.4rem;border-left:2px solid #d5d9de}
ul.tree{padding-left:.6rem}
li.event{margin:.4rem 0}
li.event>.what{background:#fff;border:1px solid #d5d9de;padding:.3rem .6rem;display:inline-block}
ul.consumers{margin:.2rem 0 .2rem 1rem;padding-left:1rem;color:#3a434d}
";

fn layout(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<meta name=\"referrer\" content=\"no-referrer\">\
<title>{title} · Seaport admin</title><style>{STYLE}</style></head>\
<body><header><a href=\"/admin\">Seaport admin</a><span>{title}</span></header><main>{body}</main></body></html>\n",
        csp = esc(CONTENT_SECURITY_POLICY),
        title = esc(title),
    )
}

/// Milliseconds since the epoch as RFC 3339 (UTC).
fn time_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Where a dead letter stands: `dead` (never replayed), `replayed` (sent back, not processed
/// yet, or failed again), `processed` (its consumer's inbox has the message now).
fn dead_letter_state(d: &DeadLetter, processed: &HashSet<i64>) -> &'static str {
    if processed.contains(&d.id) {
        "processed"
    } else if d.replays > 0 {
        "replayed"
    } else {
        "dead"
    }
}

/// The dead letters whose consumer has processed the message since (after a replay: the failed
/// attempts rolled back, so an inbox record means the copy went through).
async fn processed_dead_letters(app: &AppState) -> Result<HashSet<i64>, sqlx::Error> {
    let ids: Vec<i64> = on_pool!(&app.store, p => sqlx::query_scalar(
        "SELECT d.id FROM seaport_dead_letters d
         JOIN seaport_inbox i ON i.consumer = d.consumer AND i.message_id = d.message_id",
    )
    .fetch_all(p)
    .await)?;
    Ok(ids.into_iter().collect())
}

async fn overview(
    State(app): State<AppState>,
    token: Option<Extension<AdminToken>>,
    RawQuery(query): RawQuery,
) -> Result<Response, Problem> {
    let outbox = seaport::outbox::status(&app.store).await.map_err(Problem::internal)?;
    let dead = seaport::dead_letters::list(&app.store).await?;
    let processed = processed_dead_letters(&app).await?;
    let writable = token.is_some();
    let mut h = String::new();

    if let Some(id) = query_param(query.as_deref(), "replayed").and_then(|v| v.parse::<i64>().ok()) {
        let _ = write!(
            h,
            "<p class=\"flash\" id=\"flash\">Dead letter #{id} was sent back to its consumer.</p>"
        );
    }

    // Outbox.
    let lag = match outbox.oldest_unpublished_age_ms {
        Some(ms) => format!("{:.3} s", ms as f64 / 1000.0),
        None => "caught up".to_owned(),
    };
    let _ = write!(
        h,
        "<h2>Outbox</h2><div class=\"cards\" id=\"outbox\">\
<div class=\"card\">backlog<b id=\"outbox-backlog\">{}</b></div>\
<div class=\"card\">lag (oldest unpublished)<b id=\"outbox-lag\">{}</b></div>\
<div class=\"card\">failing<b id=\"outbox-failing\">{}</b></div></div>",
        outbox.unpublished,
        esc(&lag),
        outbox.failing
    );

    // Consumers: the service's own, plus any other name that has dead letters.
    let mut per_consumer: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for d in &dead {
        let e = per_consumer.entry(d.consumer.as_str()).or_default();
        e.0 += 1;
        if d.replays == 0 {
            e.1 += 1;
        }
    }
    let mut names: Vec<&str> = CONSUMERS.to_vec();
    names.extend(per_consumer.keys().filter(|n| !CONSUMERS.contains(n)));
    h.push_str(
        "<h2>Consumers</h2><table id=\"consumers\"><thead><tr><th>consumer</th><th>pending</th>\
<th>unacknowledged</th><th>redelivered</th><th>dead letters</th><th>not replayed</th></tr></thead><tbody>",
    );
    for name in names {
        let state = match &app.broker {
            Some(broker) => match broker.consumer_state(&app.stream, name).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(consumer = name, error = %e, "cannot read the consumer's state for the admin console");
                    None
                }
            },
            None => None,
        };
        let (pending, ack_pending, redelivered) = match state {
            Some(s) => (
                s.pending.to_string(),
                s.ack_pending.to_string(),
                s.redelivered.to_string(),
            ),
            None => ("–".to_owned(), "–".to_owned(), "–".to_owned()),
        };
        let (dead_total, dead_open) = per_consumer.get(name).copied().unwrap_or_default();
        let _ = write!(
            h,
            "<tr id=\"consumer-{n}\" class=\"consumer\"><td><code>{n}</code></td><td class=\"num pending\">{pending}</td>\
<td class=\"num ack-pending\">{ack_pending}</td><td class=\"num\">{redelivered}</td>\
<td class=\"num dead-letters\">{dead_total}</td><td class=\"num\">{dead_open}</td></tr>",
            n = esc(name)
        );
    }
    h.push_str("</tbody></table>");

    // Circuit breakers.
    h.push_str("<h2>Circuit breakers</h2>");
    let breakers: Vec<_> = app.crm.iter().map(|crm| crm.breaker()).collect();
    if breakers.is_empty() {
        h.push_str("<p class=\"note\" id=\"breakers\">No circuit breakers (no CRM configured).</p>");
    } else {
        h.push_str(
            "<table id=\"breakers\"><thead><tr><th>breaker</th><th>state</th><th>failures in a row</th>\
<th>window calls / failures</th><th>retry after</th><th>in state for</th><th>successes</th><th>failures</th>\
<th>rejected</th></tr></thead><tbody>",
        );
        for b in &breakers {
            let state = b.state.as_str();
            let retry = b
                .retry_after_ms
                .map_or_else(|| "–".to_owned(), |ms| format!("{:.1} s", ms as f64 / 1000.0));
            let _ = write!(
                h,
                "<tr class=\"breaker\" id=\"breaker-{name}\"><td><code>{name}</code></td>\
<td class=\"breaker-{state}\">{state}</td><td class=\"num\">{}</td><td class=\"num\">{} / {}</td>\
<td class=\"num\">{}</td><td class=\"num\">{:.1} s</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
<td class=\"num\">{}</td></tr>",
                b.consecutive_failures,
                b.window_calls,
                b.window_failures,
                esc(&retry),
                b.in_state_ms as f64 / 1000.0,
                b.successes,
                b.failures,
                b.rejected,
                name = esc(&b.name),
                state = esc(state),
            );
        }
        h.push_str("</tbody></table>");
    }

    // Dead letters, newest first.
    let _ = write!(h, "<h2>Dead letters ({})</h2>", dead.len());
    if !writable {
        h.push_str(
            "<p class=\"note\" id=\"read-only\">Read-only console: replay is disabled \
(start the service with <code>--admin-token</code> or <code>SEAPORT_ADMIN_TOKEN</code> to enable it).</p>",
        );
    }
    if dead.is_empty() {
        h.push_str("<p class=\"note\" id=\"no-dead-letters\">No dead letters.</p>");
    } else {
        if dead.len() > MAX_DEAD_LETTERS_SHOWN {
            let _ = write!(
                h,
                "<p class=\"note\">Showing the newest {MAX_DEAD_LETTERS_SHOWN}; <code>seaport dlq list</code> lists all.</p>"
            );
        }
        h.push_str(
            "<table id=\"dead-letters\"><thead><tr><th>id</th><th>consumer</th><th>subject</th><th>message id</th>\
<th>last error</th><th>deliveries</th><th>failed at</th><th>state</th><th>replay</th></tr></thead><tbody>",
        );
        for d in dead.iter().rev().take(MAX_DEAD_LETTERS_SHOWN) {
            let state = dead_letter_state(d, &processed);
            let state_text = match (state, d.replays) {
                ("dead", _) => "dead".to_owned(),
                (s, n) => format!("{s} (replays: {n})"),
            };
            let error: String = d.last_error.chars().take(MAX_ERROR_CHARS).collect();
            let ellipsis = if d.last_error.chars().count() > MAX_ERROR_CHARS {
                "…"
            } else {
                ""
            };
            let disabled = if writable { "" } else { " disabled" };
            let _ = write!(
                h,
                "<tr id=\"dead-letter-{id}\" class=\"dead-letter\" data-state=\"{state}\" data-replays=\"{replays}\">\
<td class=\"num\">{id}</td><td class=\"consumer\"><code>{consumer}</code></td><td><code>{subject}</code></td>\
<td class=\"message-id\"><code>{message_id}</code></td><td class=\"error\">{error}{ellipsis}</td>\
<td class=\"num deliveries\">{deliveries}</td><td>{failed_at}</td>\
<td class=\"state state-{state}\">{state_text}</td>\
<td><form class=\"replay\" method=\"post\" action=\"/admin/dead-letters/{id}/replay\">\
<input type=\"password\" name=\"token\" placeholder=\"admin token\" autocomplete=\"off\" aria-label=\"admin token\"{disabled}>\
<button type=\"submit\" class=\"replay\"{disabled}>Replay</button></form></td></tr>",
                id = d.id,
                replays = d.replays,
                consumer = esc(&d.consumer),
                subject = esc(&d.subject),
                message_id = esc(&d.message_id),
                error = esc(&error),
                deliveries = d.delivery_count,
                failed_at = esc(&time_ms(d.failed_at)),
                state_text = esc(&state_text),
            );
        }
        h.push_str("</tbody></table>");
    }

    // Trace lookup.
    h.push_str(
        "<h2>Trace</h2><form id=\"trace-lookup\" method=\"get\" action=\"/admin/trace\">\
<input name=\"correlation_id\" placeholder=\"correlation id\" size=\"48\" required maxlength=\"128\" aria-label=\"correlation id\"> \
<button type=\"submit\">Show the causal tree</button></form>",
    );
    Ok(html(StatusCode::OK, layout("Overview", &h)))
}

async fn trace_query(State(app): State<AppState>, RawQuery(query): RawQuery) -> Result<Response, Problem> {
    let id = query_param(query.as_deref(), "correlation_id").unwrap_or_default();
    render_trace(&app, id.trim()).await
}

async fn trace_page(
    State(app): State<AppState>,
    correlation_id: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let Path(id) = correlation_id.map_err(Problem::from)?;
    render_trace(&app, &id).await
}

async fn render_trace(app: &AppState, correlation_id: &str) -> Result<Response, Problem> {
    if !seaport::http::correlation::valid_id(correlation_id) {
        let body = format!(
            "<p class=\"refused\" id=\"invalid\">{} is not a valid correlation id (1–128 of \
<code>A-Z a-z 0-9 - _ . : @ / + =</code>).</p><p><a href=\"/admin\">Back to the overview</a></p>",
            esc(&format!("{correlation_id:?}"))
        );
        return Ok(html(StatusCode::BAD_REQUEST, layout("Trace", &body)));
    }
    let trace = crate::trace::load(&app.store, correlation_id).await?;
    let status = if trace.events.is_empty() {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    };
    Ok(html(
        status,
        layout(&format!("Trace {correlation_id}"), &trace_html(&trace)),
    ))
}

/// The causal tree as nested lists: each event's consequences in a list inside its item.
fn trace_html(trace: &Trace) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<h2>Causal tree of <code id=\"correlation-id\">{}</code></h2>",
        esc(&trace.correlation_id)
    );
    if trace.events.is_empty() {
        h.push_str("<p class=\"note\" id=\"no-events\">No events recorded for this correlation id (yet).</p>");
        return h;
    }
    h.push_str("<ul class=\"tree\" id=\"trace\">");
    let mut prev: Option<usize> = None;
    for e in &trace.events {
        // `causal_order` never jumps more than one level down; clamp anyway so the markup nests.
        let depth = e.depth.min(prev.map_or(0, |p| p + 1));
        match prev {
            Some(p) if depth > p => h.push_str("<ul class=\"children\">"),
            Some(p) => {
                h.push_str("</li>");
                for _ in depth..p {
                    h.push_str("</ul></li>");
                }
            }
            None => {}
        }
        let _ = write!(
            h,
            "<li class=\"event\" id=\"event-{id}\" data-type=\"{ty}\" data-depth=\"{depth}\"><div class=\"what\">\
<b class=\"type\">{ty}</b> <code class=\"id\">{id}</code><br><span class=\"note\">time {time} · source <code>{source}</code> \
· subject <code>{subject}</code> · caused by <code>{cause}</code></span>",
            id = esc(&e.id),
            ty = esc(&e.ty),
            time = esc(e.time.as_deref().unwrap_or("–")),
            source = esc(&e.source),
            subject = esc(e.subject.as_deref().unwrap_or("–")),
            cause = esc(e.causation_id.as_deref().unwrap_or("–")),
        );
        if e.consumers.is_empty() {
            h.push_str("<ul class=\"consumers\"><li class=\"note\">not processed by any consumer yet</li></ul>");
        } else {
            h.push_str("<ul class=\"consumers\">");
            for c in &e.consumers {
                let effects = if c.effects.is_empty() {
                    "no effect".to_owned()
                } else {
                    c.effects.join("; ")
                };
                let _ = write!(
                    h,
                    "<li class=\"processed-by\" data-consumer=\"{consumer}\"><code>{consumer}</code> at {at}: {effects}</li>",
                    consumer = esc(&c.consumer),
                    at = esc(&c.processed_at),
                    effects = esc(&effects),
                );
            }
            h.push_str("</ul>");
        }
        h.push_str("</div>");
        prev = Some(depth);
    }
    if let Some(p) = prev {
        h.push_str("</li>");
        for _ in 0..p {
            h.push_str("</ul></li>");
        }
    }
    h.push_str("</ul><p><a href=\"/admin\">Back to the overview</a></p>");
    h
}

/// Does the client want a page (a browser) rather than problem+json (a script)?
fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

/// An error of the replay route: a page for browsers, RFC 9457 problem+json otherwise.
fn replay_error(headers: &HeaderMap, status: StatusCode, id: &str, detail: &str) -> Response {
    if wants_html(headers) {
        let body = format!(
            "<p class=\"refused\" id=\"refused\" data-status=\"{}\">{}</p><p><a href=\"/admin#dead-letter-{}\">Back to the overview</a></p>",
            status.as_u16(),
            esc(detail),
            esc(id)
        );
        html(status, layout("Replay refused", &body))
    } else {
        Problem::new(status, detail).into_response()
    }
}

async fn replay(
    State(app): State<AppState>,
    token: Option<Extension<AdminToken>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let raw_id = id.map(|Path(id)| id).unwrap_or_default();
    let Some(Extension(token)) = token else {
        return replay_error(
            &headers,
            StatusCode::FORBIDDEN,
            &raw_id,
            "Replay is disabled: this console is read-only (no admin token is configured).",
        );
    };
    let given = body
        .ok()
        .and_then(|b| {
            form_urlencoded::parse(&b)
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
        })
        .unwrap_or_default();
    if !token.matches(&given) {
        tracing::warn!(dead_letter = %raw_id, "admin console: replay refused (wrong or missing admin token)");
        return replay_error(
            &headers,
            StatusCode::FORBIDDEN,
            &raw_id,
            "Replay refused: wrong or missing admin token.",
        );
    }
    let Ok(id) = raw_id.parse::<i64>() else {
        return replay_error(&headers, StatusCode::BAD_REQUEST, &raw_id, "not a dead letter id");
    };
    let Some(broker) = &app.broker else {
        return replay_error(
            &headers,
            StatusCode::SERVICE_UNAVAILABLE,
            &raw_id,
            "this process has no broker to replay through",
        );
    };
    match seaport::dead_letters::replay(&app.store, broker.as_ref(), id).await {
        Ok(()) => {
            tracing::info!(dead_letter = id, "admin console: dead letter replayed");
            let mut res = html(StatusCode::SEE_OTHER, String::new());
            let location = format!("/admin?replayed={id}#dead-letter-{id}");
            if let Ok(v) = HeaderValue::from_str(&location) {
                res.headers_mut().insert(header::LOCATION, v);
            }
            res
        }
        Err(ReplayError::NotFound(_)) => replay_error(
            &headers,
            StatusCode::NOT_FOUND,
            &raw_id,
            &format!("no dead letter #{id}"),
        ),
        Err(ReplayError::Broker(e)) => {
            tracing::error!(dead_letter = id, error = %e, "admin console: the broker refused a replay");
            replay_error(
                &headers,
                StatusCode::BAD_GATEWAY,
                &raw_id,
                "the broker refused the replay; it was logged",
            )
        }
        Err(ReplayError::Storage(e)) => Problem::from(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_neutralises_markup_and_quotes() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'y'"#).to_string(),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;y&#x27;"
        );
        assert_eq!(esc("plain text, ünïcode ✓").to_string(), "plain text, ünïcode ✓");
        assert_eq!(esc("").to_string(), "");
        assert_eq!(
            esc("&amp;").to_string(),
            "&amp;amp;",
            "escaping is not idempotent: escape once"
        );
        assert_eq!(esc("a\"b'c<d>e&").to_string(), "a&quot;b&#x27;c&lt;d&gt;e&amp;");
    }

    #[test]
    fn the_token_is_redacted_and_checked_whole() {
        let token = AdminToken::configure(Some("  correct-horse-battery-staple "))
            .unwrap()
            .unwrap();
        assert!(token.matches("correct-horse-battery-staple"));
        assert!(!token.matches("correct-horse-battery-stapl"));
        assert!(!token.matches("correct-horse-battery-staplf"));
        assert!(!token.matches(""));
        assert_eq!(format!("{token:?}"), "AdminToken(<redacted>)");
        assert!(AdminToken::configure(Some("   ")).unwrap().is_none());
        assert!(AdminToken::configure(None).unwrap().is_none());
        let short = AdminToken::configure(Some("short")).unwrap_err().to_string();
        assert!(short.contains("--admin-token") && !short.contains("short"), "{short}");
    }

    #[test]
    fn the_trace_nests_consequences_inside_their_cause() {
        use crate::trace::TracedEvent;
        let ev = |id: &str, depth| TracedEvent {
            id: id.into(),
            ty: "t".into(),
            source: "/s".into(),
            subject: None,
            time: None,
            causation_id: None,
            depth,
            consumers: vec![],
        };
        let trace = Trace {
            correlation_id: "c".into(),
            events: vec![ev("a", 0), ev("b", 1), ev("c", 2), ev("d", 1), ev("e", 0)],
        };
        let mut h = trace_html(&trace);
        // Drop each event's (flat) list of consumers; what is left is the tree's skeleton.
        while let Some(start) = h.find("<ul class=\"consumers\">") {
            let end = start + h[start..].find("</ul>").expect("closed") + "</ul>".len();
            h.replace_range(start..end, "");
        }
        let tokens = [
            ("<ul class=\"tree\"", "T"),
            ("<ul class=\"children\"", "("),
            ("</ul>", ")"),
            ("<li class=\"event\"", "E"),
            ("</li>", "."),
        ];
        let shape: String = h
            .match_indices('<')
            .filter_map(|(i, _)| tokens.iter().find(|(p, _)| h[i..].starts_with(p)).map(|(_, t)| *t))
            .collect();
        // a(b(c) d) e
        assert_eq!(shape, "TE(E(E.).E.).E.)", "{h}");
    }
}
