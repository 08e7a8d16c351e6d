//! A login endpoint's own history, fleet-wide within this Envoy: attempts
//! and failures over a short window, the failure ratio it normally has
//! (learned), and whether it is under attack now.
//!
//! Layout, [`ENDPOINT_BYTES`] bytes: key 8 · last_seen_ms 8 · attempts
//! (sliding window) 16 · failures (sliding window) 16 · baseline failure
//! ratio (f32) 4 · baseline samples 4 · attack_until_ms 8 · the mean being
//! learned while the baseline is still the prior (f32) 4 · successful
//! logins seen (known accounts learned) 4 · attempts on accounts not known
//! to exist (sliding window) 16 · the share of such attempts it normally
//! has (f32) 4 · failed attempts on accounts not known to exist (sliding
//! window) 16 · the shapes of the usernames that logged in here (a 64-bit
//! set, see [`name_shape`]) 8 · successful logins that taught the shapes 4 ·
//! attempts on unknown accounts whose names are unlike the site's (sliding
//! window) 16 · those of them that failed (sliding window) 16 · the formats
//! of the usernames that logged in here (a 64-bit set, see [`NameShape`]) 8.

use crate::codec::{Reader, Writer};
use crate::sketch::DistinctWindow;
use crate::window::SlidingWindow;

pub const ENDPOINT_BYTES: usize = 160;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EndpointRecord {
    pub key: u64,
    pub last_seen_ms: u64,
    pub attempts: SlidingWindow,
    pub failures: SlidingWindow,
    pub baseline: f32,
    pub baseline_samples: u32,
    pub attack_until_ms: u64,
    pub learning_mean: f32,
    pub successes_seen: u32,
    pub unknown: SlidingWindow,
    pub unknown_baseline: f32,
    pub unknown_failures: SlidingWindow,
    pub name_shapes: u64,
    pub names_learned: u32,
    pub foreign: SlidingWindow,
    pub foreign_failures: SlidingWindow,
    pub name_formats: u64,
}

impl EndpointRecord {
    pub fn under_attack(&self, now_ms: u64) -> bool {
        self.attack_until_ms > now_ms
    }

    /// Folds one observation into the learned baseline: the first `skip`
    /// samples are only counted (while windows fill), the next `warm_up` make
    /// a running mean, and after that the baseline is an exponential average
    /// in time, `b ← b + α (value − b)` with `α = 1 − e^(−since/τ)`, so a
    /// burst of seconds cannot drag a baseline learned over `τ`.
    pub fn learn(&mut self, value: f32, since_ms: f64, tau_ms: f64, skip: u32, warm_up: u32) {
        self.baseline_samples = self.baseline_samples.saturating_add(1);
        let n = self.baseline_samples;
        let alpha = if n <= skip {
            0.0
        } else if n <= skip.saturating_add(warm_up) {
            1.0 / n.saturating_sub(skip) as f32
        } else {
            (1.0 - (-since_ms / tau_ms.max(1.0)).exp()) as f32
        };
        self.baseline += alpha.clamp(0.0, 1.0) * (value - self.baseline);
    }
}

impl EndpointRecord {
    /// Every field, in the order of the layout above.
    fn encode_fields(&self, w: &mut Writer<'_>) {
        w.u64(self.key);
        w.u64(self.last_seen_ms);
        w.window(&self.attempts);
        w.window(&self.failures);
        w.f32(self.baseline);
        w.u32(self.baseline_samples);
        w.u64(self.attack_until_ms);
        w.f32(self.learning_mean);
        w.u32(self.successes_seen);
        w.window(&self.unknown);
        w.f32(self.unknown_baseline);
        w.window(&self.unknown_failures);
        w.u64(self.name_shapes);
        w.u32(self.names_learned);
        w.window(&self.foreign);
        w.window(&self.foreign_failures);
        w.u64(self.name_formats);
    }

    fn decode_fields(r: &mut Reader<'_>) -> EndpointRecord {
        let key = r.u64();
        let last_seen_ms = r.u64();
        let attempts = r.window();
        let failures = r.window();
        let baseline = r.f32();
        let unit = |v: f32| if v.is_finite() { v.clamp(0.0, 1.0) } else { 0.0 };
        EndpointRecord {
            key,
            last_seen_ms,
            attempts,
            failures,
            baseline: if baseline.is_finite() { baseline.clamp(0.0, 1.0) } else { 0.0 },
            baseline_samples: r.u32(),
            attack_until_ms: r.u64(),
            learning_mean: unit(r.f32()),
            successes_seen: r.u32(),
            unknown: r.window(),
            unknown_baseline: unit(r.f32()),
            unknown_failures: r.window(),
            name_shapes: r.u64(),
            names_learned: r.u32(),
            foreign: r.window(),
            foreign_failures: r.window(),
            name_formats: r.u64(),
        }
    }
}

