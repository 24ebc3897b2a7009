//! `metrics.jsonl`: one JSON object per line, appended as training goes.
//!
//! Records carry `step`, `loss`, `lr`, `tokens_per_s` and, at evaluation steps,
//! `eval_loss`, `eval_accuracy` and `eval_bpb`. A line is written with a single `write`
//! so a crash can at worst leave one torn last line. On resume from a checkpoint of step
//! S, records of steps after S describe training that is about to be redone, so they
//! are dropped (and a torn line with them) before appending continues: the log then reads
//! as one uninterrupted run.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// An append-only metrics log.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Starts a fresh log at `path` (`None`), or continues the one there after dropping
    /// its records with step > `resume_from_step`; the rewrite is atomic (temporary
    /// file, `sync_all`, rename), so a crash during it loses nothing.
    pub fn open(path: &Path, resume_from_step: Option<u64>) -> Result<MetricsLog, String> {
        let error = |e: std::io::Error| format!("metrics log {}: {e}", path.display());
        match resume_from_step {
            None => {
                File::create(path).map_err(error)?;
            }
            Some(step) => {
                let text = match fs::read_to_string(path) {
                    Ok(text) => text,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                    Err(e) => return Err(error(e)),
                };
                let kept: String = text
                    .lines()
                    .filter(|line| parse_line(line).is_some_and(|(s, _)| s <= step))
                    .flat_map(|line| [line, "\n"])
                    .collect();
                let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
                tmp_name.push(".tmp");
                let tmp = path.with_file_name(tmp_name);
                let mut file = File::create(&tmp).map_err(error)?;
                file.write_all(kept.as_bytes()).and_then(|()| file.sync_all()).map_err(error)?;
                fs::rename(&tmp, path).map_err(error)?;
            }
        }
        let file = OpenOptions::new().append(true).open(path).map_err(error)?;
        Ok(MetricsLog { path: path.to_path_buf(), file })
    }

    /// Appends one record, which must be a JSON object with a non-negative integer `step`.
    pub fn append(&self, record: &Value) -> Result<(), String> {
        if !record.get("step").is_some_and(Value::is_u64) {
            return Err(format!("metrics record needs a non-negative integer `step`: {record}"));
        }
        let mut line = record.to_string();
        line.push('\n');
        (&self.file).write_all(line.as_bytes()).map_err(|e| format!("metrics log {}: {e}", self.path.display()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads every record of a log, in order. A malformed last line without its newline (a
/// write torn by a crash) is skipped; any other malformed line is an error naming it.
pub fn read(path: &Path) -> Result<Vec<Value>, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("metrics log {}: {e}", path.display()))?;
    let torn_tail = !text.is_empty() && !text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut records = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line) {
            Some((_, record)) => records.push(record),
            None if torn_tail && i + 1 == lines.len() => {}
            None => {
                return Err(format!(
                    "metrics log {}: line {} is not a JSON object with an integer `step`",
                    path.display(),
                    i + 1
                ))
            }
        }
    }
    Ok(records)
}

fn parse_line(line: &str) -> Option<(u64, Value)> {
    let record: Value = serde_json::from_str(line).ok()?;
    Some((record.get("step")?.as_u64()?, record))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn steps(path: &Path) -> Vec<u64> {
        read(path).unwrap().iter().map(|r| r["step"].as_u64().unwrap()).collect()
    }

    #[test]
    fn appends_one_object_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let log = MetricsLog::open(&path, None).unwrap();
        log.append(&json!({"step": 1, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 1000.0})).unwrap();
        log.append(&json!({"step": 2, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 1100.0, "eval_loss": 2.1})).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        let records = read(&path).unwrap();
        assert_eq!(records[1]["eval_loss"], json!(2.1));
        assert_eq!(records[0]["loss"], json!(2.5));
        assert!(log.append(&json!({"loss": 1.0})).unwrap_err().contains("`step`"));
        assert!(log.append(&json!({"step": -1})).is_err());
    }

    #[test]
    fn resume_drops_later_steps_and_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        fs::write(&path, "{\"step\":1,\"loss\":3}\n{\"step\":2,\"loss\":2}\n{\"step\":3,\"loss\":1}\n{\"step\":4,\"lo")
            .unwrap();
        // The torn tail is tolerated by read().
        assert_eq!(steps(&path), vec![1, 2, 3]);
        let log = MetricsLog::open(&path, Some(2)).unwrap();
        assert_eq!(steps(&path), vec![1, 2]);
        log.append(&json!({"step": 3, "loss": 1.5})).unwrap();
        let records = read(&path).unwrap();
        assert_eq!(records.iter().map(|r| r["loss"].as_f64().unwrap()).collect::<Vec<_>>(), vec![3.0, 2.0, 1.5]);
        assert!(!dir.path().join("metrics.jsonl.tmp").exists());
    }

    #[test]
    fn fresh_open_truncates_and_resume_creates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        MetricsLog::open(&path, Some(5)).unwrap().append(&json!({"step": 6})).unwrap();
        assert_eq!(steps(&path), vec![6]);
        MetricsLog::open(&path, None).unwrap();
        assert_eq!(steps(&path), Vec::<u64>::new());
    }

    #[test]
    fn malformed_middle_lines_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        fs::write(&path, "{\"step\":1}\nnot json\n{\"step\":2}\n").unwrap();
        let err = read(&path).unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(read(&dir.path().join("missing.jsonl")).unwrap_err().contains("missing.jsonl"));
    }
}
