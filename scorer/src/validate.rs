//! What a score request or an event batch must look like beyond its JSON
//! shape. Everything in it is chosen by whoever reaches the scorer, and ends
//! up in store keys, metric labels and the dashboard, so each string is
//! bounded here.

use abuse_engine::profile::SeenSet;
use abuse_engine::wire::{
    BaselineSnapshot, EventBatch, FeatureSample, ProfileUpdate, ScoreRequest, FEATURE_NAMES,
    MAX_BASELINES, MAX_BATCH_ACCOUNTS, MAX_BATCH_PROFILES, MAX_BATCH_SAMPLES, MAX_BATCH_DECISIONS, WIRE_VERSION,
};
/// Route group names come from the filter's configuration.
const MAX_GROUP_LEN: usize = 64;

pub const MAX_REASONS: usize = 16;
const MAX_REASON_LEN: usize = 64;
const MAX_CLIENT_LEN: usize = 64;
const MAX_SESSION_LEN: usize = 128;
const MAX_USERNAME_LEN: usize = 256;
/// Baseline names are `login:<path>` or `group:<name>`, from the configuration.
pub const MAX_BASELINE_NAME_LEN: usize = 300;

/// A short, quoted excerpt of caller input for an error message.
fn excerpt(s: &str) -> String {
    format!("{:?}", s.chars().take(40).collect::<String>())
}

fn token(name: &str, value: &str, max: usize) -> Result<(), String> {
    if value.is_empty() || value.len() > max || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "`{name}` must be 1 to {max} printable ASCII characters without spaces, got {}",
            excerpt(value)
        ));
    }
    Ok(())
}

fn version(v: u32) -> Result<(), String> {
    if v != WIRE_VERSION {
        return Err(format!(
            "unsupported wire version {v} (this scorer speaks version {WIRE_VERSION})"
        ));
    }
    Ok(())
}

pub fn check(req: &ScoreRequest) -> Result<(), String> {
    version(req.version)?;
    token("client", &req.client, MAX_CLIENT_LEN)?;
    if req.reasons.len() > MAX_REASONS {
        return Err(format!(
            "too many `reasons`: {} (at most {MAX_REASONS})",
            req.reasons.len()
        ));
    }
    for r in &req.reasons {
        let snake = r
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if r.is_empty() || r.len() > MAX_REASON_LEN || !snake {
            return Err(format!(
                "`reasons`: {} is not a snake_case name of at most {MAX_REASON_LEN} characters",
                excerpt(r)
            ));
        }
    }
    if req
        .username
        .as_ref()
        .is_some_and(|u| u.len() > MAX_USERNAME_LEN)
    {
        return Err(format!(
            "`username` is longer than {MAX_USERNAME_LEN} bytes"
        ));
    }
    if let Some(s) = &req.session {
        token("session", s, MAX_SESSION_LEN)?;
    }
    Ok(())
}

pub fn check_batch(batch: &EventBatch) -> Result<(), String> {
    version(batch.version)?;
    if batch.known_accounts.len() > MAX_BATCH_ACCOUNTS {
        return Err(format!(
            "too many `known_accounts`: {} (at most {MAX_BATCH_ACCOUNTS} per batch)",
            batch.known_accounts.len()
        ));
    }
    if batch.profiles.len() > MAX_BATCH_PROFILES {
        return Err(format!(
            "too many `profiles`: {} (at most {MAX_BATCH_PROFILES} per batch)",
            batch.profiles.len()
        ));
    }
    if batch.samples.len() > MAX_BATCH_SAMPLES {
        return Err(format!(
            "too many `samples`: {} (at most {MAX_BATCH_SAMPLES} per batch)",
            batch.samples.len()
        ));
    }
    if batch.decisions.len() > MAX_BATCH_DECISIONS {
        return Err(format!(
            "too many `decisions`: {} (at most {MAX_BATCH_DECISIONS} per batch)",
            batch.decisions.len()
        ));
    }
    if batch.baselines.len() > MAX_BASELINES {
        return Err(format!(
            "too many `baselines`: {} (at most {MAX_BASELINES} per batch)",
            batch.baselines.len()
        ));
    }
    Ok(())
}

/// One feature sample of a batch, as the model's vector; a bad one is
/// skipped and counted (like a baseline), not a 400.
pub fn check_sample(s: &FeatureSample) -> Result<[f32; FEATURE_NAMES.len()], String> {
    // The message is logged: it names the field, never the client.
    if token("client", &s.client, MAX_CLIENT_LEN).is_err() {
        return Err(format!(
            "a sample's `client` is not 1 to {MAX_CLIENT_LEN} printable ASCII characters"
        ));
    }
    if let Some(g) = &s.route_group {
        token("route_group", g, MAX_GROUP_LEN)?;
    }
    let v: [f32; FEATURE_NAMES.len()] = s.features.as_slice().try_into().map_err(|_| {
        format!(
            "a sample has {} features (expected {})",
            s.features.len(),
            FEATURE_NAMES.len()
        )
    })?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err("a sample has a feature that is not a finite number".into());
    }
    Ok(v)
}

