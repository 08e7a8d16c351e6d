//! The model survives restarts: it is written to `STATE_DIR/model.json`
//! every 30 s (when it learned something since) and on shutdown, and read
//! back at start. Writes go to a temporary file that is synced and then
//! renamed over the old one, so a crash mid-write leaves the previous
//! snapshot, never half a file. A snapshot that cannot be read or checked is
//! logged and ignored: the model starts cold rather than the service not at
//! all.

use crate::app::App;
use crate::model::{Model, Params};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const FILE: &str = "model.json";
pub const EVERY: Duration = Duration::from_secs(30);

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

pub fn load_or_new(state_dir: &Path, params: Params) -> Model {
    let file = path(state_dir);
    match Model::load(&file) {
        Ok(Some(mut model)) => {
            model.set_warm_up(params.warm_up);
            tracing::info!(file = %file.display(), trained = model.trained(), warm = model.is_warm(), "loaded the model snapshot");
            model
        }
        Ok(None) => {
            tracing::info!(file = %file.display(), warm_up = params.warm_up, "no model snapshot yet: the model starts cold");
            Model::new(params)
        }
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "ignoring the model snapshot: the model starts cold");
            Model::new(params)
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
    let file = path(&app.state_dir);
    let app = app.clone();
    // The check and the write happen together under `snapshot_written`, in
    // the blocking task: the final save at shutdown may start while an
    // aborted periodic save is still writing (aborting does not stop a
    // blocking task), and an older model must never be renamed over a newer
    // one. `trained` only grows, so it orders the snapshots.
    tokio::task::spawn_blocking(move || {
        let mut written = app.snapshot_written();
        if trained <= *written {
            return Ok(false);
        }
        write_atomic(&file, &json)?;
        *written = trained;
        Ok(true)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e: std::io::Error| e.to_string())
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
    fn a_corrupt_snapshot_means_a_cold_model() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), "{\"format\": 1, \"trees\": [").unwrap();
        let model = load_or_new(dir.path(), Params::default());
        assert_eq!(model.trained(), 0);
    }
}
