//! The learned anomaly model: streaming Half-Space Trees (Tan, Ting & Liu,
//! "Fast Anomaly Detection for Streaming Data", IJCAI 2011). Unsupervised:
//! no labels, it learns what ordinary traffic looks like from the vectors
//! it is given (the filters' samples of all their clients: see `models.rs`,
//! which decides what each model learns) and rates how far a client is from it.
//!
//! **Features.** `Features::to_vector()` (18 values, `FEATURE_NAMES`
//! order), each `ln(1 + max(x, 0))` — counts are heavy-tailed, and in log
//! space "10× more failures" is one fixed distance whatever the base — then
//! scaled with the per-feature minimum and maximum seen during warm-up, so
//! that the warm-up range maps to [0.3, 0.7] inside the [0, 1] the trees
//! are built for (the margin lets the trees cut off what lies just outside
//! the traffic; see `MARGIN`). The scaling is frozen when warm-up ends,
//! because the trees' masses are only comparable while a split means the
//! same thing; values outside the warm-up range land in the margin or
//! beyond, in the outer cells of the work space. A feature constant during
//! warm-up (say, always 0) is scaled as if its range were one log unit, so
//! that its first non-zero values are visible but not infinitely far.
//!
//! **Trees.** 25 trees of depth 10, built once from a seeded RNG (so two
//! scorers started alike are identical): per tree, every dimension gets a
//! random work range `[s - 2·max(s, 1-s), s + 2·max(s, 1-s)]`, `s ~ U[0,1]`,
//! and each internal node halves its range on a random dimension. Each node
//! holds two masses: `r`, the number of points of the reference window that
//! reached it, and `l`, the same for the window being filled. Every 250
//! learned points (`window`) `l` becomes the new `r` and `l` is cleared —
//! the model forgets what traffic no longer looks like.
//!
//! **Warm-up.** The first `warm_up` vectors only set the scaling; when the
//! last arrives they are replayed into the trees as the first reference
//! window. Until then the model answers `None` and does not act.
//!
//! **Score.** Per tree, walk down while the node's reference mass is at
//! least `sizeLimit = n_ref / 10` (as in the paper) and take the node where
//! the walk stops: its mass `r` at depth `k`, times `2^k` (a small cell
//! holding points counts for more), normalised to a 250-point window. The
//! model's "log-mass" `L` is the mean over trees of `log2(1 + mass)`: a
//! point alone in its region has `L = 0`, the maximum is `log2(1 + 250 ·
//! 2^10) ≈ 18`; ordinary clients sit around 16–18. Lower `L` = sparser.
//!
//! **Tag line.** Each model (one per route group, and `all`) has a tag
//! line `τ` in log-mass, and **`anomaly = 1 / (1 + 2^(L − τ))`**: 0.5 on
//! the line, above it for a client sparser than the line (each bit of mass
//! less moves it towards 1), near 0 for ordinary clients. A client beyond
//! the line (anomaly > 0.5) is what the scorer tags `anomaly`; nothing
//! else is. The line is set from the **calibration candidates**: every
//! sample the model was shown while a window filled, learned or gated (the
//! caller leaves penalized ones out), one per client, up to a window's
//! worth. `τ = L_(k) − m`, where `L_(k)` is the `k`-th smallest log-mass of
//! the `n` candidates of the last `CALIBRATION_WINDOWS` (4) windows before
//! the current reference's (one per client over the pool, its newest; up
//! to 1,000) scored against the current reference, `k` = `CALIBRATION_RANK`
//! (2) per 250 of them, rounded down (8 of 1,000), and `m =
//! TAG_MARGIN_BITS` = 1.5 bits (a client must hold under 2^-1.5 ≈ 1/3 of
//! the mass of the k-th sparsest candidate). Recalibrated at every window
//! swap; none of the candidates is part of the reference it calibrates.
//! At the end of warm-up, when there is no other window yet, the warm-up
//! samples themselves, leave-one-out (each scored as if the reference had
//! been built without it: its own count taken off every node of its walk).
//!
//! *The bound.* A fresh client of the group and the `n` candidates are
//! `n + 1` draws of the same sampled traffic (uniform over distinct
//! clients) scored against the same reference, none of them part of it:
//! exchangeable. The fresh client's rank among them is uniform, so it falls
//! under `L_(k)` with probability at most `k / (n + 1)` — **8/1,001 ≈ 0.8 %
//! per sample**, always under 2/250 (k is rounded down), whatever the
//! traffic's distribution, the features or the trees' seed (ties only lower
//! it); the margin `m` only lowers it further. Over calibration draws the
//! probability is `U ~ Beta(k, n + 1 − k)`: `P(U > 0.02) < 1e-3` at `k = 8,
//! n = 1,000`. A client sampled `s` times is tagged with probability at
//! most `s · k / (n + 1)` (union bound). The bound is on the stream, attack
//! clients included: a benign share `b` of the sampled clients is tagged
//! at most `k / ((n + 1) b)`. What it assumes: the traffic is the same
//! from the candidates' windows to the fresh client's (about five windows);
//! and, approximately, that the reference is independent of the older
//! candidates (which samples of its window were learned depended on the
//! line before, which they helped set; the effect is confined to the gated
//! tail). Why gated samples are candidates: calibrating on the learned
//! samples alone is calibrating on the stream with its tail cut off (the
//! samples beyond the previous line), which puts `L_(k)` too high and tags
//! more than `k / (n + 1)` (measured on `make eval`'s streams: 1.0–1.6 %
//! of samples under the learned-only `L_(2)` of 250, against 0.5–0.8 %
//! here), and never moves the line for a population the gate keeps out.
//! What a candidate-calibrated line means: "rarer than the k-th rarest of
//! the last ~1,000 clients". A lone odd client is tagged; a population of
//! look-alikes over k of them (benign, or an attack campaign) sets the line
//! and is not (`models::tests`).
//!
//! **Per person.** A client key (an address and its user agent) can carry
//! several people: an office behind one NAT. Its counts sum over them, and
//! in the unit-test traffic or `make eval` such a key is sparser than any
//! one person (the office's 100 people were 5.5 bits under the login
//! group's `L_(2)`). So the features that sum over people (requests, login
//! failures and successes, failed usernames, 404s and their paths, object
//! requests and distinct ids, response KiB) are divided by the key's
//! `sessions` (at least 1) and the mean interval multiplied by it, before the
//! log transform; `sessions` itself stays a feature, so a key carrying
//! unusually many sessions is still unusual in that one dimension. A client
//! without sessions (most tools) is unchanged.
//!
//! **Explanation.** While walking a tree, every split on dimension `q`
//! divides the mass. Ordinary points lose about one bit per split (half of
//! the points go each way); a point that a split *separates from the
//! traffic* loses much more — all of it, when it lands in an empty cell. So
//! each split on `q` is charged `max(0, log2((1 + r_parent) / (1 + r_child))
//! − 1)` bits of "surprise", summed per feature over the 25 trees and
//! normalised to sum to 1; the top three features are the explanation. If
//! no split separated the point (it is sparse but not cut off), each
//! feature's distance outside the warm-up range is used instead.

