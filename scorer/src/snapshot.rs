//! The model survives restarts: it is written to `STATE_DIR/model.json`
//! every 30 s (when it learned something since) and on shutdown, and read
//! back at start. Writes go to a temporary file that is synced and then
//! renamed over the old one, so a crash mid-write leaves the previous
//! snapshot, never half a file. A snapshot that cannot be read or checked is
//! logged and ignored: the model starts cold rather than the service not at
//! all.
//!
//! The warm-start state of the in-process store (known-accounts bits and
//! baselines: the whole of it without Redis, the mirror with Redis) goes to
//! `STATE_DIR/warm.json` the same way, when it changed, so a scorer without
//! Redis still hands a fresh Envoy what the fleet learned before its own
//! restart. At most ~1.4 MB (1,024 shards of 1 KiB in base64).

use crate::app::App;
use crate::known;
use crate::model::Params;
use crate::models::Models;
use crate::store::memory::MemoryStore;
use abuse_engine::wire::{BaselineSnapshot, KnownShard, ProfileUpdate};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

pub const FILE: &str = "model.json";
pub const WARM_FILE: &str = "warm.json";
const WARM_FORMAT: u32 = 1;

/// `warm.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WarmFile {
    format: u32,
    baselines: Vec<SavedBaseline>,
    known_shards: Vec<KnownShard>,
    /// Account profiles, most recent first (absent in files of before them).
    #[serde(default)]
    profiles: Vec<ProfileUpdate>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedBaseline {
    baseline: BaselineSnapshot,
    /// When a batch last mentioned it (ms since the epoch).
    seen_ms: u64,
}
pub const EVERY: Duration = Duration::from_secs(30);

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

pub fn load_or_new(state_dir: &Path, params: Params) -> Models {
    let file = path(state_dir);
    match Models::load(&file) {
        Ok(Some(mut model)) => {
            model.set_warm_up(params.warm_up);
            tracing::info!(file = %file.display(), trained = model.trained(), warm = model.is_warm(), "loaded the model snapshot");
            model
        }
        Ok(None) => {
            tracing::info!(file = %file.display(), warm_up = params.warm_up, "no model snapshot yet: the model starts cold");
            Models::new(params)
        }
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "ignoring the model snapshot: the model starts cold");
            Models::new(params)
        }
    }
}

pub fn write_atomic(file: &Path, contents: &str) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension(format!("json.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Saves the model if it learned since the last save; whether it wrote.
pub async fn save(app: &Arc<App>) -> Result<bool, String> {
    // Serialise under the model lock (a few ms), write outside it.
    let (json, trained) = {
        let model = app.model();
        let trained = model.trained();
        if trained <= *app.snapshot_written() {
            return Ok(false);
        }
        (model.to_json().map_err(|e| e.to_string())?, trained)
    };
    // `trained` only grows, so it orders the snapshots.
    write_if_newer(app, path(&app.state_dir), json, trained, App::snapshot_written).await
}

/// Writes `json` to `file` unless a version at least as new was written;
/// `written` is the lock holding the last version written. The check and
/// the write happen together under that lock, in the blocking task: the
/// final save at shutdown may start while an aborted periodic save is still
/// writing (aborting does not stop a blocking task), and an older state
/// must never be renamed over a newer one.
async fn write_if_newer(
    app: &Arc<App>,
    file: PathBuf,
    json: String,
    version: u64,
    written: fn(&App) -> MutexGuard<'_, u64>,
) -> Result<bool, String> {
    let app = app.clone();
    tokio::task::spawn_blocking(move || {
        let mut last = written(&app);
        if version <= *last {
            return Ok(false);
        }
        write_atomic(&file, &json)?;
        *last = version;
        Ok(true)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e: std::io::Error| e.to_string())
}

/// Reads `warm.json` into `store` (at start); a missing file is no state,
/// an unreadable one is logged and ignored.
pub fn load_warm(state_dir: &Path, store: &MemoryStore) {
    let file = state_dir.join(WARM_FILE);
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "ignoring the warm-start snapshot");
            return;
        }
    };
    let saved: WarmFile = match serde_json::from_str(&text) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "ignoring the warm-start snapshot");
            return;
        }
    };
    if saved.format != WARM_FORMAT {
        tracing::warn!(file = %file.display(), format = saved.format, "ignoring a warm-start snapshot of another format");
        return;
    }
    let shards: Vec<(usize, known::ShardBits)> = saved
        .known_shards
        .iter()
        .filter_map(|s| Some((usize::try_from(s.index).ok()?, known::decode(&s.bits)?)))
        .collect();
    let baselines = saved
        .baselines
        .into_iter()
        .map(|b| (b.baseline, b.seen_ms))
        .collect::<Vec<_>>();
    tracing::info!(file = %file.display(), shards = shards.len(), baselines = baselines.len(), profiles = saved.profiles.len(), "loaded the warm-start snapshot");
    store.restore_warm(baselines, &shards, &saved.profiles);
}

