//! Distributed credential stuffing: hundreds of rotating addresses, each
//! trying only 1–3 logins, copying real browsers' user agents and header
//! order, stay under every per-client threshold and share every client
//! fingerprint with real users. What no disguise changes is what the attempts
//! are *for*: accounts that do not exist here, accounts whose owners log in
//! from elsewhere, one password on many accounts — and that the endpoint as a
//! whole fails far more than it normally does.
//!
//! **Recognition** (the endpoint). Over the last `window_s` the endpoint's
//! failure ratio `r = failures / attempts` (once `min_attempts` were made)
//! is compared with its baseline `b`: the endpoint is under attack while
//! `r > max(attack_factor · b, attack_min_ratio)`, and for `hold_s` after.
//! Cold start: for the first [`WARM_UP`] judged logins `b` stays at
//! `baseline_prior` — an attack that begins with the endpoint's life cannot
//! drag it — while the mean of the windows that were *not* an attack is
//! learned aside; it becomes `b` at the end of the warm-up. After that `b`
//! follows `r` outside attacks as an exponential average in time
//! (`α = 1 − e^(−Δt/τ)`, τ = [`BASELINE_TAU_MS`], one hour). Once warm, and
//! once `known_accounts_min` successful logins taught the known accounts,
//! the endpoint is also under attack while the share `u` of the window's
//! attempts on accounts not known to exist exceeds
//! `max(attack_factor · b_u, attack_unknown_share)`, `b_u` being the share
//! it normally has (learned like `b`, from the first window: after a cold
//! start every first login is "unknown", `b_u` is high and this channel
//! stays shut until the known accounts catch up), while the window also
//! fails more than 2 × `b` (real first logins mostly succeed). A leaked list's mark,
//! which real users' logins and a busy endpoint's many successes cannot
//! dilute the way they dilute `r`. Channels that no dilution removes
//! ([`DistributedStuffing::on_attempt`]): failed attempts on unknown
//! accounts (≥ [`UNKNOWN_FAILURES_MIN`], ≥ [`UNKNOWN_FAILING_RATIO`] of
//! the attempts on such accounts failing, their share above
//! `attack_factor · b_u` and [`UNKNOWN_FAILING_SHARE`]; before unknown
//! accounts are evidence, twice as many and [`COLD_UNKNOWN_FAILING_RATIO`]
//! failing), names unlike every name that logged in here failing
//! ([`FOREIGN_FAILING_RATIO`], a [`FOREIGN_SHARE`] of the attempts), such a
//! name with a sprayed password, and before unknown accounts are evidence a
//! password failing widely on unknown accounts. A spray alone never
//! recognises (real users' common wrong passwords would be a false alarm).
//!
//! **The filter's own refusals count** ([`DistributedStuffing::counts_refusal`]):
//! an attempt refused on the attack's evidence, by a new client, is a
//! failed attempt for the endpoint, the tool fingerprint and (when the
//! refusal stands without it) the password — never for the client's or the
//! account's own record. Without it a mostly refused attack emptied the
//! window: the hold ran out ~`hold_s` after recognition and a few attempts a
//! minute passed to renew the tool's failures.
//!
//! **Attribution** (the attempt), only while the endpoint is under attack.
//! Each attempt adds up its evidence ([`AttemptSignals::score`]):
//!
//! | evidence | points |
//! |---|---|
//! | the account is not known to exist (no successful login ever, see `known_accounts`) — only where real logins to unknown accounts are rare (the endpoint's learned unknown share ≤ [`UNKNOWN_RARE`]; after a cold start every first login is one) | 2 |
//! | the same before that (`unknown_unsure`): never refuses by itself | 1 |
//! | ... while half the window's attempts on unknown accounts fail, and this account is not failing by others' hands (`unknowns_failing`): the level is `high` (a second factor), never a refusal | 0 |
//! | the account is known, but the attempt does not look like its owner (fingerprint and country of its recent successful logins) | 2 |
//! | the password was tried on `spray_min_accounts` accounts in the window (and let nobody in lately) | 2 |
//! | the headers do not match the browser the user agent claims | 2 |
//! | a tool's fingerprint (a user agent that claims no browser, with the same header order) failed at least 10 times in the window with almost no successes | 2 |
//! | an unknown account whose name's shape never logged in here, or whose format is not the one format of a site that issues its names (`unlike_site_names`) | 2 |
//! | the client is new (no successful login, at most `new_client_max_requests` requests) | 1 |
//! | the client never made a request that was not a login attempt | 1 |
//!
//! At the owner's own place (a device *and* a network of the account's
//! recent successful logins: `owners_place`) the client's evidence (tool,
//! new, never browsed) counts nothing and the attempt is never refused: an
//! API user's script shares its client library with attacks, not its
//! server's address.
//!
//! At `refuse_at` (4) the attempt is refused before the upstream and the
//! client charged `weight`; below it, the attempt goes on with the
//! `x-abuse-login-risk` header for the application to step up. A stuffer on
//! a new address posting straight to the login with a leaked credential
//! scores 4 either way (unknown account, or known account that is not its
//! owner's device); the owner logging in from their device scores at most 2;
//! a person logging in for the first time (unknown account) after using the
//! site scores 3. A browser's fingerprint is never evidence: the attacker
//! copies it and real users share it (and refused attempts would keep it
//! "failing" for ever); a tool that says what it is, is.
//!
//! Scenario, in short:
//! - counts: login attempts and failures, unknown accounts, a password's accounts, a tool fingerprint's failures;
//! - grouped by: login endpoint (recognition); the attempt, its account, password and fingerprint (attribution);
//! - over: sliding `credential_stuffing.distributed.window_s`, attack held `hold_s`;
//! - over the threshold: during an attack an attempt with evidence `>= refuse_at` is refused, `credential_stuffing` (`weight`) to its client.