use abuse_engine::wire::{Contribution, FEATURE_NAMES};
use serde::{Deserialize, Serialize};
#[cfg(test)]
use std::path::Path;

/// Number of features the model sees.
pub const DIMS: usize = FEATURE_NAMES.len();
/// Bumped whenever the snapshot layout changes, so an old file is ignored
/// (2: the tag line and its calibration points replaced `L10`; 3: the
/// calibration candidates, one per client, pooled over windows).
const FORMAT: u32 = 3;
/// The warm-up range maps to [MARGIN, 1 - MARGIN], not [0, 1]: the random
/// work spaces then cut between the traffic and what lies just outside it
/// within one or two splits, instead of lumping a point a little past the
/// warm-up maximum with the points at it. Measured on the unit-test
/// traffic: a credential stuffer's anomaly went from 0.68 (no margin) to
/// 0.93, ordinary traffic's 95th percentile stayed at 0.53.
const MARGIN: f64 = 0.3;
/// Smallest log-space range a feature is scaled by (see module doc).
const MIN_LOG_RANGE: f64 = 1.0;
/// Share of the reference mass under which a walk stops (Tan et al.: 0.1).
const SIZE_LIMIT_SHARE: f64 = 0.1;
/// The tag line sits under the `k`-th smallest log-mass of the `n`
/// calibration points, `k = CALIBRATION_RANK` per window's worth of points
/// (rounded down, at least 1: 2 of 250, 8 of 1,000; see module doc, **Tag
/// line**)...
pub const CALIBRATION_RANK: usize = 2;
/// ...pooled over this many windows of candidates (the newest first).
pub const CALIBRATION_WINDOWS: usize = 4;
/// ...by this many bits (each bit: half the mass).
pub const TAG_MARGIN_BITS: f64 = 1.5;
/// Most stored points a snapshot may hold per buffer (a window is 250).
const MAX_POINTS: usize = 1 << 16;
/// Explanation length.
const TOP_FEATURES: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    pub trees: usize,
    pub depth: u32,
    pub window: u32,
    pub warm_up: u32,
    pub seed: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            trees: 25,
            depth: 10,
            window: 250,
            warm_up: 200,
            seed: 0x5c0_2e5_eed,
        }
    }
}

/// What the model says about one vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessment {
    /// In [0, 1]: `1 / (1 + 2^(L - tag_line))`; above 0.5 = beyond its
    /// model's tag line (see module doc).
    pub anomaly: f32,
    /// Top features by share of surprise (see module doc); empty unless
    /// `anomaly > 0.5`.
    pub explanation: Vec<Contribution>,
}

/// Features that sum over the people behind a client key: per person, they
/// are divided by the key's sessions (see module doc, **Per person**).
const PER_PERSON_SUMS: [&str; 10] = [
    "requests",
    "recent_requests",
    "login_failures",
    "failed_usernames",
    "login_successes",
    "not_found",
    "not_found_paths",
    "object_requests",
    "distinct_object_ids",
    "response_kib",
];

/// `v` with what is not a finite number as 0 (as `log_transform` reads it),
/// for storing: a snapshot holds no NaN.
fn finite(v: &[f32; DIMS]) -> [f32; DIMS] {
    v.map(|x| if x.is_finite() { x } else { 0.0 })
}