/// The store's warm-start state as saved, and its `warm_changes`.
fn warm_file(store: &MemoryStore) -> (u64, WarmFile) {
    let (changes, baselines, shards, profiles) = store.export_warm();
    let file = WarmFile {
        format: WARM_FORMAT,
        baselines: baselines
            .into_iter()
            .map(|(baseline, seen_ms)| SavedBaseline { baseline, seen_ms })
            .collect(),
        known_shards: known::wire_shards(&shards),
        profiles,
    };
    (changes, file)
}

/// Saves the warm-start state if it changed since the last save; whether it wrote.
pub async fn save_warm(app: &Arc<App>) -> Result<bool, String> {
    let local = app.fleet.local();
    if local.warm_changes() <= *app.warm_written() {
        return Ok(false);
    }
    let (changes, saved) = warm_file(local);
    let json = serde_json::to_string(&saved).map_err(|e| e.to_string())?;
    write_if_newer(app, app.state_dir.join(WARM_FILE), json, changes, App::warm_written).await
}

/// Saves every [`EVERY`], forever (aborted at shutdown, which saves once more).
pub async fn every(app: Arc<App>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match save(&app).await {
            Ok(true) => tracing::debug!("saved the model snapshot"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "saving the model snapshot failed; will retry"),
        }
        match save_warm(&app).await {
            Ok(true) => tracing::debug!("saved the warm-start snapshot"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "saving the warm-start snapshot failed; will retry");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub").join(FILE);
        write_atomic(&file, "one").unwrap();
        write_atomic(&file, "two").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "two");
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            1
        );
    }

    #[test]
    fn warm_state_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = MemoryStore::new();
        store.add_known(&[3, 3 + 1024 * 9, 1023]);
        let b = BaselineSnapshot {
            name: "login:/api/login".into(),
            samples: 40,
            ..BaselineSnapshot::default()
        };
        store.merge_baseline_list(std::slice::from_ref(&b), 1_000);
        let (changes, file) = warm_file(&store);
        assert_eq!(changes, 2);
        write_atomic(
            &dir.path().join(WARM_FILE),
            &serde_json::to_string(&file).unwrap(),
        )
        .unwrap();
        let back = MemoryStore::new();
        load_warm(dir.path(), &back);
        assert_eq!(back.known_page(0, 64), store.known_page(0, 64));
        assert_eq!(back.baseline_list(), vec![b]);
        assert_eq!(back.warm_changes(), 0, "nothing new to write");
        std::fs::write(dir.path().join(WARM_FILE), "{\"format\":1,").unwrap();
        let cold = MemoryStore::new();
        load_warm(dir.path(), &cold);
        assert!(cold.known_page(0, 64).shards.is_empty());
    }

    #[test]
    fn a_corrupt_snapshot_means_a_cold_model() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), "{\"format\": 1, \"trees\": [").unwrap();
        let model = load_or_new(dir.path(), Params::default());
        assert_eq!(model.trained(), 0);
    }
}