use super::Signal;
use crate::endpoint::{EndpointRecord, FingerprintRecord, NameShape, SprayRecord};
use crate::reason::Reason;
use super::Figure;
use crate::record::ClientRecord;
use crate::validate::{check_finite_range, check_range, ConfigError};
use serde::Deserialize;

// ---- configuration (`credential_stuffing.distributed`) ----

/// Recognising an attack spread over many addresses from the login
/// endpoint's failure ratio (see `detectors::distributed_stuffing`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct DistributedStuffingConfig {
    pub enabled: bool,
    pub window_s: u32,
    /// Attempts in the window before the ratio is judged.
    pub min_attempts: u32,
    /// Failure ratio assumed before any traffic was seen, and the fixed
    /// baseline while the real one is learned (an attack cannot drag it).
    pub baseline_prior: f32,
    /// Attack when the ratio exceeds `attack_factor` x baseline...
    pub attack_factor: f32,
    /// ...and at least this ratio.
    pub attack_min_ratio: f32,
    /// How long the endpoint stays "under attack" after the last sign of it.
    pub hold_s: u32,
    /// A client with more requests than this, or any successful login, is not "new".
    pub new_client_max_requests: u32,
    /// During an attack, an attempt whose evidence adds up to this is
    /// refused before it reaches the upstream (see the detector's doc).
    pub refuse_at: u32,
    /// Successful logins the known-accounts table must have learned before
    /// "unknown account" counts as evidence (0: from the first).
    pub known_accounts_min: u32,
    /// Also an attack: more than this share of the window's attempts are
    /// on accounts not known to exist (once the baseline and the known
    /// accounts have learned; 1 turns this off).
    pub attack_unknown_share: f32,
    /// One password failing on this many accounts in the window is a spray.
    pub spray_min_accounts: u32,
    /// Risk added to a client per refused attempt (two refusals reach the
    /// default `block_at`: one refused attempt never boxes a person).
    pub weight: f32,
}

impl Default for DistributedStuffingConfig {
    fn default() -> Self {
        DistributedStuffingConfig {
            enabled: true,
            window_s: 60,
            min_attempts: 20,
            baseline_prior: 0.2,
            attack_factor: 2.5,
            attack_min_ratio: 0.25,
            hold_s: 300,
            new_client_max_requests: 5,
            refuse_at: 4,
            known_accounts_min: 20,
            attack_unknown_share: 0.6,
            spray_min_accounts: 5,
            weight: 50.0,
        }
    }
}

impl DistributedStuffingConfig {
    /// `credential_stuffing.distributed`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = self;
        check_range("credential_stuffing.distributed.window_s", d.window_s, 5, 86_400)?;
        check_range("credential_stuffing.distributed.min_attempts", d.min_attempts, 1, 1_000_000)?;
        check_finite_range("credential_stuffing.distributed.baseline_prior", d.baseline_prior, 0.0, 1.0)?;
        check_finite_range("credential_stuffing.distributed.attack_factor", d.attack_factor, 1.0, 100.0)?;
        check_finite_range("credential_stuffing.distributed.attack_min_ratio", d.attack_min_ratio, 0.01, 1.0)?;
        check_range("credential_stuffing.distributed.hold_s", d.hold_s, 1, 86_400)?;
        check_range("credential_stuffing.distributed.refuse_at", d.refuse_at, 1, 100)?;
        check_range("credential_stuffing.distributed.known_accounts_min", d.known_accounts_min, 0, 1_000_000)?;
        check_finite_range("credential_stuffing.distributed.attack_unknown_share", d.attack_unknown_share, 0.05, 1.0)?;
        check_range("credential_stuffing.distributed.spray_min_accounts", d.spray_min_accounts, 2, 1_000)?;
        check_range("credential_stuffing.distributed.new_client_max_requests", d.new_client_max_requests, 0, 1_000_000)?;
        check_finite_range("credential_stuffing.distributed.weight", d.weight, 0.0, 10_000.0)?;
        Ok(())
    }
}


/// Time constant of the baseline's exponential average.
pub const BASELINE_TAU_MS: f64 = 3_600_000.0;
/// Judged logins during which the baseline stays at the prior.
pub const WARM_UP: u32 = 50;
/// The highest failure-ratio baseline the endpoint learns: an attacker who
/// fails on purpose right after a restart (while the baseline is learned)
/// could otherwise lift it to where no attack line can be crossed (with the
/// default `attack_factor` 2.5, a baseline of 0.4 puts the line at 1). The
/// scorer clamps the fleet's baselines alike.
pub const MAX_BASELINE: f32 = 0.35;
/// "Unknown account" is evidence only while the endpoint's real logins are
/// to unknown accounts at most this often.
pub const UNKNOWN_RARE: f32 = 0.25;
/// A tool fingerprint is attacking after this many failures in the window
/// with at most one success per 20 failures.
pub const TOOL_MIN_FAILURES: f64 = 10.0;