crate::record::impl_record!(EndpointRecord, ENDPOINT_BYTES);

/// A username's shape and format, each one of 64 (hashed).
///
/// The shape: each run of letters is `a`, each run of digits `9`, every
/// other character itself (`user0042` → `a9`, `anna.li77@mail.example` →
/// `a.a9@a.a`). A site's usernames share a shape its sign-up imposes; a list
/// leaked from elsewhere mostly has another (e-mail addresses where this
/// site names its users, say). Case, lengths and the letters themselves are
/// left out, so that real people's names are all of a few shapes.
///
/// The format: the shape with each run's length (`user0042` → `a4 9×4`,
/// `john7858` → `a4 9×4`, `karendavi523` → `a9 9×3`). Free-form names
/// have many formats, and then it says nothing; a site that issues its
/// names (`user0042`, a customer number) has one or two, and a handle of
/// the same shape but another length is none of its accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NameShape {
    pub shape: u8,
    pub format: u8,
}

/// Runs longer than this are one length in a name's format.
const MAX_RUN: u8 = 16;

pub fn name_shape(username: &str) -> NameShape {
    fn fnv(h: u32, bytes: &[u8]) -> u32 {
        bytes.iter().fold(h, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
    }
    let class_of = |c: char| if c.is_alphabetic() { 'a' } else if c.is_numeric() { '9' } else { c };
    let (mut shape, mut format) = (0x811c_9dc5u32, 0x811c_9dc5u32);
    let mut classes = username.trim().chars().map(class_of).peekable();
    while let Some(class) = classes.next() {
        let mut len = 1u8;
        if class == 'a' || class == '9' {
            while classes.next_if_eq(&class).is_some() {
                len = len.saturating_add(1);
            }
        }
        let mut buf = [0u8; 4];
        let bytes = class.encode_utf8(&mut buf).as_bytes();
        shape = fnv(shape, bytes);
        format = fnv(fnv(format, bytes), &[len.min(MAX_RUN)]);
    }
    NameShape { shape: (shape % 64) as u8, format: (format % 64) as u8 }
}

impl EndpointRecord {
    /// Whether usernames of this shape ever logged in here.
    pub fn knows_name_shape(&self, name: NameShape) -> bool {
        self.name_shapes & (1u64 << (name.shape % 64)) != 0
    }

    /// Whether usernames of this format ever logged in here.
    pub fn knows_name_format(&self, name: NameShape) -> bool {
        self.name_formats & (1u64 << (name.format % 64)) != 0
    }

    /// How many formats the names that logged in here have (of 64).
    pub fn name_format_count(&self) -> u32 {
        self.name_formats.count_ones()
    }

    /// A successful login's username shape and format.
    pub fn learn_name_shape(&mut self, name: NameShape) {
        self.name_shapes |= 1u64 << (name.shape % 64);
        self.name_formats |= 1u64 << (name.format % 64);
        self.names_learned = self.names_learned.saturating_add(1);
    }
}

/// One password (a keyed hash, the key rotating every window so that no
/// hash outlives it) and the accounts it was tried on: a spray tries one
/// password on many accounts. A password that let someone in lately is
/// somebody's real one (many people's, if it is `123456`): never a spray's
/// mark, whatever else failed with it.
///
/// Layout, [`SPRAY_BYTES`] bytes: key 8 · last_seen_ms 8 · distinct accounts
/// (distinct window) 16 · the last successful login with it (ms, 0 none) 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SprayRecord {
    pub key: u64,
    pub last_seen_ms: u64,
    pub accounts: DistinctWindow,
    pub succeeded_ms: u64,
}

pub const SPRAY_BYTES: usize = 40;

impl SprayRecord {
    /// Every field, in the order of the layout above.
    fn encode_fields(&self, w: &mut Writer<'_>) {
        w.u64(self.key);
        w.u64(self.last_seen_ms);
        w.distinct(&self.accounts);
        w.u64(self.succeeded_ms);
    }

    fn decode_fields(r: &mut Reader<'_>) -> SprayRecord {
        SprayRecord { key: r.u64(), last_seen_ms: r.u64(), accounts: r.distinct(), succeeded_ms: r.u64() }
    }
}

crate::record::impl_record!(SprayRecord, SPRAY_BYTES);

