//! The operator's API: why a client was refused, lifting it everywhere,
//! allow entries, the audit log and the decision export. Every route takes
//! the operator token (`Authorization: Bearer`; without one configured,
//! this machine only — see `access`); a refusal is counted in
//! `abuse_scorer_errors_total{kind}`. Who made a change is the
//! `x-abuse-operator` header (or an allow entry's `author`), bounded;
//! why, the `note`. Neither the token nor a raw credential an operator
//! searches by is logged or kept (credentials are hashed on arrival).
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/decisions?client=&id=&session=&api_key=&username=&limit=` | records, newest first (+ the client's current state with `client=`) |
//! | `GET /v1/decisions/{id}` | one record |
//! | `DELETE /v1/decisions?client=ADDR[&quiet_s=N][&reason=a,b][&note=]` | lift the client everywhere |
//! | `GET /v1/decisions/stream[?since_ms=N]` | JSON lines: records after N, then live |
//! | `GET /v1/allow`, `POST /v1/allow`, `DELETE /v1/allow/{id}[?note=]` | allow entries |
//! | `GET /v1/audit[?limit=N][&at=MS]` | the changes, or the allow list as it stood at `at` |

use crate::access::Peer;
use crate::allow::{self, check_text, AllowRecord, NewAllow, MAX_ALLOW_ENTRIES};
use crate::app::{ApiError, App};
use crate::audit::{allows_at, AuditRecord, Change};
use crate::clock::now_ms;
use crate::decisions::{address_of, valid_id, Key, Record, RecordView, DEFAULT_LIMIT, MAX_LIMIT};
use crate::ops_store::AddError;
use abuse_engine::wire::{FleetLift, MAX_DECISION_REASONS};
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Longest quiet period an unblock may ask for.
pub const MAX_QUIET_S: u64 = 24 * 60 * 60;
/// Labels lifted per unblock, at most (the address, its pool, its agents).
pub const MAX_LIFT_LABELS: usize = 64;
/// Addresses an allow entry lifts at once, at most.
const MAX_ALLOW_LIFTS: usize = 64;
/// Largest `POST /v1/allow` body.
const MAX_ALLOW_BODY: usize = 4096;
/// Export streams open at once, at most (each holds a connection).
pub const MAX_STREAMS: usize = 8;
/// Records an export stream replays before it goes live.
const REPLAY_MAX: usize = 1_000;
pub const OPERATOR_HEADER: &str = "x-abuse-operator";
/// Audit records a client's state looks through for its latest lift (the
/// dashboard asks every 2 s: not the whole log).
const STATE_AUDIT: usize = 1_000;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/decisions", get(list_decisions).delete(unblock))
        .route("/v1/decisions/stream", get(stream))
        .route("/v1/decisions/{id}", get(one_decision))
        .route("/v1/allow", get(list_allow).post(add_allow))
        .route("/v1/allow/{id}", delete(remove_allow))
        .route("/v1/audit", get(audit))
}

/// Who is asking: the `x-abuse-operator` header, bounded, else "operator".
fn author(headers: &HeaderMap) -> Result<String, ApiError> {
    let given = headers
        .get(OPERATOR_HEADER)
        .map(|v| v.to_str().map_err(|_| ApiError::bad_request(format!("{OPERATOR_HEADER} must be text"))))
        .transpose()?
        .unwrap_or("");
    let a = check_text(given, allow::MAX_AUTHOR, OPERATOR_HEADER).map_err(ApiError::bad_request)?;
    Ok(if a.is_empty() { "operator".into() } else { a })
}

/// Who made a change, from where, and why (for the audit log).
pub struct Actor {
    pub author: String,
    pub peer: String,
    pub note: String,
}

fn peer_text(peer: Peer) -> String {
    peer.0.map_or_else(|| "unknown".into(), |a| a.ip().to_string())
}

/// A client as an operator names it: an address, or a label
/// (`addr#tag`, `addr#pool`); the address must parse.
fn check_client(c: &str) -> Result<String, ApiError> {
    let c = c.trim();
    let bad = || ApiError::bad_request("`client` must be an IP address, or an address and '#tag' / '#pool'".into());
    if c.is_empty() || c.len() > 128 || c.chars().any(|ch| ch.is_control() || ch == ' ') {
        return Err(bad());
    }
    let address: IpAddr = address_of(c).parse().map_err(|_| bad())?;
    Ok(match c.split_once('#') {
        Some((_, tag)) if tag == "pool" || (tag.len() == 8 && tag.bytes().all(|b| b.is_ascii_hexdigit())) => {
            format!("{address}#{}", tag.to_ascii_lowercase())
        }
        Some(_) => return Err(bad()),
        None => address.to_string(),
    })
}