/// `ln(1 + max(x, 0))` of the per-person vector, the heavy-tail transform.
fn log_transform(v: &[f32; DIMS]) -> [f64; DIMS] {
    let clean = |x: f32| {
        if x.is_finite() {
            f64::from(x).max(0.0)
        } else {
            0.0
        }
    };
    let people = FEATURE_NAMES
        .iter()
        .zip(v)
        .find(|(name, _)| **name == "sessions")
        .map_or(1.0, |(_, s)| clean(*s).max(1.0));
    let mut out = [0.0; DIMS];
    for ((o, name), x) in out.iter_mut().zip(FEATURE_NAMES).zip(v) {
        let x = clean(*x);
        let x = if PER_PERSON_SUMS.contains(&name) {
            x / people
        } else if name == "interval_mean_ms" {
            x * people
        } else {
            x
        };
        *o = x.ln_1p();
    }
    out
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Scaler {
    seen: u64,
    lo: [f64; DIMS],
    hi: [f64; DIMS],
}

impl Scaler {
    fn observe(&mut self, t: &[f64; DIMS]) {
        if self.seen == 0 {
            self.lo = *t;
            self.hi = *t;
        } else {
            for ((lo, hi), x) in self.lo.iter_mut().zip(self.hi.iter_mut()).zip(t) {
                *lo = lo.min(*x);
                *hi = hi.max(*x);
            }
        }
        self.seen += 1;
    }

    fn scale(&self, t: &[f64; DIMS]) -> [f64; DIMS] {
        let mut out = [0.0; DIMS];
        for (((o, x), lo), hi) in out.iter_mut().zip(t).zip(&self.lo).zip(&self.hi) {
            *o = MARGIN + (1.0 - 2.0 * MARGIN) * (x - lo) / (hi - lo).max(MIN_LOG_RANGE);
        }
        out
    }
}

/// A tiny deterministic RNG (SplitMix64): the trees must come out the same
/// for the same seed on every machine and version.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// One half-space tree, stored as a complete binary tree in heap order: the
/// children of node `i` are `2i + 1` and `2i + 2`; nodes `0..dim.len()` are
/// internal, the rest leaves.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tree {
    dim: Vec<u8>,
    split: Vec<f64>,
    /// Reference mass per node.
    r: Vec<u32>,
    /// Latest-window mass per node.
    l: Vec<u32>,
}

/// Where a walk stopped, and the surprise charged to each feature on the way.
struct Walk {
    mass: u32,
    depth: u32,
    surprise: [f64; DIMS],
}

impl Tree {
    fn build(rng: &mut SplitMix, depth: u32) -> Tree {
        let internal = (1usize << depth) - 1;
        let total = (1usize << (depth + 1)) - 1;
        let mut tree = Tree {
            dim: vec![0; internal],
            split: vec![0.0; internal],
            r: vec![0; total],
            l: vec![0; total],
        };
        let mut lo = [0.0; DIMS];
        let mut hi = [0.0; DIMS];
        for (lo, hi) in lo.iter_mut().zip(hi.iter_mut()) {
            let s = rng.unit();
            let sd = 2.0 * s.max(1.0 - s);
            *lo = s - sd;
            *hi = s + sd;
        }
        tree.grow(rng, 0, lo, hi);
        tree
    }

    fn grow(&mut self, rng: &mut SplitMix, node: usize, lo: [f64; DIMS], hi: [f64; DIMS]) {
        if node >= self.dim.len() {
            return;
        }
        let q = rng.below(DIMS);
        let (Some(l), Some(h)) = (lo.get(q).copied(), hi.get(q).copied()) else {
            return;
        };
        let p = (l + h) / 2.0;
        if let (Some(d), Some(s)) = (self.dim.get_mut(node), self.split.get_mut(node)) {
            *d = q as u8;
            *s = p;
        }
        let (mut left_hi, mut right_lo) = (hi, lo);
        if let (Some(a), Some(b)) = (left_hi.get_mut(q), right_lo.get_mut(q)) {
            *a = p;
            *b = p;
        }
        self.grow(rng, 2 * node + 1, lo, left_hi);
        self.grow(rng, 2 * node + 2, right_lo, hi);
    }

    /// The child `x` goes to, or `None` at a leaf.
    fn child(&self, node: usize, x: &[f64; DIMS]) -> Option<(usize, usize)> {
        let q = usize::from(*self.dim.get(node)?);
        let s = *self.split.get(node)?;
        let v = *x.get(q)?;
        Some((if v < s { 2 * node + 1 } else { 2 * node + 2 }, q))
    }

    /// Counts `x` in the latest window (or the reference one) on its whole path.
    fn update(&mut self, x: &[f64; DIMS], reference: bool) {
        let mut node = 0;
        loop {
            let mass = if reference {
                self.r.get_mut(node)
            } else {
                self.l.get_mut(node)
            };
            if let Some(m) = mass {
                *m = m.saturating_add(1);
            }
            match self.child(node, x) {
                Some((c, _)) => node = c,
                None => break,
            }
        }
    }

    /// Walks `x` down the reference masses; `own` is subtracted from every
    /// node on the way (1 when `x` itself is one of the reference points:
    /// leave-one-out, as if the reference had been built without it).
    fn walk(&self, x: &[f64; DIMS], size_limit: f64, own: u32) -> Walk {
        let mut surprise = [0.0; DIMS];
        let (mut node, mut depth) = (0usize, 0u32);
        loop {
            let mass = self.r.get(node).copied().unwrap_or(0).saturating_sub(own);
            if f64::from(mass) < size_limit {
                return Walk {
                    mass,
                    depth,
                    surprise,
                };
            }
            let Some((child, q)) = self.child(node, x) else {
                return Walk {
                    mass,
                    depth,
                    surprise,
                };
            };
            let child_mass = self.r.get(child).copied().unwrap_or(0).saturating_sub(own);
            let bits = (f64::from(mass) + 1.0).log2() - (f64::from(child_mass) + 1.0).log2() - 1.0;
            if let Some(s) = surprise.get_mut(q) {
                *s += bits.max(0.0);
            }
            node = child;
            depth += 1;
        }
    }