/// A client fingerprint's login outcomes (user agent + header-name order):
/// a tool rotating addresses keeps its fingerprint. Only fingerprints that
/// do not claim a browser are judged by it (see the detector).
///
/// Layout, [`FINGERPRINT_BYTES`] bytes: key 8 · last_seen_ms 8 · failures
/// (sliding window) 16 · successes (sliding window) 16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FingerprintRecord {
    pub key: u64,
    pub last_seen_ms: u64,
    pub failures: SlidingWindow,
    pub successes: SlidingWindow,
}

pub const FINGERPRINT_BYTES: usize = 48;

impl FingerprintRecord {
    /// Every field, in the order of the layout above.
    fn encode_fields(&self, w: &mut Writer<'_>) {
        w.u64(self.key);
        w.u64(self.last_seen_ms);
        w.window(&self.failures);
        w.window(&self.successes);
    }

    fn decode_fields(r: &mut Reader<'_>) -> FingerprintRecord {
        FingerprintRecord { key: r.u64(), last_seen_ms: r.u64(), failures: r.window(), successes: r.window() }
    }
}

crate::record::impl_record!(FingerprintRecord, FINGERPRINT_BYTES);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Record;

    #[test]
    fn codecs_round_trip() {
        let e = EndpointRecord {
            key: 1,
            last_seen_ms: 2,
            attempts: SlidingWindow { start_ms: 3, current: 4, previous: 5 },
            failures: SlidingWindow { start_ms: 6, current: 7, previous: 8 },
            baseline: 0.25,
            baseline_samples: 9,
            attack_until_ms: 10,
            learning_mean: 0.5,
            successes_seen: 11,
            unknown: SlidingWindow { start_ms: 12, current: 13, previous: 14 },
            unknown_baseline: 0.25,
            unknown_failures: SlidingWindow { start_ms: 15, current: 16, previous: 17 },
            name_shapes: 1 << 40 | 3,
            names_learned: 18,
            foreign: SlidingWindow { start_ms: 19, current: 20, previous: 21 },
            foreign_failures: SlidingWindow { start_ms: 22, current: 23, previous: 24 },
            name_formats: 1 << 63 | 5,
        };
        let mut buf = [0u8; ENDPOINT_BYTES];
        e.encode(&mut buf);
        assert_eq!(EndpointRecord::decode(&buf), e);
        let f = SprayRecord { key: 1, last_seen_ms: 2, accounts: DistinctWindow { start_ms: 3, bits: 4 }, succeeded_ms: 5 };
        let mut buf = [0u8; SPRAY_BYTES];
        f.encode(&mut buf);
        assert_eq!(SprayRecord::decode(&buf), f);
    }

    #[test]
    fn a_sites_names_share_a_shape_and_a_leaked_lists_mostly_do_not() {
        assert_eq!(name_shape("user0042").shape, name_shape("user1").shape);
        assert_eq!(name_shape("User0042").shape, name_shape("bob77").shape);
        assert_eq!(name_shape("anna.li77@mail.example").shape, name_shape("omar.kate5@mail.example").shape);
        assert_ne!(name_shape("user0042").shape, name_shape("anna.li77@mail.example").shape);
        assert_ne!(name_shape("user0042").shape, name_shape("kate77@mail.example").shape);
        let mut e = EndpointRecord::default();
        assert!(!e.knows_name_shape(name_shape("user7")));
        e.learn_name_shape(name_shape("user0042"));
        assert!(e.knows_name_shape(name_shape("user7")) && e.names_learned == 1);
    }

    #[test]
    fn a_format_is_the_shape_with_its_run_lengths() {
        let shape = |n: &str| name_shape(n).shape;
        let format = |n: &str| name_shape(n).format;
        // Same shape, same format: issued names of one pattern.
        assert_eq!(name_shape("user0042"), name_shape("User9999"));
        assert_eq!(name_shape("user0042"), name_shape("john7858"));
        // Same shape, other lengths: another format.
        for handle in ["karendavi523", "johnwhi7858", "ashleybro3633", "user42", "user00042"] {
            assert_eq!(shape(handle), shape("user0042"), "{handle}");
            assert_ne!(format(handle), format("user0042"), "{handle}");
        }
        // Runs past MAX_RUN are one length; other characters count one each.
        assert_eq!(format(&format!("{}1", "a".repeat(20))), format(&format!("{}1", "b".repeat(30))));
        assert_ne!(format("a..b"), format("a.b"));
        let mut e = EndpointRecord::default();
        e.learn_name_shape(name_shape("user0042"));
        e.learn_name_shape(name_shape("user0777"));
        assert!(e.knows_name_format(name_shape("user1234")) && !e.knows_name_format(name_shape("karendavi523")));
        assert_eq!(e.name_format_count(), 1);
    }
}
