//! The answer phase, [`Engine::on_response`]: the outcome detectors. Only
//! answers that can change something pay for it: login routes, a 404 for
//! probing, object routes for enumeration, sizes for scraping volume.

use super::{Engine, Exchange, DOMAIN_USERNAME};
use crate::detectors::Signal;
use crate::detectors::login::LoginOutcome;
use crate::detectors::scraping::Scraping;
use crate::reason::Reason;
use crate::record::ClientRecord;
use crate::state::store::SharedStore;
use crate::verdict::Verdict;

impl Engine {
    /// Whether the host must read the answer's size (`content-length`).
    pub fn reads_response_size(&self) -> bool {
        self.scraping.as_ref().is_some_and(Scraping::tracks_volume)
    }

    /// Whether an answer with this status can change anything: lets the host
    /// skip reading the clock and the size for the common answer.
    pub fn answer_matters(&self, exchange: &Exchange, status: u32) -> bool {
        if !exchange.judged {
            return false;
        }
        let login = self.login.is_some() && exchange.login_route.is_some();
        let volume = self.reads_response_size() && !exchange.good_bot;
        login || self.counts_not_found(exchange, status) || self.counts_object_answer(exchange) || volume
    }

    /// Whether any answer to this request can count, asked before the
    /// status is read: when false the host skips the answer phase without
    /// a host call. Only the 404 of probing depends on the status, so the
    /// answer that matters most is a 404; and an accepted credential needs
    /// the status too. With probing on (the default) a 404 counts on every
    /// route, so every judged request is read.
    pub fn answer_can_count(&self, exchange: &Exchange) -> bool {
        exchange.judged && (self.answer_matters(exchange, 404) || self.credential_header_for(exchange).is_some())
    }

    /// A 404 counts for probing (forced browsing).
    pub(super) fn counts_not_found(&self, exchange: &Exchange, status: u32) -> bool {
        status == 404 && self.probing.is_some() && !exchange.good_bot
    }

    /// The answer to an object request counts for enumeration (miss ratio).
    pub(super) fn counts_object_answer(&self, exchange: &Exchange) -> bool {
        exchange.object && self.enumeration.is_some() && !exchange.good_bot
    }