/// Failed attempts on unknown accounts in the window before they can
/// recognise an attack by themselves.
pub const UNKNOWN_FAILURES_MIN: f64 = 10.0;
/// ... when at least this share of the attempts on unknown accounts fail ...
pub const UNKNOWN_FAILING_RATIO: f64 = 0.6;
/// ... (before unknown accounts are evidence: at least this share of them fail) ...
pub const COLD_UNKNOWN_FAILING_RATIO: f64 = 0.8;
/// ... and they are more than this share of the window's attempts (and
/// `attack_factor` times the usual share).
pub const UNKNOWN_FAILING_SHARE: f32 = 0.1;
/// Attempts on unknown accounts with names unlike the site's recognise an
/// attack when this share of them fails...
pub const FOREIGN_FAILING_RATIO: f64 = 0.9;
/// ... and they are this share of the window's attempts.
pub const FOREIGN_SHARE: f64 = 0.1;
/// During an attack, an attempt on an account not known to exist is told
/// `high` (a second factor) while at least this share of the window's
/// attempts on such accounts fail: then one more is at least as likely the
/// attack's as a person's.
pub const UNKNOWN_STEP_UP_RATIO: f64 = 0.5;
/// Successful logins whose usernames' shapes are learned before a name
/// unlike them is evidence.
pub const NAMES_MIN: u32 = 20;
/// A site whose names that logged in are all of this many formats issues
/// its names (see [`NameShape`]: `user0042`, a customer number): a name of
/// another format is unlike its names even when its shape is theirs. One:
/// a single name of another format that ever logged in (a legacy account,
/// an `admin`) turns the check off for good.
pub const STRICT_FORMATS: u32 = 1;

/// One attempt as the endpoint counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttemptOutcome {
    pub failed: bool,
    /// Whether the account is not known to exist (None: no username read).
    pub unknown: Option<bool>,
    /// The username's shape and format (a success teaches them).
    pub name_shape: Option<NameShape>,
    /// An unknown account whose name is unlike the site's (see
    /// [`AttemptSignals::unlike_site_names`]).
    pub foreign: bool,
    /// ... with a password that failed on many accounts in the window: a
    /// list from elsewhere, sprayed.
    pub foreign_spray: bool,
    /// The attempt's password has now failed on twice `spray_min_accounts`
    /// accounts in the window ([`DistributedStuffing::is_sprayed_widely`]).
    pub sprayed_widely: bool,
}

#[derive(Debug, Clone)]
pub struct DistributedStuffing {
    config: DistributedStuffingConfig,
    window_ms: u64,
    hold_ms: u64,
}

/// What an attempt showed, as far as it is known (the account-level parts
/// once the body gave the username).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttemptSignals {
    pub under_attack: bool,
    pub new_client: bool,
    pub never_browsed: bool,
    pub inconsistent_headers: bool,
    pub unknown_account: bool,
    pub unlike_owner: bool,
    pub sprayed_password: bool,
    pub tool_fingerprint: bool,
    /// The username's shape is none of those that ever logged in here
    /// (told only for accounts not known to exist).
    pub unlike_site_names: bool,
    /// During an attack, the account is not known to exist, but the filter
    /// cannot tell what that is worth (after a cold start every returning
    /// user's first login is to an "unknown" account): points toward
    /// `high` (a second factor), never a refusal by itself.
    pub unknown_unsure: bool,
    /// ... while most of the window's attempts on unknown accounts fail
    /// ([`DistributedStuffing::unknowns_failing`]): `high` (the application
    /// asks for a second factor), still never a refusal by itself.
    pub unknowns_failing: bool,
    /// The attempt comes from the device *and* the network of the
    /// account's recent successful logins: its owner, whatever client
    /// library it shares with an attack.
    pub owners_place: bool,
}

impl AttemptSignals {
    pub fn score(&self) -> u32 {
        // At the owner's own place, what the client is (a tool, new to
        // this Envoy, a script that only logs in) says nothing against it.
        let client = !self.owners_place;
        let points = [
            (self.unknown_account, 2),
            (self.unknown_unsure, 1),
            (self.unlike_owner, 2),
            (self.sprayed_password, 2),
            (self.inconsistent_headers, 2),
            (self.tool_fingerprint && client, 2),
            (self.unlike_site_names, 2),
            (self.new_client && client, 1),
            (self.never_browsed && client, 1),
        ];
        points.iter().filter(|(on, _)| *on).map(|(_, p)| p).sum()
    }

    /// Names for the login-risk header, in a fixed order.
    pub fn names(&self) -> Vec<&'static str> {
        let all = [
            (self.under_attack, "endpoint_under_attack"),
            (self.unknown_account, "unknown_account"),
            (self.unknown_unsure, "unknown_account_unsure"),
            (self.unknowns_failing, "unknowns_failing"),
            (self.unlike_owner, "unlike_owner"),
            (self.sprayed_password, "sprayed_password"),
            (self.inconsistent_headers, "inconsistent_headers"),
            (self.tool_fingerprint, "tool_fingerprint"),
            (self.unlike_site_names, "unlike_site_names"),
            (self.new_client, "new_client"),
            (self.never_browsed, "never_browsed"),
            (self.owners_place, "owners_place"),
        ];
        all.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect()
    }

    /// `high` during an attack when the attempt is refused or would need
    /// little more to be, or is on an unknown account while most such
    /// attempts fail; `medium` on any evidence or during an attack, else
    /// `low`. Outside an attack nothing here is more than `medium`: a new
    /// user's first login from a new device is not a reason for a second factor.
    pub fn level(&self, refuse_at: u32) -> &'static str {
        let score = self.score();
        if self.under_attack && (score >= refuse_at.saturating_sub(1).max(1) || self.unknowns_failing) {
            "high"
        } else if score > 0 || self.under_attack {
            "medium"
        } else {
            "low"
        }
    }

    /// The login-risk header's value, e.g. `high; score=3; reasons=endpoint_under_attack,unknown_account,new_client`.
    pub fn header(&self, refuse_at: u32) -> String {
        format!("{}; score={}; reasons={}", self.level(refuse_at), self.score(), self.names().join(","))
    }
}

