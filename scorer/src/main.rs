//! # abuse-scorer
//!
//! A small native service the Envoy filter calls for **borderline** clients
//! (risk high enough to look at, not high enough to block on the rules
//! alone). It adds what one filter cannot know by itself: a learned model of
//! what ordinary traffic looks like, and fleet state shared by every scorer
//! through Redis. It speaks the wire format of `abuse_engine::wire`.
//!
//! ```sh
//! cargo build -p abuse-scorer
//! target/debug/abuse-scorer --listen 127.0.0.1:8081 \
//!     [--redis-url redis://127.0.0.1:6379] [--secret S] [--operator-token T] \
//!     [--state-dir ./target/scorer] [--warm-up 200] [--block-at 100] [--ttl-s 30]
//! # abuse-scorer listening on http://127.0.0.1:8081
//! ```
//!
//! **Two credentials** (pass both through the environment: a command line
//! is visible to every user of the machine): the filters' *secret* guards
//! what the filters call, the *operator token* what people and Prometheus
//! read. Off loopback (`0.0.0.0`, a pod address) the scorer **refuses to
//! start** without a strong secret — at least 32 bytes, 8 distinct
//! characters, not a published placeholder (`demo-secret`, `change-me`,
//! `secret`, …) — and says which rule failed, never the value. An operator
//! token, if set, must be as strong and differ from the secret. See
//! `docs/security-scorer.md` and `config::check_deployment`.
//!
//! | flag | env | default | meaning |
//! |---|---|---|---|
//! | `--listen` | `LISTEN` | `127.0.0.1:8081` | address; port 0 picks a free one, printed in the banner |
//! | `--redis-url` | `REDIS_URL` | none | share fleet state through Redis; without it, state is per process |
//! | `--secret` | `ABUSE_SCORER_SECRET` | none | required in `x-abuse-scorer-secret` on `/v1/score`, `/v1/verdicts`, `/v1/events` and `/v1/warm`; required (and strong) to listen off loopback |
//! | `--operator-token` | `ABUSE_OPERATOR_TOKEN` | none | required as `Authorization: Bearer` on `GET /`, `/v1/dashboard` and `/metrics`; without one those answer only to 127.0.0.1 and ::1 |
//! | `--caller-known-accounts-per-min` | `CALLER_KNOWN_ACCOUNTS_PER_MIN` | 12000 | known accounts one caller (peer address) may add per minute; the rest are dropped and counted |
//! | `--caller-profiles-per-min` | `CALLER_PROFILES_PER_MIN` | 12000 | account-profile updates one caller may merge per minute |
//! | `--caller-blocks-per-min` | `CALLER_BLOCKS_PER_MIN` | 600 | fleet blocks one caller's score requests may publish per minute (past it the caller still gets its block answer) |
//! | `--state-dir` | `STATE_DIR` | `./target/scorer` | where `model.json` (the model snapshot) and `warm.json` (the warm-start state) are kept |
//! | `--warm-up` | `WARM_UP` | 200 | vectors learned before the model scores |
//! | `--block-at` | `BLOCK_AT` | 100 | score that blocks (match the filter's `risk.block_at`) |
//! | `--ttl-s` | `TTL_S` | 30 | how long the filter may reuse an answer; blocks go to the fleet for 4× (≥ 60 s) |
//! | `--sample-log` | `SAMPLE_LOG` | none | append every feature sample to this file as a JSON line (anomaly null while its model warms) (offline evaluation; `make eval` sets it) |
//!
//! Logs go to stderr (`RUST_LOG`, default `info`); they carry no secret,
//! token, query string, username, session or client address (a fleet
//! block names its client by a keyed hash). SIGTERM or SIGINT stop
//! it gracefully (in-flight requests finish, up to 5 s) and save the model
//! and the warm-start state.
//!
//! ## Endpoints
//!
//! | endpoint | credential | answer |
//! |---|---|---|
//! | `POST /v1/score` | yes | `ScoreRequest` → `ScoreResponse`; 401 bad secret, 413 body > 16 KiB, 400 bad JSON, unknown field, wrong `version` or out-of-range values, each as `{"error": "..."}` |
//! | `GET /v1/verdicts?since=N` | yes | `FleetVerdicts`: live blocks decided by any scorer after cursor N, at most 1,000; pass `next` back as `since` |
//! | `POST /v1/events` | yes | `EventBatch` (a filter worker's tick batch) → `{"accepted": n, "flags": [...]}` (flags: sampled clients the model asks the filter to tag); 401, 413 body > 64 KiB, 400 bad JSON, another `version`, > 2,048 `known_accounts`, > 64 `baselines` or > 64 `samples` (a baseline or sample with a bad name or value is skipped and counted) |
//! | `GET /v1/warm?from=N` | yes | `WarmState`: up to 64 non-empty known-accounts shards of index ≥ N (default 0), `next` = where the next page starts (null: done); the baselines on the first page (`from=0`) only |
//! | `GET /healthz` | none | `{"status":"ok","store":"memory"\|"redis","redis_ok":bool,"model":{"trained":n,"warm":bool}}` (probes) |
//! | `GET /metrics` | operator | Prometheus text (below) |
//! | `GET /` | operator | the dashboard; without the token a 401 carrying the same page, whose form asks for it (or takes `?token=` once) and keeps it in the tab's sessionStorage |
//! | `GET /v1/dashboard` | operator | the dashboard's data: client addresses, scores, reasons and counts only |
//! | `GET /v1/decisions?client=\|id=\|session=\|api_key=\|username=` | operator | decision records, newest first (with `client=`, its state now); raw credentials are hashed here, never kept |
//! | `GET /v1/decisions/{id}` | operator | one record with its reasons and figures |
//! | `DELETE /v1/decisions?client=ADDR[&quiet_s=N]` | operator | unblock everywhere: lifts on the verdicts' cursor, fleet blocks forgotten |
//! | `GET /v1/decisions/stream[?since_ms=N]` | operator | JSON lines of decision records, replayed then live (a SIEM's input) |
//! | `GET\|POST /v1/allow`, `DELETE /v1/allow/{id}` | operator | allow entries (cidr, api_key, agent), on every `/v1/verdicts` answer |
//! | `GET /v1/audit[?at=MS]` | operator | every operator change, or the allow list as it stood at `at` |
//!
//! `abuse-scorer ctl …` is the same API from a shell (see `ctl.rs`); the
//! operator's state and its bounds are in `decisions.rs`, `allow.rs`,
//! `audit.rs`, `ops_store.rs` and `operator.rs`.
//!
//! *secret*: `x-abuse-scorer-secret` (401 `unauthorized`). *operator*:
//! `Authorization: Bearer <ABUSE_OPERATOR_TOKEN>` (401
//! `operator_unauthorized`, even from this machine); with no token
//! configured, a peer at exactly 127.0.0.1 or ::1, else 403 `not_local`
//! (not all of 127/8: Istio's sidecar delivers inbound connections from
//! 127.0.0.6).
//!
//! **What callers write is bounded** beyond its shape, every refusal, cap
//! and clamp counted in `abuse_scorer_rejected_total{kind}`:
//!
//! | what | bound | kind |
//! |---|---|---|
//! | batch baselines | only `login:`/`group:` names, 1 to 10⁹ samples, finite ≥ 0 values (else skipped) | `baseline_invalid` |
//! | | login failure ratio and unknown share ≤ 0.35 (a posted 1.0 would switch recognition off in every Envoy warming from it), group rate ≤ 100,000 req/s; samples stored capped at 10⁶ so no made-up count outranks real ones forever; applied again to what `/v1/warm` hands out | `baseline_clamped` |
//! | score requests | `features.risk` counts at most `block_at`: a `risk: 1e6` is one ordinary block for `4 · ttl_s` | `risk_capped` |
//! | fleet blocks | `--caller-blocks-per-min` per caller; stored blocks handed out by `/v1/verdicts` end at most `4 · ttl_s` from now | `block_quota`, `block_ttl_capped` |
//! | known accounts | `--caller-known-accounts-per-min` per caller | `known_accounts_quota` |
//! | profiles | `--caller-profiles-per-min` per caller; no time after now + 60 s; into a known profile one new value per set (device, country, ASN, network) per update | `profiles_quota`, `profile_time_clamped`, `profile_new_values` |
//!
//! A caller is the connection's peer address (at most 10,000 tracked).
//!
//! Metrics: `abuse_scorer_score_requests_total{action}`,
//! `abuse_scorer_errors_total{kind=unauthorized|too_large|bad_request|operator_unauthorized|not_local}`,
//! `abuse_scorer_rejected_total{kind}` (the bounds above),
//! `abuse_scorer_request_duration_seconds{route}` (histogram),
//! `abuse_scorer_model_samples`, `abuse_scorer_model_warm`,
//! `abuse_scorer_store_errors_total`, `abuse_scorer_store_fallbacks_total`,
//! `abuse_scorer_redis_up`, `abuse_scorer_fleet_verdicts_total`,
//! `abuse_scorer_detections_total{reason}` (one per reason per answer),
//! `abuse_scorer_samples_total{kind=learned|excluded|gated|invalid}`,
//! `abuse_scorer_anomaly_flags_total`,
//! `abuse_scorer_batches_total`, `abuse_scorer_known_accounts_added_total`
//! (accounts new to the known-accounts filter),
//! `abuse_scorer_batch_items_dropped_total{by=filter|scorer}` (what the
//! batches report as dropped; baselines the scorer had no name for).
//!
//! ## Scoring
//!
//! `score = risk + 60·max(0, anomaly − 0.5)·2 + 50·[username tried ≥ 20 times
//! fleet-wide in 10 min] + 50·[session used from ≥ 5 addresses in 10 min]`;
//! block when the score *without the model's points* reaches `block_at` (or
//! when the client is already blocked fleet-wide), tag at half of it: the
//! model makes tags, never blocks. Reasons are the request's, plus `credential_stuffing`,
//! `session_sharing`, and `anomaly` when the model added to the score. A
//! new block is published to the fleet for `4 · ttl_s` (at least 60 s). See
//! `scoring.rs`.
//!
//! ## The model
//!
//! Unsupervised streaming **Half-Space Trees** (Tan, Ting & Liu 2011): 25
//! trees of depth 10, reference/latest mass windows of 250 vectors, built
//! from a fixed seed (every scorer has the same trees). Features are the 18
//! of `Features::to_vector()`, each `ln(1 + max(x, 0))`, scaled by the
//! minimum and maximum seen during warm-up to [0.3, 0.7] (the margin lets
//! the trees cut off what lies just outside ordinary traffic). For the
//! first `--warm-up` vectors it only learns and answers no anomaly. It
//! learns from the filters' samples of all their clients (tick batches),
//! never from callouts, one model over all samples and one per route group
//! (see `models.rs`).
//! Anomaly = `1 / (1 + 2^(L − τ))`, where `L` is the mean over trees of
//! `log2(1 + mass · 2^depth)` at the node where the walk stops (reference
//! mass below a tenth of the window) and `τ` the model's **tag line**, per
//! route group: 1.5 bits under the 8th smallest `L` of the last ~1,000
//! distinct sampled clients of the group (out of sample, gated ones
//! included): 0.5 = on the line, above = tagged `anomaly`; a client of the
//! stream is beyond it with probability at most 8/1,001 per sample,
//! whatever the traffic (see `model.rs`, **Tag line**).
//! Counts are per person (divided by the key's sessions). **Explanation**:
//! every split on the way down is charged the bits of mass it removed
//! beyond the one bit an ordinary point loses, to the split's feature;
//! summed over trees and normalised, the top three features are returned
//! with their share (`explanation` in the answer). The model is saved to
//! `STATE_DIR/model.json` every 30 s and at shutdown (temp file + rename)
//! and loaded at start (a corrupt file is logged and ignored). See
//! `model.rs`.
//!
//! ## Dashboard
//!
//! `GET /` is a self-contained page (no CDN, no fonts) polling
//! `GET /v1/dashboard` every 2 s: top 20 risky clients of the last 10
//! minutes (`#top-clients`, one `<tr data-client="ADDR">` each), detections
//! per reason in 10 s buckets over 10 minutes drawn as SVG lines
//! (`#detections-chart`), score requests per second by action over the last
//! minute (`#callout-rate`), and model and store state (`#model-state`).
//! The JSON:
//!
//! ```json
//! {"now_ms": 1795750311361,
//!  "top_clients": [{"client": "203.0.113.7", "score": 155.0, "action": "block",
//!                   "reasons": ["credential_stuffing", "anomaly"], "anomaly": 0.93,
//!                   "last_seen_ms": 1795750311310, "requests": 3}],
//!  "detections": {"start_ms": 1795749720000, "bucket_s": 10,
//!                 "series": {"credential_stuffing": [0, 0, "… 60 counts, oldest first …", 3]}},
//!  "callouts": {"window_s": 60.0, "per_s": {"allow": 0.5, "tag": 0.02, "block": 0.05},
//!               "total": {"allow": 120, "tag": 4, "block": 9}},
//!  "model": {"trained": 1234, "warm": true, "warm_up": 200, "excluded": 12, "gated": 3,
//!            "calibration": {"tag_line": 13.1, "rank": 2, "points": 250, "kth_log_mass": 15.6,
//!                            "median_log_mass": 17.4, "false_tag_bound": 0.00797},
//!            "groups": [{"group": "api", "trained": 1100, "warm": true, "calibration": {"…": "as above"}}]},
//!  "store": {"kind": "redis", "redis_ok": true},
//!  "anomaly_distribution": {"bins": 20, "counts": [0, 3, "… 20 counts …", 1],
//!                           "above_half": 0.08, "samples": 812}}
//! ```
//!
//! Only addresses, scores, reasons and counts — still personal data: the
//! endpoint takes the operator token (or this machine only). Its history is
//! bounded (1,000 clients, 60 buckets).
//!
//! ## Fleet state
//!
//! Per 10-minute sliding window: attempts per username (hashed with a key
//! derived from the secret, never stored in clear), distinct addresses per
//! session hash, live blocks, and the verdict log with its cursor (last
//! 10,000). In memory every map is capped (100,000 entries, CLOCK-style
//! eviction); in Redis keys expire with their window (the verdict log and
//! cursor 7 days after the last block). If a Redis call fails
//! or takes over 250 ms the in-process store answers (it mirrors every
//! write), a warning is logged at most every 10 s, and
//! `abuse_scorer_store_fallbacks_total` counts it: never a 500. See
//! `store/`. The counts of the filters' `fleet` rules follow the same
//! rule (Redis with a URL, this process's memory as the fallback): see
//! `rules.rs`.
//!
//! ## Warm start
//!
//! Every filter worker posts a tick batch to `POST /v1/events`: the fleet
//! keys of accounts that just logged in (set in the scorer's copy of the
//! known-accounts Bloom filter, 1,024 shards of 1 KiB, the engine's
//! `known_accounts::bit_positions` geometry) and its learned baselines (per
//! name the one with the most `samples` is kept, the newer on a tie; at
//! most 64 names, a name unmentioned for a day making room for a new one
//! when all are taken). A fresh Envoy pages through `GET /v1/warm` and ORs
//! the shards into its own filter. In Redis the state lives under versioned
//! keys (`abuse:v1:known_accounts:{shard}`, `abuse:v1:baselines`,
//! `abuse:v1:profiles`) that expire 30 days after their last write; in
//! memory it is fixed in size and saved to `STATE_DIR/warm.json`
//! every 30 s when it changed and at shutdown. See `known.rs`.

