//! The HTTP service: shared state and the routes.
//!
//! Every failure is a JSON body `{"error": "..."}` naming the problem with
//! its status (401 secret, 413 size, 400 shape/version/values), counted in
//! `abuse_scorer_errors_total{kind}`. Nothing a caller sends can panic a
//! handler: bodies are read with a size limit, parsed with serde into the
//! strict wire types, bounded by `validate`, and the store falls back to
//! memory instead of failing.
//!
//! Besides scoring, the filters feed the fleet's warm-start state through
//! `POST /v1/events` (tick batches: known accounts, baselines) and a fresh
//! Envoy reads it back from `GET /v1/warm?from=N` (see [`events`], [`warm`]).
//!
//! What a caller writes is bounded beyond its shape: baselines clamped to a
//! plausible range (`validate::sanitize_baseline`), a claimed risk capped at
//! `block_at`, per-caller quotas on known accounts, profile updates and
//! published blocks (`quota`), profile merges bounded
//! (`profiles::merge_bounded`) — each counted in
//! `abuse_scorer_rejected_total{kind}`. The operator routes (`GET /`,
//! `/v1/dashboard`, `/metrics`) take the operator token or, without one,
//! only this machine (`access`). Logs carry no client address, username,
//! session, query string or credential: a fleet block is logged by a
//! keyed hash of its client.

use crate::access::{self, same_secret, Denied, Peer};
use crate::allow::FleetNames;
use crate::decisions::{self, Decisions};
use crate::fleetview::FleetView;
use crate::ops_store::OpsStore;
use crate::clock::now_ms;
use crate::dashboard::{self, Dashboard, ModelView, StoreView};
use crate::known;
use crate::metrics::{action_name, reason_label, Metrics};
use crate::models::Models;
use crate::quota::{self, Quotas};
use crate::sample_log::{self, SampleLog};
use crate::scoring::{self, feature, FleetSignals, Policy};
use crate::store::Fleet;
use crate::validate;
use abuse_engine::hash::KeyedHasher;
use abuse_engine::known_accounts::SHARDS;
use abuse_engine::wire::{
    EventBatch, EventsAnswer, FeatureSample, Features, FleetVerdict, ScoreRequest,
    ScoreResponse, WarmState, EVENTS_PATH, MAX_BATCH_BYTES,
    MAX_SCORE_REQUEST_BYTES, SCORE_PATH, SECRET_HEADER, VERDICTS_PATH, WARM_PAGE_SHARDS, WARM_PATH,
    WIRE_VERSION,
};
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

pub struct App {
    secret: Option<String>,
    /// Guards the operator routes; None: this machine only (see `access`).
    operator_token: Option<String>,
    quotas: Quotas,
    policy: Policy,
    model: Mutex<Models>,
    pub fleet: Fleet,
    pub metrics: Metrics,
    dashboard: Mutex<Dashboard>,
    usernames: KeyedHasher,
    pub state_dir: PathBuf,
    /// `trained` of the model on disk (see `snapshot::save`).
    snapshot_written: Mutex<u64>,
    /// `warm_changes` of the warm-start state on disk (see `snapshot::save_warm`).
    warm_written: Mutex<u64>,
    sample_log: Mutex<SampleLog>,
    /// The fleet's decision records (see `decisions`).
    pub decisions: Decisions,
    /// Allow entries and the audit log (see `ops_store`).
    pub ops: OpsStore,
    /// Operators' quiet periods (see `quiet`).
    pub quiet: crate::quiet::Quiet,
    fleet_view: Mutex<FleetView>,
    /// With Redis the fleet view is kept there too, so that every
    /// replica's dashboard shows every filter's decisions (`fleetview_redis`).
    view_redis: Option<redis::aio::ConnectionManager>,
    /// Hashes what an operator types as the filters do (see `allow`).
    pub names: FleetNames,
    /// Every new decision record as a JSON line, for the export streams.
    pub export: tokio::sync::broadcast::Sender<Arc<str>>,
    /// Export streams open (at most `operator::MAX_STREAMS`).
    pub streams: Arc<AtomicUsize>,
    /// Allow entry ids: a per-process random prefix and a counter.
    id_prefix: u32,
    id_counter: AtomicU64,
    /// The filters' `fleet` rules, counted fleet-wide (see `rules`).
    pub fleet_rules: crate::rules::FleetRules,
}

/// The key usernames are hashed with before they reach any store. Derived
/// from the secret so that every scorer of a fleet (same secret) makes the
/// same Redis keys, while whoever reads Redis without the secret cannot
/// test username guesses against them.
fn username_hasher(secret: Option<&str>) -> KeyedHasher {
    let base = KeyedHasher::from_seed(b"abuse-scorer-v1!");
    let s = secret.unwrap_or("").as_bytes();
    let mut seed = [0u8; 16];
    let (k0, k1) = seed.split_at_mut(8);
    k0.copy_from_slice(&base.key(1, s).to_le_bytes());
    k1.copy_from_slice(&base.key(2, s).to_le_bytes());
    KeyedHasher::from_seed(&seed)
}

pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn not_found(message: &str) -> Self {
        ApiError { status: StatusCode::NOT_FOUND, kind: "not_found", message: message.into() }
    }
    pub(crate) fn conflict(message: String) -> Self {
        ApiError { status: StatusCode::CONFLICT, kind: "conflict", message }
    }
    pub(crate) fn busy(message: String) -> Self {
        ApiError { status: StatusCode::SERVICE_UNAVAILABLE, kind: "busy", message }
    }
    fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "unauthorized",
            message: format!("missing or wrong {SECRET_HEADER}"),
        }
    }
    fn too_large(limit: usize) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "too_large",
            message: format!("body larger than {limit} bytes"),
        }
    }
    pub(crate) fn bad_request(message: String) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "bad_request",
            message,
        }
    }
    fn operator(denied: Denied) -> Self {
        match denied {
            Denied::Unauthorized => ApiError {
                status: StatusCode::UNAUTHORIZED,
                kind: "operator_unauthorized",
                message: "missing or wrong operator token (Authorization: Bearer ...)".into(),
            },
            Denied::NotLocal => ApiError {
                status: StatusCode::FORBIDDEN,
                kind: "not_local",
                message: "without an operator token (ABUSE_OPERATOR_TOKEN) this answers only to \
                          127.0.0.1 and ::1"
                    .into(),
            },
        }
    }
}

