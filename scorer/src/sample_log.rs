//! `--sample-log FILE`: every sample as one JSON line (`anomaly` null while
//! its model warms), for offline evaluation (`make eval` computes the
//! model's AUC per scenario from it; `models::tests::replay_sample_log`
//! replays it exactly through a fresh model).
//! Off by default. Bounded: after [`MAX_LINES`] lines it stops writing and
//! says so once; a write error turns it off (the service never fails on it).

use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

pub const MAX_LINES: u64 = 2_000_000;

#[derive(Debug, Serialize)]
pub struct Line<'a> {
    pub t_ms: u64,
    pub client: &'a str,
    pub group: Option<&'a str>,
    /// None (`null`) while the sample's model warms: scored by nothing,
    /// learned all the same.
    pub anomaly: Option<f32>,
    pub penalized: bool,
    pub flagged: bool,
    /// The feature vector (`FEATURE_NAMES` order), for comparing models offline.
    pub features: &'a [f32],
}

pub struct SampleLog {
    out: Option<BufWriter<File>>,
    lines: u64,
}

impl SampleLog {
    pub fn off() -> SampleLog {
        SampleLog { out: None, lines: 0 }
    }

    pub fn open(path: &Path) -> std::io::Result<SampleLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(SampleLog { out: Some(BufWriter::new(file)), lines: 0 })
    }

    pub fn is_on(&self) -> bool {
        self.out.is_some()
    }

    /// Writes `lines` and flushes (one batch at a time).
    pub fn write(&mut self, lines: &[Line<'_>]) {
        let Some(out) = self.out.as_mut() else { return };
        let mut result = Ok(());
        for line in lines {
            if self.lines >= MAX_LINES {
                tracing::warn!(max = MAX_LINES, "the sample log is full: no more lines");
                self.out = None;
                return;
            }
            result = serde_json::to_writer(&mut *out, line)
                .map_err(std::io::Error::other)
                .and_then(|()| out.write_all(b"\n"));
            if result.is_err() {
                break;
            }
            self.lines += 1;
        }
        if let Err(e) = result.and_then(|()| out.flush()) {
            tracing::warn!(error = %e, "writing the sample log failed: turned off");
            self.out = None;
        }
    }
}
