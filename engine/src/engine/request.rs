//! The request phase, [`Engine::on_request`]: the pipeline of stages
//! identify → penalty → count → detect → decide, in one read-modify-write
//! of the client's record (see the module map in `engine/mod.rs`).

use super::identify::{CROWD_MARK_MS, CROWD_WINDOW_MS, NEWCOMER_REQUESTS};
use super::{Engine, Exchange, RequestFacts, DOMAIN_OBJECT, DOMAIN_PATH, DOMAIN_FINGERPRINT};
use crate::config::Mode;
use crate::detectors::enumeration::{ObjectId, Objects};
use crate::detectors::harvest::{Harvest, HarvestEvidence, ADJACENT};
use crate::object_route::ObjectRouteRecord;
use crate::detectors::spike::GroupState;
use crate::detectors::Signal;
use crate::endpoint::EndpointRecord;
use crate::identity::ClientAddr;
use crate::routes::RouteMatch;
use crate::detectors::distributed_stuffing::AttemptSignals;
use crate::profile::{LoginPlace, asn_number, country_number, device_tag, network_tag};
use crate::reason::Reason;
use crate::record::ClientRecord;
use crate::state::store::SharedStore;
use crate::verdict::Verdict;

/// What the request tells without the client's record: computed once,
/// outside the CAS loop (the **look** before stage 2).
struct Look<'a> {
    key: u64,
    good_bot: bool,
    routes: RouteMatch,
    probe: Signal,
    object: Option<ObjectId<'a>>,
    object_hash: Option<u64>,
    login_route: Option<usize>,
    tool_key: Option<u64>,
    /// The login endpoint's record as the request found it.
    endpoint: Option<EndpointRecord>,
    attempt: Option<AttemptSignals>,
    login_place: LoginPlace,
    page: Option<u32>,
    mode: Mode,
    anonymous: bool,
    /// The request carries a credential the API has not verified or
    /// accepted yet (it stays anonymous unless its client logged in).
    unaccepted_credential: bool,
    /// The request's credential is one the API verified or accepted.
    accepted: bool,
    /// The private object route's record as the request found it (harvest on).
    object_route: Option<(usize, ObjectRouteRecord)>,
}

/// Which record a request is judged on: the identity's own (limits × 1), or
/// its address's pool of new identities (limits × the pool's scale).
#[derive(Clone, Copy)]
struct Budget {
    scale: f64,
    pool: bool,
}

impl Budget {
    const OWN: Budget = Budget { scale: 1.0, pool: false };
}

/// What the count stage found outside the client's record.
#[derive(Clone, Copy)]
struct Counted {
    session_hash: Option<u64>,
    session_signal: Signal,
    group_state: Option<GroupState>,
    /// The record judged and its budget (set per record).
    budget: Budget,
}

