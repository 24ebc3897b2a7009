//! Training checkpoints: safetensors files written so that a crash at any moment leaves
//! either the previous checkpoint or the new one, never a half-written file under a
//! checkpoint's name, and so that a file damaged later (truncated or bit-flipped) is
//! detected on load instead of silently resuming from garbage.
//!
//! Layout: `DIR/ckpt-{step:08}.safetensors`, one F32 tensor per entry of
//! [`Checkpoint::tensors`], and in the safetensors `__metadata__`:
//! `format` = [`FORMAT`], `step`, `data_position`, `rng`, `threads` (decimal), `tensors`
//! (the JSON array of tensor names in the checkpoint's order, which safetensors itself
//! does not keep), `meta.KEY` for each user entry, and `sha256`, the hex SHA-256 of every
//! other metadata entry (sorted by key) followed by each tensor's name, shape and
//! little-endian bytes in order, each field length-prefixed.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

/// The value of the `format` metadata entry; a file without it is not a tnc checkpoint.
pub const FORMAT: &str = "tnc-train-checkpoint/1";

/// Everything needed to resume training exactly where it stopped.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Optimizer steps taken.
    pub step: u64,
    /// The next training batch to draw (see [`crate::DataSource::train_batch`]).
    pub data_position: u64,
    /// The state of the run's random generator (e.g. the dropout step counter).
    pub rng: u64,
    /// Threads the run used; results can differ in the last bits with another count.
    pub threads: usize,
    /// (name, shape, values): parameters and optimizer moments, in a stable order.
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// Free-form entries, e.g. the bundle hash and the run's configuration as JSON.
    pub meta: BTreeMap<String, String>,
}

/// The file name of the checkpoint of `step`.
pub fn file_name(step: u64) -> String {
    format!("ckpt-{step:08}.safetensors")
}

/// Writes `ckpt` atomically into `dir` (created if missing) and returns its path. Then
/// removes leftover temporary files and all but the `keep_last` newest checkpoints
/// (0 keeps every one); checkpoints of later steps than `ckpt` — left by a run that was
/// resumed from an earlier point — are never removed, nor is the one just written.
pub fn save(dir: &Path, ckpt: &Checkpoint, keep_last: usize) -> Result<PathBuf, String> {
    fs::create_dir_all(dir).map_err(|e| format!("checkpoint directory {}: {e}", dir.display()))?;
    let path = dir.join(file_name(ckpt.step));
    let bytes = encode(ckpt).map_err(|e| format!("checkpoint {}: {e}", path.display()))?;
    let tmp = dir.join(format!("{}.tmp", file_name(ckpt.step)));
    let written = write_durably(&tmp, &bytes).and_then(|()| fs::rename(&tmp, &path)).and_then(|()| sync_dir(dir));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(format!("checkpoint {}: writing failed: {e}", path.display()));
    }
    prune(dir, ckpt.step, keep_last).map_err(|e| format!("checkpoint {} saved, but {e}", path.display()))?;
    Ok(path)
}

/// Reads and verifies a checkpoint: format, metadata and checksum.
pub fn load(path: &Path) -> Result<Checkpoint, String> {
    let bytes = fs::read(path).map_err(|e| format!("checkpoint {}: {e}", path.display()))?;
    decode(&bytes).map_err(|e| format!("checkpoint {}: {e}", path.display()))
}

/// The newest checkpoint in `dir` that loads and verifies, with a warning for each newer
/// one that did not. `None` when `dir` holds no checkpoint at all (a fresh run); an
/// error when it holds some but none is valid, since starting over would silently
/// discard the run.
pub fn latest_valid(dir: &Path) -> Result<Option<(PathBuf, Checkpoint, Vec<String>)>, String> {
    let mut warnings = Vec::new();
    for (_, path) in checkpoints(dir)?.into_iter().rev() {
        match load(&path) {
            Ok(ckpt) => return Ok(Some((path, ckpt, warnings))),
            Err(e) => warnings.push(format!("skipping invalid {e}")),
        }
    }
    if warnings.is_empty() {
        Ok(None)
    } else {
        Err(format!("no valid checkpoint in {}:\n  {}", dir.display(), warnings.join("\n  ")))
    }
}

