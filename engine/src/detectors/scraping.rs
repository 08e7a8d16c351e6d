//! Scraping (harvesting): a client copying the API's data wholesale. Three
//! signals, all per client:
//!
//! **Deep, fast pagination.** The page number (or offset) is read from the
//! query string (`page_params`, first listed wins). A run counts consecutive
//! forward pages; it fires `weight` once `page_run >= max_page_run`, and on
//! every page after that. Rules:
//!
//! - *Step.* With `d = page - last_page`, the page continues the run when
//!   `d >= 1` and `last_page` is a multiple of `d`. Page numbers step by 1,
//!   which always qualifies (1, 2, 3, ...); offsets step by the page size
//!   from 0 (0, 20, 40, ...), and every offset `k·s` is a multiple of the
//!   step `s`. No step has to be stored: the record has no field for it,
//!   and this test needs only `last_page`. It also lets through a few
//!   irregular forward jumps (0 → 500, 40 → 80), which is harmless: any
//!   deep forward walk at machine speed is harvesting. Offsets that do not
//!   start on a multiple of the page size (10, 30, 50, ...) are missed.
//! - *Repeat.* The same page again (a retry, a refresh) leaves the run as it
//!   is: neither growth nor reset, so duplicates cannot be used to dodge it.
//!   A page going backwards, or an irregular step, restarts the run.
//! - *Speed.* The run only grows while (a) the gap since the client's
//!   previous request is at most `max_page_interval_ms` and (b) the run as a
//!   whole keeps that pace: `now - page_run_start_ms <= (page_run + 1) ·
//!   max_page_interval_ms`. Otherwise it restarts at this page. (a) is "a
//!   pause restarts"; (b) is what makes the slow partner safe even when it
//!   sends other requests between pages (there is no last-page time in the
//!   record, only the last request's, so a 2.5 s page pace padded with fast
//!   detail requests would pass (a) alone). Each page `<= max_page_interval_ms`
//!   after the previous one implies (b), so (b) never misses a fast walk.
//!
//! **Machine rhythm.** Humans are irregular; a script sleeping a fixed time
//! between requests is not. The gaps `x` between a client's consecutive
//! requests feed an exponentially weighted mean and variance (α = 0.1,
//! West/Finch incremental form):
//!
//! ```text
//!     d = x − μ;   μ ← μ + α·d;   σ² ← (1 − α)·(σ² + α·d²)
//! ```
//!
//! started with `μ = x₁, σ² = 0`. With α = 0.1 the estimate spans roughly
//! the last 10–20 gaps, so a bot that changes its pace is judged on its new
//! pace within seconds. Once `intervals >= rhythm_min_requests` the rhythm is
//! machine-like when `μ <= rhythm_max_mean_ms` (fast: a 30 s poller is an app)
//! and the coefficient of variation `σ/μ <= rhythm_max_cv`. For comparison: a
//! human clicking every 0.5–8 s at random has a CV near 0.5; a NATed office
//! (many independent users, Poisson arrivals) near 1; jitter of ±10 ms on
//! 200 ms is 0.03. A gap over [`MAX_GAP_MS`] (10 min) restarts the
//! statistics: a client back from lunch is a new session.
//!
//! *When the rhythm fires.* Firing on every request would add
//! `rhythm_action_weight` per request and block a steady poller in seconds;
//! firing once would let the tag fade for good. It fires (1) on the request
//! that brings the statistics to exactly `rhythm_min_requests` intervals, if
//! they look machine-like then; and (2) on the first request of each
//! clock-aligned period of `P = RHYTHM_REFLAG_WINDOWS × window_s` (5 min at
//! defaults: `now / P` differs from the previous request's) that still looks
//! machine-like, provided at least one window has passed since (1). The
//! record has no "last fired" field, so that time is estimated as
//! `(intervals − rhythm_min_requests) · μ`: sound, because the rhythm is
//! regular whenever (2) can fire. Hence at most once per window, and after
//! the first re-flag exactly once per period while the rhythm lasts; a pause
//! over 10 min starts a new run, which fires (1) again.
//!
//! Why a period of 5 windows: a signal `w` repeated every `P` under a risk
//! half-life `H` peaks at `w / (1 − 2^(−P/H))` and drops to
//! `w · 2^(−P/H) / (1 − 2^(−P/H))` just before the next one. At the defaults
//! (w = 40, P = 300 s, H = 300 s) that tends to 80 and 40: above `tag_at`
//! (30) and below `block_at` (100), so a rhythm alone keeps a client tagged
//! for as long as it lasts and never blocks it (the first cycles start lower
//! and may dip under `tag_at` briefly). Re-flagging every 60 s would
//! accumulate to ~310 and block any steady 1 s poller within 3 minutes.
//!
//! **Response volume.** KiB answered to the client in a sliding window of
//! `window_s` (`response_kib`); fires `weight` on each answer while over
//! `max_kib_per_window`. Off by default (0): what is a normal volume depends
//! entirely on the API.
//!
//! Scenario, in short:
//! - counts: forward page runs, request rhythm, KiB answered;
//! - grouped by: client;
//! - over: the run's pace (`max_page_interval_ms`); exponentially weighted request intervals (rhythm); sliding `scraping.window_s` (volume);
//! - over the threshold: `scraping`: `weight` past `max_page_run` or `max_kib_per_window`; `machine_rhythm` (`rhythm_action_weight`, tags alone) for a regular fast rhythm past `rhythm_min_requests`.