/// Whether one baseline of a batch can be kept. A bad one is skipped and
/// counted, not a 400: refusing the batch would lose its known accounts,
/// and the same worker would send the same baseline again in 10 s.
pub fn check_baseline(b: &BaselineSnapshot) -> Result<(), String> {
    if b.name.is_empty()
        || b.name.len() > MAX_BASELINE_NAME_LEN
        || b.name.chars().any(char::is_control)
    {
        return Err(format!(
            "baseline name {} is not 1 to {MAX_BASELINE_NAME_LEN} bytes without control characters",
            excerpt(&b.name)
        ));
    }
    for (field, v) in [
        ("baseline", b.baseline),
        ("unknown_baseline", b.unknown_baseline),
    ] {
        if !v.is_finite() || v < 0.0 {
            return Err(format!(
                "baseline {} has `{field}` {v}, not a finite number ≥ 0",
                excerpt(&b.name)
            ));
        }
    }
    Ok(())
}

/// Highest failure ratio — and share of attempts on accounts not known to
/// exist — a login baseline may carry. The filter calls an attack when the
/// ratio exceeds `max(attack_factor · baseline, attack_min_ratio)`: with
/// the default factor 2.5, a baseline of 0.4 or more puts that above 1 and
/// switches recognition off wherever the baseline is warmed in. At 0.35 the
/// line stays at 0.875 (stuffing fails 95 % or more); a real endpoint with
/// more failures than that is better served by its own local learning.
pub const MAX_LOGIN_RATIO: f32 = 0.35;
/// Highest rate (requests/s) a route group's baseline may carry: a group's
/// baseline is one Envoy's rate, and one Envoy serves well under this.
pub const MAX_GROUP_RPS: f32 = 100_000.0;
/// Samples past which a baseline is simply warm: stored and handed out
/// capped here, so that a made-up count cannot outrank every real
/// baseline forever (at the cap a tie goes to the newer).
pub const WARM_SAMPLES: u32 = 1_000_000;
/// More samples (or successes) than this is not a count a filter makes
/// (it would take years at thousands a second): skipped.
pub const MAX_PLAUSIBLE_SAMPLES: u32 = 1_000_000_000;

/// What [`sanitize_baseline`] made of a baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct Sanitized {
    pub baseline: BaselineSnapshot,
    /// A value was out of its plausible range and was clamped.
    pub clamped: bool,
}

/// A baseline as the fleet may keep and hand out: checked
/// ([`check_baseline`]), named `login:<path>` or `group:<name>` (the only
/// names a filter reads), with a plausible sample count; its values
/// clamped to their plausible range ([`MAX_LOGIN_RATIO`],
/// [`MAX_GROUP_RPS`]) and its counts to [`WARM_SAMPLES`]. Applied to what
/// batches post and again to what warm answers hand out (state written
/// before these bounds existed).
pub fn sanitize_baseline(b: &BaselineSnapshot) -> Result<Sanitized, String> {
    check_baseline(b)?;
    let login = b.name.starts_with("login:");
    if !login && !b.name.starts_with("group:") {
        return Err(format!(
            "baseline name {} is neither `login:<path>` nor `group:<name>`",
            excerpt(&b.name)
        ));
    }
    if b.samples == 0 {
        return Err(format!("baseline {} has no samples", excerpt(&b.name)));
    }
    for (field, v) in [("samples", b.samples), ("successes_seen", b.successes_seen)] {
        if v > MAX_PLAUSIBLE_SAMPLES {
            return Err(format!(
                "baseline {} claims {v} `{field}` (more than {MAX_PLAUSIBLE_SAMPLES} is not plausible)",
                excerpt(&b.name)
            ));
        }
    }
    let mut out = b.clone();
    if login {
        out.baseline = out.baseline.min(MAX_LOGIN_RATIO);
        out.unknown_baseline = out.unknown_baseline.min(MAX_LOGIN_RATIO);
    } else {
        out.baseline = out.baseline.min(MAX_GROUP_RPS);
    }
    let clamped = out.baseline != b.baseline || out.unknown_baseline != b.unknown_baseline;
    out.samples = out.samples.min(WARM_SAMPLES);
    out.successes_seen = out.successes_seen.min(WARM_SAMPLES);
    Ok(Sanitized { baseline: out, clamped })
}

