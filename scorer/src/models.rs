//! The models the scorer keeps, and what they learn from.
//!
//! **What they learn from.** The filters' tick batches carry a uniform
//! sample of each worker's clients per 5-second window (the engine's
//! `engine::sample`): that sample, not the borderline clients the filter
//! asks about, is "normal". Callouts are scored, never learned.
//!
//! **Per route group.** Normal depends on the endpoint: a client that
//! fails three logins is ordinary on `/api/products` traffic only if
//! nobody there logs in at all. So there is one model over all sampled
//! traffic (`all`, warm first) and one per route group for the first
//! [`MAX_GROUP_MODELS`] groups named by the samples; a client is scored by
//! its group's model once that one is warm, else by `all`. Every model has
//! the same seeded trees, so their scores read alike.
//!
//! **What they do not learn from.** (1) Clients the filter penalized or
//! blocked in the window (the sample says so). (2) Once warm, a sample the
//! model already finds anomalous (≥ [`LEARN_GATE`]): an attack the rules
//! miss must not teach the model that it is normal, one sample at a time.
//! The gate gives way when more than half of a group's recent samples would
//! be gated — that is not an attack hiding in the traffic but the traffic
//! changing (a new release), and the model must follow it. (3) Within a
//! window a sample is a distinct client, so an attacker's volume counts
//! once. What is left is an attack the rules miss *from many distinct
//! clients at once*: Half-Space Trees stop a walk at a node holding under a
//! tenth of the reference window (`sizeLimit`), so a tight cluster holding
//! under ~10 % of the sample is still scored as a sparse region. Measured in
//! `robust_to_a_five_percent_attack_share_and_the_limit_is_stated`
//! (stuffers mixed into warm-up and training): AUC of attack vs benign
//! 1.000 clean, 0.997 at a 5 % share (mean attack anomaly 0.92 → 0.77), and
//! 0.03 at 20 % — there the cluster *is* normal to the model, the limit we
//! state.

use crate::model::{Assessment, Model, Params, DIMS};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Route groups with their own model, at most (the rest learn into `all` only).
pub const MAX_GROUP_MODELS: usize = 8;
/// Once warm, a sample at or above this anomaly is not learned (see module doc).
pub const LEARN_GATE: f32 = 0.8;
/// Bumped when the snapshot layout changes (format 1 was one `Model`).
const FORMAT: u32 = 2;

/// A model and its learning gate's recent counts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Learner {
    model: Model,
    recent_seen: u32,
    recent_gated: u32,
    gated: u64,
}

impl Learner {
    fn new(params: Params) -> Learner {
        Learner { model: Model::new(params), recent_seen: 0, recent_gated: 0, gated: 0 }
    }

