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
use crate::decisions::{address_of, valid_id, Key, Record, DEFAULT_LIMIT, MAX_LIMIT};
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
    decisions: Vec<Record>,
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
        let (log, _) = self.ops.audit_log(&self.fleet, now).await;
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
            let decisions = self.get_decision(id, now).await.into_iter().collect();
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
            Key::Session(self.names.credential("cookie", s).map_err(ApiError::bad_request)?)
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
        Ok(DecisionsAnswer { decisions, state })
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
        Some(r) => Json(r).into_response(),
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
        .iter()
        .filter_map(|r| serde_json::to_string(r).ok())
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