use super::Signal;
use crate::validate::ConfigError;
use crate::reason::Reason;
use super::Figure;
use crate::record::ClientRecord;
use serde::Deserialize;

/// Weight of each new gap in the exponentially weighted statistics.
pub const ALPHA: f64 = 0.1;
/// Longer gaps restart the rhythm statistics instead of being averaged in.
pub const MAX_GAP_MS: u64 = 600_000;
/// The rhythm is re-flagged once per this many windows (see the module docs).
pub const RHYTHM_REFLAG_WINDOWS: u64 = 5;
/// Query pairs looked at; page parameters come early in real URLs.
const MAX_QUERY_PAIRS: usize = 64;
/// u32::MAX has 10 digits.
const MAX_DIGITS: usize = 10;
/// Most page parameters an operator may list (each is compared per query pair).
pub const MAX_PAGE_PARAMS: usize = 16;

/// Scraping detection (see the module docs).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct ScrapingConfig {
    pub enabled: bool,
    /// Query parameters that carry a page number or an offset, by priority.
    pub page_params: Vec<String>,
    /// Consecutive forward pages (n, n+1, ... or offsets by a constant step)...
    pub max_page_run: u32,
    /// ...each following the previous one within this many ms; a longer
    /// pause (or a slower average pace) restarts the run.
    pub max_page_interval_ms: u32,
    /// Intervals between requests needed before the rhythm is judged.
    pub rhythm_min_requests: u32,
    /// Coefficient of variation (stddev/mean) of the intervals at or below
    /// which the rhythm is machine-like.
    pub rhythm_max_cv: f32,
    /// Only rhythms at least this fast count (a 30 s poller is an app).
    pub rhythm_max_mean_ms: u32,
    /// Risk for a machine rhythm; below `risk.block_at` so that alone it tags.
    pub rhythm_action_weight: f32,
    /// Response KiB per client per window; 0 = not tracked.
    pub max_kib_per_window: u32,
    pub window_s: u32,
    /// Risk for deep fast pagination and for volume.
    pub weight: f32,
}

impl Default for ScrapingConfig {
    fn default() -> Self {
        // Safe for: a mobile app polling every 30 s (too slow for the
        // rhythm), a partner doing 50 requests/s (network jitter keeps its
        // CV far above 0.1, and rhythm alone only tags), a partner paging an
        // export at one page per 2+ s (slower than 1 s per page), a NATed
        // office of 100 (interleaved users break page runs, and their merged
        // arrivals are Poisson, CV ≈ 1). A scraper reading 30 pages in under
        // 30 s is not any of these.
        ScrapingConfig {
            enabled: true,
            page_params: vec!["page".to_string(), "offset".to_string(), "cursor_page".to_string()],
            max_page_run: 15,
            max_page_interval_ms: 1000,
            rhythm_min_requests: 50,
            rhythm_max_cv: 0.1,
            rhythm_max_mean_ms: 2000,
            rhythm_action_weight: 40.0,
            max_kib_per_window: 0,
            window_s: 60,
            weight: 100.0,
        }
    }
}

fn config_error(field: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError { key: format!("scraping.{field}"), problem: problem.into() }
}

fn check_u32(field: &str, value: u32, min: u32, max: u32) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(config_error(field, format!("{value} is out of range [{min}, {max}]")));
    }
    Ok(())
}

fn check_f32(field: &str, value: f32, min: f32, max: f32) -> Result<(), ConfigError> {
    if !value.is_finite() {
        return Err(config_error(field, "must be a finite number"));
    }
    if value < min || value > max {
        return Err(config_error(field, format!("{value} is out of range [{min}, {max}]")));
    }
    Ok(())
}