    /// The answer's status and size (KiB, when read). Returns a verdict only
    /// when the answer mattered.
    pub fn on_response(
        &self,
        store: &dyn SharedStore,
        exchange: &Exchange,
        status: u32,
        response_kib: Option<u32>,
        now_ms: u64,
    ) -> Option<Verdict> {
        self.begin_phase();
        if !self.answer_matters(exchange, status) {
            return None;
        }
        let client = exchange.client?;
        let outcome = match (&self.login, exchange.login_route) {
            (Some(login), Some(route)) => login.outcome(route, status),
            _ => LoginOutcome::Other,
        };
        let not_found = self.counts_not_found(exchange, status);
        let object_answer = self.counts_object_answer(exchange);
        let volume = match (&self.scraping, response_kib) {
            (Some(sc), Some(kib)) if sc.tracks_volume() && !exchange.good_bot && kib > 0 => Some(kib),
            _ => None,
        };
        // A login the application answered otherwise (a second factor
        // asked, say) still reports what it was told about it.
        let told = outcome != LoginOutcome::Failure && exchange.profile_risk.is_some_and(|r| !r.is_empty());
        if outcome == LoginOutcome::Other && !not_found && !object_answer && volume.is_none() && !told {
            return None;
        }
        let username_hash = exchange
            .username
            .as_deref()
            .map(|u| self.account_hasher.key(DOMAIN_USERNAME, u.as_bytes()));
        let account_failures = match (&self.login, username_hash, outcome) {
            (Some(login), Some(user), LoginOutcome::Failure) => self
                .accounts
                .update(store, user, now_ms, |a| {
                    if let Some(pool) = exchange.pool_key {
                        // The pool took part too (new identities fail as one).
                        a.failing_clients.insert(pool, now_ms, login.window_ms());
                    }
                    (login.account_failure(a, exchange.client_key, now_ms), true)
                })
                .map(|(f, _)| f)
                .unwrap_or(0.0),
            (Some(login), Some(user), LoginOutcome::Success) => {
                // The account exists, and this is how its owner logs in.
                if self.distributed.is_some() && matches!(self.known_accounts.insert(store, user), Ok(true)) {
                    self.queue_known_account(user);
                }
                self.accounts
                    .update(store, user, now_ms, |a| {
                        // The owner on their own device is never a takeover,
                        // however many failures others caused on the account.
                        let owner = a.profile.is_known() && a.profile.looks_like_owner(&exchange.login_place);
                        // Others' failures on the account never refuse this
                        // login by themselves (five failed tries on a
                        // victim's name would lock its owner out): they go
                        // in the login-risk header (`failures_elsewhere`).
                        // A takeover is a success by a client that failed on it.
                        let took_part = a.failing_clients.contains(exchange.client_key)
                            || exchange.pool_key.is_some_and(|k| a.failing_clients.contains(k));
                        let failures = if owner || !took_part { 0.0 } else { login.account_failures(a, now_ms) };
                        // Only a success teaches the profile.
                        a.profile.learn(&exchange.login_place, now_ms);
                        ((failures, a.profile), true)
                    })
                    .map(|((f, profile), _)| {
                        self.queue_profile(user, profile);
                        f
                    })
                    .unwrap_or(0.0)
            }
            _ => 0.0,
        };
        if let (Some(d), Some(route), true) = (&self.distributed, exchange.login_route, outcome != LoginOutcome::Other) {
            self.count_attempt(store, d, route, exchange, outcome == LoginOutcome::Failure, username_hash, now_ms);
        }
        let judge = |record: &mut ClientRecord| {
            if let Some(penalized) = self.penalized(record, now_ms) {
                return (penalized, false);
            }
            let mut signal = Signal::default();
            if let Some(login) = &self.login {
                // Suspected of stuffing, not merely risky: an office address
                // tagged for session churn still logs its people in.
                // The account's failing-clients sketch is a 64-bit map that
                // collides: a takeover also needs this record's own recent
                // failures, so that an owner who never failed is never one.
                let own_failed = record.login_failures.estimate(now_ms, login.window_ms()) >= 1.0;
                // Suspected on its own failed logins: a refusal by
                // distributed stuffing is no failure, so a person whose
                // first login was refused during an attack and who gets in
                // once it is over is not taken for a stuffer who got lucky.
                let suspected = record.recent_reasons.contains(Reason::CredentialStuffing) && own_failed;
                let account_failures = if own_failed || outcome != LoginOutcome::Success { account_failures } else { 0.0 };
                signal.add(login.observe(record, outcome, username_hash, account_failures, suspected, now_ms));
            }
            if let (true, Some(p)) = (not_found, &self.probing) {
                signal.add(p.on_not_found(record, exchange.path_hash, now_ms));
            }
            if let (true, Some(e)) = (object_answer, &self.enumeration) {
                signal.add(e.on_answer(record, status, now_ms));
            }
            if let (Some(kib), Some(sc)) = (volume, &self.scraping) {
                let mut answered = sc.on_response(record, kib, now_ms);
                if exchange.accepted {
                    // An accepted client's volume is its limits' business (see `detect`).
                    answered.only_tag(Reason::Scraping);
                }
                signal.add(answered);
            }
            (self.apply(record, signal, now_ms), true)
        };
        let mut updated = self.clients.update(store, exchange.client_key, now_ms, judge);
        let mut pooled = false;
        if let Some(pool_key) = exchange.pool_key {
            // A new identity's answer counts for its address's pool too: a
            // failed login per invented user agent adds up there.
            let pool = self.clients.update(store, pool_key, now_ms, judge);
            let own_refuses = updated.as_ref().is_ok_and(|(o, _)| Self::refuses(o));
            if !own_refuses && pool.as_ref().is_ok_and(|(o, _)| Self::refuses(o)) {
                updated = pool;
                pooled = true;
            }
        }
        let mode = exchange.mode.unwrap_or(self.config.mode);
        let mut verdict = self.verdict(client, updated, mode, now_ms);
        verdict.agent = exchange.agent;
        verdict.pool = pooled;
        verdict.on_response = true;
        if told {
            // What the application was told about this login, now that it
            // answered: for the access log and the stats.
            verdict.login_risk = self.login_risk(exchange).or_else(|| {
                let r = exchange.profile_risk?;
                Some(format!("low; score={}; reasons={}", r.score, r.all_names().collect::<Vec<_>>().join(",")))
            });
            verdict.profile_risk = exchange.profile_risk;
        }
        // Penalties found here were already handled by the request phase.
        (!verdict.penalized).then_some(verdict)
    }
}