    fn swap_windows(&mut self) {
        std::mem::swap(&mut self.r, &mut self.l);
        self.l.iter_mut().for_each(|m| *m = 0);
    }
}

/// The model, as saved in `STATE_DIR/model.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Model {
    format: u32,
    params: Params,
    scaler: Scaler,
    trees: Vec<Tree>,
    /// Warm-up vectors (as given), replayed into the trees when warm-up ends.
    warm_up_buffer: Vec<[f32; DIMS]>,
    warm: bool,
    trained: u64,
    /// Points in the reference window (`window`, or the warm-up count at first).
    n_ref: u32,
    /// Points learned into the latest window so far.
    in_window: u32,
    /// The tag line `τ`: the log-mass that reads as anomaly 0.5.
    tag_line: f64,
    /// How it was set: what the calibration points said.
    calibration: Calibration,
    /// The calibration candidates offered while the latest window fills
    /// (as given): every sample the model was shown, learned or gated, one
    /// per client (`latest_clients`), at most a window's worth. They will
    /// calibrate the reference after the one they fill (they are not part
    /// of it).
    latest_points: Vec<[f32; DIMS]>,
    latest_clients: Vec<u64>,
    /// The candidates of the windows before: the current reference's
    /// window is the newest, and is not used until the next swap (its
    /// learned points are in the reference); the older ones calibrate.
    reference_points: Vec<[f32; DIMS]>,
    reference_clients: Vec<u64>,
    older_points: Vec<(Vec<[f32; DIMS]>, Vec<u64>)>,
}

/// Where the tag line came from (see module doc, **Tag line**).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Calibration points scored (`n`).
    pub points: u32,
    /// The rank used (`k`, at most `n`).
    pub rank: u32,
    /// Their `k`-th smallest log-mass; the tag line is `TAG_MARGIN_BITS` under it.
    pub kth_log_mass: f64,
    /// Their median log-mass (for the record: how far ordinary clients sit above the line).
    pub median_log_mass: f64,
    /// Leave-one-out on the reference's own points (the first calibration,
    /// at the end of warm-up) rather than points outside it.
    pub leave_one_out: bool,
}

impl Calibration {
    /// The distribution-free bound on the share of a model's normal clients
    /// beyond its tag line: `k / (n + 1)` (see module doc).
    pub fn false_tag_bound(&self) -> f64 {
        f64::from(self.rank) / (f64::from(self.points) + 1.0)
    }
}

/// `k` for `n` calibration points: `CALIBRATION_RANK` per 250 (the
/// default window), rounded down (so `k / (n + 1) < 2/250`), at least 1
/// and at most `n` (200: 1, 1,000: 8).
fn calibration_rank(n: usize) -> usize {
    (CALIBRATION_RANK * n / 250).clamp(1, n.max(1))
}

#[derive(Debug)]
pub enum LoadError {
    Io(std::io::Error),
    Corrupt(String),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Io(e) => write!(f, "{e}"),
            LoadError::Corrupt(e) => write!(f, "corrupt snapshot: {e}"),
        }
    }
}

impl Model {
    pub fn new(params: Params) -> Model {
        let params = Params {
            trees: params.trees.clamp(1, 256),
            depth: params.depth.clamp(1, 16),
            window: params.window.max(10),
            warm_up: params.warm_up.max(1),
            seed: params.seed,
        };
        let mut rng = SplitMix(params.seed);
        let trees = (0..params.trees)
            .map(|_| Tree::build(&mut rng, params.depth))
            .collect();
        Model {
            format: FORMAT,
            params,
            scaler: Scaler {
                seen: 0,
                lo: [0.0; DIMS],
                hi: [0.0; DIMS],
            },
            trees,
            warm_up_buffer: Vec::new(),
            warm: false,
            trained: 0,
            n_ref: 0,
            in_window: 0,
            tag_line: 0.0,
            calibration: Calibration {
                points: 0,
                rank: 0,
                kth_log_mass: 0.0,
                median_log_mass: 0.0,
                leave_one_out: false,
            },
            latest_points: Vec::new(),
            latest_clients: Vec::new(),
            reference_points: Vec::new(),
            reference_clients: Vec::new(),
            older_points: Vec::new(),
        }
    }

    pub fn trained(&self) -> u64 {
        self.trained
    }

    pub fn is_warm(&self) -> bool {
        self.warm
    }

    pub fn warm_up(&self) -> u32 {
        self.params.warm_up
    }

    /// The tag line (log-mass) and its calibration, once warm.
    pub fn calibration(&self) -> Option<(f64, Calibration)> {
        self.warm.then_some((self.tag_line, self.calibration))
    }

    /// Changes the warm-up length (from the command line, over a loaded
    /// snapshot). A model already warm stays warm; one that has now seen
    /// enough finishes its warm-up at once.
    pub fn set_warm_up(&mut self, warm_up: u32) {
        self.params.warm_up = warm_up.max(1);
        if !self.warm && self.warm_up_buffer.len() >= self.params.warm_up as usize {
            self.finish_warm_up();
        }
    }

    #[cfg(test)]
    /// Scores `features` (None while warming up), then learns from it.
    pub fn score_and_learn(&mut self, features: &[f32; DIMS]) -> Option<Assessment> {
        let assessment = self.score(features);
        self.learn(features);
        assessment
    }