    /// Scores `v`, then learns it unless excluded or gated.
    fn observe(&mut self, v: &[f32; DIMS], penalized: bool, window: u32) -> Option<Assessment> {
        let a = self.model.score(v);
        if penalized {
            return a;
        }
        let odd = a.as_ref().is_some_and(|a| a.anomaly >= LEARN_GATE);
        // Counts over the last two windows of samples.
        if self.recent_seen >= window.saturating_mul(2) {
            self.recent_seen = 0;
            self.recent_gated = 0;
        }
        self.recent_seen += 1;
        let drifting = self.recent_gated.saturating_mul(2) > self.recent_seen;
        if odd {
            self.recent_gated += 1;
            if !drifting {
                self.gated = self.gated.saturating_add(1);
                return a;
            }
        }
        self.model.learn(v);
        a
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Models {
    format: u32,
    params: Params,
    all: Learner,
    groups: BTreeMap<String, Learner>,
    /// Samples scored but not learned because the filter penalized them.
    excluded: u64,
}

/// What the dashboard and health show.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelsView {
    pub trained: u64,
    pub warm: bool,
    pub warm_up: u32,
    pub excluded: u64,
    pub gated: u64,
    /// Per route group: samples learned, and warm or not.
    pub groups: Vec<GroupView>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GroupView {
    pub group: String,
    pub trained: u64,
    pub warm: bool,
}

impl Models {
    pub fn new(params: Params) -> Models {
        Models { format: FORMAT, params, all: Learner::new(params), groups: BTreeMap::new(), excluded: 0 }
    }

    pub fn trained(&self) -> u64 {
        self.all.model.trained()
    }

    pub fn is_warm(&self) -> bool {
        self.all.model.is_warm()
    }

    pub fn warm_up(&self) -> u32 {
        self.all.model.warm_up()
    }

    pub fn set_warm_up(&mut self, warm_up: u32) {
        self.params.warm_up = warm_up.max(1);
        self.all.model.set_warm_up(warm_up);
        for l in self.groups.values_mut() {
            l.model.set_warm_up(warm_up);
        }
    }

    /// Samples gated so far, all models.
    pub fn view_gated(&self) -> u64 {
        self.all.gated + self.groups.values().map(|l| l.gated).sum::<u64>()
    }

    pub fn view(&self) -> ModelsView {
        ModelsView {
            trained: self.trained(),
            warm: self.is_warm(),
            warm_up: self.warm_up(),
            excluded: self.excluded,
            gated: self.view_gated(),
            groups: self
                .groups
                .iter()
                .map(|(g, l)| GroupView { group: g.clone(), trained: l.model.trained(), warm: l.model.is_warm() })
                .collect(),
        }
    }

    /// Scores a client (a callout): its group's model once warm, else `all`.
    /// Never learns: callouts are the borderline clients, not normal traffic.
    pub fn score(&self, group: Option<&str>, v: &[f32; DIMS]) -> Option<Assessment> {
        group
            .and_then(|g| self.groups.get(g))
            .and_then(|l| l.model.score(v))
            .or_else(|| self.all.model.score(v))
    }

    /// One sample from a batch: scored as [`Models::score`] would (before
    /// learning it), and learned by `all` and its group's model unless
    /// penalized or gated.
    pub fn observe(&mut self, group: Option<&str>, v: &[f32; DIMS], penalized: bool) -> Option<Assessment> {
        let window = self.params.window;
        if penalized {
            self.excluded = self.excluded.saturating_add(1);
        }
        let from_all = self.all.observe(v, penalized, window);
        let Some(group) = group else {
            return from_all;
        };
        if !self.groups.contains_key(group) && self.groups.len() >= MAX_GROUP_MODELS {
            return from_all;
        }
        let params = self.params;
        let learner = self.groups.entry(group.to_string()).or_insert_with(|| Learner::new(params));
        learner.observe(v, penalized, window).or(from_all)
    }

    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    /// A snapshot of this format, or of format 1 (one model: it becomes `all`).
    pub fn from_json(json: &str) -> Result<Models, crate::model::LoadError> {
        use crate::model::LoadError;
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| LoadError::Corrupt(e.to_string()))?;
        if value.get("format").and_then(serde_json::Value::as_u64) == Some(1) {
            let model = Model::from_json(json)?;
            let params = model.params();
            let mut models = Models::new(params);
            models.all.model = model;
            return Ok(models);
        }
        let models: Models = serde_json::from_value(value).map_err(|e| LoadError::Corrupt(e.to_string()))?;
        if models.format != FORMAT {
            return Err(LoadError::Corrupt(format!("format {} (expected {FORMAT})", models.format)));
        }
        if models.groups.len() > MAX_GROUP_MODELS {
            return Err(LoadError::Corrupt("too many group models".into()));
        }
        for l in std::iter::once(&models.all).chain(models.groups.values()) {
            l.model.check().map_err(LoadError::Corrupt)?;
        }
        Ok(models)
    }

    pub fn load(path: &Path) -> Result<Option<Models>, crate::model::LoadError> {
        match std::fs::read_to_string(path) {
            Ok(json) => Models::from_json(&json).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(crate::model::LoadError::Io(e)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::model::tests::{normal, stuffer, Noise};
    use abuse_engine::wire::Features;

    fn params(warm_up: u32) -> Params {
        Params { warm_up, ..Params::default() }
    }

    /// A stuffer with some jitter (attackers are not one point).
    fn noisy_stuffer(n: &mut Noise) -> [f32; DIMS] {
        let mut f = stuffer();
        f.login_failures += n.below(40);
        f.failed_usernames += n.below(30);
        f.requests += n.below(30);
        f.interval_mean_ms += n.unit() * 1000.0;
        f.to_vector()
    }

    /// AUC of attack over benign scores (share of pairs ranked right).
    fn auc(benign: &[f32], attack: &[f32]) -> f64 {
        let mut wins = 0.0;
        for a in attack {
            for b in benign {
                wins += if a > b { 1.0 } else if a == b { 0.5 } else { 0.0 };
            }
        }
        wins / (benign.len() * attack.len()) as f64
    }

    fn scores(models: &Models, vs: &[[f32; DIMS]]) -> Vec<f32> {
        vs.iter().map(|v| models.score(None, v).unwrap().anomaly).collect()
    }

    /// Warm-up and two windows of samples with `share` of stuffers among them.
    fn trained_with_attack_share(share: f64) -> Models {
        let mut m = Models::new(params(200));
        let (mut n, mut k) = (Noise::new(11), Noise::new(12));
        for i in 0..1200 {
            let attack = (i as f64 * share).floor() != ((i + 1) as f64 * share).floor();
            let v = if attack { noisy_stuffer(&mut k) } else { normal(&mut n).to_vector() };
            m.observe(None, &v, false);
        }
        m
    }

    #[test]
    fn learns_normal_from_samples_alone_and_then_scores() {
        let mut m = Models::new(params(200));
        let mut n = Noise::new(3);
        assert!(m.score(None, &normal(&mut n).to_vector()).is_none(), "cold");
        for _ in 0..200 {
            m.observe(None, &normal(&mut n).to_vector(), false);
        }
        assert!(m.is_warm() && m.trained() == 200);
        let benign: Vec<[f32; DIMS]> = (0..200).map(|_| normal(&mut n).to_vector()).collect();
        let b = scores(&m, &benign);
        let s = m.score(None, &stuffer().to_vector()).unwrap().anomaly;
        assert!(s > 0.9, "stuffer {s}");
        assert!(b.iter().filter(|&&x| x >= LEARN_GATE).count() <= 4, "benign rarely gated: {b:?}");
        // Scoring a callout learns nothing.
        let before = m.trained();
        m.score(None, &stuffer().to_vector());
        assert_eq!(m.trained(), before);
    }

    #[test]
    fn penalized_samples_are_scored_but_never_learned() {
        let mut m = Models::new(params(50));
        let mut n = Noise::new(4);
        for _ in 0..50 {
            m.observe(None, &normal(&mut n).to_vector(), false);
        }
        let before = m.trained();
        let mut last = None;
        for _ in 0..500 {
            last = m.observe(None, &stuffer().to_vector(), true);
        }
        assert_eq!(m.trained(), before, "not one learned");
        assert_eq!(m.view().excluded, 500);
        assert!(last.unwrap().anomaly > 0.9, "and still anomalous: the model did not get used to it");
        // Without the flag (and without the gate) 500 stuffers would be "normal":
        // the gate alone keeps them out too, until they are most of the traffic.
        let mut gated = Models::new(params(50));
        let mut n = Noise::new(4);
        for _ in 0..50 {
            gated.observe(None, &normal(&mut n).to_vector(), false);
        }
        for _ in 0..100 {
            gated.observe(None, &normal(&mut n).to_vector(), false);
            gated.observe(None, &noisy_stuffer(&mut n), false);
        }
        assert!(gated.view().gated > 0);
    }

    #[test]
    fn robust_to_a_five_percent_attack_share_and_the_limit_is_stated() {
        let mut n = Noise::new(99);
        let benign: Vec<[f32; DIMS]> = (0..300).map(|_| normal(&mut n).to_vector()).collect();
        let mut k = Noise::new(98);
        let attack: Vec<[f32; DIMS]> = (0..50).map(|_| noisy_stuffer(&mut k)).collect();
        let clean = trained_with_attack_share(0.0);
        let five = trained_with_attack_share(0.05);
        let twenty = trained_with_attack_share(0.20);
        let (a0, a5, a20) = (
            auc(&scores(&clean, &benign), &scores(&clean, &attack)),
            auc(&scores(&five, &benign), &scores(&five, &attack)),
            auc(&scores(&twenty, &benign), &scores(&twenty, &attack)),
        );
        let mean = |m: &Models| scores(m, &attack).iter().sum::<f32>() / attack.len() as f32;
        eprintln!(
            "AUC clean {a0:.3}, 5 % {a5:.3}, 20 % {a20:.3}; attack mean {:.3} / {:.3} / {:.3}; gated {} / {}",
            mean(&clean),
            mean(&five),
            mean(&twenty),
            five.view().gated,
            twenty.view().gated
        );
        assert!(a0 > 0.99 && a5 > 0.98, "{a0} {a5}");
        assert!(mean(&five) > 0.7, "a 5 % share stays anomalous");
        // The stated limit: at 20 % the attack is a region of normal.
        assert!(mean(&twenty) < mean(&five));
    }

    #[test]
    fn normal_depends_on_the_route_group() {
        // On the login group failing logins is ordinary; on products nobody logs in.
        let mut m = Models::new(params(100));
        let mut n = Noise::new(5);
        let login_user = |n: &mut Noise| Features { login_failures: 2.0 + n.below(4), failed_usernames: 1.0, ..normal(n) };
        let browser = |n: &mut Noise| Features { login_failures: 0.0, failed_usernames: 0.0, login_successes: 0.0, ..normal(n) };
        for _ in 0..400 {
            m.observe(Some("login"), &login_user(&mut n).to_vector(), false);
            m.observe(Some("products"), &browser(&mut n).to_vector(), false);
        }
        let v = Features { login_failures: 5.0, failed_usernames: 1.0, requests: 30.0, ..browser(&mut n) }.to_vector();
        let on_login = m.score(Some("login"), &v).unwrap().anomaly;
        let on_products = m.score(Some("products"), &v).unwrap().anomaly;
        eprintln!("same client: login {on_login:.3}, products {on_products:.3}");
        assert!(on_products > 0.8 && on_login < 0.6, "{on_login} {on_products}");
        assert_eq!(m.view().groups.len(), 2);
        // Bounded: groups past the cap learn into `all` only.
        for g in 0..20 {
            m.observe(Some(&format!("g{g}")), &browser(&mut n).to_vector(), false);
        }
        assert_eq!(m.view().groups.len(), MAX_GROUP_MODELS);
        assert!(m.score(Some("never-seen"), &v).is_some(), "falls back to all");
    }

    #[test]
    fn snapshots_round_trip_and_read_the_old_single_model() {
        let m = trained_with_attack_share(0.0);
        let back = Models::from_json(&m.to_json().unwrap()).unwrap();
        let v = stuffer().to_vector();
        assert_eq!(m.score(None, &v), back.score(None, &v));
        let old = crate::model::tests::trained(300, 100);
        let from_old = Models::from_json(&old.to_json().unwrap()).unwrap();
        assert_eq!(from_old.trained(), 300);
        assert_eq!(from_old.score(None, &v), old.score(&v));
        assert!(Models::from_json("{\"format\":2}").is_err());
        assert!(Models::from_json("nope").is_err());
    }
}