impl Engine {
    /// The request phase: identify → (look) → count → penalty → detect →
    /// decide, then the scorer and the sample.
    pub fn on_request(&self, store: &dyn SharedStore, facts: &RequestFacts<'_>, now_ms: u64) -> (Verdict, Exchange) {
        self.begin_phase();
        // 1. identify
        let client = self
            .identity
            .client_addr(facts.identity.peer, facts.identity.forwarded_for);
        let agent = self.agent_of(facts.user_agent);
        let mut exchange = Exchange { client: Some(client), agent, ..Exchange::default() };
        let api_key = facts.identity.api_key.and_then(|k| std::str::from_utf8(k).ok()).map(str::trim);
        if self.exemptions.allowlisted(client, api_key) || self.operator_allowed(client, api_key, facts.user_agent, now_ms) {
            let mut v = Verdict::allow(client);
            v.exempt = true;
            return (v, exchange);
        }
        let key = self.client_key(client, agent);
        let mut look = self.look(store, facts, client, key, now_ms);
        // 3. count: the session and the route groups (their own tables).
        let seen = self.observe_session(store, facts, key, now_ms);
        let (session_hash, session_signal) = (seen.hash, seen.signal);
        // Only a credential the API verified or accepted lifts the client
        // from the anonymous limits: anyone can send an invented one.
        look.anonymous = self.has_anonymous_limits() && !seen.accepted;
        look.unaccepted_credential = look.anonymous && seen.hash.is_some();
        look.accepted = seen.accepted;
        if !seen.accepted && self.identity.accepted_credential_header.is_some() {
            exchange.session_to_accept = seen.hash;
        }
        let group_state = self.count_route_groups(store, look.routes, now_ms);
        // The operator's rules, on their own keys (their weight joins the record's risk).
        let rules_acted = self.rules_on_request(store, facts, client, key, look.routes, &mut exchange, now_ms);
        let counted = Counted { session_hash, session_signal, group_state, budget: Budget::OWN };
        let mut snapshot: Option<ClientRecord> = None;
        let mut attempt_seen = look.attempt;
        // A quiet client's request stays in this worker's view (see `tiers`).
        let stays_local = |base: &ClientRecord, next: &ClientRecord| {
            crate::state::tiers::client_stays_local(base, next, now_ms, |base, next| {
                self.rate.as_ref().is_none_or(|r| r.far_from_limits(base, next, now_ms))
            })
        };
        // 2. penalty, 4. detect, 5. decide: on the record judged (the
        // identity's own, or its address's pool), limits times `scale`.
        let mut judge = |record: &mut ClientRecord, budget: Budget| {
            if let Some(penalized) = self.penalized(record, now_ms) {
                return (penalized, false);
            }
            let mut signal = self.detect(record, facts, &look, &Counted { budget, ..counted }, &mut attempt_seen, now_ms);
            signal.add(rules_acted.signal);
            let outcome = self.apply(record, signal, now_ms);
            if self.callouts.is_some() {
                snapshot = Some(*record);
            }
            (outcome, true)
        };
        let mut fresh = false;
        let own = self.clients.update_local(store, key, now_ms, stays_local, |record| {
            if let (Some(h), Some(_)) = (&self.harvest, &look.object_route) {
                // Refused or not, the request counts for its route.
                fresh = !h.has_history(record.first_seen_ms, record.requests, record.login_successes > 0, look.accepted, now_ms);
            }
            let young = !self.returning(record, now_ms);
            let newcomer = young && record.requests < NEWCOMER_REQUESTS;
            let mark = record.last_seen_ms / CROWD_MARK_MS != now_ms / CROWD_MARK_MS;
            let (outcome, write) = judge(record, Budget::OWN);
            ((outcome, young, newcomer, mark), write)
        });
        let (updated, pooled) = match (own, self.pool_key(client, agent)) {
            (Ok(((outcome, young, newcomer, mark), stats)), Some(pool_key)) => {
                let pool = if newcomer {
                    // One request of the address's pool of new identities.
                    exchange.pool_key = Some(pool_key);
                    self.clients
                        .update_local(store, pool_key, now_ms, stays_local, |record| {
                            // Over its budget the pool sheds: every request
                            // counts, refused ones included, so a sustained
                            // burst stays refused and the pool opens again
                            // as soon as the burst ends (no box on newcomers
                            // arriving after it).
                            let scale = self.pool_scale(record, now_ms);
                            let (outcome, write) = judge(record, Budget { scale, pool: true });
                            (Some(outcome), write)
                        })
                        .ok()
                } else if young {
                    // Not counted any more, but not yet returning: the pool's box holds.
                    self.clients
                        .update_local(store, pool_key, now_ms, stays_local, |record| (self.penalized(record, now_ms), false))
                        .ok()
                } else {
                    if mark {
                        self.mark_crowd(store, pool_key, key, now_ms);
                    }
                    None
                };
                match pool {
                    Some((Some(p), pool_stats)) if Self::refuses(&p) => (Ok((p, pool_stats)), true),
                    _ => (Ok((outcome, stats)), false),
                }
            }
            (Ok(((outcome, ..), stats)), None) => (Ok((outcome, stats)), false),
            (Err(failed), _) => (Err(failed), false),
        };
        self.count_object_route(store, &look, fresh, now_ms);
        exchange.agent = agent;
        exchange.client_key = look.key;
        exchange.group = look.routes.first();
        if self.events_on() {
            exchange.fleet_session = self.fleet_session_of(facts);
        }
        let key = look.key;
        let mut verdict = self.verdict(client, updated, look.mode, now_ms);
        verdict.agent = agent;
        verdict.pool = pooled;
        self.apply_rules(&mut verdict, &rules_acted);
        if let (Some(a), Some(d)) = (&attempt_seen, &self.distributed) {
            if a.level(d.refuse_at()) != "low" {
                verdict.login_risk = Some(a.header(d.refuse_at()));
            }
        }
        if !verdict.would_block && !verdict.store_failed {
            self.remember(&mut exchange, facts, &look, attempt_seen);
            if let Some(record) = snapshot {
                self.consult_scorer(store, facts, record, look.routes, &mut verdict, &mut exchange, now_ms);
            }
        }
        self.sample_client(key, &verdict, snapshot.as_ref(), look.routes, facts.anonymous, now_ms);
        (verdict, exchange)
    }