    /// Learns `features` (every call its own client: tests).
    #[cfg(test)]
    pub fn learn(&mut self, features: &[f32; DIMS]) {
        self.offer(features, None, true);
    }

    /// One sample of `client` (a hash; `None`: a client of its own): learned
    /// into the trees when `learn` (always during warm-up), and in any case
    /// a calibration candidate of the latest window — the first sample of
    /// each client, up to a window's worth (see module doc, **Tag line**).
    pub fn offer(&mut self, features: &[f32; DIMS], client: Option<u64>, learn: bool) {
        if !self.warm {
            if !learn {
                return;
            }
            let t = log_transform(features);
            self.trained = self.trained.saturating_add(1);
            self.scaler.observe(&t);
            self.warm_up_buffer.push(finite(features));
            if self.warm_up_buffer.len() >= self.params.warm_up as usize {
                self.finish_warm_up();
            }
            return;
        }
        let seen = client.is_some_and(|c| self.latest_clients.contains(&c));
        if !seen && self.latest_points.len() < self.params.window as usize {
            self.latest_points.push(finite(features));
            // A client of its own (no label: `learn`, in tests): a number
            // unique over the model's life, that no label hashes to in practice.
            let own = u64::MAX - self.trained;
            self.latest_clients.push(client.unwrap_or(own));
        }
        if !learn {
            return;
        }
        let t = log_transform(features);
        self.trained = self.trained.saturating_add(1);
        let x = self.scaler.scale(&t);
        for tree in &mut self.trees {
            tree.update(&x, false);
        }
        self.in_window += 1;
        if self.in_window >= self.params.window {
            for tree in &mut self.trees {
                tree.swap_windows();
            }
            self.n_ref = self.in_window;
            self.in_window = 0;
            // The candidates of the windows before the new reference's are
            // outside it: they calibrate it (the newest `CALIBRATION_WINDOWS`
            // of them); the new reference's own candidates wait a window.
            let previous = (
                std::mem::replace(&mut self.reference_points, std::mem::take(&mut self.latest_points)),
                std::mem::replace(&mut self.reference_clients, std::mem::take(&mut self.latest_clients)),
            );
            self.older_points.insert(0, previous);
            self.older_points.truncate(CALIBRATION_WINDOWS);
            // One point per client over the pool: its newest.
            let mut seen = std::collections::HashSet::new();
            let pool: Vec<[f32; DIMS]> = self
                .older_points
                .iter()
                .flat_map(|(points, clients)| {
                    points.iter().enumerate().map(move |(i, p)| (clients.get(i).copied(), p))
                })
                .filter(|(c, _)| c.is_none_or(|c| seen.insert(c)))
                .map(|(_, p)| *p)
                .collect();
            self.calibrate(&pool, false);
        }
    }

    /// Replays the warm-up vectors as the first reference window, and
    /// calibrates it leave-one-out on them (there are no other points yet).
    fn finish_warm_up(&mut self) {
        let buffer = std::mem::take(&mut self.warm_up_buffer);
        for v in &buffer {
            let x = self.scaler.scale(&log_transform(v));
            for tree in &mut self.trees {
                tree.update(&x, true);
            }
        }
        self.n_ref = u32::try_from(buffer.len()).unwrap_or(u32::MAX);
        self.warm = true;
        self.calibrate(&buffer, true);
        self.reference_points = buffer;
    }

    /// Sets the tag line from `points`' log-masses against the reference:
    /// `TAG_MARGIN_BITS` under their `CALIBRATION_RANK`-th smallest. With
    /// no points the line stays where it was.
    fn calibrate(&mut self, points: &[[f32; DIMS]], leave_one_out: bool) {
        let own = u32::from(leave_one_out);
        let mut masses: Vec<f64> = points
            .iter()
            .map(|v| self.log_mass_of(&self.scaler.scale(&log_transform(v)), own).0)
            .collect();
        if masses.is_empty() {
            return;
        }
        masses.sort_by(f64::total_cmp);
        let rank = calibration_rank(masses.len());
        let (Some(&kth), Some(&median)) = (masses.get(rank - 1), masses.get(masses.len() / 2))
        else {
            return;
        };
        self.tag_line = kth - TAG_MARGIN_BITS;
        self.calibration = Calibration {
            points: u32::try_from(masses.len()).unwrap_or(u32::MAX),
            rank: u32::try_from(rank).unwrap_or(u32::MAX),
            kth_log_mass: kth,
            median_log_mass: median,
            leave_one_out,
        };
    }

    /// Mean over trees of `log2(1 + mass)` and summed surprise per feature.
    fn log_mass(&self, x: &[f64; DIMS]) -> (f64, [f64; DIMS]) {
        self.log_mass_of(x, 0)
    }

    /// [`Model::log_mass`], with `own` points of the reference left out
    /// (1: `x` is one of them; the masses are then those of a reference of
    /// `n_ref - 1` points, normalised as such).
    fn log_mass_of(&self, x: &[f64; DIMS], own: u32) -> (f64, [f64; DIMS]) {
        let n_ref = f64::from(self.n_ref.saturating_sub(own).max(1));
        let size_limit = (n_ref * SIZE_LIMIT_SHARE).max(1.0);
        let to_window = f64::from(self.params.window) / n_ref;
        let mut sum = 0.0;
        let mut surprise = [0.0; DIMS];
        for tree in &self.trees {
            let walk = tree.walk(x, size_limit, own);
            let mass = f64::from(walk.mass) * 2f64.powi(walk.depth as i32) * to_window;
            sum += mass.ln_1p() / std::f64::consts::LN_2;
            for (s, w) in surprise.iter_mut().zip(walk.surprise) {
                *s += w;
            }
        }
        (sum / self.trees.len().max(1) as f64, surprise)
    }

