//! How a worker's local changes to a record merge into the shared record
//! (see [`crate::state::tiers`]): `base` is the shared record as the worker last
//! read it, `local` the worker's record since, `shared` the record as it is
//! now (other workers may have written since `base`). The worker's *delta*
//! (`local` minus `base`) is applied to `shared`, so no worker's increments
//! are lost, whoever merges first:
//!
//! - counts are summed (`shared + local - base`), window by window;
//! - distinct sketches are OR-ed (same window) or the newer window wins;
//! - penalties, risk and last-seen times are max-ed, reason sets united;
//! - sequence state (last object id and its run, request intervals, page
//!   runs) comes from whichever record saw the client last.

use crate::record::ClientRecord;
use crate::sketch::DistinctWindow;
use crate::window::SlidingWindow;

/// Events `local` counted since `base`, as (window start, count) pairs: the
/// ones still in `base`'s current window, then the ones in a later window.
///
/// A window rolls forward by exactly its length (`previous` = the old
/// `current`) or restarts (`previous` = 0) after a long silence; both are
/// recognised from the starts and counts alone, without the length.
fn events_since(base: &SlidingWindow, local: &SlidingWindow) -> [(u64, u32); 2] {
    if local.start_ms == base.start_ms {
        return [(base.start_ms, local.current.saturating_sub(base.current)), (0, 0)];
    }
    if local.start_ms > base.start_ms && base.start_ms != 0 && local.previous >= base.current && local.previous > 0 {
        // Rolled once: the old current window is now `previous`.
        return [(base.start_ms, local.previous.saturating_sub(base.current)), (local.start_ms, local.current)];
    }
    [(local.start_ms, local.current), (0, 0)]
}

/// Adds events to a window: into `current` when they are of its window,
/// into `previous` when they are older (never dropped: a count errs high,
/// and fades with the window).
fn add_events(target: &mut SlidingWindow, events: [(u64, u32); 2]) {
    for (start, n) in events {
        if n == 0 {
            continue;
        }
        if target.start_ms == 0 {
            *target = SlidingWindow { start_ms: start.max(1), current: n, previous: 0 };
        } else if start >= target.start_ms {
            target.current = target.current.saturating_add(n);
        } else {
            target.previous = target.previous.saturating_add(n);
        }
    }
}

/// `shared` plus what `local` counted since `base`.
pub fn merge_window(shared: &SlidingWindow, base: &SlidingWindow, local: &SlidingWindow) -> SlidingWindow {
    if local.start_ms > shared.start_ms {
        // The worker's window is the newer one: add the others' events to it.
        let mut out = *local;
        add_events(&mut out, events_since(base, shared));
        out
    } else {
        let mut out = *shared;
        add_events(&mut out, events_since(base, local));
        out
    }
}

/// Same window: every value either saw; else the newer window (the older
/// one has expired: a sketch restarts rather than rolls).
pub fn merge_distinct(shared: &DistinctWindow, local: &DistinctWindow) -> DistinctWindow {
    match local.start_ms.cmp(&shared.start_ms) {
        std::cmp::Ordering::Equal => DistinctWindow { start_ms: shared.start_ms, bits: shared.bits | local.bits },
        std::cmp::Ordering::Greater => *local,
        std::cmp::Ordering::Less => *shared,
    }
}

fn add_count(shared: u32, base: u32, local: u32) -> u32 {
    shared.saturating_add(local.saturating_sub(base))
}