pub(crate) fn error_response(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

impl App {
    pub fn new(
        secret: Option<&str>,
        policy: Policy,
        model: Models,
        fleet: Fleet,
        metrics: Metrics,
        state_dir: PathBuf,
    ) -> App {
        metrics
            .model_samples
            .set(i64::try_from(model.trained()).unwrap_or(i64::MAX));
        metrics.model_warm.set(i64::from(model.is_warm()));
        let fleet_conn = fleet.redis_conn();
        App {
            secret: secret.map(str::to_string),
            operator_token: None,
            quotas: Quotas::new(quota::Limits::default()),
            policy,
            snapshot_written: Mutex::new(model.trained()),
            warm_written: Mutex::new(fleet.local().warm_changes()),
            model: Mutex::new(model),
            fleet,
            metrics,
            dashboard: Mutex::new(Dashboard::new(now_ms())),
            usernames: username_hasher(secret),
            state_dir,
            sample_log: Mutex::new(SampleLog::off()),
            decisions: Decisions::redis(fleet_conn.clone()),
            ops: OpsStore::new(fleet_conn.clone()),
            quiet: crate::quiet::Quiet::new(fleet_conn.clone()),
            fleet_view: Mutex::new(FleetView::new()),
            view_redis: fleet_conn.clone(),
            names: FleetNames::new(secret),
            export: tokio::sync::broadcast::channel(EXPORT_BUFFER).0,
            streams: Arc::new(AtomicUsize::new(0)),
            id_prefix: random_u32(),
            id_counter: AtomicU64::new(0),
            fleet_rules: crate::rules::FleetRules::new(fleet_conn),
        }
    }

    pub fn with_sample_log(self, log: SampleLog) -> App {
        App { sample_log: Mutex::new(log), ..self }
    }

    /// Requires `token` (as `Authorization: Bearer`) on the operator routes.
    pub fn with_operator_token(self, token: Option<&str>) -> App {
        App { operator_token: token.map(str::to_string), ..self }
    }

    pub fn with_quotas(self, limits: quota::Limits) -> App {
        App { quotas: Quotas::new(limits), ..self }
    }

    /// A client's address as logs may show it: a keyed hash (the key comes
    /// from the secret), enough to follow one client through the log, not
    /// to read its address.
    pub(crate) fn log_key(&self, client: &str) -> String {
        format!("{:08x}", self.usernames.key(3, client.as_bytes()) >> 32)
    }

    /// Whether a request may read an operator route; refusals are counted.
    pub(crate) fn operator_access(&self, headers: &HeaderMap, peer: Peer) -> Result<(), ApiError> {
        access::operator(self.operator_token.as_deref(), headers, peer).map_err(ApiError::operator)
    }

    /// The model is only ever touched for microseconds, and a panic while
    /// holding it cannot leave it unusable, so a poisoned lock is used as is.
    pub fn model(&self) -> MutexGuard<'_, Models> {
        self.model.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn snapshot_written(&self) -> MutexGuard<'_, u64> {
        self.snapshot_written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn warm_written(&self) -> MutexGuard<'_, u64> {
        self.warm_written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn fleet_view(&self) -> MutexGuard<'_, FleetView> {
        self.fleet_view.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new allow entry id: unique in this process, and across scorers
    /// by its random prefix.
    pub(crate) fn new_id(&self, now_ms: u64) -> String {
        let n = self.id_counter.fetch_add(1, Ordering::Relaxed);
        format!("al-{:08x}-{:x}{:x}", self.id_prefix, now_ms % 0x10_0000, n)
    }

    /// A batch's decision events: checked (a bad one skipped and counted),
    /// stored, counted for the dashboard, and sent to the export streams.
    /// How many were taken.
    async fn take_decisions(&self, batch: &EventBatch, now: u64) -> u64 {
        let mut events = Vec::with_capacity(batch.decisions.len());
        let mut clamped = 0;
        for d in &batch.decisions {
            let mut d = d.clone();
            decisions::clamp_path(&mut d);
            match decisions::check(&d) {
                Ok(()) => {
                    clamped += u64::from(decisions::clamp_time(&mut d, now));
                    events.push(d);
                }
                Err(e) => tracing::debug!(error = %e, "skipping a decision event of a batch"),
            }
        }
        let invalid = (batch.decisions.len() - events.len()) as u64;
        self.metrics.rejected("decision_invalid", invalid);
        self.metrics.rejected("decision_time_clamped", clamped);
        self.metrics.decisions_dropped.with_label_values(&["scorer"]).inc_by(invalid);
        self.metrics.decisions_dropped.with_label_values(&["filter"]).inc_by(batch.decisions_dropped);
        if events.is_empty() {
            return 0;
        }
        let (stored, redis) = self.decisions.store(&events, now).await;
        if let Err(e) = redis {
            self.fleet.redis_result::<()>("store_decisions", Err(e), now);
        }
        self.metrics.decisions.with_label_values(&["stored"]).inc_by(stored.records);
        self.metrics.decisions.with_label_values(&["aggregated"]).inc_by(stored.aggregated);
        {
            let mut view = self.fleet_view();
            for d in &events {
                view.record(now, d);
            }
        }
        if let Some(conn) = &self.view_redis {
            let result = crate::fleetview_redis::record(conn, &events, now).await;
            self.fleet.redis_result("record_view", result, now);
        }
        if self.export.receiver_count() > 0 {
            for d in &events {
                // The shape of a record (as replayed): a SIEM reads one kind of line.
                let view = decisions::RecordView { decision: d.clone(), penalty_hits: 0, last_hit_ms: 0, received_ms: now };
                let Ok(line) = serde_json::to_string(&view) else { continue };
                let _ = self.export.send(Arc::from(line));
            }
        }
        events.len() as u64
    }

    fn dashboard(&self) -> MutexGuard<'_, Dashboard> {
        self.dashboard
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = &self.secret else {
            return Ok(());
        };
        match headers.get(SECRET_HEADER) {
            Some(given) if same_secret(given.as_bytes(), expected.as_bytes()) => Ok(()),
            _ => Err(ApiError::unauthorized()),
        }
    }

    /// A JSON object of type `T` from a body of at most `limit` bytes;
    /// `what` names it in error messages.
    pub(crate) async fn read_json<T: DeserializeOwned>(
        headers: &HeaderMap,
        body: Body,
        limit: usize,
        what: &str,
    ) -> Result<T, ApiError> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ApiError::too_large(limit));
        }
        let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
            if is_length_limit(&e) {
                ApiError::too_large(limit)
            } else {
                ApiError::bad_request(format!("could not read the body: {e}"))
            }
        })?;
        // serde would also read a struct from a JSON array, by position:
        // the wire format is objects only.
        if bytes.trim_ascii_start().first() != Some(&b'{') {
            return Err(ApiError::bad_request(format!(
                "invalid {what}: the body must be a JSON object"
            )));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("invalid {what}: {e}")))
    }

    async fn read_request(
        &self,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<ScoreRequest, ApiError> {
        let req: ScoreRequest =
            Self::read_json(headers, body, MAX_SCORE_REQUEST_BYTES, "score request").await?;
        validate::check(&req).map_err(ApiError::bad_request)?;
        Ok(req)
    }

    fn username_key(&self, username: &str) -> Option<String> {
        // Case and surrounding blanks do not make another account.
        let normalised = username.trim().to_lowercase();
        (!normalised.is_empty())
            .then(|| format!("{:016x}", self.usernames.key(1, normalised.as_bytes())))
    }

    async fn score(
        &self,
        headers: &HeaderMap,
        body: Body,
        caller: IpAddr,
    ) -> Result<ScoreResponse, ApiError> {
        self.authorize(headers)?;
        let req = self.read_request(headers, body).await?;
        let now = now_ms();

        let username = req.username.as_deref().and_then(|u| self.username_key(u));
        let attempts = async {
            match &username {
                Some(key) => self.fleet.username_attempt(key, now).await,
                None => 0.0,
            }
        };
        let addresses = async {
            match &req.session {
                Some(session) => self.fleet.session_seen(session, &req.client, now).await,
                None => 0,
            }
        };
        let (username_attempts, session_addresses, blocked) =
            tokio::join!(attempts, addresses, self.fleet.blocked(&req.client, now));
        let fleet = FleetSignals {
            username_attempts,
            session_addresses,
            blocked,
        };

        // Scored, never learned: callouts are the borderline clients, and
        // normal is learned from the batches' samples (see `models`).
        let assessment = self
            .model()
            .score(req.route_group.as_deref(), &req.features.to_vector());

        let mut decision = scoring::combine(&self.policy, &req, assessment.as_ref(), &fleet, now);
        self.metrics.rejected("risk_capped", u64::from(decision.risk_capped));
        if let Some(verdict) = &decision.new_verdict {
            // An operator lifted this client with a quiet period: no new
            // fleet block on those reasons, at most a tag, until it ends.
            let labels = [req.client.as_str(), crate::decisions::address_of(&req.client)];
            let periods = self.quiet.get(&self.fleet, &labels, now).await;
            if periods.iter().any(|p| p.holds_off(&verdict.reasons, now)) {
                decision.new_verdict = None;
                decision.response.action = abuse_engine::wire::ScoreAction::Tag;
                self.metrics.rejected("quiet_period", 1);
            }
        }
        if let Some(verdict) = &decision.new_verdict {
            // Over its quota a caller still gets its block; the fleet does not.
            if self.quotas.take(caller, quota::Kind::Blocks, 1, now) == 1 {
                self.fleet.record_verdict(verdict, now).await;
                self.metrics.fleet_verdicts.inc();
                tracing::info!(client = %self.log_key(&verdict.client), reasons = ?verdict.reasons, until_ms = verdict.until_ms, "fleet block");
            } else {
                self.metrics.rejected("block_quota", 1);
            }
        }
        let answer = decision.response;
        self.metrics
            .score_requests
            .with_label_values(&[action_name(answer.action)])
            .inc();
        for r in &answer.reasons {
            self.metrics
                .detections
                .with_label_values(&[reason_label(r)])
                .inc();
        }
        self.dashboard().record(now, &req.client, &answer);
        Ok(answer)
    }

    /// A batch's samples: each scored, then learned unless penalized or
    /// gated (see `models`); the ones the model makes worth a tag (rules'
    /// risk plus model points ≥ `block_at / 2`, as for a callout, but never
    /// more than a tag) come back as flags. Returns the flags and how many
    /// samples were invalid.
    fn learn_samples(&self, samples: &[FeatureSample], now: u64) -> (Vec<FleetVerdict>, u64) {
        let mut flags = Vec::new();
        let mut invalid = 0;
        let mut log = self.sample_log.lock().unwrap_or_else(PoisonError::into_inner);
        let mut lines = Vec::new();
        let mut model = self.model();
        for sample in samples {
            let v = match validate::check_sample(sample) {
                Ok(v) => v,
                Err(e) => {
                    tracing::debug!(error = %e, "skipping a sample of a batch");
                    invalid += 1;
                    continue;
                }
            };
            let gated_before = model.view_gated();
            let assessment = model.observe(sample.route_group.as_deref(), &sample.client, &v, sample.penalized);
            let kind = if sample.penalized {
                "excluded"
            } else if model.view_gated() > gated_before {
                "gated"
            } else {
                "learned"
            };
            self.metrics.samples.with_label_values(&[kind]).inc();
            let Some(a) = assessment else {
                // Logged all the same (no anomaly): a replay of the log must
                // see what the models learned while warming.
                if log.is_on() {
                    lines.push(sample_log::Line {
                        t_ms: now,
                        client: &sample.client,
                        group: sample.route_group.as_deref(),
                        anomaly: None,
                        penalized: sample.penalized,
                        flagged: false,
                        features: &sample.features,
                    });
                }
                continue;
            };
            let req = ScoreRequest {
                version: WIRE_VERSION,
                client: sample.client.clone(),
                route_group: sample.route_group.clone(),
                // What the decision reads besides the model: the filter's
                // risk, and whether the key is several people's.
                features: Features {
                    risk: feature(&v, "risk"),
                    sessions: feature(&v, "sessions"),
                    ..Features::default()
                },
                ..ScoreRequest::default()
            };
            let decision = scoring::combine(&self.policy, &req, Some(&a), &FleetSignals::default(), now);
            let flagged = !sample.penalized
                && decision.model_points > 0.0
                && decision.response.action != abuse_engine::wire::ScoreAction::Allow;
            self.dashboard()
                .record_sample(now, &sample.client, a.anomaly, flagged.then_some(&decision.response));
            if log.is_on() {
                lines.push(sample_log::Line {
                    t_ms: now,
                    client: &sample.client,
                    group: sample.route_group.as_deref(),
                    anomaly: Some(a.anomaly),
                    penalized: sample.penalized,
                    flagged,
                    features: &sample.features,
                });
            }
            if flagged {
                flags.push(FleetVerdict {
                    client: sample.client.clone(),
                    reasons: vec![scoring::REASON_ANOMALY.to_string()],
                    until_ms: now.saturating_add(self.policy.verdict_ms()),
                });
            }
        }
        self.metrics
            .model_samples
            .set(i64::try_from(model.trained()).unwrap_or(i64::MAX));
        self.metrics.model_warm.set(i64::from(model.is_warm()));
        self.metrics.anomaly_flags.inc_by(flags.len() as u64);
        drop(model);
        log.write(&lines);
        (flags, invalid)
    }

    /// `POST /v1/events`: one worker's tick batch.
    async fn events(
        &self,
        headers: &HeaderMap,
        body: Body,
        caller: IpAddr,
    ) -> Result<EventsAnswer, ApiError> {
        self.authorize(headers)?;
        let batch: EventBatch =
            Self::read_json(headers, body, MAX_BATCH_BYTES, "event batch").await?;
        validate::check_batch(&batch).map_err(ApiError::bad_request)?;
        let now = now_ms();
        let before = batch.baselines.len();
        let mut baselines = Vec::with_capacity(before);
        let mut clamped = 0;
        for b in &batch.baselines {
            match validate::sanitize_baseline(b) {
                Ok(s) => {
                    clamped += u64::from(s.clamped);
                    baselines.push(s.baseline);
                }
                Err(e) => tracing::debug!(error = %e, "skipping a baseline of a batch"),
            }
        }
        let bad_baselines = (before - baselines.len()) as u64;
        self.metrics.rejected("baseline_invalid", bad_baselines);
        self.metrics.rejected("baseline_clamped", clamped);

        // Per-caller quotas: what is over is dropped (and counted), the
        // rest of the batch still counts.
        let accounts_allowed = self.quotas.take(
            caller,
            quota::Kind::KnownAccounts,
            batch.known_accounts.len() as u64,
            now,
        );
        let accounts = batch
            .known_accounts
            .get(..usize::try_from(accounts_allowed).unwrap_or(usize::MAX))
            .unwrap_or(&batch.known_accounts);
        let over_accounts = (batch.known_accounts.len() - accounts.len()) as u64;
        self.metrics.rejected("known_accounts_quota", over_accounts);
        let profiles_allowed = self.quotas.take(
            caller,
            quota::Kind::Profiles,
            batch.profiles.len() as u64,
            now,
        );
        let mut profiles: Vec<_> = batch
            .profiles
            .iter()
            .take(usize::try_from(profiles_allowed).unwrap_or(usize::MAX))
            .cloned()
            .collect();
        let over_profiles = (batch.profiles.len() - profiles.len()) as u64;
        self.metrics.rejected("profiles_quota", over_profiles);
        let future = profiles
            .iter_mut()
            .filter_map(|u| validate::clamp_profile_times(u, now).then_some(()))
            .count() as u64;
        self.metrics.rejected("profile_time_clamped", future);

        let (flags, bad_samples) = self.learn_samples(&batch.samples, now);
        let invalid = bad_baselines + bad_samples;
        self.metrics
            .samples
            .with_label_values(&["invalid"])
            .inc_by(bad_samples);
        let (added, no_room, (merged, new_values)) = tokio::join!(
            self.fleet.add_known_accounts(accounts, now),
            self.fleet.merge_baselines(&baselines, now),
            self.fleet.merge_profiles(&profiles, now)
        );
        self.metrics.profiles_merged.inc_by(merged);
        self.metrics.rejected("profile_new_values", new_values);
        let refused = invalid + no_room + over_accounts + over_profiles;
        self.metrics.batches.inc();
        self.metrics.known_accounts_added.inc_by(added);
        self.metrics
            .batch_items_dropped
            .with_label_values(&["filter"])
            .inc_by(batch.dropped);
        self.metrics
            .batch_items_dropped
            .with_label_values(&["scorer"])
            .inc_by(refused);
        if no_room > 0 {
            tracing::debug!(no_room, "baselines without a free name were dropped");
        }
        // Fleet rules: this batch's counts join the fleet's; every batch
        // hears every key over its threshold. In Redis with one (every
        // replica sums alike); while Redis fails, on this scorer's own
        // counts (a fallback, counted; never a refusal).
        let (bad_rule_counts, rule_keys, redis) = self.fleet_rules.judge(&batch.rule_counts, now).await;
        self.fleet.redis_result("fleet_rules", redis, now);
        self.metrics.rejected("rule_count_invalid", bad_rule_counts);
        let refused = refused + bad_rule_counts;
        let items = batch.known_accounts.len() + before + batch.profiles.len() + batch.samples.len() + batch.rule_counts.len();
        let decisions_taken = self.take_decisions(&batch, now).await;
        Ok(EventsAnswer {
            accepted: (items as u64).saturating_sub(refused) + decisions_taken,
            flags,
            rule_keys,
        })
    }

    /// `GET /v1/warm?from=N`: a page of the warm-start state (see [`warm`]).
    async fn warm_page(&self, from: u32) -> WarmState {
        let now = now_ms();
        let start = usize::try_from(from).unwrap_or(usize::MAX);
        if start >= SHARDS {
            // After the shards: the account profiles, most recent first.
            let k = start - SHARDS;
            let (profiles, more) = self.fleet.profile_page(k, now).await;
            return WarmState {
                version: WIRE_VERSION,
                profiles,
                next: more.then(|| from.saturating_add(1)),
                ..WarmState::default()
            };
        }
        let page = self.fleet.known_shards(start, WARM_PAGE_SHARDS, now).await;
        let baselines = if from == 0 {
            // Bounded again on the way out: state stored before the bounds
            // (or by another version) is handed out within them.
            self.fleet
                .baselines(now)
                .await
                .iter()
                .filter_map(|b| validate::sanitize_baseline(b).ok())
                .map(|s| s.baseline)
                .collect()
        } else {
            Vec::new()
        };
        // The last shards' page carries the first page of profiles; the
        // others follow at `SHARDS + k`.
        let (profiles, next) = match page.next {
            Some(n) => (Vec::new(), u32::try_from(n).ok()),
            None => {
                let (profiles, more) = self.fleet.profile_page(0, now).await;
                let next = more.then(|| u32::try_from(SHARDS + 1).ok()).flatten();
                (profiles, next)
            }
        };
        WarmState {
            version: WIRE_VERSION,
            baselines,
            known_shards: known::wire_shards(&page.shards),
            profiles,
            next,
        }
    }

    pub(crate) fn refuse(&self, e: ApiError) -> Response {
        self.metrics.error(e.kind);
        error_response(e.status, &e.message)
    }
}