    /// The anomaly of `features` with no learning, or None while warming up.
    pub fn score(&self, features: &[f32; DIMS]) -> Option<Assessment> {
        if !self.warm {
            return None;
        }
        let t = log_transform(features);
        let x = self.scaler.scale(&t);
        let (log_mass, surprise) = self.log_mass(&x);
        let anomaly = 1.0 / (1.0 + (log_mass - self.tag_line).exp2());
        let explanation = if anomaly > 0.5 {
            explain(&surprise, &x)
        } else {
            Vec::new()
        };
        Some(Assessment {
            anomaly: anomaly.clamp(0.0, 1.0) as f32,
            explanation,
        })
    }

    #[cfg(test)]
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    #[cfg(test)]
    /// Parses and checks one model (the scorer saves them all: `models`).
    pub fn from_json(json: &str) -> Result<Model, LoadError> {
        let model: Model =
            serde_json::from_str(json).map_err(|e| LoadError::Corrupt(e.to_string()))?;
        model.check().map_err(LoadError::Corrupt)?;
        Ok(model)
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format {} (expected {FORMAT})", self.format));
        }
        let p = &self.params;
        if p.trees == 0 || p.trees > 256 || !(1..=16).contains(&p.depth) || p.window < 10 {
            return Err("parameters out of range".into());
        }
        if self.trees.len() != p.trees {
            return Err("tree count does not match parameters".into());
        }
        let internal = (1usize << p.depth) - 1;
        let total = (1usize << (p.depth + 1)) - 1;
        for t in &self.trees {
            if t.dim.len() != internal
                || t.split.len() != internal
                || t.r.len() != total
                || t.l.len() != total
            {
                return Err("tree shape does not match parameters".into());
            }
            if t.dim.iter().any(|&d| usize::from(d) >= DIMS)
                || t.split.iter().any(|s| !s.is_finite())
            {
                return Err("bad split".into());
            }
        }
        let c = &self.calibration;
        if !self.tag_line.is_finite()
            || !c.kth_log_mass.is_finite()
            || !c.median_log_mass.is_finite()
            || c.rank > c.points
        {
            return Err("bad calibration".into());
        }
        if self.latest_points.len() > p.window as usize
            || self.latest_clients.len() > self.latest_points.len()
            || self.older_points.len() > CALIBRATION_WINDOWS
            || self.older_points.iter().any(|(w, c)| w.len() > MAX_POINTS || c.len() > MAX_POINTS)
            || self.reference_clients.len() > MAX_POINTS
            || self.reference_points.len() > MAX_POINTS
            || self.warm_up_buffer.len() > MAX_POINTS
        {
            return Err("too many stored points".into());
        }
        Ok(())
    }

    #[cfg(test)]
    /// Loads `path`; `Ok(None)` when there is no snapshot yet.
    pub fn load(path: &Path) -> Result<Option<Model>, LoadError> {
        match std::fs::read_to_string(path) {
            Ok(json) => Model::from_json(&json).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LoadError::Io(e)),
        }
    }
}

/// Top features by share of surprise; by range excess when nothing was cut off.
fn explain(surprise: &[f64; DIMS], x: &[f64; DIMS]) -> Vec<Contribution> {
    let mut weights = *surprise;
    if weights.iter().sum::<f64>() <= f64::EPSILON {
        weights = x.map(|v| (v - 1.0).max(0.0) + (-v).max(0.0));
    }
    let total: f64 = weights.iter().sum();
    if total <= f64::EPSILON {
        return Vec::new();
    }
    let mut ranked: Vec<(usize, f64)> = weights
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, w)| *w > 0.0)
        .collect();
    // Largest first; ties by feature order so the answer is deterministic.
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked
        .into_iter()
        .take(TOP_FEATURES)
        .filter_map(|(i, w)| {
            let name = FEATURE_NAMES.get(i)?;
            Some(Contribution {
                feature: (*name).to_string(),
                weight: ((w / total) * 1000.0).round() as f32 / 1000.0,
            })
        })
        .collect()
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
pub(crate) mod tests {
    use super::*;
    use abuse_engine::wire::Features;

    /// Deterministic noise for test traffic.
    pub(crate) struct Noise(SplitMix);
    impl Noise {
        pub(crate) fn new(seed: u64) -> Noise {
            Noise(SplitMix(seed))
        }
        pub(crate) fn unit(&mut self) -> f32 {
            self.0.unit() as f32
        }
        pub(crate) fn below(&mut self, n: usize) -> f32 {
            self.0.below(n) as f32
        }
    }

    /// A normal client: a few requests, the odd login failure, human rhythm.
    pub(crate) fn normal(n: &mut Noise) -> Features {
        Features {
            risk: n.below(15),
            requests: 5.0 + n.below(60),
            recent_requests: 1.0 + n.below(10),
            login_failures: n.below(3),
            failed_usernames: n.below(2),
            login_successes: n.below(3),
            not_found: n.below(3),
            not_found_paths: n.below(2),
            object_requests: n.below(20),
            object_miss_ratio: n.unit() * 0.2,
            distinct_object_ids: n.below(10),
            sequential_object_run: n.below(3),
            page_run: n.below(4),
            interval_mean_ms: 500.0 + n.unit() * 5000.0,
            interval_cv: 0.5 + n.unit(),
            sessions: 1.0 + n.below(2),
            response_kib: 10.0 + n.unit() * 200.0,
            anonymous_network: 0.0,
        }
    }