mod access;
mod allow;
mod app;
mod audit;
mod bounded;
mod clock;
mod config;
mod ctl;
mod dashboard;
mod decisions;
mod fleetview;
mod fleetview_redis;
mod known;
mod metrics;
mod model;
mod models;
mod operator;
mod ops_store;
mod profiles;
mod quiet;
mod quota;
mod rules;
mod sample_log;
mod scoring;
mod snapshot;
mod store;
mod validate;

use clap::Parser;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// How long in-flight requests get to finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> ExitCode {
    let mut cli = config::Cli::parse();
    if let Some(config::Command::Ctl(ctl)) = cli.command.take() {
        // Blocking HTTP calls: off the runtime's worker.
        let token = cli.operator_token().map(str::to_string);
        return tokio::task::spawn_blocking(move || ctl::run(&ctl, token.as_deref()))
            .await
            .unwrap_or(ExitCode::FAILURE);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("abuse-scorer: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: config::Cli) -> Result<(), String> {
    // Before anything else: a scorer that should not start must not
    // half-start (bind, load state) first.
    let warnings = config::check_deployment(cli.listen, cli.secret(), cli.operator_token())?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let metrics = metrics::Metrics::new().map_err(|e| format!("metrics: {e}"))?;
    let params = model::Params {
        warm_up: cli.warm_up,
        ..model::Params::default()
    };
    let model = snapshot::load_or_new(&cli.state_dir, params);
    let fleet = match &cli.redis_url {
        Some(url) => store::Fleet::redis(
            url,
            store::FleetMetrics {
                errors: metrics.store_errors.clone(),
                fallbacks: metrics.store_fallbacks.clone(),
                redis_up: metrics.redis_up.clone(),
            },
        )
        .map_err(|e| e.to_string())?,
        None => store::Fleet::memory(),
    };
    snapshot::load_warm(&cli.state_dir, fleet.local());
    let policy = scoring::Policy::new(cli.block_at, cli.ttl_s);
    let sample_log = match &cli.sample_log {
        Some(path) => sample_log::SampleLog::open(path).map_err(|e| format!("--sample-log {}: {e}", path.display()))?,
        None => sample_log::SampleLog::off(),
    };
    let app = Arc::new(
        app::App::new(
            cli.secret(),
            policy,
            model,
            fleet,
            metrics,
            cli.state_dir.clone(),
        )
        .with_sample_log(sample_log)
        .with_operator_token(cli.operator_token())
        .with_quotas(quota::Limits {
            known_accounts_per_min: cli.caller_known_accounts_per_min,
            profiles_per_min: cli.caller_profiles_per_min,
            blocks_per_min: cli.caller_blocks_per_min,
        }),
    );

    let signals = shutdown_signals();
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cli.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    // The one line on stdout: scripts and tests read the address from it.
    let mut out = std::io::stdout();
    let _ = writeln!(out, "abuse-scorer listening on http://{addr}");
    let _ = out.flush();
    tracing::info!(%addr, store = app.fleet.kind(), "serving");

    let saver = tokio::spawn(snapshot::every(app.clone()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // The peer address reaches the handlers (`access::Peer`): the operator
    // routes without a token answer only to this machine, quotas are per peer.
    let service = app::router(app.clone())
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    let server = axum::serve(listener, service).with_graceful_shutdown(async move {
        let _ = stopped.await;
    });
    let mut serving = tokio::spawn(async move { server.await });

    tokio::select! {
        ended = &mut serving => {
            // Only an accept-loop error ends the server before a signal.
            saver.abort();
            save_now(&app).await;
            return match ended {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("server: {e}")),
                Err(e) => Err(format!("server task: {e}")),
            };
        }
        () = shutdown_signal(signals) => {}
    }
    tracing::info!("shutting down");
    let _ = stop.send(());
    if tokio::time::timeout(DRAIN, &mut serving).await.is_err() {
        tracing::warn!(
            "requests still open after {} s; closing them",
            DRAIN.as_secs()
        );
        serving.abort();
    }
    saver.abort();
    save_now(&app).await;
    Ok(())
}

async fn save_now(app: &Arc<app::App>) {
    match snapshot::save(app).await {
        Ok(true) => tracing::info!(trained = app.model().trained(), "saved the model snapshot"),
        Ok(false) => tracing::info!("model unchanged since the last snapshot"),
        Err(e) => tracing::warn!(error = %e, "saving the model snapshot failed"),
    }
    match snapshot::save_warm(app).await {
        Ok(true) => tracing::info!("saved the warm-start snapshot"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "saving the warm-start snapshot failed"),
    }
}

/// SIGTERM (orchestrators) and SIGINT (Ctrl-C) handlers. Installed before
/// the banner is printed: whoever reads the banner may signal at once, and
/// a signal that arrived before its handler would kill the process without
/// saving the model. If one cannot be installed the other still works.
fn shutdown_signals() -> [Option<Signal>; 2] {
    [SignalKind::terminate(), SignalKind::interrupt()].map(|kind| {
        signal(kind)
            .map_err(|e| tracing::warn!(error = %e, ?kind, "cannot listen for a shutdown signal"))
            .ok()
    })
}

/// The first of the installed signals to arrive.
async fn shutdown_signal([mut term, mut int]: [Option<Signal>; 2]) {
    async fn recv(s: &mut Option<Signal>) {
        match s {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    tokio::select! {
        () = recv(&mut term) => {}
        () = recv(&mut int) => {}
    }
}