/// The bytes of `ckpt` as [`save`] writes them (deterministic: the same checkpoint is
/// the same bytes).
pub fn encode(ckpt: &Checkpoint) -> Result<Vec<u8>, String> {
    let mut names = std::collections::HashSet::new();
    let mut data = Vec::with_capacity(ckpt.tensors.len());
    for (name, shape, values) in &ckpt.tensors {
        if !names.insert(name.as_str()) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        let elements = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if elements != Some(values.len()) {
            return Err(format!("tensor `{name}` has shape {shape:?} but {} values", values.len()));
        }
        data.push(values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    }
    let order: Vec<&str> = ckpt.tensors.iter().map(|t| t.0.as_str()).collect();
    let mut header: BTreeMap<String, String> =
        ckpt.meta.iter().map(|(k, v)| (format!("meta.{k}"), v.clone())).collect();
    header.insert("format".into(), FORMAT.into());
    header.insert("step".into(), ckpt.step.to_string());
    header.insert("data_position".into(), ckpt.data_position.to_string());
    header.insert("rng".into(), ckpt.rng.to_string());
    header.insert("threads".into(), ckpt.threads.to_string());
    header.insert("tensors".into(), serde_json::to_string(&order).map_err(|e| e.to_string())?);
    let tensors =
        ckpt.tensors.iter().zip(&data).map(|((name, shape, _), bytes)| (name.as_str(), &shape[..], &bytes[..]));
    let sha = checksum(&header, tensors);
    header.insert("sha256".into(), sha);

    let mut views = Vec::with_capacity(data.len());
    for ((name, shape, _), bytes) in ckpt.tensors.iter().zip(&data) {
        let view = TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(|e| format!("tensor `{name}`: {e}"))?;
        views.push((name.as_str(), view));
    }
    let bytes = safetensors::serialize(views, Some(header.into_iter().collect::<HashMap<_, _>>()))
        .map_err(|e| e.to_string())?;
    sorted_header(bytes)
}

/// The safetensors file `bytes` with its JSON header's keys in sorted order (the crate
/// writes the metadata from a `HashMap`, in a different order every run), so that the
/// same checkpoint is the same bytes. The data section is unchanged: its offsets are
/// relative to its own start.
fn sorted_header(bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    let bad = || "the safetensors writer produced no header".to_string();
    let len = u64::from_le_bytes(bytes.get(..8).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
    let end = 8usize.checked_add(len).filter(|&e| e <= bytes.len()).ok_or_else(bad)?;
    // serde_json's maps are ordered by key (no `preserve_order` feature).
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..end]).map_err(|e| e.to_string())?;
    let mut text = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    // The data starts 8-byte aligned, as the writer pads it: with spaces.
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - end);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[end..]);
    Ok(out)
}

/// A checkpoint from bytes, verified as [`load`] does; any bytes give a checkpoint or an
/// error, never a panic (`tests/fuzz_loaders.rs`).
pub fn decode(bytes: &[u8]) -> Result<Checkpoint, String> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| format!("not a complete safetensors file ({e})"))?;
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let mut header: BTreeMap<String, String> = metadata.metadata().clone().unwrap_or_default().into_iter().collect();
    if header.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(format!("not a tnc training checkpoint (metadata `format` is not `{FORMAT}`)"));
    }
    let expected = header.remove("sha256").ok_or("metadata `sha256` is missing")?;
    let order: Vec<String> = serde_json::from_str(field(&header, "tensors")?)
        .map_err(|e| format!("metadata `tensors` is not a JSON list of names: {e}"))?;
    if order.len() != file.len() {
        return Err(format!("metadata lists {} tensors but the file has {}", order.len(), file.len()));
    }
    let mut views = Vec::with_capacity(order.len());
    for name in &order {
        let view = file.tensor(name).map_err(|_| format!("tensor `{name}` listed in the metadata is missing"))?;
        if view.dtype() != Dtype::F32 {
            return Err(format!("tensor `{name}` is {:?}, expected F32", view.dtype()));
        }
        views.push((name.as_str(), view));
    }
    let actual = checksum(&header, views.iter().map(|(name, v)| (*name, v.shape(), v.data())));
    if actual != expected {
        return Err(format!("checksum mismatch: the file is corrupt (stored sha256 {expected}, computed {actual})"));
    }
    Ok(Checkpoint {
        step: number(&header, "step")?,
        data_position: number(&header, "data_position")?,
        rng: number(&header, "rng")?,
        threads: number(&header, "threads")?,
        tensors: views
            .iter()
            .map(|(name, v)| {
                let values = v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                (name.to_string(), v.shape().to_vec(), values)
            })
            .collect(),
        meta: header.iter().filter_map(|(k, v)| Some((k.strip_prefix("meta.")?.to_string(), v.clone()))).collect(),
    })
}