    /// A credential stuffer: as busy as a normal client, but failing a lot
    /// with many usernames.
    pub(crate) fn stuffer() -> Features {
        Features {
            risk: 10.0,
            requests: 40.0,
            recent_requests: 6.0,
            login_failures: 80.0,
            failed_usernames: 60.0,
            login_successes: 0.0,
            interval_mean_ms: 2000.0,
            interval_cv: 1.0,
            sessions: 1.0,
            response_kib: 50.0,
            ..Features::default()
        }
    }

    pub(crate) fn trained(samples: usize, warm_up: u32) -> Model {
        let mut model = Model::new(Params {
            warm_up,
            ..Params::default()
        });
        let mut n = Noise::new(7);
        for _ in 0..samples {
            model.learn(&normal(&mut n).to_vector());
        }
        model
    }

    #[test]
    fn cold_until_warm_up_then_scores() {
        let mut model = Model::new(Params {
            warm_up: 50,
            ..Params::default()
        });
        let mut n = Noise::new(1);
        for i in 0..50 {
            assert!(
                model.score_and_learn(&normal(&mut n).to_vector()).is_none(),
                "sample {i}"
            );
        }
        assert!(model.is_warm());
        assert_eq!(model.trained(), 50);
        assert!(model.score(&normal(&mut n).to_vector()).is_some());
    }

    #[test]
    fn abnormal_scores_much_higher_and_is_explained_by_login_features() {
        let model = trained(2000, 200);
        let mut n = Noise::new(99);
        let normal_scores: Vec<f32> = (0..200)
            .map(|_| model.score(&normal(&mut n).to_vector()).unwrap().anomaly)
            .collect();
        let mean = normal_scores.iter().sum::<f32>() / normal_scores.len() as f32;
        let mut sorted = normal_scores.clone();
        sorted.sort_by(f32::total_cmp);
        let p95 = sorted[189];
        let attack = model.score(&stuffer().to_vector()).unwrap();
        eprintln!(
            "normal mean {mean:.3} p95 {p95:.3}; attack {:.3} {:?}; tag line {:.2}",
            attack.anomaly, attack.explanation, model.tag_line
        );
        // Deterministic (seeded trees and traffic), so exact enough bounds.
        assert!(mean < 0.45, "ordinary traffic reads as ordinary: {mean}");
        // On this synthetic traffic (18 independent uniform features: a long
        // sparse tail of ordinary corners) the stuffer sits near the line
        // (0.47); ranked above every ordinary client either way. Tagged on
        // the route-group traffic of `models::tests`.
        assert!(attack.anomaly > 0.4, "attack anomaly {}", attack.anomaly);
        assert!(
            attack.anomaly > p95 + 0.3,
            "attack {} vs normal p95 {p95}",
            attack.anomaly
        );
        assert!(normal_scores.iter().all(|&s| s < attack.anomaly));
        // The explanation the answer carries beyond the line (here: computed).
        let x = model.scaler.scale(&log_transform(&stuffer().to_vector()));
        let attack = Assessment { explanation: explain(&model.log_mass(&x).1, &x), ..attack };
        assert!(!attack.explanation.is_empty() && attack.explanation.len() <= 3);
        let top = &attack.explanation[0].feature;
        assert!(
            top == "login_failures" || top == "failed_usernames",
            "explained by {top}"
        );
        let login: f32 = attack
            .explanation
            .iter()
            .filter(|c| c.feature == "login_failures" || c.feature == "failed_usernames")
            .map(|c| c.weight)
            .sum();
        assert!(
            login > 0.5,
            "login features carry most of it: {:?}",
            attack.explanation
        );
        assert!(attack
            .explanation
            .windows(2)
            .all(|w| w[0].weight >= w[1].weight));
    }

    /// Share of `count` fresh normal clients (seeded) the model tags:
    /// beyond its tag line, anomaly > 0.5.
    fn tagged_share(model: &Model, seed: u64, count: usize) -> f64 {
        let mut n = Noise::new(seed);
        let tagged = (0..count)
            .filter(|_| model.score(&normal(&mut n).to_vector()).unwrap().anomaly > 0.5)
            .count();
        tagged as f64 / count as f64
    }

    #[test]
    fn the_tag_line_is_set_leave_one_out_then_out_of_sample() {
        let young = trained(200, 200);
        let (line, c) = young.calibration().unwrap();
        assert!(c.leave_one_out && c.points == 200 && c.rank == 1, "{c:?}");
        assert!((line - (c.kth_log_mass - TAG_MARGIN_BITS)).abs() < 1e-12);
        // After the first window: the warm-up points calibrate the new
        // reference they are not part of; after the second, the first
        // window's candidates and the warm-up points (pooled, never the
        // reference's own window): k = 3 of 450.
        let model = trained(700, 200);
        let (line, c) = model.calibration().unwrap();
        assert!(!c.leave_one_out && c.points == 450 && c.rank == 3, "{c:?}");
        assert!((line - (c.kth_log_mass - TAG_MARGIN_BITS)).abs() < 1e-12);
        assert!(c.median_log_mass > c.kth_log_mass);
        assert!((c.false_tag_bound() - 3.0 / 451.0).abs() < 1e-12);
        // Four windows on: 1,000 points pooled, k = 8 (8/1001 < 2/250).
        let old = trained(1700, 200);
        let (_, c) = old.calibration().unwrap();
        assert!(c.points == 1000 && c.rank == 8, "{c:?}");
        assert!(Model::new(Params::default()).calibration().is_none(), "cold: no line");
    }