impl DistributedStuffing {
    pub fn new(config: &DistributedStuffingConfig) -> Option<DistributedStuffing> {
        config.enabled.then(|| DistributedStuffing {
            config: config.clone(),
            window_ms: u64::from(config.window_s).saturating_mul(1000),
            hold_ms: u64::from(config.hold_s).saturating_mul(1000),
        })
    }

    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    pub fn refuse_at(&self) -> u32 {
        self.config.refuse_at
    }

    /// Whether the endpoint's baseline is still the prior.
    pub fn learning(&self, endpoint: &EndpointRecord) -> bool {
        endpoint.baseline_samples < WARM_UP
    }

    /// Whether the known-accounts table has learned enough successful logins.
    pub fn knows_accounts(&self, endpoint: &EndpointRecord) -> bool {
        endpoint.successes_seen >= self.config.known_accounts_min
    }

    /// Whether "unknown account" is evidence: the table knows enough and
    /// the endpoint's real logins are rarely to unknown accounts.
    pub fn unknown_is_evidence(&self, endpoint: &EndpointRecord) -> bool {
        self.knows_accounts(endpoint) && !self.learning(endpoint) && endpoint.unknown_baseline <= UNKNOWN_RARE
    }

    pub fn on_fingerprint_outcome(&self, fp: &mut FingerprintRecord, failed: bool, now_ms: u64) {
        fp.last_seen_ms = now_ms;
        if failed {
            fp.failures.record(now_ms, self.window_ms);
        } else {
            fp.successes.record(now_ms, self.window_ms);
        }
    }

    /// Whether a (non-browser) fingerprint behaves like an attack tool.
    pub fn tool_is_attacking(&self, fp: &FingerprintRecord, now_ms: u64) -> bool {
        let failures = fp.failures.estimate(now_ms, self.window_ms);
        let successes = fp.successes.estimate(now_ms, self.window_ms);
        failures >= TOOL_MIN_FAILURES && successes * 20.0 <= failures
    }

    /// Records one login outcome on the endpoint and updates its state.
    /// `unknown`: whether the attempt's account is not known to exist (None
    /// when the username could not be read).
    pub fn on_outcome(&self, endpoint: &mut EndpointRecord, failed: bool, unknown: Option<bool>, now_ms: u64) {
        self.on_attempt(endpoint, &AttemptOutcome { failed, unknown, ..AttemptOutcome::default() }, now_ms);
    }

    /// Records one attempt's outcome on the endpoint — the application's
    /// answer, or the filter's own refusal of an attack-attributed attempt
    /// (a failure: see [`DistributedStuffing::counts_refusal`]) — and
    /// updates its state.
    pub fn on_attempt(&self, endpoint: &mut EndpointRecord, outcome: &AttemptOutcome, now_ms: u64) {
        let AttemptOutcome { failed, unknown, name_shape, foreign, foreign_spray, sprayed_widely } = *outcome;
        let since_ms = now_ms.saturating_sub(endpoint.last_seen_ms) as f64;
        endpoint.last_seen_ms = now_ms;
        if !failed {
            endpoint.successes_seen = endpoint.successes_seen.saturating_add(1);
            if let Some(shape) = name_shape {
                endpoint.learn_name_shape(shape);
            }
        }
        if endpoint.baseline_samples == 0 && endpoint.baseline == 0.0 {
            endpoint.baseline = self.config.baseline_prior;
        }
        let attempts = endpoint.attempts.record(now_ms, self.window_ms);
        let failures = if failed {
            endpoint.failures.record(now_ms, self.window_ms)
        } else {
            endpoint.failures.estimate(now_ms, self.window_ms)
        };
        let unknown_attempts = if unknown == Some(true) {
            endpoint.unknown.record(now_ms, self.window_ms)
        } else {
            endpoint.unknown.estimate(now_ms, self.window_ms)
        };
        let unknown_failures = if unknown == Some(true) && failed {
            endpoint.unknown_failures.record(now_ms, self.window_ms)
        } else {
            endpoint.unknown_failures.estimate(now_ms, self.window_ms)
        };
        let (foreign_attempts, foreign_failures) = match foreign {
            true => (
                endpoint.foreign.record(now_ms, self.window_ms),
                if failed {
                    endpoint.foreign_failures.record(now_ms, self.window_ms)
                } else {
                    endpoint.foreign_failures.estimate(now_ms, self.window_ms)
                },
            ),
            false => (
                endpoint.foreign.estimate(now_ms, self.window_ms),
                endpoint.foreign_failures.estimate(now_ms, self.window_ms),
            ),
        };
        if attempts < f64::from(self.config.min_attempts) {
            return;
        }
        let ratio = (failures / attempts.max(1.0)).clamp(0.0, 1.0) as f32;
        let threshold = (endpoint.baseline * self.config.attack_factor).max(self.config.attack_min_ratio);
        let unknown_share = (unknown_attempts / attempts.max(1.0)).clamp(0.0, 1.0) as f32;
        let unknown_threshold =
            (endpoint.unknown_baseline * self.config.attack_factor).max(self.config.attack_unknown_share);
        // A burst of real first logins (a launch, a migration) is also
        // "unknown", but it mostly succeeds: a leaked list mostly fails.
        let failing = ratio > (endpoint.baseline * 2.0).max(self.config.attack_min_ratio);
        let knows = !self.learning(endpoint) && self.knows_accounts(endpoint);
        let leaked_list = knows && unknown_share > unknown_threshold && failing;
        // However many real logins dilute the endpoint's ratio: attempts on
        // accounts that never logged in, far more of them than the
        // endpoint's usual share, and nearly all failing (real first
        // logins mostly succeed).
        // Once unknown accounts are evidence, their share must also be far
        // above its usual (a busy site's mistyped usernames fail too);
        // before (a cold start, where every returning user's first login is
        // to an "unknown" account, and mostly succeeds), twice as many,
        // failing four in five: no false alarm here can refuse anyone on an
        // unknown account alone (see `unknown_unsure`).
        let failing_unknowns = unknown_failures >= UNKNOWN_FAILURES_MIN
            && unknown_failures >= UNKNOWN_FAILING_RATIO * unknown_attempts
            && if self.unknown_is_evidence(endpoint) {
                unknown_share > (endpoint.unknown_baseline * self.config.attack_factor).max(UNKNOWN_FAILING_SHARE)
            } else {
                unknown_failures >= 2.0 * UNKNOWN_FAILURES_MIN && unknown_failures >= COLD_UNKNOWN_FAILING_RATIO * unknown_attempts
            };
        // A spray alone is evidence about the attempt, not the endpoint
        // (real users' common wrong passwords would make it a false alarm,
        // and a false alarm makes every first login "unknown" evidence);
        // a spray over names unlike any that logged in here is a list from
        // elsewhere, however many real logins dilute the ratio.
        let spraying_foreign = foreign_spray && failed;
        // Names unlike any that logged in here, on accounts never seen, a
        // tenth of the window's attempts and nearly all failing: a list from
        // elsewhere (a person who types an e-mail where the site wants a
        // username fails too, but not a tenth of the endpoint's logins).
        let foreign_list = foreign_failures >= 2.0 * UNKNOWN_FAILURES_MIN
            && foreign_failures >= FOREIGN_FAILING_RATIO * foreign_attempts
            && foreign_attempts >= FOREIGN_SHARE * attempts;
        // (A wide spray over unknown accounts at a cold start is no channel:
        // an office whose people share one wrong password is one.)
        let _ = sprayed_widely;
        if ratio > threshold || leaked_list || failing_unknowns || spraying_foreign || foreign_list {
            endpoint.attack_until_ms = now_ms.saturating_add(self.hold_ms);
        } else if !endpoint.under_attack(now_ms) {
            self.learn(endpoint, ratio, unknown_share, since_ms);
        }
    }