impl ScrapingConfig {
    /// Range checks; errors name the key as `scraping.<field>`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.page_params.len() > MAX_PAGE_PARAMS {
            return Err(config_error("page_params", format!("at most {MAX_PAGE_PARAMS} parameters")));
        }
        for (i, p) in self.page_params.iter().enumerate() {
            // A name with these characters could never match a query key.
            let ok = !p.is_empty()
                && p.len() <= 64
                && !p.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '&' | '=' | '#' | '?'));
            if !ok {
                return Err(config_error(
                    &format!("page_params[{i}]"),
                    format!("{p:?} must be 1 to 64 characters without spaces, '&', '=', '#' or '?'"),
                ));
            }
        }
        check_u32("max_page_run", self.max_page_run, 2, 1_000_000)?;
        check_u32("max_page_interval_ms", self.max_page_interval_ms, 1, 600_000)?;
        // Below ~1/α intervals the weighted statistics still mostly reflect
        // the first few gaps.
        check_u32("rhythm_min_requests", self.rhythm_min_requests, 10, 1_000_000)?;
        check_f32("rhythm_max_cv", self.rhythm_max_cv, 0.0, 1.0)?;
        // Gaps over MAX_GAP_MS restart the statistics, so a slower mean never occurs.
        check_u32("rhythm_max_mean_ms", self.rhythm_max_mean_ms, 1, 600_000)?;
        check_f32("rhythm_action_weight", self.rhythm_action_weight, 0.0, 10_000.0)?;
        check_u32("max_kib_per_window", self.max_kib_per_window, 0, 1_000_000_000)?;
        check_u32("window_s", self.window_s, 1, 86_400)?;
        check_f32("weight", self.weight, 0.0, 10_000.0)?;
        Ok(())
    }
}

/// The scraping detector, compiled from [`ScrapingConfig`].
#[derive(Debug, Clone)]
pub struct Scraping {
    page_params: Vec<String>,
    max_page_run: u32,
    max_page_interval_ms: u64,
    rhythm_min_requests: u32,
    rhythm_max_cv: f64,
    rhythm_max_mean_ms: f64,
    rhythm_weight: f32,
    /// 0 = volume not tracked.
    max_kib: f64,
    window_ms: u64,
    reflag_ms: u64,
    weight: f32,
}

impl Scraping {
    /// None when disabled.
    pub fn new(config: &ScrapingConfig) -> Option<Scraping> {
        if !config.enabled {
            return None;
        }
        let window_ms = u64::from(config.window_s).saturating_mul(1000).max(1);
        Some(Scraping {
            page_params: config.page_params.iter().take(MAX_PAGE_PARAMS).cloned().collect(),
            max_page_run: config.max_page_run.max(1),
            max_page_interval_ms: u64::from(config.max_page_interval_ms),
            // At least 1: intervals == 0 means "no statistics yet".
            rhythm_min_requests: config.rhythm_min_requests.max(1),
            rhythm_max_cv: f64::from(config.rhythm_max_cv),
            rhythm_max_mean_ms: f64::from(config.rhythm_max_mean_ms),
            rhythm_weight: config.rhythm_action_weight,
            max_kib: f64::from(config.max_kib_per_window),
            window_ms,
            reflag_ms: window_ms.saturating_mul(RHYTHM_REFLAG_WINDOWS),
            weight: config.weight,
        })
    }

    /// Whether responses need to be measured ([`Scraping::on_response`] can fire).
    pub fn tracks_volume(&self) -> bool {
        self.max_kib > 0.0
    }

    /// The page number (or offset) this request asks for, from its query
    /// string: the first of `page_params` (in their configured order) present
    /// with a decimal u32 value. Keys and values are %-decoded as the
    /// upstream would decode them (so `p%61ge=%33` is page 3, not a way
    /// around the detector); only the first [`MAX_QUERY_PAIRS`] pairs are
    /// read, and a value must be 1–10 ASCII digits that fit in a u32.
    pub fn page_of(&self, path_and_query: &str) -> Option<u32> {
        if self.page_params.is_empty() {
            return None;
        }
        let (_, query) = path_and_query.split_once('?')?;
        let query = query.split('#').next().unwrap_or(query);
        // (priority, value): lower priority index wins.
        let mut best: Option<(usize, u32)> = None;
        for (key, value) in form_urlencoded::parse(query.as_bytes()).take(MAX_QUERY_PAIRS) {
            let Some(rank) = self.page_params.iter().position(|p| *p == key) else {
                continue;
            };
            if best.is_some_and(|(b, _)| b <= rank) {
                continue;
            }
            if let Some(n) = decimal_u32(&value) {
                best = Some((rank, n));
                if rank == 0 {
                    break;
                }
            }
        }
        best.map(|(_, n)| n)
    }