    #[test]
    fn at_most_one_percent_of_normal_clients_tagged_with_a_fixed_seed() {
        // Seeded trees and traffic: the same figure every run.
        let model = trained(700, 200);
        let share = tagged_share(&model, 99, 5000);
        let stuffer = model.score(&stuffer().to_vector()).unwrap();
        let mut n = Noise::new(99);
        let top = (0..5000)
            .map(|_| model.score(&normal(&mut n).to_vector()).unwrap().anomaly)
            .fold(0.0f32, f32::max);
        eprintln!("normal clients tagged: {share:.4} (top anomaly {top:.3}); stuffer {:.3}", stuffer.anomaly);
        assert!(share <= 0.01, "{share}");
        assert!(stuffer.anomaly > top, "the odd client above every ordinary one: {} vs {top}", stuffer.anomaly);
    }

    /// The bound that needs no seed (module doc, **Tag line**): the tag line
    /// is at or under the k-th smallest of n out-of-sample calibration
    /// log-masses, so a fresh normal client falls under it with probability
    /// U, U ~ Beta(k, n + 1 - k) over the calibration draw (here k = 3, n =
    /// 450: mean 0.67 %, P(U > 0.06) < 1e-9), whatever the traffic's
    /// distribution or the trees' seed. Of 2,000 fresh clients, then, more
    /// than 10 % are tagged with probability < 1e-9 + P(Bin(2000, 0.06) >
    /// 200) < 2e-5 — for any seed below, or any other.
    #[test]
    fn the_false_tag_bound_holds_whatever_the_seed() {
        for seed in [1u64, 2, 3, 0xdead_beef, 0x0123_4567_89ab_cdef, u64::MAX] {
            let mut model = Model::new(Params { warm_up: 200, seed, ..Params::default() });
            let mut n = Noise::new(seed ^ 0x5555_5555);
            for _ in 0..700 {
                model.learn(&normal(&mut n).to_vector());
            }
            let (_, c) = model.calibration().unwrap();
            assert!(!c.leave_one_out && c.false_tag_bound() < 2.0 / 250.0, "{c:?}");
            let share = tagged_share(&model, seed.wrapping_add(17), 2000);
            assert!(share <= 0.10, "seed {seed}: {share}");
        }
    }

    #[test]
    fn same_seed_same_model_and_scores_are_deterministic() {
        let a = trained(600, 200);
        let b = trained(600, 200);
        let v = stuffer().to_vector();
        assert_eq!(a.score(&v), b.score(&v));
        assert_eq!(a.to_json().unwrap(), b.to_json().unwrap());
    }

    #[test]
    fn save_load_same_score() {
        let model = trained(700, 200);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.json");
        std::fs::write(&path, model.to_json().unwrap()).unwrap();
        let loaded = Model::load(&path).unwrap().unwrap();
        let mut n = Noise::new(3);
        for v in [stuffer().to_vector(), normal(&mut n).to_vector()] {
            assert_eq!(model.score(&v), loaded.score(&v));
        }
        assert_eq!(loaded.trained(), 700);
        assert!(loaded.is_warm());
    }

    #[test]
    fn corrupt_or_foreign_snapshots_are_refused() {
        assert!(matches!(
            Model::from_json("{not json"),
            Err(LoadError::Corrupt(_))
        ));
        let mut model = trained(10, 5);
        model.trees.pop();
        assert!(matches!(
            Model::from_json(&model.to_json().unwrap()),
            Err(LoadError::Corrupt(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        assert!(Model::load(&dir.path().join("absent.json"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn hostile_inputs_never_break_it() {
        let mut model = trained(300, 100);
        let weird = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -f32::MAX,
            0.0,
            1e-30,
            -1.0,
        ];
        for (i, w) in weird.iter().enumerate() {
            let v = [*w; DIMS];
            let a = model.score_and_learn(&v).unwrap();
            assert!(
                a.anomaly.is_finite() && (0.0..=1.0).contains(&a.anomaly),
                "case {i}: {a:?}"
            );
        }
        assert!(Model::from_json(&model.to_json().unwrap()).is_ok());
    }

    #[test]
    fn a_window_later_the_reference_is_the_latest_traffic() {
        let mut model = trained(200, 200);
        assert_eq!(model.n_ref, 200);
        let mut n = Noise::new(5);
        for _ in 0..250 {
            model.learn(&normal(&mut n).to_vector());
        }
        assert_eq!(model.n_ref, 250);
        assert_eq!(model.in_window, 0);
        assert!(model
            .trees
            .iter()
            .all(|t| t.l.iter().all(|&m| m == 0) && t.r[0] == 250));
    }

    #[test]
    fn set_warm_up_finishes_early() {
        let mut model = Model::new(Params {
            warm_up: 100,
            ..Params::default()
        });
        let mut n = Noise::new(2);
        for _ in 0..30 {
            model.learn(&normal(&mut n).to_vector());
        }
        assert!(!model.is_warm());
        model.set_warm_up(20);
        assert!(model.is_warm());
    }
}