/// Decision lines an export stream may fall behind by before it skips.
const EXPORT_BUFFER: usize = 4_096;

/// 32 random bits from the standard library's per-process random hash keys.
fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(crate::clock::now_ms());
    (h.finish() >> 32) as u32
}

/// Whether reading the body failed on the size limit (rather than, say, a
/// connection reset).
fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(SCORE_PATH, post(score))
        .route(VERDICTS_PATH, get(verdicts))
        .route(EVENTS_PATH, post(events))
        .route(WARM_PATH, get(warm))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/", get(dashboard_page))
        .route("/v1/dashboard", get(dashboard_data))
        .merge(crate::operator::routes())
        .fallback(|| async { error_response(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(app)
}

/// Runs a handler's work and records its latency under `route`.
async fn timed(
    app: &App,
    route: &str,
    work: impl std::future::Future<Output = Response>,
) -> Response {
    let started = Instant::now();
    let response = work.await;
    app.metrics
        .latency
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The query of an authorized call, or why it is refused.
fn authorized_query<Q>(
    app: &App,
    headers: &HeaderMap,
    query: Result<Query<Q>, QueryRejection>,
) -> Result<Q, ApiError> {
    app.authorize(headers)?;
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))
}

async fn score(
    State(app): State<Arc<App>>,
    peer: Peer,
    headers: HeaderMap,
    body: Body,
) -> Response {
    timed(&app, "score", async {
        match app.score(&headers, body, peer.caller()).await {
            Ok(answer) => Json(answer).into_response(),
            Err(e) => app.refuse(e),
        }
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerdictsQuery {
    #[serde(default)]
    since: u64,
}

async fn verdicts(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    query: Result<Query<VerdictsQuery>, QueryRejection>,
) -> Response {
    timed(&app, "verdicts", async {
        match authorized_query(&app, &headers, query) {
            Ok(q) => {
                let now = now_ms();
                let mut answer = app.fleet.verdicts_since(q.since, now).await;
                let mut capped = 0;
                for v in &mut answer.verdicts {
                    capped += u64::from(scoring::cap_verdict(&app.policy, v, now));
                }
                app.metrics.rejected("block_ttl_capped", capped);
                // Every allow entry in force, every answer: an Envoy
                // replaces its list with this one.
                answer.allows = app.ops.allows(&app.fleet, now).await.iter().map(|e| e.entry()).collect();
                Json(answer).into_response()
            }
            Err(e) => app.refuse(e),
        }
    })
    .await
}

/// `POST /v1/events` (secret): an [`EventBatch`] of at most 64 KiB,
/// `MAX_BATCH_ACCOUNTS` known accounts and `MAX_BASELINES` baselines.
/// Each account's Bloom bits are set in the fleet's known-accounts filter,
/// each baseline kept if it is the warmest of its name, `dropped` added to
/// `abuse_scorer_batch_items_dropped_total{by="filter"}`. A baseline with a
/// bad name (empty, > 300 bytes, control characters) or value (not finite,
/// negative) is skipped and counted, not refused: the batch's accounts
/// still count. Each feature sample (at most `MAX_BATCH_SAMPLES`) is
/// scored and learned by the model (see `models`); a bad one is skipped and
/// counted. 200 [`EventsAnswer`] `{"accepted": n, "flags": [...]}`: how many
/// items were taken (invalid baselines and samples, and baselines without a
/// free name, are not; see
/// `abuse_scorer_batch_items_dropped_total{by="scorer"}`), and the sampled
/// clients to tag for anomaly; 401, 413 or 400 (bad JSON, unknown
/// field, another version, over a limit) as `{"error": "..."}`.
/// A Redis failure is never an error: the batch lands in the memory store.
async fn events(
    State(app): State<Arc<App>>,
    peer: Peer,
    headers: HeaderMap,
    body: Body,
) -> Response {
    timed(&app, "events", async {
        match app.events(&headers, body, peer.caller()).await {
            Ok(accepted) => Json(accepted).into_response(),
            Err(e) => app.refuse(e),
        }
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WarmQuery {
    #[serde(default)]
    from: u32,
}

/// `GET /v1/warm?from=N` (secret; N defaults to 0): a [`WarmState`] with
/// up to `WARM_PAGE_SHARDS` (64) non-empty known-accounts shards of index
/// ≥ N, ascending, each `{"index": i, "bits": base64 of its 1,024 bytes}`,
/// and `next`: the index after the page's last shard while non-empty
/// shards remain after it, null when this page is the last (a full page
/// with nothing after it has `next` null). **The baselines are on the
/// first page only** (`from=0`; every baseline kept, at most
/// `MAX_BASELINES`); later pages carry `[]`. N ≥ 1024 is an empty last
/// page. With Redis, the answer is the union of Redis and this scorer's
/// memory store (the memory store alone if Redis fails).
async fn warm(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    query: Result<Query<WarmQuery>, QueryRejection>,
) -> Response {
    timed(&app, "warm", async {
        match authorized_query(&app, &headers, query) {
            Ok(q) => Json(app.warm_page(q.from).await).into_response(),
            Err(e) => app.refuse(e),
        }
    })
    .await
}

/// `GET /healthz`, fields in the documented order.
#[derive(Serialize)]
struct Health {
    status: &'static str,
    store: &'static str,
    redis_ok: bool,
    model: HealthModel,
}

#[derive(Serialize)]
struct HealthModel {
    trained: u64,
    warm: bool,
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    let redis_ok = app.fleet.check_redis(now_ms()).await;
    let (trained, warm) = {
        let m = app.model();
        (m.trained(), m.is_warm())
    };
    Json(Health {
        status: "ok",
        store: app.fleet.kind(),
        redis_ok,
        model: HealthModel { trained, warm },
    })
    .into_response()
}

/// `GET /metrics` (operator): Prometheus text.
async fn metrics(State(app): State<Arc<App>>, peer: Peer, headers: HeaderMap) -> Response {
    if let Err(e) = app.operator_access(&headers, peer) {
        return app.refuse(e);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// `GET /` (operator): the dashboard page. Without the token the same page
/// is served with a 401 — it holds no data, only the form that asks for the
/// token (kept in the tab's sessionStorage and sent as a bearer token on
/// its `/v1/dashboard` calls): a browser cannot send the header on a
/// navigation. Off this machine without a token configured: 403.
async fn dashboard_page(State(app): State<Arc<App>>, peer: Peer, headers: HeaderMap) -> Response {
    let status = match app.operator_access(&headers, peer) {
        Ok(()) => StatusCode::OK,
        Err(e) if e.status == StatusCode::UNAUTHORIZED => {
            app.metrics.error(e.kind);
            StatusCode::UNAUTHORIZED
        }
        Err(e) => return app.refuse(e),
    };
    (
        status,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(dashboard::HTML),
    )
        .into_response()
}

/// `GET /v1/dashboard` (operator): the dashboard's data.
async fn dashboard_data(State(app): State<Arc<App>>, peer: Peer, headers: HeaderMap) -> Response {
    if let Err(e) = app.operator_access(&headers, peer) {
        return app.refuse(e);
    }
    let model: ModelView = app.model().view();
    let store = StoreView {
        kind: app.fleet.kind(),
        redis_ok: app.fleet.redis_ok(),
    };
    let now = now_ms();
    let data = app.dashboard().data(now, model, store);
    let from_redis = match &app.view_redis {
        Some(conn) => app.fleet.redis_result("read_view", crate::fleetview_redis::read(conn, now).await, now),
        None => None,
    };
    let fleet = match from_redis {
        Some((buckets, clients)) => crate::fleetview::data_of(buckets.iter(), clients, now),
        // Without Redis, or while it fails: this scorer's own view.
        None => app.fleet_view().data(now),
    };
    // The callouts' view and the filters' decisions side by side.
    let mut value = serde_json::to_value(data).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert("fleet".into(), serde_json::to_value(fleet).unwrap_or_default());
    }
    Json(value).into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::extract::ConnectInfo;
    use axum::http::Request;
    use std::net::SocketAddr;
    use tower::ServiceExt;

    #[test]
    fn usernames_are_keyed_by_the_secret() {
        let a = username_hasher(Some("one")).key(1, b"alice");
        assert_eq!(a, username_hasher(Some("one")).key(1, b"alice"));
        assert_ne!(a, username_hasher(Some("two")).key(1, b"alice"));
    }

    const TOKEN: &str = "0f4c1e2d3b5a69788796a5b4c3d2e1f00f4c1e2d3b5a69788796a5b4c3d2e1f0";

    fn app(token: Option<&str>) -> Arc<App> {
        let app = App::new(
            Some("filters-secret"),
            Policy::new(100.0, 30),
            Models::new(crate::model::Params::default()),
            Fleet::memory(),
            Metrics::new().unwrap(),
            PathBuf::from("unused"),
        )
        .with_operator_token(token);
        Arc::new(app)
    }

    /// The status of `GET path` from `peer` (None: no ConnectInfo), with
    /// `Authorization: auth` if given.
    async fn status(app: &Arc<App>, path: &str, peer: Option<&str>, auth: Option<&str>) -> u16 {
        let mut req = Request::get(path);
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let mut req = req.body(Body::empty()).unwrap();
        if let Some(p) = peer {
            req.extensions_mut().insert(ConnectInfo(p.parse::<SocketAddr>().unwrap()));
        }
        router(app.clone()).oneshot(req).await.unwrap().status().as_u16()
    }

    fn errors(app: &App, kind: &str) -> u64 {
        app.metrics.errors.with_label_values(&[kind]).get()
    }

    #[tokio::test]
    async fn with_an_operator_token_the_operator_routes_need_it() {
        let app = app(Some(TOKEN));
        let good = format!("Bearer {TOKEN}");
        for path in ["/", "/v1/dashboard", "/metrics"] {
            assert_eq!(status(&app, path, Some("127.0.0.1:4000"), None).await, 401, "{path}: even from this machine");
            assert_eq!(status(&app, path, Some("10.0.0.7:4000"), Some("Bearer wrong")).await, 401, "{path}");
            assert_eq!(status(&app, path, Some("10.0.0.7:4000"), Some(&good)).await, 200, "{path}");
            assert_eq!(status(&app, path, None, Some(&good)).await, 200, "{path}");
        }
        assert_eq!(errors(&app, "operator_unauthorized"), 6);
        assert_eq!(status(&app, "/metrics", Some("10.0.0.7:4000"), Some("Bearer filters-secret")).await, 401,
                   "the filters' secret is not the token");
        assert_eq!(status(&app, "/healthz", Some("10.0.0.7:4000"), None).await, 200, "probes need nothing");
    }

    #[tokio::test]
    async fn without_one_they_answer_this_machine_only() {
        let app = app(None);
        for path in ["/", "/v1/dashboard", "/metrics"] {
            assert_eq!(status(&app, path, Some("127.0.0.1:4000"), None).await, 200, "{path}");
            assert_eq!(status(&app, path, Some("[::1]:4000"), None).await, 200, "{path}");
            assert_eq!(status(&app, path, Some("10.0.0.7:4000"), None).await, 403, "{path}");
            assert_eq!(status(&app, path, Some("127.0.0.6:4000"), None).await, 403, "{path}: Istio's inbound");
            assert_eq!(status(&app, path, None, None).await, 403, "{path}: unknown peer");
        }
        assert_eq!(errors(&app, "not_local"), 9);
        let text = app.metrics.render();
        assert!(text.contains("abuse_scorer_errors_total{kind=\"not_local\"} 9"), "{text}");
    }

    #[test]
    fn logs_name_clients_by_a_keyed_hash() {
        let app = app(None);
        let key = app.log_key("203.0.113.7");
        assert_eq!(key.len(), 8);
        assert!(!key.contains("203"));
        assert_eq!(key, app.log_key("203.0.113.7"));
        assert_ne!(key, app.log_key("203.0.113.8"));
    }
}