    /// Whether a refused attempt counts for the endpoint (as a failure of
    /// its fingerprint, password and account too): refused on the attack's
    /// own evidence, by a client new here. Counting the filter's refusals
    /// keeps an attack that is mostly refused recognised at any pace (else
    /// the window empties of failures and a few attempts pass to renew
    /// it); counting only a new client's keeps one person retrying after a
    /// refusal from holding the endpoint under attack by themselves. A
    /// refusal never counts for the person's own record (no login failure
    /// on the client or the account).
    pub fn counts_refusal(&self, signals: &AttemptSignals) -> bool {
        signals.new_client && !self.refusal(signals).reasons.is_empty()
    }

    /// Whether a username is unlike the endpoint's: it learned enough
    /// successful logins' names, and none had this shape — or the site's
    /// names are of at most [`STRICT_FORMATS`] formats (it issues them) and
    /// none had this one.
    pub fn unlike_site_names(&self, endpoint: &EndpointRecord, name: NameShape) -> bool {
        let strict = endpoint.name_format_count() <= STRICT_FORMATS;
        endpoint.names_learned >= self.config.known_accounts_min.max(NAMES_MIN)
            && (!endpoint.knows_name_shape(name) || strict && !endpoint.knows_name_format(name))
    }

    /// Whether the window's attempts on accounts not known to exist mostly
    /// fail (at least twice [`UNKNOWN_FAILURES_MIN`] of them, and
    /// [`UNKNOWN_STEP_UP_RATIO`]): after a cold start, where "unknown"
    /// cannot yet be weighed by its usual share, real people's logins to
    /// accounts the filter has not seen mostly succeed (a typo in five);
    /// when half fail, one more is at least as likely the attack's as
    /// theirs — worth a second factor (`high`), not a refusal.
    pub fn unknowns_failing(&self, endpoint: &EndpointRecord, now_ms: u64) -> bool {
        let attempts = endpoint.unknown.estimate(now_ms, self.window_ms);
        let failures = endpoint.unknown_failures.estimate(now_ms, self.window_ms);
        failures >= 2.0 * UNKNOWN_FAILURES_MIN && failures >= UNKNOWN_STEP_UP_RATIO * attempts
    }

    /// Learns one normal window: aside while warming up (the prior stays the
    /// baseline), then into the baseline itself.
    fn learn(&self, endpoint: &mut EndpointRecord, ratio: f32, unknown_share: f32, since_ms: f64) {
        endpoint.baseline_samples = endpoint.baseline_samples.saturating_add(1);
        let n = endpoint.baseline_samples;
        if n <= WARM_UP {
            let step = 1.0 / n as f32;
            endpoint.learning_mean += (ratio - endpoint.learning_mean) * step;
            endpoint.unknown_baseline += (unknown_share - endpoint.unknown_baseline) * step;
            if n == WARM_UP {
                endpoint.baseline = endpoint.learning_mean.min(MAX_BASELINE);
            }
            return;
        }
        let alpha = ((1.0 - (-since_ms / BASELINE_TAU_MS).exp()) as f32).clamp(0.0, 1.0);
        endpoint.baseline += alpha * (ratio - endpoint.baseline);
        endpoint.baseline = endpoint.baseline.min(MAX_BASELINE);
        endpoint.unknown_baseline += alpha * (unknown_share - endpoint.unknown_baseline);
    }

    /// Counts a failed login with a password (by its hash) on an account (by its hash).
    pub fn on_failed_password(&self, spray: &mut SprayRecord, account: u64, now_ms: u64) {
        spray.last_seen_ms = now_ms;
        spray.accounts.insert(account, now_ms, self.window_ms);
    }