/// Applies the worker's delta (`local` since `base`) to `shared`.
pub fn merge_client(shared: &mut ClientRecord, base: &ClientRecord, local: &ClientRecord) {
    let s = *shared;
    let mut out = s;
    out.last_seen_ms = s.last_seen_ms.max(local.last_seen_ms);
    out.first_seen_ms = match (s.first_seen_ms, local.first_seen_ms) {
        (0, l) => l,
        (f, 0) => f,
        (f, l) => f.min(l),
    };
    if s.lifted_at_ms > base.lifted_at_ms {
        // An operator lifted the client after this worker read it: the
        // worker's penalty, risk and reasons are from before the lift (else
        // the lift would come straight back with the next merge).
    } else {
        if local.penalty_until_ms > s.penalty_until_ms {
            out.decision = local.decision;
        }
        out.penalty_until_ms = s.penalty_until_ms.max(local.penalty_until_ms);
        out.penalty_reasons = s.penalty_reasons.union(local.penalty_reasons);
        out.recent_reasons = s.recent_reasons.union(local.recent_reasons);
        out.risk = s.risk.max(local.risk);
    }
    if local.lifted_at_ms > s.lifted_at_ms {
        // (A lift changes the penalty, so it is written through to shared
        // data at once; this only keeps the newer lift's terms if not.)
        out.lifted_at_ms = local.lifted_at_ms;
        out.quiet_until_ms = local.quiet_until_ms;
        out.quiet_reasons = local.quiet_reasons;
    }
    out.requests = add_count(s.requests, base.requests, local.requests);
    out.login_successes = add_count(s.login_successes, base.login_successes, local.login_successes);
    out.login_attempts = add_count(s.login_attempts, base.login_attempts, local.login_attempts);
    out.intervals = add_count(s.intervals, base.intervals, local.intervals);
    for ((o, b), l) in out.rate.iter_mut().zip(base.rate.iter()).zip(local.rate.iter()) {
        *o = merge_window(o, b, l);
    }
    out.login_failures = merge_window(&s.login_failures, &base.login_failures, &local.login_failures);
    out.not_found = merge_window(&s.not_found, &base.not_found, &local.not_found);
    out.object_requests = merge_window(&s.object_requests, &base.object_requests, &local.object_requests);
    out.object_misses = merge_window(&s.object_misses, &base.object_misses, &local.object_misses);
    out.response_kib = merge_window(&s.response_kib, &base.response_kib, &local.response_kib);
    out.recent_requests = merge_window(&s.recent_requests, &base.recent_requests, &local.recent_requests);
    out.failed_usernames = merge_distinct(&s.failed_usernames, &local.failed_usernames);
    out.not_found_paths = merge_distinct(&s.not_found_paths, &local.not_found_paths);
    out.object_ids = merge_distinct(&s.object_ids, &local.object_ids);
    out.sessions = merge_distinct(&s.sessions, &local.sessions);
    out.crowd = merge_distinct(&s.crowd, &local.crowd);
    if local.last_seen_ms >= s.last_seen_ms {
        // The worker saw the client last: its sequence state is the latest.
        out.last_object_id = local.last_object_id;
        out.object_run = local.object_run;
        out.last_request_ms = local.last_request_ms;
        out.interval_mean_ms = local.interval_mean_ms;
        out.interval_var = local.interval_var;
        out.last_page = local.last_page;
        out.page_run = local.page_run;
        out.object_session = local.object_session;
        out.page_run_start_ms = local.page_run_start_ms;
    }
    *shared = out;
}

/// Whether `next` differs from `base` only in what the local tier may keep
/// for a while: counts, times and interval statistics that no decision
/// reads exactly. Anything else (a new distinct value, a login, an object
/// or page run, a penalty, a reason) must go to shared data at once. New
/// fields are "anything else" until listed here.
pub fn only_free_fields_changed(base: &ClientRecord, next: &ClientRecord) -> bool {
    let mut x = *next;
    x.last_seen_ms = base.last_seen_ms;
    x.first_seen_ms = base.first_seen_ms;
    x.requests = base.requests;
    x.rate = base.rate;
    x.last_request_ms = base.last_request_ms;
    x.interval_mean_ms = base.interval_mean_ms;
    x.interval_var = base.interval_var;
    x.intervals = base.intervals;
    x.recent_requests = base.recent_requests;
    x.response_kib = base.response_kib;
    x.risk = base.risk;
    x == *base
}