fn limit(l: Option<usize>) -> Result<usize, ApiError> {
    match l {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::bad_request(format!("`limit` must be 1-{MAX_LIMIT}"))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionsQuery {
    client: Option<String>,
    id: Option<String>,
    session: Option<String>,
    api_key: Option<String>,
    username: Option<String>,
    limit: Option<usize>,
}

/// A client's state now, as this scorer knows it.
#[derive(Debug, Serialize)]
struct ClientState {
    client: String,
    /// In the penalty box until (the latest decision's, unless lifted since); 0: not boxed.
    penalty_until_ms: u64,
    /// The risk of its latest decision.
    risk: Option<f32>,
    /// Blocked fleet-wide (a scorer's block) until; 0: not.
    fleet_block_until_ms: u64,
    /// When an operator last lifted it, and the quiet period's end.
    lifted_at_ms: Option<u64>,
    quiet_until_ms: u64,
    /// Allow entries in force that cover it.
    allowed_by: Vec<String>,
}

#[derive(Debug, Serialize)]
struct DecisionsAnswer {
    decisions: Vec<RecordView>,
    state: Option<ClientState>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UnblockQuery {
    client: String,
    #[serde(default)]
    quiet_s: u64,
    /// Comma-separated reasons the quiet period holds off (empty: any).
    #[serde(default)]
    reason: String,
    #[serde(default)]
    note: String,
}

#[derive(Debug, Serialize)]
pub struct Unblocked {
    pub lifted: Vec<String>,
    pub quiet_until_ms: u64,
    /// The verdict cursor of the last lift: every Envoy that polled past it has it.
    pub cursor: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoteQuery {
    #[serde(default)]
    note: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<usize>,
    at: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    #[serde(default)]
    since_ms: u64,
}

fn query<Q>(q: Result<Query<Q>, QueryRejection>) -> Result<Q, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))
}

impl App {
    /// Records by `key`, from Redis when configured (memory if it fails).
    async fn find(&self, key: &Key, limit: usize, now: u64) -> Vec<Record> {
        match self.decisions.find_redis(key, limit, now).await {
            Some(r) => self
                .fleet
                .redis_result("find_decisions", r, now)
                .unwrap_or_else(|| self.decisions.find_local(key, limit, now)),
            None => self.decisions.find_local(key, limit, now),
        }
    }

    async fn get_decision(&self, id: &str, now: u64) -> Option<Record> {
        match self.decisions.get_redis(id).await {
            Some(r) => match self.fleet.redis_result("get_decision", r, now) {
                Some(found) => found,
                None => self.decisions.get_local(id),
            },
            None => self.decisions.get_local(id),
        }
    }

    async fn client_state(&self, client: &str, records: &[Record], now: u64) -> ClientState {
        let address = address_of(client);
        let (log, _) = self.ops.audit_newest(&self.fleet, STATE_AUDIT, now).await;
        let lift = log.iter().find_map(|r| match &r.change {
            Change::Unblock { labels, quiet_until_ms, .. }
                if labels.iter().any(|l| l == client || l == address) =>
            {
                Some((r.at_ms, *quiet_until_ms))
            }
            _ => None,
        });
        let lifted_at = lift.map(|(at, _)| at);
        let penalty_until_ms = records
            .iter()
            .filter(|r| r.received_ms > lifted_at.unwrap_or(0))
            .map(|r| r.decision.until_ms)
            .max()
            .filter(|u| *u > now)
            .unwrap_or(0);
        let fleet_block_until_ms = self.fleet.blocked(client, now).await.map_or(0, |v| v.until_ms);
        let agent = client.split_once('#').map(|(_, t)| t);
        let keys: BTreeSet<&str> = records
            .iter()
            .filter(|r| r.decision.credential.as_deref() == Some("key"))
            .filter_map(|r| r.decision.session.as_deref())
            .collect();
        let allowed_by = self
            .ops
            .allows(&self.fleet, now)
            .await
            .into_iter()
            .filter(|e| e.covers(address, agent, None) || keys.iter().any(|k| e.covers(address, agent, Some(k))))
            .map(|e| e.id)
            .collect();
        ClientState {
            client: client.to_string(),
            penalty_until_ms,
            risk: records.first().map(|r| r.decision.risk),
            fleet_block_until_ms,
            lifted_at_ms: lifted_at,
            quiet_until_ms: lift.map_or(0, |(_, q)| q),
            allowed_by,
        }
    }

    async fn decisions_answer(&self, q: DecisionsQuery) -> Result<DecisionsAnswer, ApiError> {
        let now = now_ms();
        let limit = limit(q.limit)?;
        let given = [&q.client, &q.id, &q.session, &q.api_key, &q.username].iter().filter(|v| v.is_some()).count();
        if given > 1 {
            return Err(ApiError::bad_request(
                "give one of `client`, `id`, `session`, `api_key`, `username`".into(),
            ));
        }
        if let Some(id) = &q.id {
            if !valid_id(id) {
                return Err(ApiError::bad_request("`id` must be 1-64 of [A-Za-z0-9._:-]".into()));
            }
            let decisions = self.get_decision(id, now).await.into_iter().map(RecordView::from).collect();
            return Ok(DecisionsAnswer { decisions, state: None });
        }
        let key = if let Some(c) = &q.client {
            let c = check_client(c)?;
            if c.contains('#') {
                Key::Label(c)
            } else {
                Key::Address(c)
            }
        } else if let Some(s) = &q.session {
            // A raw value may be a cookie, a bearer token or a subject: the
            // filters hash each with its own prefix, so look under all three.
            let mut hashes = BTreeSet::new();
            for prefix in ["cookie", "bearer", "sub"] {
                hashes.insert(self.names.credential(prefix, s).map_err(ApiError::bad_request)?);
            }
            let mut found = Vec::new();
            for h in hashes {
                found.extend(self.find(&Key::Session(h), limit, now).await);
            }
            found.sort_by(|a, b| b.received_ms.cmp(&a.received_ms).then(b.decision.time_ms.cmp(&a.decision.time_ms)));
            found.truncate(limit);
            return Ok(DecisionsAnswer { decisions: found.into_iter().map(RecordView::from).collect(), state: None });
        } else if let Some(k) = &q.api_key {
            Key::Session(self.names.credential("key", k).map_err(ApiError::bad_request)?)
        } else if let Some(u) = &q.username {
            Key::Username(self.names.username(u).map_err(ApiError::bad_request)?)
        } else {
            Key::Recent
        };
        let decisions = self.find(&key, limit, now).await;
        let state = match &key {
            Key::Address(c) | Key::Label(c) => Some(self.client_state(c, &decisions, now).await),
            _ => None,
        };
        Ok(DecisionsAnswer { decisions: decisions.into_iter().map(RecordView::from).collect(), state })
    }

    /// Lifts `client` everywhere: the address itself, its pool, and every
    /// label the scorer has seen at it (decisions, fleet blocks); their
    /// fleet blocks are forgotten so that no poll boxes them again.
    pub async fn unblock(
        &self,
        client: &str,
        quiet_s: u64,
        reasons: Vec<String>,
        who: &Actor,
        now: u64,
    ) -> Unblocked {
        let mut labels = BTreeSet::new();
        if client.contains('#') {
            labels.insert(client.to_string());
        } else {
            labels.insert(client.to_string());
            labels.insert(format!("{client}#pool"));
            for r in self.find(&Key::Address(client.to_string()), MAX_LIMIT, now).await {
                labels.insert(r.decision.client);
            }
            for v in self.fleet.verdicts_since(0, now).await.verdicts {
                if address_of(&v.client) == client {
                    labels.insert(v.client);
                }
            }
        }
        let labels: Vec<String> = labels.into_iter().take(MAX_LIFT_LABELS).collect();
        let quiet_until_ms = if quiet_s > 0 { now.saturating_add(quiet_s.saturating_mul(1000)) } else { 0 };
        self.fleet.forget(&labels, now).await;
        let mut cursor = 0;
        for l in &labels {
            let lift = FleetLift { client: l.clone(), reasons: reasons.clone(), quiet_until_ms };
            cursor = self.fleet.record_lift(&lift, now).await;
        }
        let period = crate::quiet::QuietPeriod { until_ms: quiet_until_ms, reasons: reasons.clone() };
        self.quiet.set(&self.fleet, &labels, &period, now).await;
        let record = AuditRecord {
            at_ms: now,
            author: who.author.clone(),
            peer: who.peer.clone(),
            target: client.to_string(),
            note: who.note.clone(),
            change: Change::Unblock { labels: labels.clone(), quiet_until_ms, reasons },
        };
        self.ops.audit(&self.fleet, &record, now).await;
        self.metrics.operator_changes.with_label_values(&["unblock"]).inc();
        tracing::info!(client = %self.log_key(client), labels = labels.len(), quiet_s, "operator unblock");
        Unblocked { lifted: labels, quiet_until_ms, cursor }
    }

    /// What an allow entry clears: the clients of recent decisions it covers.
    async fn lift_allowed(&self, entry: &AllowRecord, peer: &str, now: u64) -> Vec<String> {
        let mut addresses = BTreeSet::new();
        if entry.kind == "cidr" && entry.value.parse::<IpAddr>().is_ok() {
            addresses.insert(entry.value.clone());
        }
        for r in self.find(&Key::Recent, MAX_LIMIT, now).await {
            let d = &r.decision;
            let key = (d.credential.as_deref() == Some("key")).then_some(d.session.as_deref()).flatten();
            if entry.covers(&d.address, d.agent.as_deref(), key) {
                addresses.insert(if entry.kind == "cidr" { d.address.clone() } else { d.client.clone() });
            }
        }
        let mut lifted = Vec::new();
        let who = Actor { author: entry.author.clone(), peer: peer.to_string(), note: format!("allow entry {}", entry.id) };
        for a in addresses.into_iter().take(MAX_ALLOW_LIFTS) {
            lifted.extend(self.unblock(&a, 0, Vec::new(), &who, now).await.lifted);
        }
        lifted
    }
}

async fn list_decisions(
    State(app): State<Arc<App>>,
    peer: Peer,
    headers: HeaderMap,
    q: Result<Query<DecisionsQuery>, QueryRejection>,
) -> Response {
    let result = async {
        app.operator_access(&headers, peer)?;
        app.decisions_answer(query(q)?).await
    }
    .await;
    match result {
        Ok(a) => Json(a).into_response(),
        Err(e) => app.refuse(e),
    }
}

async fn one_decision(State(app): State<Arc<App>>, peer: Peer, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(e) = app.operator_access(&headers, peer) {
        return app.refuse(e);
    }
    if !valid_id(&id) {
        return app.refuse(ApiError::bad_request("a decision id is 1-64 of [A-Za-z0-9._:-]".into()));
    }
    match app.get_decision(&id, now_ms()).await {
        Some(r) => Json(RecordView::from(r)).into_response(),
        None => app.refuse(ApiError::not_found("no such decision (unknown, or older than the store keeps)")),
    }
}

async fn unblock(
    State(app): State<Arc<App>>,
    peer: Peer,
    headers: HeaderMap,
    q: Result<Query<UnblockQuery>, QueryRejection>,
) -> Response {
    let result = async {
        app.operator_access(&headers, peer)?;
        let q = query(q)?;
        let client = check_client(&q.client)?;
        if q.quiet_s > MAX_QUIET_S {
            return Err(ApiError::bad_request(format!("`quiet_s` must be 0-{MAX_QUIET_S}")));
        }
        let reasons: Vec<String> =
            q.reason.split(',').map(str::trim).filter(|r| !r.is_empty()).map(str::to_string).collect();
        if reasons.len() > MAX_DECISION_REASONS
            || reasons.iter().any(|r| r.len() > 64 || !r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        {
            return Err(ApiError::bad_request(format!(
                "`reason`: at most {MAX_DECISION_REASONS} comma-separated reason names"
            )));
        }
        let note = check_text(&q.note, allow::MAX_NOTE, "note").map_err(ApiError::bad_request)?;
        let who = Actor { author: author(&headers)?, peer: peer_text(peer), note };
        Ok(app.unblock(&client, q.quiet_s, reasons, &who, now_ms()).await)
    }
    .await;
    match result {
        Ok(a) => Json(a).into_response(),
        Err(e) => app.refuse(e),
    }
}

#[derive(Debug, Serialize)]
struct AllowList {
    allows: Vec<AllowRecord>,
    max: usize,
}

async fn list_allow(State(app): State<Arc<App>>, peer: Peer, headers: HeaderMap) -> Response {
    if let Err(e) = app.operator_access(&headers, peer) {
        return app.refuse(e);
    }
    let allows = app.ops.allows(&app.fleet, now_ms()).await;
    Json(AllowList { allows, max: MAX_ALLOW_ENTRIES }).into_response()
}

#[derive(Debug, Serialize)]
struct Added {
    entry: AllowRecord,
    /// Client labels lifted because the entry covers them.
    lifted: Vec<String>,
}

async fn add_allow(State(app): State<Arc<App>>, peer: Peer, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        app.operator_access(&headers, peer)?;
        let new: NewAllow = App::read_json(&headers, body, MAX_ALLOW_BODY, "allow entry").await?;
        let who = author(&headers)?;
        let now = now_ms();
        let entry = allow::build(&new, &who, &app.names, app.new_id(now), now).map_err(ApiError::bad_request)?;
        app.ops.add_allow(&app.fleet, &entry, now).await.map_err(|AddError::Full| {
            ApiError::conflict(format!("{MAX_ALLOW_ENTRIES} allow entries are in force: remove one first"))
        })?;
        let record = AuditRecord {
            at_ms: now,
            author: entry.author.clone(),
            peer: peer_text(peer),
            target: entry.id.clone(),
            note: entry.note.clone(),
            change: Change::AllowAdd { entry: entry.clone() },
        };
        app.ops.audit(&app.fleet, &record, now).await;
        app.metrics.operator_changes.with_label_values(&["allow_add"]).inc();
        let lifted = app.lift_allowed(&entry, &peer_text(peer), now).await;
        Ok(Added { entry, lifted })
    }
    .await;
    match result {
        Ok(a) => (StatusCode::CREATED, Json(a)).into_response(),
        Err(e) => app.refuse(e),
    }
}

async fn remove_allow(
    State(app): State<Arc<App>>,
    peer: Peer,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: Result<Query<NoteQuery>, QueryRejection>,
) -> Response {
    let result = async {
        app.operator_access(&headers, peer)?;
        let note = check_text(&query(q)?.note, allow::MAX_NOTE, "note").map_err(ApiError::bad_request)?;
        if !valid_id(&id) {
            return Err(ApiError::bad_request("an allow entry id is 1-64 of [A-Za-z0-9._:-]".into()));
        }
        let now = now_ms();
        let removed = app
            .ops
            .remove_allow(&app.fleet, &id, now)
            .await
            .ok_or_else(|| ApiError::not_found("no such allow entry in force"))?;
        let record = AuditRecord {
            at_ms: now,
            author: author(&headers)?,
            peer: peer_text(peer),
            target: id.clone(),
            note,
            change: Change::AllowRemove { id },
        };
        app.ops.audit(&app.fleet, &record, now).await;
        app.metrics.operator_changes.with_label_values(&["allow_remove"]).inc();
        Ok(removed)
    }
    .await;
    match result {
        Ok(r) => Json(serde_json::json!({ "removed": r })).into_response(),
        Err(e) => app.refuse(e),
    }
}

async fn audit(
    State(app): State<Arc<App>>,
    peer: Peer,
    headers: HeaderMap,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Response {
    let result = async {
        app.operator_access(&headers, peer)?;
        let q = query(q)?;
        let limit = limit(q.limit)?;
        let (log, complete) = app.ops.audit_log(&app.fleet, now_ms()).await;
        Ok(match q.at {
            Some(at) => serde_json::json!({ "at_ms": at, "allows": allows_at(&log, at), "complete": complete }),
            None => serde_json::json!({
                "records": log.into_iter().take(limit).collect::<Vec<_>>(),
                "complete": complete,
            }),
        })
    }
    .await;
    match result {
        Ok(a) => Json(a).into_response(),
        Err(e) => app.refuse(e),
    }
}

/// Holds one of the [`MAX_STREAMS`] export slots while a stream is open.
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `GET /v1/decisions/stream?since_ms=N`: the records received after N
/// (from memory, at most 1,000), then every new decision as it arrives,
/// one JSON object a line (`application/x-ndjson`), until the client
/// closes. A reader too slow to keep up skips what it missed (counted in
/// `abuse_scorer_decisions_export_lagged_total`).
async fn stream(
    State(app): State<Arc<App>>,
    peer: Peer,
    headers: HeaderMap,
    q: Result<Query<StreamQuery>, QueryRejection>,
) -> Response {
    let since = match app.operator_access(&headers, peer).and_then(|()| query(q)) {
        Ok(q) => q.since_ms,
        Err(e) => return app.refuse(e),
    };
    let open = app.streams.clone();
    if open.fetch_add(1, Ordering::Relaxed) >= MAX_STREAMS {
        open.fetch_sub(1, Ordering::Relaxed);
        return app.refuse(ApiError::busy(format!("{MAX_STREAMS} export streams are open already")));
    }
    let slot = StreamSlot(open);
    // Subscribed before the replay is read: nothing falls in between
    // (a record may come twice; a SIEM dedups by id).
    let live = app.export.subscribe();
    let replay: Vec<Result<Bytes, std::io::Error>> = app
        .decisions
        .since_local(since, REPLAY_MAX)
        .into_iter()
        .filter_map(|r| serde_json::to_string(&RecordView::from(r)).ok())
        .map(|line| Ok(Bytes::from(line + "\n")))
        .collect();
    let lagged = app.metrics.export_lagged.clone();
    let live = futures_util::stream::unfold((live, slot, lagged), |(mut rx, slot, lagged)| async move {
        loop {
            match rx.recv().await {
                Ok(line) => {
                    let chunk: Result<Bytes, std::io::Error> = Ok(Bytes::from(format!("{line}\n")));
                    return Some((chunk, (rx, slot, lagged)));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => lagged.inc_by(n),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let body = Body::from_stream(futures_util::StreamExt::chain(futures_util::stream::iter(replay), live));
    (
        [(header::CONTENT_TYPE, "application/x-ndjson"), (header::CACHE_CONTROL, "no-store")],
        body,
    )
        .into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::decisions::tests::event;
    use crate::metrics::Metrics;
    use crate::models::Models;
    use crate::scoring::Policy;
    use crate::store::Fleet;
    use abuse_engine::wire::{EventBatch, FleetVerdict, FleetVerdicts, SECRET_HEADER, WIRE_VERSION};
    use axum::extract::ConnectInfo;
    use axum::http::Request;
    use serde_json::Value;
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use tower::ServiceExt;

    const TOKEN: &str = "0f4c1e2d3b5a69788796a5b4c3d2e1f00f4c1e2d3b5a69788796a5b4c3d2e1f0";
    const SECRET: &str = "filters-secret";

    fn app() -> Arc<App> {
        Arc::new(
            App::new(
                Some(SECRET),
                Policy::new(100.0, 30),
                Models::new(crate::model::Params::default()),
                Fleet::memory(),
                Metrics::new().unwrap(),
                PathBuf::from("unused"),
            )
            .with_operator_token(Some(TOKEN)),
        )
    }

    async fn call(app: &Arc<App>, method: &str, path: &str, auth: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, format!("Bearer {a}"));
        }
        req = req.header(SECRET_HEADER, SECRET).header(OPERATOR_HEADER, "alice");
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
        let mut req = req.header(header::CONTENT_TYPE, "application/json").body(body).unwrap();
        req.extensions_mut().insert(ConnectInfo("10.0.0.9:5000".parse::<SocketAddr>().unwrap()));
        let resp = crate::app::router(app.clone()).oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn post_batch(app: &Arc<App>, decisions: Vec<abuse_engine::wire::DecisionEvent>, dropped: u64) -> Value {
        let batch = EventBatch { version: WIRE_VERSION, decisions, decisions_dropped: dropped, ..EventBatch::default() };
        let (s, v) = call(app, "POST", "/v1/events", None, Some(serde_json::to_value(batch).unwrap())).await;
        assert_eq!(s, 200, "{v}");
        v
    }

    #[tokio::test]
    async fn every_operator_route_needs_the_token() {
        let app = app();
        let routes = [
            ("GET", "/v1/decisions?client=203.0.113.7"),
            ("GET", "/v1/decisions/a-1"),
            ("DELETE", "/v1/decisions?client=203.0.113.7"),
            ("GET", "/v1/decisions/stream"),
            ("GET", "/v1/allow"),
            ("POST", "/v1/allow"),
            ("DELETE", "/v1/allow/al-1"),
            ("GET", "/v1/audit"),
        ];
        for (m, p) in routes {
            assert_eq!(call(&app, m, p, None, None).await.0, 401, "{m} {p}");
            assert_eq!(call(&app, m, p, Some("wrong"), None).await.0, 401, "{m} {p}");
            assert_eq!(call(&app, m, p, Some(SECRET), None).await.0, 401, "{m} {p}: the filters' secret is not the token");
        }
        assert_eq!(app.metrics.errors.with_label_values(&["operator_unauthorized"]).get(), 24);
        assert_eq!(app.ops.audit_log(&app.fleet, now_ms()).await.0.len(), 0, "nothing changed");
    }

    #[tokio::test]
    async fn a_clients_story_and_an_unblock_that_sticks() {
        let app = app();
        let t = now_ms();
        let mut tagged = event("e1-0-2", "203.0.113.7#1a2b3c4d", "shed", t);
        tagged.agent = Some("1a2b3c4d".into());
        let mut bad = event("bad id", "203.0.113.7", "block", t);
        bad.time_ms = t;
        let answer = post_batch(&app, vec![event("e1-0-1", "203.0.113.7", "block", t), tagged, bad], 3).await;
        assert_eq!(answer["accepted"], 2);
        post_batch(&app, vec![event("e1-0-1", "203.0.113.7", "penalty", t + 100)], 0).await;
        let m = &app.metrics;
        assert_eq!(m.decisions.with_label_values(&["stored"]).get(), 2);
        assert_eq!(m.decisions.with_label_values(&["aggregated"]).get(), 1);
        assert_eq!(m.decisions_dropped.with_label_values(&["filter"]).get(), 3);
        assert_eq!(m.decisions_dropped.with_label_values(&["scorer"]).get(), 1);

        let (s, story) = call(&app, "GET", "/v1/decisions?client=203.0.113.7", Some(TOKEN), None).await;
        assert_eq!(s, 200);
        assert_eq!(story["decisions"].as_array().unwrap().len(), 2);
        assert_eq!(story["decisions"][0]["id"], "e1-0-2", "newest first");
        assert_eq!(story["decisions"][1]["penalty_hits"], 7);
        assert_eq!(story["decisions"][1]["reasons"][0]["text"], "29 failed-login usernames in 600 s; limit 5");
        assert_eq!(story["state"]["penalty_until_ms"], t + 60_000);
        let (s, one) = call(&app, "GET", "/v1/decisions/e1-0-1", Some(TOKEN), None).await;
        assert_eq!((s, one["reasons"][0]["value"].as_f64()), (200, Some(29.0)));
        assert_eq!(call(&app, "GET", "/v1/decisions/nope", Some(TOKEN), None).await.0, 404);
        assert_eq!(call(&app, "GET", "/v1/decisions?id=e1-0-2", Some(TOKEN), None).await.1["decisions"][0]["action"], "shed");
        // By a session cookie's or bearer token's raw value, or its hash.
        let mut cookie = event("e1-0-4", "198.51.100.5", "tag", t);
        cookie.session = Some(app.names.credential("bearer", "eyJ-raw-token").unwrap());
        cookie.credential = Some("bearer".into());
        post_batch(&app, vec![cookie], 0).await;
        let by_token = call(&app, "GET", "/v1/decisions?session=eyJ-raw-token", Some(TOKEN), None).await.1;
        assert_eq!(by_token["decisions"][0]["id"], "e1-0-4", "{by_token}");
        // By the API key as the operator has it: hashed here as the filters hash it.
        let key = app.names.credential("key", "raw-partner-key").unwrap();
        let mut keyed = event("e1-0-3", "198.51.100.4", "block", t);
        keyed.session = Some(key.clone());
        post_batch(&app, vec![keyed], 0).await;
        let by_key = call(&app, "GET", "/v1/decisions?api_key=raw-partner-key", Some(TOKEN), None).await.1;
        assert_eq!(by_key["decisions"][0]["id"], "e1-0-3");
        assert_eq!(call(&app, "GET", &format!("/v1/decisions?api_key={key}"), Some(TOKEN), None).await.1, by_key);

        // A fleet block the scorer holds: the unblock forgets it.
        let before = app.fleet.verdicts_since(0, t).await.next;
        app.fleet.record_verdict(&FleetVerdict { client: "203.0.113.7#1a2b3c4d".into(), reasons: vec![], until_ms: t + 600_000 }, t).await;
        let (s, un) = call(&app, "DELETE", "/v1/decisions?client=203.0.113.7&quiet_s=120&note=customer%20call", Some(TOKEN), None).await;
        assert_eq!(s, 200, "{un}");
        let lifted: Vec<&str> = un["lifted"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(lifted, vec!["203.0.113.7", "203.0.113.7#1a2b3c4d", "203.0.113.7#pool"]);
        let (_, polled) = call(&app, "GET", &format!("/v1/verdicts?since={before}"), None, None).await;
        let polled: FleetVerdicts = serde_json::from_value(polled).unwrap();
        assert!(polled.verdicts.is_empty(), "the lifted client's block is gone: {polled:?}");
        assert_eq!(polled.lifts.len(), 3);
        assert!(polled.lifts.iter().all(|l| l.quiet_until_ms >= t + 120_000));
        assert_eq!(polled.next, un["cursor"].as_u64().unwrap());
        assert!(app.fleet.blocked("203.0.113.7#1a2b3c4d", t).await.is_none());
        let state = call(&app, "GET", "/v1/decisions?client=203.0.113.7", Some(TOKEN), None).await.1["state"].clone();
        assert_eq!(state["penalty_until_ms"], 0, "lifted: {state}");
        assert!(state["quiet_until_ms"].as_u64().unwrap() >= t + 120_000);
        let audit = call(&app, "GET", "/v1/audit", Some(TOKEN), None).await.1;
        assert_eq!(audit["records"][0]["author"], "alice");
        assert_eq!(audit["records"][0]["note"], "customer call");
        assert_eq!(audit["records"][0]["change"]["unblock"]["labels"].as_array().unwrap().len(), 3);
        // The scorer itself holds the quiet period: a callout that would
        // block gets a tag, and nothing is published to the fleet.
        let ask = serde_json::json!({"version": 1, "client": "203.0.113.7#1a2b3c4d", "method": "POST", "path": "/api/login",
                                     "reasons": ["credential_stuffing"], "features": {"risk": 150.0}});
        let (s, answer) = call(&app, "POST", "/v1/score", None, Some(ask.clone())).await;
        assert_eq!((s, answer["action"].as_str()), (200, Some("tag")), "{answer}");
        assert!(app.fleet.blocked("203.0.113.7#1a2b3c4d", now_ms()).await.is_none());
        assert_eq!(app.metrics.rejected.with_label_values(&["quiet_period"]).get(), 1);
        let other = serde_json::json!({"version": 1, "client": "192.0.2.50", "method": "POST", "path": "/api/login",
                                       "reasons": ["credential_stuffing"], "features": {"risk": 150.0}});
        assert_eq!(call(&app, "POST", "/v1/score", None, Some(other)).await.1["action"], "block", "others are not quiet");
        for bad in ["client=nope", "client=203.0.113.7&quiet_s=999999", "client=1.2.3.4%23zz", "client=1.2.3.4&reason=a%20b"] {
            assert_eq!(call(&app, "DELETE", &format!("/v1/decisions?{bad}"), Some(TOKEN), None).await.0, 400, "{bad}");
        }
        assert_eq!(call(&app, "GET", "/v1/decisions?client=1.2.3.4&id=x", Some(TOKEN), None).await.0, 400);
        assert_eq!(call(&app, "GET", "/v1/decisions?limit=0", Some(TOKEN), None).await.0, 400);
    }

    #[tokio::test]
    async fn allow_entries_reach_every_poll_lift_and_are_audited() {
        let app = app();
        let t = now_ms();
        post_batch(&app, vec![event("e2-0-1", "198.51.100.7", "block", t)], 0).await;
        let new = serde_json::json!({"kind": "cidr", "value": "198.51.100.0/24", "ttl_s": 3600, "note": "partner X"});
        let (s, added) = call(&app, "POST", "/v1/allow", Some(TOKEN), Some(new)).await;
        assert_eq!(s, 201, "{added}");
        let id = added["entry"]["id"].as_str().unwrap().to_string();
        assert_eq!(added["entry"]["author"], "alice");
        assert!(added["lifted"].as_array().unwrap().iter().any(|l| l == "198.51.100.7"), "{added}");
        let polled: FleetVerdicts = serde_json::from_value(call(&app, "GET", "/v1/verdicts?since=0", None, None).await.1).unwrap();
        assert_eq!(polled.allows.len(), 1);
        assert_eq!((polled.allows[0].kind.as_str(), polled.allows[0].value.as_str()), ("cidr", "198.51.100.0/24"));
        assert!(polled.lifts.iter().any(|l| l.client == "198.51.100.7"));
        let story = call(&app, "GET", "/v1/decisions?client=198.51.100.7", Some(TOKEN), None).await.1;
        assert_eq!(story["state"]["allowed_by"][0], id.as_str());
        for bad in [
            serde_json::json!({"kind": "cidr", "value": "0.0.0.0/0"}),
            serde_json::json!({"kind": "cidr", "value": "1.2.3.4", "ttl_s": 0}),
            serde_json::json!({"kind": "agent", "value": "not-hex"}),
            serde_json::json!({"kind": "api_key", "value": "k", "extra": 1}),
        ] {
            assert_eq!(call(&app, "POST", "/v1/allow", Some(TOKEN), Some(bad.clone())).await.0, 400, "{bad}");
        }
        // The removal comes strictly after the addition's millisecond.
        let after_add = added["entry"]["created_ms"].as_u64().unwrap();
        while now_ms() <= after_add {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let (s, removed) = call(&app, "DELETE", &format!("/v1/allow/{id}?note=contract%20ended"), Some(TOKEN), None).await;
        assert_eq!((s, removed["removed"]["id"].as_str()), (200, Some(id.as_str())));
        assert_eq!(call(&app, "DELETE", &format!("/v1/allow/{id}"), Some(TOKEN), None).await.0, 404);
        assert!(call(&app, "GET", "/v1/allow", Some(TOKEN), None).await.1["allows"].as_array().unwrap().is_empty());
        let polled: FleetVerdicts = serde_json::from_value(call(&app, "GET", "/v1/verdicts?since=0", None, None).await.1).unwrap();
        assert!(polled.allows.is_empty());
        // The list as it stood: with the entry between add and removal.
        let then = call(&app, "GET", &format!("/v1/audit?at={after_add}"), Some(TOKEN), None).await.1;
        assert_eq!(then["allows"][0]["id"], id.as_str(), "{then}");
        let before = call(&app, "GET", &format!("/v1/audit?at={}", t - 1), Some(TOKEN), None).await.1;
        assert!(before["allows"].as_array().unwrap().is_empty());
        let kinds: Vec<String> = call(&app, "GET", "/v1/audit", Some(TOKEN), None).await.1["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["change"].as_object().unwrap().keys().next().unwrap().clone())
            .collect();
        assert_eq!(kinds, vec!["allow_remove", "unblock", "allow_add"]);
        assert_eq!(app.metrics.operator_changes.with_label_values(&["allow_add"]).get(), 1);
    }

    #[tokio::test]
    async fn the_export_streams_replay_then_live_lines() {
        use http_body_util::BodyExt;
        let app = app();
        let t = now_ms();
        post_batch(&app, vec![event("s-0-1", "203.0.113.7", "block", t)], 0).await;
        let open = |auth: bool| {
            let app = app.clone();
            async move {
                let mut req = Request::get("/v1/decisions/stream?since_ms=0");
                if auth {
                    req = req.header(header::AUTHORIZATION, format!("Bearer {TOKEN}"));
                }
                crate::app::router(app).oneshot(req.body(Body::empty()).unwrap()).await.unwrap()
            }
        };
        assert_eq!(open(false).await.status(), 401);
        let resp = open(true).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/x-ndjson");
        let mut body = resp.into_body();
        async fn next_line(body: &mut Body) -> Value {
            let bytes = body.frame().await.unwrap().unwrap().into_data().unwrap();
            serde_json::from_slice::<Value>(&bytes).unwrap()
        }
        let replayed = next_line(&mut body).await;
        assert_eq!(replayed["id"], "s-0-1");
        post_batch(&app, vec![event("s-0-2", "198.51.100.1", "shed", t)], 0).await;
        let live = next_line(&mut body).await;
        assert_eq!((live["id"].as_str(), live["action"].as_str()), (Some("s-0-2"), Some("shed")));
        // At most MAX_STREAMS at once; a closed one gives its slot back.
        let mut held = Vec::new();
        for _ in 1..MAX_STREAMS {
            held.push(open(true).await);
        }
        let over = open(true).await;
        assert_eq!(over.status(), 503);
        drop(body);
        drop(held);
        assert_eq!(open(true).await.status(), 200);
    }

    #[tokio::test]
    async fn with_redis_away_the_memory_store_answers() {
        // A port nobody listens on: Redis "down" from the start.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let metrics = Metrics::new().unwrap();
        let fleet = Fleet::redis(
            &format!("redis://127.0.0.1:{port}"),
            crate::store::FleetMetrics {
                errors: metrics.store_errors.clone(),
                fallbacks: metrics.store_fallbacks.clone(),
                redis_up: metrics.redis_up.clone(),
            },
        )
        .unwrap();
        let app = Arc::new(
            App::new(Some(SECRET), Policy::new(100.0, 30), Models::new(crate::model::Params::default()), fleet, metrics, PathBuf::from("unused"))
                .with_operator_token(Some(TOKEN)),
        );
        let t = now_ms();
        post_batch(&app, vec![event("r-0-1", "203.0.113.7", "block", t)], 0).await;
        let story = call(&app, "GET", "/v1/decisions?client=203.0.113.7", Some(TOKEN), None).await.1;
        assert_eq!(story["decisions"][0]["id"], "r-0-1");
        let (s, _) = call(&app, "DELETE", "/v1/decisions?client=203.0.113.7", Some(TOKEN), None).await;
        assert_eq!(s, 200);
        let new = serde_json::json!({"kind": "agent", "value": "1a2b3c4d"});
        assert_eq!(call(&app, "POST", "/v1/allow", Some(TOKEN), Some(new)).await.0, 201);
        let polled: FleetVerdicts = serde_json::from_value(call(&app, "GET", "/v1/verdicts?since=0", None, None).await.1).unwrap();
        assert_eq!((polled.lifts.len(), polled.allows.len()), (2, 1));
        assert!(app.metrics.store_fallbacks.get() >= 5, "every Redis call fell back and was counted");
    }
}