    /// The look: stateless signals (probing paths and user agents, object
    /// ids, pages), the route groups and mode, and on login routes what the
    /// request itself tells about the attempt. The client's fingerprint
    /// (header order + user agent) names its device in the account's
    /// profile, and a user agent that claims no browser is also judged as a
    /// tool by it.
    fn look<'a>(&self, store: &dyn SharedStore, facts: &RequestFacts<'a>, client: ClientAddr, key: u64, now_ms: u64) -> Look<'a> {
        let good_bot = self.exemptions.good_bot(client, facts.user_agent);
        let routes = self.routes.matches(facts.method, facts.path);
        let probe = match &self.probing {
            Some(p) if !good_bot => p.on_request(facts.path, facts.user_agent),
            _ => Signal::default(),
        };
        let object = match &self.enumeration {
            Some(e) if !good_bot => e.object_id(facts.path),
            _ => None,
        };
        let object_hash = object.as_ref().map(|o| self.hasher.key(DOMAIN_OBJECT, o.text.as_bytes()));
        let object_route = match (&self.harvest, &object) {
            (Some(_), Some(ObjectId { route: Some(route), objects: Objects::Private, .. })) => {
                let key = self.object_route_keys.get(*route).copied().unwrap_or_default();
                Some((*route, self.object_routes.peek(store, key).ok().flatten().unwrap_or_default()))
            }
            _ => None,
        };
        let login_route = self.login.as_ref().and_then(|l| l.route(facts.method, facts.path));
        let header_shape = login_route.map(|_| self.client_header_shape(facts.header_names.unwrap_or("")));
        let fingerprint_text = header_shape
            .as_ref()
            .map(|shape| format!("{shape}|{}", facts.user_agent.unwrap_or("")));
        let tool_key = match (&self.distributed, &fingerprint_text) {
            (Some(_), Some(text)) if !facts.user_agent.is_some_and(crate::detectors::browser::claims_browser) => {
                Some(self.hasher.key(DOMAIN_FINGERPRINT, text.as_bytes()))
            }
            _ => None,
        };
        let endpoint = match (&self.distributed, login_route) {
            (Some(_), Some(route)) => self.endpoints.peek(store, self.endpoint_key(route)).ok().flatten(),
            _ => None,
        };
        let attempt = match (&self.distributed, login_route) {
            (Some(d), Some(_)) => {
                let under_attack = endpoint.is_some_and(|e| e.under_attack(now_ms));
                let tool_fingerprint = under_attack
                    && tool_key.is_some_and(|k| {
                        self.fingerprints
                            .peek(store, k)
                            .ok()
                            .flatten()
                            .is_some_and(|f| d.tool_is_attacking(&f, now_ms))
                    });
                Some(AttemptSignals {
                    under_attack,
                    tool_fingerprint,
                    inconsistent_headers: crate::detectors::browser::inconsistent(
                        facts.user_agent,
                        facts.header_names.unwrap_or(""),
                    ),
                    ..AttemptSignals::default()
                })
            }
            _ => None,
        };
        let login_place = match login_route {
            Some(_) => LoginPlace {
                device: device_tag(facts.user_agent.unwrap_or(""), header_shape.as_deref().unwrap_or(""), facts.ja4),
                country: country_number(facts.country),
                asn: asn_number(facts.asn),
                network: network_tag(&client),
            },
            None => LoginPlace::default(),
        };
        let mode = self.routes.mode_for(routes).unwrap_or(self.config.mode);
        // Set by the count stage (it reads the session's record).
        let anonymous = false;
        let page = match &self.scraping {
            Some(sc) if !good_bot => sc.page_of(facts.path),
            _ => None,
        };
        Look {
            key,
            good_bot,
            routes,
            probe,
            object,
            object_hash,
            login_route,
            tool_key,
            endpoint,
            attempt,
            login_place,
            page,
            mode,
            anonymous,
            unaccepted_credential: false,
            accepted: false,
            object_route,
        }
    }

    /// Stage 4, **detect**: every detector against the client's record, in
    /// a fixed order (some count on the record as they go: the login
    /// attempts before the rate limits, the request last).
    fn detect(
        &self,
        record: &mut ClientRecord,
        facts: &RequestFacts<'_>,
        look: &Look<'_>,
        counted: &Counted,
        attempt: &mut Option<AttemptSignals>,
        now_ms: u64,
    ) -> Signal {
        let budget = counted.budget;
        if record.first_seen_ms == 0 {
            record.first_seen_ms = now_ms;
        }
        let mut signal = look.probe;
        signal.add(counted.session_signal);
        if let (Some(d), Some(h)) = (&self.sessions, counted.session_hash) {
            signal.add(d.on_client(record, h, now_ms));
        }
        if facts.anonymous {
            let figure = crate::detectors::Figure::new("request from an anonymous network", 1.0, 0.0, 0);
            signal.fire_with(Reason::AnonymousNetwork, self.config.geo.anonymous_weight, figure);
        }
        let spike = match &self.spikes {
            Some(spikes) => spikes.on_request(record, counted.group_state, now_ms),
            None => Signal::default(),
        };
        let mut scraping = match (&self.scraping, look.good_bot) {
            (Some(sc), false) => sc.on_request(record, look.page, now_ms),
            _ => Signal::default(),
        };
        if let (Some(a), Some(d)) = (attempt.as_mut(), &self.distributed) {
            (a.new_client, a.never_browsed) = d.client_signals(record);
            signal.add(d.refusal(a));
        }
        if look.login_route.is_some() {
            record.login_attempts = record.login_attempts.saturating_add(1);
        }
        let mut under_limit = true;
        if let Some(rate) = &self.rate {
            // A client that logged in carries the credential it was just
            // given: keyed at once, not only after the API accepted it (its
            // first requests with it would else count as anonymous). Never
            // on a pool: a newcomer's login is not another's.
            let logged_in = look.unaccepted_credential && record.login_successes > 0 && !budget.pool;
            let over = rate.observe(look.routes, look.anonymous && !logged_in, record, now_ms, budget.scale);
            under_limit = over.reasons.is_empty();
            signal.add(over);
        }
        // A client the API accepted (a partner's key) is accountable: under
        // its own limits, driving a spike or walking the catalogue's pages
        // marks it, never refuses it — its limits say what it may do, and
        // its key can be revoked.
        let mut spike = spike;
        if look.accepted && under_limit {
            spike.only_tag(Reason::EndpointSpike);
            scraping.only_tag(Reason::Scraping);
        }
        signal.add(spike);
        signal.add(scraping);
        if let (Some(e), Some(o), Some(h)) = (&self.enumeration, &look.object, look.object_hash) {
            if let (Some(harvest), Some((_, route))) = (&self.harvest, &look.object_route) {
                signal.add(self.harvest_evidence(harvest, record, o, h, route, look.accepted, counted.session_hash.is_none(), now_ms));
            }
            let session = counted.session_hash.map(|h| (h & 0xffff_ffff) as u32).unwrap_or(0);
            let sessions = record.sessions.estimate();
            signal.add(e.on_request(record, o, h, session, sessions, look.accepted, now_ms));
        }
        record.requests = record.requests.saturating_add(1);
        signal
    }

    /// During a harvest of the request's private route, its evidence (see
    /// `detectors::harvest`), from the client's record before this request.
    #[allow(clippy::too_many_arguments)]
    fn harvest_evidence(
        &self,
        harvest: &Harvest,
        record: &ClientRecord,
        id: &ObjectId<'_>,
        id_hash: u64,
        route: &ObjectRouteRecord,
        accepted: bool,
        no_credential: bool,
        now_ms: u64,
    ) -> Signal {
        let harvested = route.harvested(now_ms);
        if !harvested {
            return Signal::default();
        }
        let window_ms = u64::from(self.config.enumeration.window_s).saturating_mul(1000);
        let objects_read = record.object_ids.estimate_at(now_ms, window_ms);
        let evidence = HarvestEvidence {
            no_history: !harvest.has_history(record.first_seen_ms, record.requests, record.login_successes > 0, accepted, now_ms),
            no_credential,
            next_to_recent: id.number.is_some_and(|n| route.next_to_recent(n, ADJACENT)),
            only_objects: f64::from(record.requests) <= record.object_requests.estimate(now_ms, window_ms) + 0.5,
            several_objects: objects_read >= 0.5 && !record.object_ids.contains(id_hash),
        };
        harvest.refusal(harvested, &evidence, route, now_ms)
    }

    /// Counts the request on its private object route (harvest on), refused
    /// or not: a harvest's refused requests are still the harvest's.
    fn count_object_route(&self, store: &dyn SharedStore, look: &Look<'_>, fresh: bool, now_ms: u64) {
        let (Some(harvest), Some((route, _)), Some(id), Some(id_hash)) = (&self.harvest, &look.object_route, &look.object, look.object_hash) else {
            return;
        };
        let key = self.object_route_keys.get(*route).copied().unwrap_or_default();
        // Best effort: a lost update only delays recognition.
        let _ = self.object_routes.update(store, key, now_ms, |r| {
            harvest.on_request(r, id_hash, id.number, fresh, now_ms);
            ((), true)
        });
    }

    /// A returning identity counts in its address's crowd (see `identify`).
    fn mark_crowd(&self, store: &dyn SharedStore, pool_key: u64, key: u64, now_ms: u64) {
        let _ = self.clients.update(store, pool_key, now_ms, |pool| {
            pool.crowd.insert(key, now_ms, CROWD_WINDOW_MS);
            ((), true)
        });
    }

    /// What the later phases (body, answer, scorer) need of a judged request.
    fn remember(&self, exchange: &mut Exchange, facts: &RequestFacts<'_>, look: &Look<'_>, attempt: Option<AttemptSignals>) {
        exchange.judged = true;
        exchange.client_key = look.key;
        exchange.good_bot = look.good_bot;
        exchange.login_route = look.login_route;
        exchange.attempt = attempt;
        exchange.endpoint = look.endpoint;
        exchange.tool_key = look.tool_key;
        exchange.login_place = look.login_place;
        exchange.anonymous = facts.anonymous;
        exchange.mode = Some(look.mode);
        exchange.object = look.object.is_some();
        exchange.accepted = look.accepted;
        if self.probing.is_some() {
            // Only probing reads it (distinct paths answered 404).
            exchange.path_hash = self.hasher.key(DOMAIN_PATH, facts.path.split('?').next().unwrap_or("").as_bytes());
        }
    }

    /// The request's header names as the client sent them: without those
    /// the proxy adds (Envoy's `x-request-id`, `x-forwarded-*`, `x-envoy-*`,
    /// the GeoIP filter's, the JA4 and facts headers), whose order and presence change
    /// from one request to the next (the GeoIP filter adds its headers in no
    /// fixed order) and say nothing about the client's device.
    pub(super) fn client_header_shape(&self, names: &str) -> String {
        let geo = &self.config.geo;
        let added = |name: &str| {
            name == "x-request-id"
                || name.starts_with("x-forwarded-")
                || name.starts_with("x-envoy-")
                || geo.country_header.as_deref() == Some(name)
                || geo.asn_header.as_deref() == Some(name)
                || geo.anonymous_headers.iter().any(|h| h == name)
                || self.ja4_header() == Some(name)
                || self.config.client.facts_header.as_deref() == Some(name)
        };
        names.split(',').filter(|n| !added(n)).collect::<Vec<_>>().join(",")
    }
}