    /// Whether a password failed on `spray_min_accounts` accounts in the
    /// window. Its key rotates with the window, and the record's window
    /// starts at its first failure: this window's record or the last one's
    /// (which started less than two windows ago) is judged.
    pub fn is_sprayed(&self, spray: &SprayRecord, now_ms: u64) -> bool {
        !self.let_someone_in(spray, now_ms)
            && spray.accounts.estimate_at(now_ms, self.window_ms.saturating_mul(2)) >= f64::from(self.config.spray_min_accounts) - 0.5
    }

    /// Whether the password let someone in lately (two windows): then it
    /// is a real one, never a spray's mark.
    pub fn let_someone_in(&self, spray: &SprayRecord, now_ms: u64) -> bool {
        spray.succeeded_ms != 0 && now_ms.saturating_sub(spray.succeeded_ms) < self.window_ms.saturating_mul(2)
    }

    /// A successful login with the password.
    pub fn on_password_success(&self, spray: &mut SprayRecord, now_ms: u64) {
        spray.last_seen_ms = now_ms;
        spray.succeeded_ms = spray.succeeded_ms.max(now_ms);
    }


    /// Whether a password failed on twice `spray_min_accounts` accounts in
    /// the window (its own key's: see [`DistributedStuffing::is_sprayed`]).
    pub fn is_sprayed_widely(&self, spray: &SprayRecord, now_ms: u64) -> bool {
        spray.accounts.estimate_at(now_ms, self.window_ms) >= f64::from(self.config.spray_min_accounts) * 2.0 - 0.5
    }

    /// The client-level evidence, from its record before this request.
    pub fn client_signals(&self, client: &ClientRecord) -> (bool, bool) {
        let new_client = client.login_successes == 0 && client.requests <= self.config.new_client_max_requests;
        let never_browsed = client.requests <= client.login_attempts;
        (new_client, never_browsed)
    }

    /// The signal for a refused attempt: charged to the client.
    /// Refuses an attempt during an attack only on evidence specific to the
    /// attempt — an account nobody logs into, a sprayed password, a tool's
    /// fingerprint, headers that contradict the user agent. Being new to
    /// the account (`unlike_owner`, `new_client`, `never_browsed`) is what
    /// an owner's new phone looks like too: it raises the login-risk header
    /// for a second factor, it never refuses by itself.
    pub fn refusal(&self, signals: &AttemptSignals) -> Signal {
        let mut signal = Signal::default();
        // A name unlike every name that logged in here, on an account never
        // seen: a list from elsewhere, even before the filter can say what
        // unknown accounts are worth.
        let foreign = signals.unlike_site_names && (signals.unknown_account || signals.unknown_unsure);
        let specific = signals.unknown_account
            || signals.sprayed_password
            || signals.tool_fingerprint
            || signals.inconsistent_headers
            || foreign;
        if signals.under_attack && specific && !signals.owners_place && signals.score() >= self.config.refuse_at {
            // A refusal that stands only on the name refuses the attempt
            // but charges the client nothing: a person who mistyped their
            // own name (`user555`, their e-mail) in another format must not
            // box themselves by trying twice.
            let without_name = AttemptSignals { unlike_site_names: false, ..*signals };
            let weight = if self.refuses_without_name(&without_name) { self.config.weight } else { 0.0 };
            let figure = Figure::new("attempt evidence score during an attack on the endpoint", signals.score().into(), self.config.refuse_at.into(), 0);
            signal.fire_with(Reason::CredentialStuffing, weight, figure);
        }
        signal
    }