    /// Every request of the client, in arrival order: rhythm statistics, and
    /// the pagination run when the request names a `page` (from
    /// [`Scraping::page_of`]).
    pub fn on_request(&self, record: &mut ClientRecord, page: Option<u32>, now_ms: u64) -> Signal {
        let mut signal = Signal::default();
        // Both parts need the previous request's time; pagination reads it
        // before the rhythm moves it to now.
        let previous_ms = record.last_request_ms;
        if let Some(page) = page {
            if self.on_page(record, page, previous_ms, now_ms) {
                let figure = Figure::new("consecutive pages", record.page_run.into(), self.max_page_run.into(), 0);
                signal.fire_with(Reason::Scraping, self.weight, figure);
            }
        }
        if self.on_rhythm(record, previous_ms, now_ms) {
            let figure = Figure::new("regular intervals (mean ms)", record.interval_mean_ms.into(), 0.0, 0);
            signal.fire_with(Reason::MachineRhythm, self.rhythm_weight, figure);
        }
        signal
    }

    /// Response volume: adds `kib` to the client's window and fires while
    /// the window's estimate is over `max_kib_per_window`.
    pub fn on_response(&self, record: &mut ClientRecord, kib: u32, now_ms: u64) -> Signal {
        let mut signal = Signal::default();
        let window = &mut record.response_kib;
        let total = if kib == 0 {
            window.estimate(now_ms, self.window_ms)
        } else {
            // SlidingWindow counts events one at a time: record one (which
            // also rolls the window forward) and add the rest to the current
            // window directly, saturating.
            window.record(now_ms, self.window_ms);
            window.current = window.current.saturating_add(kib.saturating_sub(1));
            window.estimate(now_ms, self.window_ms)
        };
        if self.tracks_volume() && total > self.max_kib {
            signal.fire_with(Reason::Scraping, self.weight, Figure::new("KiB answered", total, self.max_kib, self.window_ms));
        }
        signal
    }

    /// Updates the page run; true when it is long enough to fire.
    fn on_page(&self, record: &mut ClientRecord, page: u32, previous_ms: u64, now_ms: u64) -> bool {
        let gap = now_ms.saturating_sub(previous_ms);
        let run_elapsed = now_ms.saturating_sub(record.page_run_start_ms);
        let allowed = u64::from(record.page_run).saturating_add(1).saturating_mul(self.max_page_interval_ms);
        // previous_ms == 0: the client's first request, nothing to follow.
        let in_time = previous_ms != 0 && gap <= self.max_page_interval_ms && run_elapsed <= allowed;
        let last = record.last_page;
        if in_time && page == last {
            // A retry or refresh: the run stands as it is.
        } else if in_time && page > last && last.checked_rem(page.saturating_sub(last)) == Some(0) {
            record.page_run = record.page_run.saturating_add(1);
        } else {
            record.page_run = 0;
            record.page_run_start_ms = now_ms;
        }
        record.last_page = page;
        record.page_run >= self.max_page_run
    }

    /// Updates the rhythm statistics; true when this request should fire
    /// the rhythm signal (see "When the rhythm fires" in the module docs).
    fn on_rhythm(&self, record: &mut ClientRecord, previous_ms: u64, now_ms: u64) -> bool {
        let sane = record.interval_mean_ms.is_finite()
            && record.interval_mean_ms >= 0.0
            && record.interval_var.is_finite()
            && record.interval_var >= 0.0;
        if !sane {
            restart(record);
        }
        if previous_ms == 0 {
            // First request: nothing to measure yet.
            restart(record);
            record.last_request_ms = now_ms.max(1);
            return false;
        }
        let gap = if now_ms >= previous_ms {
            now_ms.saturating_sub(previous_ms)
        } else if previous_ms.saturating_sub(now_ms) <= MAX_GAP_MS {
            // Out of order by a little (workers' clocks, concurrent
            // requests): simultaneous, and the latest time is kept.
            0
        } else {
            // The clock jumped far back: nothing measured so far is comparable.
            u64::MAX
        };
        record.last_request_ms = previous_ms.max(now_ms).max(1);
        if gap > MAX_GAP_MS {
            restart(record);
            record.last_request_ms = now_ms.max(1);
            return false;
        }
        self.observe(record, gap as f64);
        self.rhythm_fires(record, previous_ms, now_ms)
    }

    /// Adds one gap to the exponentially weighted mean and variance.
    fn observe(&self, record: &mut ClientRecord, gap_ms: f64) {
        let (mean, var) = if record.intervals == 0 {
            (gap_ms, 0.0)
        } else {
            let mean = f64::from(record.interval_mean_ms);
            let var = f64::from(record.interval_var);
            let d = gap_ms - mean;
            let step = ALPHA * d;
            (mean + step, (1.0 - ALPHA) * (var + d * step))
        };
        let (mean, var) = (mean as f32, var as f32);
        if mean.is_finite() && var.is_finite() && mean >= 0.0 && var >= 0.0 {
            record.interval_mean_ms = mean;
            record.interval_var = var;
            record.intervals = record.intervals.saturating_add(1);
        } else {
            // Cannot happen with gaps <= MAX_GAP_MS and sane statistics;
            // if it does, start over rather than keep a poisoned value.
            restart(record);
        }
    }