/// How far ahead of the scorer's clock a filter's clock may be.
pub const CLOCK_SKEW_MS: u64 = 60_000;

/// A profile update with no time after now (+ [`CLOCK_SKEW_MS`]): a
/// device "seen" in 2100 would never be replaced by the owner's real ones.
/// Whether anything was clamped.
pub fn clamp_profile_times(u: &mut ProfileUpdate, now_ms: u64) -> bool {
    let latest_ms = now_ms.saturating_add(CLOCK_SKEW_MS);
    let latest_s = u32::try_from(latest_ms / 1000).unwrap_or(u32::MAX);
    let mut clamped = false;
    let p = &mut u.profile;
    for set in [&mut p.devices, &mut p.countries, &mut p.asns, &mut p.networks] {
        let SeenSet(slots) = set;
        for s in slots.iter_mut() {
            if s.at_s > latest_s {
                s.at_s = latest_s;
                clamped = true;
            }
        }
    }
    if p.last_success_ms > latest_ms {
        p.last_success_ms = latest_ms;
        clamped = true;
    }
    clamped
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn snap(name: &str, baseline: f32, unknown: f32, samples: u32) -> BaselineSnapshot {
        BaselineSnapshot {
            name: name.into(),
            baseline,
            unknown_baseline: unknown,
            samples,
            successes_seen: 10,
        }
    }

    #[test]
    fn a_login_baseline_of_one_is_clamped_and_leaves_recognition_on() {
        let s = sanitize_baseline(&snap("login:/api/login", 1.0, 1.0, 500)).unwrap();
        assert!(s.clamped);
        assert_eq!((s.baseline.baseline, s.baseline.unknown_baseline), (MAX_LOGIN_RATIO, MAX_LOGIN_RATIO));
        // The filter's default attack line stays below a ratio of 1.
        let defaults = abuse_engine::detectors::distributed_stuffing::DistributedStuffingConfig::default();
        assert!(s.baseline.baseline * defaults.attack_factor < 0.9);
        let ok = sanitize_baseline(&snap("login:/l", 0.1, 0.2, 50)).unwrap();
        assert_eq!((ok.clamped, ok.baseline), (false, snap("login:/l", 0.1, 0.2, 50)));
    }

    #[test]
    fn group_baselines_and_sample_counts_are_bounded() {
        let g = sanitize_baseline(&snap("group:api", 1e9, 0.0, 40)).unwrap();
        assert!(g.clamped);
        assert_eq!(g.baseline.baseline, MAX_GROUP_RPS);
        assert!(!sanitize_baseline(&snap("group:api", 12.5, 0.5, 40)).unwrap().clamped, "a group's unknown share means nothing");
        let warm = sanitize_baseline(&snap("group:api", 12.5, 0.0, 5_000_000)).unwrap();
        assert_eq!((warm.clamped, warm.baseline.samples), (false, WARM_SAMPLES));
        let e = |b: BaselineSnapshot| sanitize_baseline(&b).unwrap_err();
        assert!(e(snap("group:api", 1.0, 0.0, u32::MAX)).contains("not plausible"));
        assert!(e(BaselineSnapshot { successes_seen: u32::MAX, ..snap("login:/l", 0.1, 0.1, 5) }).contains("`successes_seen`"));
        assert!(e(snap("group:api", 1.0, 0.0, 0)).contains("no samples"));
        assert!(e(snap("other:x", 0.1, 0.0, 5)).contains("neither"));
        assert!(e(snap("login:/l", f32::NAN, 0.0, 5)).contains("not a finite number"));
    }

    #[test]
    fn profile_times_never_lie_in_the_future() {
        use abuse_engine::profile::{AccountProfile, LoginPlace};
        let now = 1_700_000_000_000u64;
        let mut p = AccountProfile::default();
        p.learn(&LoginPlace { device: 7, country: 1, asn: 2, network: 3 }, u64::from(u32::MAX) * 1000);
        let mut u = ProfileUpdate { account: 1, profile: p };
        assert!(clamp_profile_times(&mut u, now));
        let latest = (now + CLOCK_SKEW_MS) / 1000;
        assert!(u.profile.devices.0.iter().all(|s| u64::from(s.at_s) <= latest));
        assert_eq!(u.profile.last_success_ms, now + CLOCK_SKEW_MS);
        assert!(!clamp_profile_times(&mut u, now), "already within");
    }

    fn e_samples(b: EventBatch) -> bool {
        check_batch(&b).err().unwrap_or_default().contains("too many `samples`")
    }

    #[test]
    fn samples_are_checked_one_by_one() {
        let good = FeatureSample {
            client: "10.0.0.1".into(),
            route_group: Some("api".into()),
            features: vec![1.0; FEATURE_NAMES.len()],
            penalized: false,
        };
        assert_eq!(check_sample(&good).unwrap()[0], 1.0);
        let short = FeatureSample { features: vec![1.0; 3], ..good.clone() };
        assert!(check_sample(&short).unwrap_err().contains("3 features"));
        let mut nan = good.clone();
        nan.features[2] = f32::NAN;
        assert!(check_sample(&nan).is_err());
        let spaced = FeatureSample { route_group: Some("a b".into()), ..good.clone() };
        assert!(check_sample(&spaced).unwrap_err().contains("route_group"));
        assert!(check_sample(&FeatureSample { client: String::new(), ..good }).is_err());
    }

    #[test]
    fn batches_name_the_problem() {
        let ok = || EventBatch {
            version: WIRE_VERSION,
            known_accounts: vec![1, 2],
            baselines: vec![BaselineSnapshot {
                name: "login:/api/login".into(),
                baseline: 0.1,
                ..BaselineSnapshot::default()
            }],
            profiles: vec![],
            dropped: 0,
            samples: vec![],
            decisions: vec![],
            decisions_dropped: 0,
        };
        assert_eq!(check_batch(&ok()), Ok(()));
        let many = EventBatch { decisions: vec![Default::default(); MAX_BATCH_DECISIONS + 1], ..ok() };
        assert!(check_batch(&many).unwrap_err().contains("decisions"));
        assert!(e_samples(EventBatch { samples: vec![FeatureSample::default(); MAX_BATCH_SAMPLES + 1], ..ok() }));
        let e = |b: EventBatch| check_batch(&b).err().unwrap_or_default();
        assert!(e(EventBatch { version: 0, ..ok() }).contains("wire version 0"));
        assert!(e(EventBatch {
            known_accounts: vec![7; MAX_BATCH_ACCOUNTS + 1],
            ..ok()
        })
        .contains("too many `known_accounts`: 2049"));
        assert!(e(EventBatch {
            profiles: vec![abuse_engine::wire::ProfileUpdate::default(); MAX_BATCH_PROFILES + 1],
            ..ok()
        })
        .contains("too many `profiles`: 129"));
        assert!(e(EventBatch {
            baselines: vec![
                BaselineSnapshot {
                    name: "n".into(),
                    ..Default::default()
                };
                MAX_BASELINES + 1
            ],
            ..ok()
        })
        .contains("too many `baselines`"));
        let bad = |b: BaselineSnapshot| check_baseline(&b).err().unwrap_or_default();
        assert!(ok().baselines.iter().all(|b| check_baseline(b).is_ok()));
        assert!(bad(BaselineSnapshot::default()).contains("name \"\""));
        assert!(bad(BaselineSnapshot {
            name: "a\nb".into(),
            ..Default::default()
        })
        .contains("control"));
        assert!(bad(BaselineSnapshot {
            name: "g".into(),
            baseline: f32::INFINITY,
            ..Default::default()
        })
        .contains("`baseline` inf"));
        assert!(bad(BaselineSnapshot {
            name: "g".into(),
            unknown_baseline: -1.0,
            ..Default::default()
        })
        .contains("`unknown_baseline` -1"));
    }

    fn ok() -> ScoreRequest {
        ScoreRequest {
            version: WIRE_VERSION,
            client: "2001:db8::/64".into(),
            ..ScoreRequest::default()
        }
    }

    #[test]
    fn names_the_problem() {
        assert_eq!(check(&ok()), Ok(()));
        let e = |r: ScoreRequest| check(&r).err().unwrap_or_default();
        assert!(e(ScoreRequest { version: 2, ..ok() }).contains("wire version 2"));
        assert!(e(ScoreRequest {
            client: String::new(),
            ..ok()
        })
        .contains("`client`"));
        assert!(e(ScoreRequest {
            client: "a b".into(),
            ..ok()
        })
        .contains("`client`"));
        assert!(e(ScoreRequest {
            reasons: vec!["<script>".into()],
            ..ok()
        })
        .contains("`reasons`"));
        assert!(e(ScoreRequest {
            reasons: vec!["x".into(); 17],
            ..ok()
        })
        .contains("too many"));
        assert!(e(ScoreRequest {
            username: Some("u".repeat(300)),
            ..ok()
        })
        .contains("`username`"));
        assert!(e(ScoreRequest {
            session: Some("s\n".into()),
            ..ok()
        })
        .contains("`session`"));
    }
}