    fn refuses_without_name(&self, s: &AttemptSignals) -> bool {
        let specific = s.unknown_account || s.sprayed_password || s.tool_fingerprint || s.inconsistent_headers;
        specific && s.score() >= self.config.refuse_at
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::endpoint::name_shape;

    fn detector() -> DistributedStuffing {
        DistributedStuffing::new(&DistributedStuffingConfig::default()).unwrap()
    }

    #[test]
    fn normal_traffic_teaches_the_baseline_and_never_alarms() {
        let d = detector();
        let mut e = EndpointRecord::default();
        // 15 % failures, steady.
        for i in 0..2000u64 {
            d.on_outcome(&mut e, i % 20 < 3, Some(false), 1_000_000 + i * 100);
            assert!(!e.under_attack(1_000_000 + i * 100), "false alarm at {i}");
        }
        assert!((e.baseline - 0.15).abs() < 0.05, "{}", e.baseline);
        assert!(!d.learning(&e));
    }

    #[test]
    fn an_attacker_failing_through_the_warm_up_cannot_lift_the_baseline_out_of_reach() {
        let d = detector();
        let mut e = EndpointRecord::default();
        // Right after a restart, every judged window ~49 % failures.
        for i in 0..3000u64 {
            d.on_outcome(&mut e, i % 100 < 49, Some(false), 1_000_000 + i * 100);
        }
        assert!(e.baseline <= MAX_BASELINE, "{}", e.baseline);
        // Then the real attack, 95 % failures, is still one.
        let t = 1_000_000 + 3000 * 100;
        for i in 0..400u64 {
            d.on_outcome(&mut e, i % 20 != 0, Some(false), t + i * 10);
        }
        assert!(e.under_attack(t + 4000), "{e:?}");
    }

    #[test]
    fn a_burst_of_failures_is_an_attack_and_does_not_move_the_baseline() {
        let d = detector();
        let mut e = EndpointRecord::default();
        // Two logins a second, one in ten failing.
        for i in 0..500u64 {
            d.on_outcome(&mut e, i % 10 == 0, Some(false), 1_000_000 + i * 500);
        }
        let learned = e.baseline;
        let t0 = 1_000_000 + 500 * 500;
        let mut recognised_at = None;
        for i in 0..300u64 {
            d.on_outcome(&mut e, true, None, t0 + i * 20);
            if recognised_at.is_none() && e.under_attack(t0 + i * 20) {
                recognised_at = Some(i);
            }
        }
        assert!(recognised_at.unwrap() < 200, "{recognised_at:?}");
        assert!((e.baseline - learned).abs() < 0.05);
    }

    #[test]
    fn an_attack_at_cold_start_cannot_drag_the_baseline() {
        // A fresh endpoint: 20 good logins (a few typos), then a
        // distributed run of failures, four a second.
        let d = detector();
        let mut e = EndpointRecord::default();
        let mut t = 1_000_000u64;
        for i in 0..20u64 {
            t += 1000;
            d.on_outcome(&mut e, i % 5 == 0, Some(true), t);
        }
        assert!(d.learning(&e));
        let mut recognised_at = None;
        for i in 0..300u64 {
            t += 250;
            d.on_outcome(&mut e, true, Some(true), t);
            if recognised_at.is_none() && e.under_attack(t) {
                recognised_at = Some(i);
            }
        }
        let at = recognised_at.unwrap();
        assert!(at < 40, "recognised at attempt {at}");
        assert!((e.baseline - 0.2).abs() < 1e-6, "still the prior: {}", e.baseline);
    }

    #[test]
    fn a_leaked_list_is_an_attack_however_many_logins_succeed() {
        let d = detector();
        let mut e = EndpointRecord::default();
        let mut t = 1_000_000u64;
        // A busy endpoint: 10 logins a second, 30 % failures, 5 % of them
        // on unknown accounts (typos, new sign-ups).
        for i in 0..3000u64 {
            t += 100;
            d.on_outcome(&mut e, i % 10 < 3, Some(i % 20 == 0), t);
        }
        assert!(!e.under_attack(t));
        // The attack: two attempts in three on unknown accounts. The failure
        // ratio ends near its threshold (0.75); the unknown share passes 0.6.
        assert!(d.unknown_is_evidence(&e));
        let mut recognised_at = None;
        for i in 0..2400u64 {
            t += 33;
            let attack = i % 3 != 0;
            d.on_outcome(&mut e, attack || i % 10 < 3, Some(attack), t);
            if recognised_at.is_none() && e.under_attack(t) {
                recognised_at = Some(i * 2 / 3);
            }
        }
        // Once the window holds the attack (a minute of it), not before.
        assert!(recognised_at.is_some_and(|a| a < 1300), "{recognised_at:?}");
    }

    #[test]
    fn evidence_adds_up_and_names_itself() {
        let attacker = AttemptSignals {
            under_attack: true,
            new_client: true,
            never_browsed: true,
            unknown_account: true,
            ..AttemptSignals::default()
        };
        assert_eq!(attacker.score(), 4);
        assert_eq!(attacker.level(4), "high");
        assert_eq!(attacker.header(4), "high; score=4; reasons=endpoint_under_attack,unknown_account,new_client,never_browsed");
        let d = detector();
        assert!(d.refusal(&attacker).reasons.contains(Reason::CredentialStuffing));
        // The owner from a new address, on their device: let through.
        let owner = AttemptSignals { under_attack: true, new_client: true, never_browsed: true, ..AttemptSignals::default() };
        assert_eq!(owner.score(), 2);
        assert!(d.refusal(&owner).reasons.is_empty());
        assert_eq!(owner.level(4), "medium");
        // A first login after browsing the site: unsure, stepped up, not refused.
        let first_timer = AttemptSignals { under_attack: true, new_client: true, unknown_account: true, ..AttemptSignals::default() };
        assert_eq!((first_timer.score(), first_timer.level(4)), (3, "high"));
        assert!(d.refusal(&first_timer).reasons.is_empty());
        // Refused on the name alone (a mistyped name of another format, a
        // first login at a cold start): the attempt, not the client.
        let typo = AttemptSignals { under_attack: true, new_client: true, unknown_unsure: true, unlike_site_names: true, ..AttemptSignals::default() };
        let r = d.refusal(&typo);
        assert!(r.reasons.contains(Reason::CredentialStuffing) && r.risk == 0.0, "{r:?}");
        let r = d.refusal(&AttemptSignals { unknown_account: true, unknown_unsure: false, never_browsed: true, ..typo });
        assert_eq!(r.risk, d.config.weight, "with evidence beyond the name, the client is charged");
        // Outside an attack nothing is refused, whatever the evidence.
        let calm = AttemptSignals { under_attack: false, ..attacker };
        assert!(d.refusal(&calm).reasons.is_empty());
        assert_eq!(calm.level(4), "medium", "no step-up outside an attack");
        assert_eq!(AttemptSignals::default().level(4), "low");
    }

    #[test]
    fn one_password_on_many_accounts_is_a_spray() {
        let d = detector();
        let mut p = SprayRecord::default();
        let sprayed: Vec<bool> = (0..6u64)
            .map(|a| {
                d.on_failed_password(&mut p, 100 + a, 1000 + a);
                d.is_sprayed(&p, 1000 + a)
            })
            .collect();
        assert_eq!(sprayed, [false, false, false, false, true, true]);
        assert!(!d.is_sprayed(&p, 1000 + 200_000), "forgotten after the window");
        // Somebody's real password (123456 is many people's): never a spray's mark.
        let mut real = p;
        d.on_password_success(&mut real, 1010);
        assert!(!d.is_sprayed(&real, 1011) && d.is_sprayed(&p, 1011));
        let mut mine = SprayRecord::default();
        for t in 0..10 {
            d.on_failed_password(&mut mine, 7, 1000 + t);
        }
        assert!(!d.is_sprayed(&mine, 1010), "one user retrying");
    }

    #[test]
    fn a_name_of_another_format_is_unlike_a_site_that_issues_its_names() {
        let d = detector();
        let learn = |names: &[String]| {
            let mut e = EndpointRecord::default();
            for n in names {
                d.on_attempt(&mut e, &AttemptOutcome { name_shape: Some(name_shape(n)), ..AttemptOutcome::default() }, 1000);
            }
            e
        };
        // A site that issues userNNNN: a handle of the same shape and
        // another length names none of its accounts; a new number does.
        let issued = learn(&(0..25).map(|i| format!("user{:04}", i * 37)).collect::<Vec<_>>());
        for handle in ["karendavi523", "johnwhi7858", "ashleybro3633", "anna.li77@mail.example"] {
            assert!(d.unlike_site_names(&issued, name_shape(handle)), "{handle}");
        }
        assert!(!d.unlike_site_names(&issued, name_shape("user8123")));
        // Free-form handles: many formats, so only the shape counts — a
        // newcomer's handle of a length never seen is like the site's.
        let free: Vec<String> = ["anna", "li", "omar", "kate", "james", "wei", "olga", "raj", "tom", "mia"]
            .iter()
            .enumerate()
            .flat_map(|(i, f)| [format!("{f}{}", i * 7), format!("{f}{}", 1000 + i)])
            .collect();
        let free = learn(&free);
        assert!(free.name_format_count() > STRICT_FORMATS);
        assert!(!d.unlike_site_names(&free, name_shape("karendavi523")));
        assert!(d.unlike_site_names(&free, name_shape("anna.li77@mail.example")), "another shape still is");
        // Not before NAMES_MIN names were learned.
        assert!(!d.unlike_site_names(&learn(&["user0001".to_string()]), name_shape("karendavi523")));
    }

    #[test]
    fn unknowns_that_mostly_fail_ask_for_a_second_factor_and_never_refuse_alone() {
        let d = detector();
        let mut e = EndpointRecord::default();
        let t = 1_000_000u64;
        // A cold start: returning users' logins to "unknown" accounts
        // mostly succeed (one in three failing).
        for i in 0..60u64 {
            d.on_outcome(&mut e, i % 3 == 0, Some(true), t + i * 100);
        }
        assert!(!d.unknowns_failing(&e, t + 6_000));
        // Then a list: two in three of the window's unknowns fail.
        let mut e = EndpointRecord::default();
        for i in 0..60u64 {
            d.on_outcome(&mut e, i % 3 != 0, Some(true), t + i * 100);
        }
        assert!(d.unknowns_failing(&e, t + 6_000));
        assert!(!d.unknowns_failing(&e, t + 6_000 + 2 * d.window_ms()), "forgotten with the window");
        let returning = AttemptSignals {
            under_attack: true,
            new_client: true,
            unknown_unsure: true,
            unknowns_failing: true,
            ..AttemptSignals::default()
        };
        assert_eq!((returning.score(), returning.level(4)), (2, "high"));
        assert!(d.refusal(&returning).reasons.is_empty());
        let straight_to_login = AttemptSignals { never_browsed: true, ..returning };
        assert!(d.refusal(&straight_to_login).reasons.is_empty(), "an API client after a cold start");
    }

    #[test]
    fn a_burst_of_real_first_logins_is_no_attack() {
        let d = detector();
        let mut e = EndpointRecord::default();
        let mut t = 1_000_000u64;
        for i in 0..3000u64 {
            t += 100;
            d.on_outcome(&mut e, i % 5 == 0, Some(i % 20 == 0), t);
        }
        // A launch: 600 new people log in, one in five after a typo.
        for i in 0..600u64 {
            t += 50;
            d.on_outcome(&mut e, i % 5 == 0, Some(true), t);
            assert!(!e.under_attack(t), "false alarm at {i}");
        }
    }

    #[test]
    fn unknown_accounts_are_no_evidence_after_a_cold_start() {
        let d = detector();
        let mut e = EndpointRecord::default();
        // Every first login after a restart is to an "unknown" account.
        for i in 0..200u64 {
            d.on_outcome(&mut e, i % 10 == 0, Some(true), 1_000_000 + i * 1000);
        }
        assert!(d.knows_accounts(&e) && !d.learning(&e));
        assert!(!d.unknown_is_evidence(&e), "unknown share {}", e.unknown_baseline);
    }

    #[test]
    fn a_tool_that_fails_is_attacking_and_one_that_succeeds_is_not() {
        let d = detector();
        let mut tool = FingerprintRecord::default();
        for i in 0..10 {
            d.on_fingerprint_outcome(&mut tool, true, 1000 + i);
        }
        assert!(d.tool_is_attacking(&tool, 2000));
        let mut app = FingerprintRecord::default();
        for i in 0..30 {
            d.on_fingerprint_outcome(&mut app, i % 3 == 0, 1000 + i);
        }
        assert!(!d.tool_is_attacking(&app, 2000));
    }

    #[test]
    fn client_signals() {
        let d = detector();
        let fresh = ClientRecord::default();
        assert_eq!(d.client_signals(&fresh), (true, true));
        let browsed = ClientRecord { requests: 3, login_attempts: 1, ..ClientRecord::default() };
        assert_eq!(d.client_signals(&browsed), (true, false));
        let regular = ClientRecord { requests: 3, login_attempts: 3, login_successes: 1, ..ClientRecord::default() };
        assert_eq!(d.client_signals(&regular), (false, true));
    }
}