    fn rhythm_fires(&self, record: &ClientRecord, previous_ms: u64, now_ms: u64) -> bool {
        let min = self.rhythm_min_requests;
        if record.intervals < min {
            return false;
        }
        let mean = f64::from(record.interval_mean_ms);
        let sd = f64::from(record.interval_var).max(0.0).sqrt();
        // A mean under 1 ms is a burst of simultaneous requests: no rhythm to
        // speak of, and the rate limit's business.
        let machine = mean >= 1.0 && mean <= self.rhythm_max_mean_ms && sd / mean <= self.rhythm_max_cv;
        if !machine {
            return false;
        }
        if record.intervals == min {
            return true;
        }
        let new_period = previous_ms / self.reflag_ms != now_ms / self.reflag_ms;
        let since_first = f64::from(record.intervals.saturating_sub(min)) * mean;
        new_period && since_first >= self.window_ms as f64
    }
}

/// Forgets the rhythm statistics (not the time of the last request).
fn restart(record: &mut ClientRecord) {
    record.interval_mean_ms = 0.0;
    record.interval_var = 0.0;
    record.intervals = 0;
}

/// 1–10 ASCII digits fitting in a u32 (`str::parse` alone would accept a `+`).
fn decimal_u32(text: &str) -> Option<u32> {
    if text.is_empty() || text.len() > MAX_DIGITS || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: u64 = 1_700_000_000_000;

    fn detector() -> Scraping {
        Scraping::new(&ScrapingConfig::default()).unwrap()
    }

    /// Deterministic pseudo-random numbers in [0, 1) (xorshift64*), so that
    /// "random" humans are the same on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        }

        fn between(&mut self, lo: f64, hi: f64) -> u64 {
            (lo + (hi - lo) * self.next()) as u64
        }
    }

    /// Runs requests at the given times; returns (request index, signal) of each fire.
    fn run(d: &Scraping, c: &mut ClientRecord, requests: &[(u64, Option<u32>)]) -> Vec<(usize, Signal)> {
        requests
            .iter()
            .enumerate()
            .filter_map(|(i, &(t, page))| {
                let s = d.on_request(c, page, t);
                (!s.reasons.is_empty()).then_some((i, s))
            })
            .collect()
    }

    fn pages(values: impl Iterator<Item = u32>, gap_ms: u64) -> Vec<(u64, Option<u32>)> {
        values.enumerate().map(|(i, p)| (T0 + i as u64 * gap_ms, Some(p))).collect()
    }

    #[test]
    fn defaults_are_valid_and_partial_configs_fill_in() {
        assert_eq!(ScrapingConfig::default().validate(), Ok(()));
        let c: ScrapingConfig = serde_json::from_str(r#"{"max_page_run": 10}"#).unwrap();
        assert_eq!(c, ScrapingConfig { max_page_run: 10, ..ScrapingConfig::default() });
        assert!(serde_json::from_str::<ScrapingConfig>(r#"{"max_page_runs": 10}"#).is_err());
        assert!(Scraping::new(&ScrapingConfig { enabled: false, ..ScrapingConfig::default() }).is_none());
    }

    #[test]
    fn validation_names_the_key() {
        let base = ScrapingConfig::default;
        let key = |c: ScrapingConfig| c.validate().unwrap_err().key;
        assert_eq!(key(ScrapingConfig { max_page_run: 1, ..base() }), "scraping.max_page_run");
        assert_eq!(key(ScrapingConfig { max_page_interval_ms: 0, ..base() }), "scraping.max_page_interval_ms");
        assert_eq!(key(ScrapingConfig { rhythm_min_requests: 3, ..base() }), "scraping.rhythm_min_requests");
        assert_eq!(key(ScrapingConfig { rhythm_max_cv: f32::NAN, ..base() }), "scraping.rhythm_max_cv");
        assert_eq!(key(ScrapingConfig { rhythm_max_cv: 1.5, ..base() }), "scraping.rhythm_max_cv");
        assert_eq!(key(ScrapingConfig { rhythm_max_mean_ms: 0, ..base() }), "scraping.rhythm_max_mean_ms");
        assert_eq!(key(ScrapingConfig { rhythm_action_weight: -1.0, ..base() }), "scraping.rhythm_action_weight");
        assert_eq!(key(ScrapingConfig { max_kib_per_window: u32::MAX, ..base() }), "scraping.max_kib_per_window");
        assert_eq!(key(ScrapingConfig { window_s: 0, ..base() }), "scraping.window_s");
        assert_eq!(key(ScrapingConfig { weight: f32::INFINITY, ..base() }), "scraping.weight");
        let params = |p: &[&str]| ScrapingConfig { page_params: p.iter().map(|s| s.to_string()).collect(), ..base() };
        assert_eq!(key(params(&["page", ""])), "scraping.page_params[1]");
        assert_eq!(key(params(&["a=b"])), "scraping.page_params[0]");
        assert_eq!(key(params(&["p"; 17])), "scraping.page_params");
        assert_eq!(params(&[]).validate(), Ok(()));
        let e = ScrapingConfig { window_s: 0, ..base() }.validate().unwrap_err();
        assert!(e.problem.contains("out of range [1, 86400]"), "{e}");
    }

    #[test]
    fn page_numbers_from_the_query() {
        let d = detector();
        assert_eq!(d.page_of("/api/products?page=7"), Some(7));
        assert_eq!(d.page_of("/api/products?offset=40&x=1"), Some(40));
        assert_eq!(d.page_of("/api/products?page=abc"), None);
        assert_eq!(d.page_of("/api/products?page=99999999999999"), None);
        assert_eq!(d.page_of("/api/products?page=4294967296"), None);
        assert_eq!(d.page_of("/api/products?page=4294967295"), Some(u32::MAX));
        assert_eq!(d.page_of("/api/products?pagex=3"), None);
        assert_eq!(d.page_of("/api/products"), None);
        assert_eq!(d.page_of("/api/products?"), None);
        assert_eq!(d.page_of("/api/products?page="), None);
        assert_eq!(d.page_of("/api/products?page"), None);
        assert_eq!(d.page_of("/api/products?page=+3"), None);
        assert_eq!(d.page_of("/api/products?page=-3"), None);
        assert_eq!(d.page_of("/api/products?page=3.0"), None);
        assert_eq!(d.page_of("/api/products?page=%zz"), None);
        // Decoded as the upstream would read it.
        assert_eq!(d.page_of("/api/products?p%61ge=%33"), Some(3));
        assert_eq!(d.page_of("/api/products?page=007"), Some(7));
        // The first configured parameter wins, whatever the query order;
        // an unusable value falls through to the next parameter.
        assert_eq!(d.page_of("/api/products?offset=40&page=2"), Some(2));
        assert_eq!(d.page_of("/api/products?page=abc&offset=40"), Some(40));
        assert_eq!(d.page_of("/api/products?page=abc&page=5"), Some(5));
        assert_eq!(d.page_of("/api/products?cursor_page=9#page=1"), Some(9));
        assert_eq!(d.page_of("/api/products?x=1#page=1"), None);
        let none = Scraping::new(&ScrapingConfig { page_params: vec![], ..ScrapingConfig::default() }).unwrap();
        assert_eq!(none.page_of("/api/products?page=7"), None);
    }

    #[test]
    fn fast_pagination_fires_at_the_configured_run() {
        let d = detector();
        let mut c = ClientRecord::default();
        let fires = run(&d, &mut c, &pages(1..=40, 100));
        // Page 1 starts the run; page 16 is the 15th consecutive step.
        let (first, signal) = fires.first().copied().unwrap();
        assert_eq!(first, 15);
        assert_eq!(signal.risk, 100.0);
        assert_eq!(signal.part(Reason::Scraping), 100.0);
        assert_eq!(fires.len(), 25, "fires on every page past the limit");
        assert_eq!(c.page_run, 39);
        assert_eq!(c.page_run_start_ms, T0);
    }

    #[test]
    fn slow_partner_export_never_fires() {
        let d = detector();
        let mut c = ClientRecord::default();
        assert!(run(&d, &mut c, &pages(1..=40, 2500)).is_empty());
        assert_eq!(c.page_run, 0);
    }

    #[test]
    fn slow_pages_padded_with_fast_requests_never_fire() {
        // One page every 2.5 s, four detail requests between pages: every
        // page is within 1 s of the previous request, but the page pace is
        // 2.5 s.
        let d = detector();
        let mut c = ClientRecord::default();
        let mut requests = Vec::new();
        for p in 1..=60u32 {
            let t = T0 + u64::from(p) * 2500;
            requests.push((t, Some(p)));
            for k in [400, 900, 1700, 2100] {
                requests.push((t + k, None));
            }
        }
        assert!(run(&d, &mut c, &requests).is_empty());
    }

    #[test]
    fn fast_offsets_fire() {
        let d = detector();
        let mut c = ClientRecord::default();
        let fires = run(&d, &mut c, &pages((0..40).map(|i| i * 20), 100));
        assert_eq!(fires.first().map(|f| f.0), Some(15));
        let mut c = ClientRecord::default();
        let fires = run(&d, &mut c, &pages((0..40).map(|i| i * 25 + 10), 100));
        assert!(fires.is_empty(), "offsets off the page grid are a documented miss");
    }

    #[test]
    fn run_rules() {
        let d = detector();
        let mut c = ClientRecord::default();
        let mut t = T0;
        let mut request = |page: Option<u32>, gap: u64| {
            t += gap;
            d.on_request(&mut c, page, t);
            c.page_run
        };
        assert_eq!(request(Some(1), 0), 0);
        assert_eq!(request(Some(2), 100), 1);
        assert_eq!(request(Some(2), 100), 1, "a retry neither grows nor resets");
        assert_eq!(request(Some(3), 100), 2);
        assert_eq!(request(Some(1), 100), 0, "backwards restarts");
        assert_eq!(request(Some(2), 100), 1);
        assert_eq!(request(Some(7), 100), 0, "an irregular jump restarts");
        assert_eq!(request(Some(8), 100), 1);
        assert_eq!(request(Some(9), 1001), 0, "a pause restarts");
        assert_eq!(request(Some(10), 1000), 1);
        assert_eq!(request(None, 100), 1, "other requests leave the run alone");
        assert_eq!(request(Some(11), 100), 2);
    }

    /// Rhythm fires: (request index, rhythm risk).
    fn rhythm_fires(d: &Scraping, gaps: impl Iterator<Item = u64>) -> Vec<(usize, f32)> {
        let mut c = ClientRecord::default();
        let mut t = T0;
        let mut fires = Vec::new();
        d.on_request(&mut c, None, t);
        for (i, gap) in gaps.enumerate() {
            t += gap;
            let s = d.on_request(&mut c, None, t);
            assert!(c.interval_mean_ms.is_finite() && c.interval_var.is_finite());
            if !s.reasons.is_empty() {
                fires.push((i + 1, s.part(Reason::MachineRhythm)));
            }
        }
        fires
    }

    #[test]
    fn metronome_bot_fires_the_rhythm_once() {
        let d = detector();
        // 60 requests, 59 intervals of exactly 200 ms: fires when the 50th
        // interval completes the statistics, once.
        assert_eq!(rhythm_fires(&d, std::iter::repeat_n(200, 59)), vec![(50, 40.0)]);
        // A little jitter (±10 ms) is still a machine.
        let mut rng = Rng(7);
        let fires = rhythm_fires(&d, (0..100).map(|_| rng.between(190.0, 210.0)));
        assert_eq!(fires, vec![(50, 40.0)]);
    }

    #[test]
    fn steady_bot_is_reflagged_without_accumulating_to_a_block() {
        let d = detector();
        // 30 minutes at one request per second: request i is at i seconds.
        let fires = rhythm_fires(&d, std::iter::repeat_n(1000, 1800));
        assert!(fires.len() >= 6 && fires.len() <= 7, "{fires:?}");
        assert_eq!(fires[0].0, 50);
        for (k, pair) in fires.windows(2).enumerate() {
            let spacing_s = pair[1].0 - pair[0].0;
            // Once per window at most; once per 5-window period after the first re-flag.
            let least = if k == 0 { 60 } else { 298 };
            assert!(spacing_s >= least, "re-flagged after only {spacing_s} s: {fires:?}");
        }
        // The risk these fires add (default half-life 300 s) never reaches
        // block_at, and settles above tag_at.
        let mut risk = 0.0f64;
        let mut last = 0usize;
        for (n, (i, w)) in fires.iter().enumerate() {
            risk *= (-((i - last) as f64) / 300.0).exp2();
            assert!(n < 3 || risk >= 30.0, "tag faded to {risk} before request {i}");
            risk += f64::from(*w);
            assert!(risk < 100.0, "rhythm alone reached {risk} at request {i}");
            last = *i;
        }
    }

    #[test]
    fn humans_pollers_partners_and_offices_never_fire_the_rhythm() {
        let d = detector();
        let mut rng = Rng(42);
        assert!(rhythm_fires(&d, (0..200).map(|_| rng.between(500.0, 8000.0))).is_empty());
        // A fast human, mean ~1.1 s.
        assert!(rhythm_fires(&d, (0..500).map(|_| rng.between(200.0, 2000.0))).is_empty());
        // A mobile app polling every 30 s, exactly.
        assert!(rhythm_fires(&d, std::iter::repeat_n(30_000, 300)).is_empty());
        // A partner at ~50 requests/s over a real network (10–30 ms gaps).
        assert!(rhythm_fires(&d, (0..5000).map(|_| rng.between(10.0, 30.0))).is_empty());
        // An office of 100 behind one NAT: merged arrivals are Poisson
        // (exponential gaps, here mean 300 ms).
        let office = (0..5000).map(|_| (-300.0 * (1.0 - rng.next()).ln()) as u64);
        assert!(rhythm_fires(&d, office).is_empty());
    }

    #[test]
    fn long_pauses_restart_the_statistics() {
        let d = detector();
        let mut c = ClientRecord::default();
        d.on_request(&mut c, None, T0);
        assert_eq!((c.last_request_ms, c.intervals), (T0, 0));
        d.on_request(&mut c, None, T0 + 200);
        d.on_request(&mut c, None, T0 + 400);
        assert_eq!(c.intervals, 2);
        assert_eq!(c.interval_mean_ms, 200.0);
        d.on_request(&mut c, None, T0 + 400);
        assert_eq!(c.intervals, 3, "a gap of 0 ms counts");
        let later = T0 + 400 + MAX_GAP_MS + 1;
        d.on_request(&mut c, None, later);
        assert_eq!((c.intervals, c.interval_mean_ms, c.last_request_ms), (0, 0.0, later));
        // A slightly late timestamp from another worker is simultaneous.
        d.on_request(&mut c, None, later - 5);
        assert_eq!((c.intervals, c.last_request_ms), (1, later));
        // A clock jumping far back restarts.
        d.on_request(&mut c, None, later - 2 * MAX_GAP_MS);
        assert_eq!((c.intervals, c.last_request_ms), (0, later - 2 * MAX_GAP_MS));
    }

    #[test]
    fn response_volume() {
        let d = Scraping::new(&ScrapingConfig { max_kib_per_window: 1000, ..ScrapingConfig::default() }).unwrap();
        assert!(d.tracks_volume());
        let mut c = ClientRecord::default();
        for i in 0..10 {
            assert!(d.on_response(&mut c, 100, T0 + i).reasons.is_empty());
        }
        assert!(d.on_response(&mut c, 0, T0 + 20).reasons.is_empty(), "exactly at the limit is fine");
        let s = d.on_response(&mut c, 1, T0 + 30);
        assert_eq!(s.part(Reason::Scraping), 100.0);
        // Two windows later it is all forgotten.
        assert!(d.on_response(&mut c, 500, T0 + 120_001).reasons.is_empty());
        assert!(!d.on_response(&mut c, u32::MAX, T0 + 120_002).reasons.is_empty());
        assert_eq!(c.response_kib.current, u32::MAX, "saturates");

        let off = detector();
        assert!(!off.tracks_volume());
        let mut c = ClientRecord::default();
        assert!(off.on_response(&mut c, u32::MAX, T0).reasons.is_empty());
    }

    proptest! {
        #[test]
        fn page_of_never_panics(s in any::<String>(), v in "[0-9%a-f+=&#?-]{0,24}") {
            let d = detector();
            let _ = d.page_of(&s);
            let _ = d.page_of(&format!("/p?{s}"));
            let p = d.page_of(&format!("/p?page={v}"));
            if let Some(n) = p {
                prop_assert!(v.contains(&n.to_string()) || v.contains('%'));
            }
        }

        #[test]
        fn on_request_keeps_the_record_finite(
            mean in any::<f32>(), var in any::<f32>(), intervals in any::<u32>(),
            last in any::<u64>(), last_page in any::<u32>(), run in any::<u32>(), run_start in any::<u64>(),
            steps in proptest::collection::vec((any::<u64>(), 0u64..5000, any::<bool>(), any::<u32>(), 0u32..4), 1..80),
        ) {
            let d = detector();
            let mut c = ClientRecord {
                interval_mean_ms: mean, interval_var: var, intervals,
                last_request_ms: last, last_page, page_run: run, page_run_start_ms: run_start,
                ..ClientRecord::default()
            };
            let mut t = last;
            for (jump, gap, big, page, kind) in steps {
                // Mostly small forward steps, sometimes anything at all.
                t = if big { jump } else { t.saturating_add(gap) };
                let page = match kind {
                    0 => None,
                    1 => Some(page),
                    2 => Some(c.last_page.saturating_add(1)),
                    _ => Some(c.last_page.saturating_add(20)),
                };
                let s = d.on_request(&mut c, page, t);
                prop_assert!(s.risk.is_finite() && s.risk >= 0.0);
                prop_assert!(c.interval_mean_ms.is_finite() && c.interval_mean_ms >= 0.0);
                prop_assert!(c.interval_var.is_finite() && c.interval_var >= 0.0);
                let r = d.on_response(&mut c, page.unwrap_or(0), t);
                prop_assert!(r.risk.is_finite());
            }
        }
    }
}