/// Events counted in `local` since `base` (both of one window).
pub fn window_delta(base: &SlidingWindow, local: &SlidingWindow) -> u32 {
    events_since(base, local).iter().fold(0u32, |sum, (_, n)| sum.saturating_add(*n))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::reason::Reason;
    use crate::record::Record;
    use proptest::prelude::*;

    const W: u64 = 1000;

    fn counted(times: &[u64]) -> SlidingWindow {
        let mut w = SlidingWindow::default();
        for &t in times {
            w.record(t, W);
        }
        w
    }

    #[test]
    fn a_lift_since_the_worker_read_the_record_drops_its_older_box_and_risk() {
        let mut base = ClientRecord::new(7);
        base.penalty_until_ms = 90_000;
        base.risk = 120.0;
        base.decision = 5;
        base.penalty_reasons.insert(Reason::CredentialStuffing);
        let mut local = base;
        local.requests = 3;
        let mut shared = base;
        shared.lift(10_000, 70_000, crate::reason::ReasonSet::default());
        merge_client(&mut shared, &base, &local);
        assert_eq!((shared.penalty_until_ms, shared.risk, shared.decision), (0, 0.0, 0), "the lift stands");
        assert_eq!(shared.requests, 3, "the worker's counts still add up");
        assert_eq!(shared.quiet_until_ms, 70_000);
        // A worker that read the record after the lift merges as ever.
        let base = shared;
        let mut local = base;
        local.penalty_until_ms = 200_000;
        local.decision = 9;
        merge_client(&mut shared, &base, &local);
        assert_eq!((shared.penalty_until_ms, shared.decision), (200_000, 9));
    }

    #[test]
    fn counts_from_two_workers_add_up() {
        let base = counted(&[10, 20]);
        let (mut a, mut b) = (base, base);
        for t in [30, 40, 50] {
            a.record(t, W);
        }
        for t in [35, 45] {
            b.record(t, W);
        }
        // A merges first, then B: 2 + 3 + 2.
        let shared = merge_window(&base, &base, &a);
        let shared = merge_window(&shared, &base, &b);
        assert_eq!(shared.estimate(60, W), 7.0);
    }

    #[test]
    fn a_window_that_rolled_on_the_worker_keeps_both_parts() {
        let base = counted(&[10, 20]);
        let mut local = base;
        local.record(900, W); // same window
        local.record(1500, W); // next window: previous = 3, current = 1
        let shared_other = {
            let mut s = base;
            s.record(950, W);
            s
        };
        let merged = merge_window(&shared_other, &base, &local);
        // 2 (base) + 1 (other) + 1 (local, old window) in previous, 1 current.
        assert_eq!((merged.start_ms, merged.previous, merged.current), (local.start_ms, 4, 1));
    }

    #[test]
    fn sketches_or_and_penalties_max() {
        let mut base = ClientRecord::new(7);
        base.sessions = DistinctWindow { start_ms: 5, bits: 0b0001 };
        let mut local = base;
        local.sessions.bits |= 0b0100;
        local.penalty_until_ms = 9_000;
        local.penalty_reasons.insert(Reason::RateLimit);
        local.risk = 120.0;
        let mut shared = base;
        shared.sessions.bits |= 0b0010;
        shared.penalty_until_ms = 5_000;
        shared.risk = 30.0;
        merge_client(&mut shared, &base, &local);
        assert_eq!(shared.sessions.bits, 0b0111);
        assert_eq!(shared.penalty_until_ms, 9_000);
        assert!(shared.penalty_reasons.contains(Reason::RateLimit));
        assert_eq!(shared.risk, 120.0);
    }

    #[test]
    fn free_fields() {
        let base = ClientRecord::new(7);
        let mut next = base;
        next.requests = 5;
        next.last_seen_ms = 99;
        next.rate[0].record(99, W);
        assert!(only_free_fields_changed(&base, &next));
        next.object_ids.insert(3, 99, W);
        assert!(!only_free_fields_changed(&base, &next));
    }

    proptest! {
        /// However N workers interleave their increments and merges (each
        /// from the base it last read), the merged count is the sum: no
        /// increment is lost or counted twice, inside one window.
        #[test]
        fn no_increment_lost(plan in proptest::collection::vec((0usize..4, 1u32..5, any::<bool>()), 1..60)) {
            let mut shared = SlidingWindow { start_ms: 1, current: 0, previous: 0 };
            let mut views = [(shared, shared); 4]; // (base, local) per worker
            let mut total = 0u32;
            for (worker, n, merge) in plan {
                let (_, local) = &mut views[worker];
                local.record_n(n, 2, W);
                total += n;
                if merge {
                    let (base, local) = views[worker];
                    shared = merge_window(&shared, &base, &local);
                    views[worker] = (shared, shared);
                }
            }
            for (base, local) in views {
                shared = merge_window(&shared, &base, &local);
            }
            prop_assert_eq!(shared.current, total);
        }
    }
}