fn field<'a>(header: &'a BTreeMap<String, String>, key: &str) -> Result<&'a str, String> {
    header.get(key).map(String::as_str).ok_or_else(|| format!("metadata `{key}` is missing"))
}

fn number<T: std::str::FromStr>(header: &BTreeMap<String, String>, key: &str) -> Result<T, String> {
    let text = field(header, key)?;
    text.parse().map_err(|_| format!("metadata `{key}` is not a non-negative integer: `{text}`"))
}

/// SHA-256 over the metadata entries and the tensors, every field length-prefixed so
/// that moving bytes between fields changes the digest.
fn checksum<'a>(
    header: &BTreeMap<String, String>,
    tensors: impl Iterator<Item = (&'a str, &'a [usize], &'a [u8])>,
) -> String {
    let mut hasher = Sha256::new();
    let mut put = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    for (key, value) in header {
        put(key.as_bytes());
        put(value.as_bytes());
    }
    for (name, shape, data) in tensors {
        put(name.as_bytes());
        put(&shape.iter().flat_map(|&d| (d as u64).to_le_bytes()).collect::<Vec<u8>>());
        put(data);
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Makes a rename in `dir` durable: without it a power loss can forget the new name.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The checkpoints in `dir` by increasing step; a missing directory has none.
fn checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>, String> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("checkpoint directory {}: {e}", dir.display())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("checkpoint directory {}: {e}", dir.display()))?;
        let name = entry.file_name();
        let step = name.to_str().and_then(|n| n.strip_prefix("ckpt-")?.strip_suffix(".safetensors"));
        if let Some(step) = step.filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())) {
            if let Ok(step) = step.parse() {
                found.push((step, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

fn prune(dir: &Path, step: u64, keep_last: usize) -> Result<(), String> {
    let mut doomed: Vec<PathBuf> = Vec::new();
    if keep_last > 0 {
        let older: Vec<_> = checkpoints(dir)?.into_iter().filter(|(s, _)| *s < step).rev().collect();
        doomed.extend(older.into_iter().skip(keep_last - 1).map(|(_, p)| p));
    }
    // Temporary files of writes that a crash interrupted.
    let entries = fs::read_dir(dir).map_err(|e| format!("listing {} failed: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| n.starts_with("ckpt-") && n.ends_with(".safetensors.tmp")) {
            doomed.push(entry.path());
        }
    }
    for path in doomed {
        fs::remove_file(&path).map_err(|e| format!("removing {} failed: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(step: u64) -> Checkpoint {
        Checkpoint {
            step,
            data_position: step * 2 + 1,
            rng: u64::MAX - step,
            threads: 2,
            // Names out of alphabetical order: the checkpoint's order must survive.
            tensors: vec![
                ("w2".into(), vec![2, 3], vec![1.0, -2.5, 3.25, 0.0, f32::MIN_POSITIVE, 6.0e7]),
                ("bias".into(), vec![3], vec![0.5, 0.25, -0.125]),
                ("scalar".into(), vec![], vec![step as f32]),
            ],
            meta: BTreeMap::from([("bundle".into(), "abc123".into()), ("config".into(), "{\"lr\":0.001}".into())]),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = save(dir.path(), &sample(42), 3).unwrap();
        assert_eq!(path, dir.path().join("ckpt-00000042.safetensors"));
        assert_eq!(load(&path).unwrap(), sample(42));
        assert_eq!(names(dir.path()), vec!["ckpt-00000042.safetensors"]);
    }

    /// The same checkpoint encodes to the same bytes every time (the metadata's keys
    /// sorted), and still decodes to itself. HashMaps are seeded per instance, so several
    /// encodings in one process would already differ without the sorting.
    #[test]
    fn the_same_checkpoint_is_the_same_bytes() {
        let first = encode(&sample(5)).unwrap();
        for _ in 0..8 {
            assert_eq!(encode(&sample(5)).unwrap(), first);
        }
        let back = decode(&first).unwrap();
        assert_eq!((back.step, back.tensors.len()), (5, sample(5).tensors.len()));
        let header_len = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header_len) % 8, 0, "the data is 8-byte aligned");
    }

    #[test]
    fn truncated_latest_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &sample(1), 0).unwrap();
        let latest = save(dir.path(), &sample(2), 0).unwrap();
        let bytes = fs::read(&latest).unwrap();
        fs::write(&latest, &bytes[..bytes.len() - 5]).unwrap();
        let (path, ckpt, warnings) = latest_valid(dir.path()).unwrap().unwrap();
        assert_eq!(path, dir.path().join("ckpt-00000001.safetensors"));
        assert_eq!(ckpt, sample(1));
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("ckpt-00000002.safetensors"), "{}", warnings[0]);
        assert!(warnings[0].contains("not a complete safetensors file"), "{}", warnings[0]);
    }

    #[test]
    fn bit_flips_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = save(dir.path(), &sample(7), 0).unwrap();
        let clean = fs::read(&path).unwrap();
        // Flip one bit in the last value of the data section, then one in a metadata value.
        let mut bytes = clean.clone();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let err = load(&path).unwrap_err();
        assert!(err.contains("checksum mismatch") && err.contains("ckpt-00000007"), "{err}");

        let mut bytes = clean.clone();
        let at = clean.windows(6).position(|w| w == b"abc123").unwrap();
        bytes[at] ^= 0x02; // "abc123" -> "cbc123": still valid JSON and UTF-8
        fs::write(&path, &bytes).unwrap();
        assert!(load(&path).unwrap_err().contains("checksum mismatch"));
    }

    #[test]
    fn no_valid_checkpoint_is_an_error_and_none_is_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        assert!(latest_valid(dir.path()).unwrap().is_none());
        assert!(latest_valid(&dir.path().join("missing")).unwrap().is_none());
        fs::write(dir.path().join("ckpt-00000003.safetensors"), b"garbage").unwrap();
        let err = latest_valid(dir.path()).unwrap_err();
        assert!(err.contains("no valid checkpoint") && err.contains("ckpt-00000003"), "{err}");
        let other = dir.path().join("other.safetensors");
        fs::write(&other, safetensors::serialize(Vec::<(&str, TensorView)>::new(), None).unwrap()).unwrap();
        assert!(load(&other).unwrap_err().contains("not a tnc training checkpoint"));
    }

    #[test]
    fn keeps_the_last_n_and_never_later_steps() {
        let dir = tempfile::tempdir().unwrap();
        for step in [10, 20, 30, 40] {
            save(dir.path(), &sample(step), 2).unwrap();
        }
        assert_eq!(names(dir.path()), vec!["ckpt-00000030.safetensors", "ckpt-00000040.safetensors"]);
        // A resumed run saving step 35 keeps the later 40, the new 35 and one older (30).
        save(dir.path(), &sample(35), 2).unwrap();
        assert_eq!(
            names(dir.path()),
            vec!["ckpt-00000030.safetensors", "ckpt-00000035.safetensors", "ckpt-00000040.safetensors"]
        );
        save(dir.path(), &sample(36), 1).unwrap();
        assert_eq!(names(dir.path()), vec!["ckpt-00000036.safetensors", "ckpt-00000040.safetensors"]);
    }

    #[test]
    fn temporary_files_are_ignored_then_removed() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &sample(5), 0).unwrap();
        fs::write(dir.path().join("ckpt-00000009.safetensors.tmp"), b"half a fi").unwrap();
        let (path, _, warnings) = latest_valid(dir.path()).unwrap().unwrap();
        assert_eq!((path, warnings), (dir.path().join("ckpt-00000005.safetensors"), vec![]));
        save(dir.path(), &sample(6), 0).unwrap();
        assert_eq!(names(dir.path()), vec!["ckpt-00000005.safetensors", "ckpt-00000006.safetensors"]);
    }

    #[test]
    fn rejects_inconsistent_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let mut bad = sample(1);
        bad.tensors[1].1 = vec![4];
        let err = save(dir.path(), &bad, 0).unwrap_err();
        assert!(err.contains("tensor `bias` has shape [4] but 3 values"), "{err}");
        let mut twice = sample(1);
        twice.tensors[1].0 = "w2".into();
        assert!(save(dir.path(), &twice, 0).unwrap_err().contains("`w2` appears twice"));
        assert!(names(dir.path()).is_empty());
    }
}
