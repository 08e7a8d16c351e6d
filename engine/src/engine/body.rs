//! The login body phase, [`Engine::on_request_body`]: the username (and,
//! during an attack, a keyed hash of the password) from a login route's
//! body; the account's profile and distributed-stuffing evidence judge the
//! attempt before it reaches the application.

use super::{Engine, Exchange, DOMAIN_USERNAME, DOMAIN_ENDPOINT, DOMAIN_PASSWORD};
use crate::account::AccountRecord;
use crate::detectors::Signal;
use crate::detectors::distributed_stuffing::{AttemptOutcome, AttemptSignals, DistributedStuffing};
use crate::detectors::login::LoginDetector;
use crate::detectors::login_profile::{LoginProfile, ProfileReason};
use crate::identity::ClientAddr;
use crate::reason::Reason;
use crate::state::store::SharedStore;
use crate::verdict::Verdict;

impl Engine {
    /// How much request body to read for this exchange (login routes, and
    /// routes where a rule reads a body field).
    pub fn wants_body(&self, exchange: &Exchange) -> Option<usize> {
        let login = match (&self.login, exchange.login_route) {
            (Some(login), Some(_)) if exchange.judged => Some(login.max_body_bytes()),
            _ => None,
        };
        match (login, self.rule_body_limit(exchange)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether login requests wait for their body before their headers go
    /// upstream (needs Envoy's `allow_on_headers_stop_iteration`).
    pub fn holds_login_headers(&self, exchange: &Exchange) -> bool {
        self.config.credential_stuffing.hold_login_headers && exchange.login_route.is_some() && exchange.judged
    }

    /// Keyed by the route's path, not its position: a reload that adds,
    /// removes or reorders login routes keeps each endpoint's baseline and
    /// attack state (the scorer names baselines by path too).
    pub(super) fn endpoint_key(&self, route: usize) -> u64 {
        let path = self.login.as_ref().and_then(|l| l.paths().nth(route)).unwrap_or_default();
        self.hasher.key(DOMAIN_ENDPOINT, path.as_bytes())
    }

    /// The login body, read whole (never called for an oversized body).
    /// During a recognised attack the account-level evidence is added to the
    /// attempt's; returns the verdict when the attempt is refused.
    pub fn on_request_body(&self, store: &dyn SharedStore, exchange: &mut Exchange, body: &[u8], now_ms: u64) -> Option<Verdict> {
        self.begin_phase();
        let (Some(login), Some(route)) = (&self.login, exchange.login_route) else {
            return None;
        };
        exchange.username = login.username(route, body);
        if let Some(q) = exchange.score_request.as_mut() {
            // The scorer hears the account by its fleet-wide name (keyed with
            // the scorer's secret, like sessions), never the raw username.
            q.username = exchange
                .username
                .as_deref()
                .map(|u| format!("{:016x}", self.account_hasher.key(DOMAIN_USERNAME, u.as_bytes())));
        }
        let username = exchange.username.as_deref()?;
        let account_key = self.account_hasher.key(DOMAIN_USERNAME, username.as_bytes());
        let account = self.accounts.peek(store, account_key).ok().flatten();
        // The login compared with the account's profile, for the
        // application (as if it succeeds: the outcome is not known yet).
        if let Some(lp) = &self.login_profile {
            let risk = lp.assess(account.as_ref(), &exchange.login_place, exchange.anonymous, exchange.client_key, now_ms);
            exchange.profile_risk = Some(risk);
        }
        let mut signal = self.attempt_evidence(store, exchange, login, route, body, account_key, account.as_ref(), now_ms);
        if let (Some(lp), true) = (&self.login_profile, exchange.profile_risk.is_some_and(|r| r.refuse)) {
            let figure = crate::detectors::Figure::new("login unlike the account's profile (refused)", 1.0, 0.0, 0);
            signal.fire_with(Reason::AccountTakeover, lp.weight(), figure);
        }
        if signal.reasons.is_empty() {
            return None;
        }
        let updated = self.clients.update(store, exchange.client_key, now_ms, |record| {
            if let Some(penalized) = self.penalized(record, now_ms) {
                return (penalized, false);
            }
            (self.apply(record, signal, now_ms), true)
        });
        let mode = exchange.mode.unwrap_or(self.config.mode);
        let client = exchange.client.unwrap_or(ClientAddr::Unknown);
        let mut verdict = self.verdict(client, updated, mode, now_ms);
        verdict.agent = exchange.agent;
        verdict.fired = verdict.fired.union(signal.reasons);
        verdict.login_risk = self.login_risk(exchange);
        // The attempt itself is refused, boxed or not.
        verdict.reasons = verdict.reasons.union(signal.reasons);
        verdict.block(403, verdict.retry_after_s.max(1));
        verdict.on_response = true;
        // No answer will be judged: the attempt never reaches the upstream.
        exchange.judged = false;
        Some(verdict)
    }

    /// Distributed stuffing's account-level evidence for the attempt: is
    /// the account known, does the attempt look like its owner, is the
    /// password sprayed. Returns the refusal signal (during an attack).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attempt_evidence(
        &self,
        store: &dyn SharedStore,
        exchange: &mut Exchange,
        login: &LoginDetector,
        route: usize,
        body: &[u8],
        account_key: u64,
        account: Option<&AccountRecord>,
        now_ms: u64,
    ) -> Signal {
        let Some(d) = self.distributed.as_ref() else {
            return Signal::default();
        };
        // Every attempt: the endpoint's share of unknown accounts is a
        // recognition signal too (recorded with the outcome).
        let known = self.known_accounts.contains(store, account_key);
        exchange.account_unknown = Some(!known);
        // The account-level evidence, always (it also goes to the login-risk
        // header when the headers were held for the body); the spray and the
        // refusal only during an attack.
        let Some(mut attempt) = exchange.attempt else {
            return Signal::default();
        };
        let endpoint = exchange.endpoint.unwrap_or_default();
        let shape = crate::endpoint::name_shape(exchange.username.as_deref().unwrap_or(""));
        exchange.name_shape = Some(shape);
        if known {
            let profile = account.map(|a| a.profile).filter(|p| p.is_known());
            attempt.unlike_owner = profile.is_some_and(|p| !p.looks_like_owner(&exchange.login_place));
            attempt.owners_place = profile.is_some_and(|p| p.is_owners_place(&exchange.login_place));
        } else {
            attempt.unknown_account = d.unknown_is_evidence(&endpoint);
            attempt.unknown_unsure = !attempt.unknown_account && attempt.under_attack;
            // Not when the failures are others' on this very account: the
            // owner is not asked for more because strangers tried it.
            let hammered = exchange.profile_risk.is_some_and(|r| r.has(ProfileReason::FailuresElsewhere));
            attempt.unknowns_failing = attempt.unknown_unsure && !hammered && d.unknowns_failing(&endpoint, now_ms);
            attempt.unlike_site_names = d.unlike_site_names(&endpoint, shape);
        }
        if let Some(password) = login.password(route, body) {
            // Keyed and rotating: the hash means nothing after its window.
            // Every attempt's (not only during an attack), so that a spray
            // is known when the attack is recognised. Failures count under this
            // window's key; a spray is judged on this window's and the
            // last one's (else each new window would let a spray's first
            // attempts through until it counted again).
            let epoch = now_ms / d.window_ms().max(1);
            let key_of = |epoch: u64| {
                let mut text = epoch.to_le_bytes().to_vec();
                text.extend_from_slice(password.as_bytes());
                self.hasher.key(DOMAIN_PASSWORD, &text)
            };
            let key = key_of(epoch);
            // Only failures count (the answer records them): real users who
            // share a common password log in, and are never a "spray".
            exchange.password_key = Some(key);
            let spray = |key: u64| self.sprays.peek(store, key).ok().flatten();
            let (now, last) = (spray(key), spray(key_of(epoch.saturating_sub(1))).filter(|_| epoch > 0));
            let sprayed = [now, last].iter().flatten().any(|p| d.is_sprayed(p, now_ms));
            let real = [now, last].iter().flatten().any(|p| d.let_someone_in(p, now_ms));
            attempt.sprayed_password = sprayed && !real;
        }
        exchange.attempt = Some(attempt);
        let signal = d.refusal(&attempt);
        if d.counts_refusal(&attempt) {
            // Its password counts among the spray's accounts only when the
            // attempt is refused without it: else one spray would feed on
            // its own refusals of every person whose password it is.
            let without_spray = AttemptSignals { sprayed_password: false, ..attempt };
            let spray = !d.refusal(&without_spray).reasons.is_empty();
            self.count_refused_attempt(store, exchange, spray.then_some(account_key), now_ms);
        }
        signal
    }

    /// The filter's refusal of an attack-attributed attempt counts as a
    /// failed attempt for the endpoint, the tool's fingerprint and the
    /// password (see `DistributedStuffing::counts_refusal`) — never for the
    /// client's or the account's own record.
    /// `account`: the attempt's account, when its password counts too.
    fn count_refused_attempt(&self, store: &dyn SharedStore, exchange: &Exchange, account: Option<u64>, now_ms: u64) {
        let (Some(d), Some(route)) = (&self.distributed, exchange.login_route) else {
            return;
        };
        self.count_attempt(store, d, route, exchange, true, account, now_ms);
    }

    /// One attempt's outcome for distributed stuffing's shared records
    /// (best effort, all three: a lost update only delays recognition).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn count_attempt(
        &self,
        store: &dyn SharedStore,
        d: &DistributedStuffing,
        route: usize,
        exchange: &Exchange,
        failed: bool,
        account: Option<u64>,
        now_ms: u64,
    ) {
        let mut sprayed_widely = false;
        match (failed, exchange.password_key, account) {
            (true, Some(pw), Some(user)) => {
                sprayed_widely = self
                    .sprays
                    .update(store, pw, now_ms, |p| {
                        d.on_failed_password(p, user, now_ms);
                        (d.is_sprayed_widely(p, now_ms), true)
                    })
                    .is_ok_and(|(wide, _)| wide);
            }
            (false, Some(pw), _) => {
                // Somebody's real password: the filter's refusals of
                // attempts with it must not make it a "spray" (and refuse
                // the next person whose password it is).
                let _ = self.sprays.update(store, pw, now_ms, |p| {
                    d.on_password_success(p, now_ms);
                    ((), true)
                });
            }
            _ => {}
        }
        if let Some(fp) = exchange.tool_key {
            let _ = self.fingerprints.update(store, fp, now_ms, |f| {
                d.on_fingerprint_outcome(f, failed, now_ms);
                ((), true)
            });
        }
        let foreign = exchange.attempt.is_some_and(|a| a.unlike_site_names);
        let foreign_spray = foreign && exchange.attempt.is_some_and(|a| a.sprayed_password);
        let outcome = AttemptOutcome {
            failed,
            unknown: exchange.account_unknown,
            name_shape: exchange.name_shape,
            foreign,
            foreign_spray,
            sprayed_widely,
        };
        let _ = self.endpoints.update(store, self.endpoint_key(route), now_ms, |e| {
            d.on_attempt(e, &outcome, now_ms);
            ((), true)
        });
    }

    /// The `x-abuse-login-risk` value once the body was read (for headers
    /// held until then: `credential_stuffing.hold_login_headers`): the
    /// attempt's evidence and the profile's reasons together.
    pub fn login_risk(&self, exchange: &Exchange) -> Option<String> {
        let attempt = match (&self.distributed, exchange.attempt) {
            (Some(d), Some(a)) => Some((a, d.refuse_at())),
            _ => None,
        };
        crate::login_risk::header(attempt, exchange.profile_risk.as_ref())
    }

    /// The header with the TLS JA4 fingerprint, when configured (login routes read it).
    pub fn ja4_header(&self) -> Option<&str> {
        self.login_profile.as_ref().and_then(LoginProfile::ja4_header)
    }
}
