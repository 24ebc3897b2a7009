//! Fuzz targets for everything tnc reads from disk besides model files (those are in
//! `fuzz_frontend.rs`): a bundle's manifest, a training checkpoint, a parameter file.
//! Each target takes bytes and must answer with a value or an error, never a panic, an
//! overflow or an allocation that aborts.
//!
//! The machines have stable Rust only, so cargo-fuzz (its sanitizers need nightly) is out;
//! these are proptest-driven targets, run as ordinary tests with a bounded number of cases
//! (CI runs them on every push). Inputs are mutations of seeds: the files of a tiny
//! training bundle compiled now, and the committed corpus in `tests/fuzz/<target>/`. The
//! mutations are byte-level (flips, truncation, splices) and structure-aware: the JSON of a
//! manifest or of a safetensors header is parsed, one node is changed (a number to a
//! boundary value, a key deleted, an array element dropped or repeated), and the file is
//! put back together with its length prefix and checksum made right again, so that the
//! mutation reaches the checks behind the checksums.
//!
//! Every input that ever crashed a target is kept in `tests/fuzz/<target>/` and replayed
//! first (`crash-*` files, each named for what it broke).
//!
//! The manifest target stops before launching kernels: a manifest that passes its
//! checksum is the compiler's output, and the generated code trusts its buffer sizes
//! (the checksum guards against damage, not against a hand-edited manifest).

mod common;
use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;
use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use tnc_runtime::manifest::{write_manifest_bytes, MANIFEST_CHECKSUM_FILE, MANIFEST_FILE};
use tnc_runtime::{Bundle, Executor};
use tnc_train::checkpoint::{self, Checkpoint};

const SETS: [&str; 6] = ["vocab=16", "dim=8", "heads=2", "layers=1", "glu_dim=12", "block=4"];

/// Cases per target per test run; about 5 s each on the 2-core development machine.
const CASES: u32 = 1500;

/// The tiny CPU training bundle every target starts from, compiled once per process.
fn seed_bundle() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let sets: Vec<String> = SETS.iter().map(|s| s.to_string()).collect();
        let (sources, g) = elaborate_path(&repo().join("models/tasks/mqar_t2.tn"), &sets);
        let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
        let d = std::env::temp_dir().join(format!("tnc-fuzz-seed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let opts = tnc_compiler::driver::Options { train: true, ..Default::default() };
        tnc_compiler::driver::compile(g, "native", &d, opts, Vec::new()).unwrap();
        d
    })
    .clone()
}

/// A runner for `CASES` cases; a failure is shrunk and reported, and not written to a
/// `proptest-regressions` file (crashes become committed fixtures instead).
fn runner() -> TestRunner {
    TestRunner::new(Config { cases: CASES, failure_persistence: None, ..Config::default() })
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = repo().join("tests/fuzz").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Mutations

/// Numbers that break arithmetic: signs, zero, the edges of i32/i64/u64, a float where an
/// integer belongs.
const BOUNDARY: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "7",
    "64",
    "65536",
    "2147483647",
    "-2147483648",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "1e300",
    "-0.5",
];

#[derive(Debug, Clone)]
enum JsonEdit {
    /// The `at`-th number (pre-order) becomes a boundary value.
    Number { at: usize, value: usize },
    /// The `at`-th string becomes another string of the document, or empty.
    Text { at: usize, other: usize },
    /// One member of the `at`-th object or element of the `at`-th array is removed.
    Remove { at: usize, which: usize },
    /// One element of the `at`-th array is repeated.
    Repeat { at: usize, which: usize },
    /// The `at`-th array or object is emptied.
    Empty { at: usize },
}

fn json_edit() -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        4 => (any::<usize>(), 0..BOUNDARY.len()).prop_map(|(at, value)| JsonEdit::Number { at, value }),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(at, other)| JsonEdit::Text { at, other }),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(at, which)| JsonEdit::Remove { at, which }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(at, which)| JsonEdit::Repeat { at, which }),
        1 => any::<usize>().prop_map(|at| JsonEdit::Empty { at }),
    ]
}

/// Every node of `v` in pre-order that `keep` selects, as mutable references, visited by
/// `f` with its index among the selected ones.
fn visit(v: &mut Value, keep: &dyn Fn(&Value) -> bool, f: &mut dyn FnMut(usize, &mut Value), count: &mut usize) {
    if keep(v) {
        f(*count, v);
        *count += 1;
    }
    match v {
        Value::Array(a) => a.iter_mut().for_each(|x| visit(x, keep, f, count)),
        Value::Object(o) => o.values_mut().for_each(|x| visit(x, keep, f, count)),
        _ => {}
    }
}

fn count(v: &Value, keep: &dyn Fn(&Value) -> bool) -> usize {
    let mut n = 0;
    visit(&mut v.clone(), keep, &mut |_, _| {}, &mut n);
    n
}

/// Applies `edit` to the `at % count`-th selected node.
fn on_nth(v: &mut Value, keep: &dyn Fn(&Value) -> bool, at: usize, f: &mut dyn FnMut(&mut Value)) {
    let n = count(v, keep);
    if n == 0 {
        return;
    }
    let target = at % n;
    visit(
        v,
        keep,
        &mut |i, x| {
            if i == target {
                f(x)
            }
        },
        &mut 0,
    );
}

fn apply_json(v: &mut Value, e: &JsonEdit) {
    let container = |x: &Value| x.is_array() || x.is_object();
    match *e {
        JsonEdit::Number { at, value } => {
            let new: Value = serde_json::from_str(BOUNDARY[value]).unwrap();
            on_nth(v, &|x| x.is_number(), at, &mut |x| *x = new.clone());
        }
        JsonEdit::Text { at, other } => {
            let mut texts = vec![String::new()];
            visit(v, &|x| x.is_string(), &mut |_, x| texts.push(x.as_str().unwrap().to_string()), &mut 0);
            let new = texts[other % texts.len()].clone();
            on_nth(v, &|x| x.is_string(), at, &mut |x| *x = Value::String(new.clone()));
        }
        JsonEdit::Remove { at, which } => on_nth(v, &container, at, &mut |x| match x {
            Value::Array(a) if !a.is_empty() => {
                a.remove(which % a.len());
            }
            Value::Object(o) if !o.is_empty() => {
                let key = o.keys().nth(which % o.len()).unwrap().clone();
                o.remove(&key);
            }
            _ => {}
        }),
        JsonEdit::Repeat { at, which } => on_nth(v, &|x| x.is_array(), at, &mut |x| {
            if let Value::Array(a) = x {
                if !a.is_empty() {
                    let i = which % a.len();
                    a.insert(i, a[i].clone());
                }
            }
        }),
        JsonEdit::Empty { at } => on_nth(v, &container, at, &mut |x| match x {
            Value::Array(a) => a.clear(),
            Value::Object(o) => o.clear(),
            _ => {}
        }),
    }
}

#[derive(Debug, Clone)]
enum ByteEdit {
    Flip { at: usize, bit: u8 },
    Truncate { at: usize },
    Delete { at: usize, len: usize },
    Duplicate { at: usize, len: usize },
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| ByteEdit::Flip { at, bit }),
        any::<usize>().prop_map(|at| ByteEdit::Truncate { at }),
        (any::<usize>(), 1usize..64).prop_map(|(at, len)| ByteEdit::Delete { at, len }),
        (any::<usize>(), 1usize..64).prop_map(|(at, len)| ByteEdit::Duplicate { at, len }),
    ]
}

fn apply_bytes(b: &mut Vec<u8>, e: &ByteEdit) {
    if b.is_empty() {
        return;
    }
    let n = b.len();
    match *e {
        ByteEdit::Flip { at, bit } => b[at % n] ^= 1 << bit,
        ByteEdit::Truncate { at } => b.truncate(at % n),
        ByteEdit::Delete { at, len } => {
            let a = at % n;
            b.drain(a..(a + len).min(n));
        }
        ByteEdit::Duplicate { at, len } => {
            let a = at % n;
            let piece = b[a..(a + len).min(n)].to_vec();
            b.splice(a..a, piece);
        }
    }
}

/// A mutation: some byte edits (applied to the raw file) or some JSON edits (applied to
/// its JSON, after which the file is made consistent again).
#[derive(Debug, Clone)]
enum Mutation {
    Bytes(Vec<ByteEdit>),
    Json(Vec<JsonEdit>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => prop::collection::vec(byte_edit(), 1..4).prop_map(Mutation::Bytes),
        3 => prop::collection::vec(json_edit(), 1..4).prop_map(Mutation::Json),
    ]
}

/// A safetensors file's JSON header, edited, with the length prefix and the 8-byte
/// alignment the format wants.
fn edit_safetensors_header(bytes: &[u8], edits: &[JsonEdit]) -> Vec<u8> {
    let Some(len) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize) else {
        return bytes.to_vec();
    };
    let Some(header) = bytes.get(8..8usize.saturating_add(len)) else { return bytes.to_vec() };
    let Ok(mut v) = serde_json::from_slice::<Value>(header) else { return bytes.to_vec() };
    edits.iter().for_each(|e| apply_json(&mut v, e));
    let mut text = serde_json::to_vec(&v).unwrap();
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + len..]);
    out
}

// ---------------------------------------------------------------------------------------
// Target: a bundle's manifest

/// A bundle directory holding the seed bundle's kernels and `manifest` (with a matching
/// `manifest.sha256`); loaded, and where it loads, given an executor, parameters and sizes.
fn manifest_target(scratch: &Path, manifest: &[u8]) -> Result<(), String> {
    write_manifest_bytes(scratch, manifest).unwrap();
    let bundle = Bundle::load(scratch).map_err(|e| e.to_string())?;
    let mut ex = Executor::cpu(&bundle, 1).map_err(|e| e.to_string())?;
    ex.set_params_from_seed(1).map_err(|e| e.to_string())?;
    let names: Vec<String> = ex.manifest().sizes.clone();
    let sizes: Vec<(&str, i64)> = names.iter().map(|s| (s.as_str(), 4)).collect();
    ex.set_sizes(&sizes).map_err(|e| e.to_string())?;
    let _ = bundle.manifest.bytes_at(&sizes.iter().copied().collect());
    Ok(())
}

fn manifest_scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("tnc-fuzz-manifest-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    // Everything but the manifest: the kernels and any baked initial values.
    for entry in std::fs::read_dir(seed_bundle()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if name != MANIFEST_FILE && name != MANIFEST_CHECKSUM_FILE {
            std::fs::copy(&path, d.join(name)).unwrap();
        }
    }
    d
}

fn mutate_manifest(seed: &[u8], m: &Mutation) -> Vec<u8> {
    match m {
        Mutation::Bytes(edits) => {
            let mut b = seed.to_vec();
            edits.iter().for_each(|e| apply_bytes(&mut b, e));
            b
        }
        Mutation::Json(edits) => match serde_json::from_slice::<Value>(seed) {
            Ok(mut v) => {
                edits.iter().for_each(|e| apply_json(&mut v, e));
                serde_json::to_vec(&v).unwrap()
            }
            Err(_) => seed.to_vec(),
        },
    }
}

/// The manifest with every launch of every entry point written as a run of one
/// repetition (the tiny vocabulary has no chunks to repeat), so the mutations reach the
/// runs' reader (`bundle/src/launch_runs.rs`) too.
fn with_runs(manifest: &[u8]) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(manifest).unwrap();
    for (_, steps) in v["entry_points"].as_object_mut().unwrap() {
        for step in steps.as_array_mut().unwrap() {
            if step.get("repeat").is_none() {
                let args = step.get("args").and_then(Value::as_array).map_or(0, Vec::len);
                let stride = vec![Value::from(7); args];
                *step = serde_json::json!({ "repeat": 1, "steps": [step.clone()], "stride": [stride] });
            }
        }
    }
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn manifests_load_or_are_refused_never_panic() {
    let scratch = manifest_scratch();
    let live = std::fs::read(seed_bundle().join(MANIFEST_FILE)).unwrap();
    // The seed itself loads: the target is not refusing everything.
    manifest_target(&scratch, &live).unwrap();
    for (name, bytes) in corpus("manifest") {
        eprintln!("manifest corpus {name}: {:?}", manifest_target(&scratch, &bytes).err());
    }
    let runs = with_runs(&live);
    manifest_target(&scratch, &runs).unwrap();
    let seeds: Vec<Vec<u8>> = [live, runs].into_iter().chain(corpus("manifest").into_iter().map(|(_, b)| b)).collect();
    let (loaded, refused) = (Cell::new(0u32), Cell::new(0u32));
    runner()
        .run(&(0..seeds.len(), mutation()), |(i, m)| {
            match manifest_target(&scratch, &mutate_manifest(&seeds[i], &m)) {
                Ok(()) => loaded.set(loaded.get() + 1),
                Err(_) => refused.set(refused.get() + 1),
            }
            Ok(())
        })
        .unwrap();
    let (loaded, refused) = (loaded.get(), refused.get());
    eprintln!("manifest: {} executions, {loaded} loaded, {refused} refused", loaded + refused);
    assert!(loaded > 0 && refused > 0, "the mutations reach both outcomes ({loaded} loaded, {refused} refused)");
}

// ---------------------------------------------------------------------------------------
// Target: a training checkpoint

/// A checkpoint of the seed bundle: parameters from seed 5 and moments of 0.5.
fn seed_checkpoint(ex: &Executor) -> Checkpoint {
    let mut tensors = Vec::new();
    for p in &ex.manifest().params {
        let shape: Vec<usize> = p.shape.iter().map(|&d| d as usize).collect();
        tensors.push((p.name.clone(), shape.clone(), ex.param(&p.name).unwrap().as_f32().unwrap().to_vec()));
        if p.trainable {
            let n = shape.iter().product();
            for moment in ["adam_m", "adam_v"] {
                tensors.push((format!("{moment}.{}", p.name), shape.clone(), vec![0.5; n]));
            }
        }
    }
    let meta = [("config".to_string(), "{\"steps\":3}".to_string())].into();
    Checkpoint { step: 3, data_position: 3, rng: 7, threads: 1, tensors, meta }
}

/// Decoded and, where it decodes, restored into the seed bundle's executor.
fn checkpoint_target(ex: &mut Executor, trainable: &[String], bytes: &[u8]) -> Result<(), String> {
    let ckpt = checkpoint::decode(bytes)?;
    tnc_train::trainer::restore(ex, &ckpt, trainable)
}

/// Byte edits hit the raw file (mostly caught by the checksum); JSON edits go to the
/// safetensors header, and half of them are then re-sealed: decoded as far as possible,
/// the checksum recomputed, so that the edit reaches `restore`.
fn mutate_checkpoint(seed: &[u8], m: &Mutation, reseal: bool) -> Vec<u8> {
    match m {
        Mutation::Bytes(edits) => {
            let mut b = seed.to_vec();
            edits.iter().for_each(|e| apply_bytes(&mut b, e));
            b
        }
        Mutation::Json(edits) if !reseal => edit_safetensors_header(seed, edits),
        Mutation::Json(edits) => {
            // Edit the checkpoint's own structure (its tensor list and metadata) and write it
            // again, so the file is sealed with a correct checksum.
            let Ok(mut ckpt) = checkpoint::decode(seed) else { return seed.to_vec() };
            let mut v = serde_json::json!({
                "tensors": ckpt.tensors.iter().map(|(n, s, _)| serde_json::json!([n, s])).collect::<Vec<_>>(),
                "meta": ckpt.meta,
                "step": ckpt.step,
            });
            edits.iter().for_each(|e| apply_json(&mut v, e));
            let values: std::collections::HashMap<String, Vec<f32>> =
                ckpt.tensors.drain(..).map(|(n, _, vals)| (n, vals)).collect();
            let listed = v["tensors"].as_array().cloned().unwrap_or_default();
            for t in listed {
                let name = t[0].as_str().unwrap_or("").to_string();
                let shape: Vec<usize> = t[1]
                    .as_array()
                    .map(|a| a.iter().filter_map(|d| d.as_u64()).map(|d| d.min(1 << 20) as usize).collect())
                    .unwrap_or_default();
                // The values keep their count where the shape allows, else fill the shape.
                let n: usize = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).unwrap_or(0).min(1 << 20);
                let mut vals = values.get(&name).cloned().unwrap_or_default();
                vals.resize(n, 0.25);
                ckpt.tensors.push((name, shape, vals));
            }
            ckpt.step = v["step"].as_u64().unwrap_or(0);
            checkpoint::encode(&ckpt).unwrap_or_else(|_| seed.to_vec())
        }
    }
}

#[test]
fn checkpoints_restore_or_are_refused_never_panic() {
    let bundle = Bundle::load(seed_bundle()).unwrap();
    let mut ex = Executor::cpu(&bundle, 1).unwrap();
    ex.set_params_from_seed(5).unwrap();
    let trainable: Vec<String> = ex.manifest().params.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect();
    let live = checkpoint::encode(&seed_checkpoint(&ex)).unwrap();
    checkpoint_target(&mut ex, &trainable, &live).unwrap();
    for (name, bytes) in corpus("checkpoint") {
        eprintln!("checkpoint corpus {name}: {:?}", checkpoint_target(&mut ex, &trainable, &bytes).err());
    }
    let seeds: Vec<Vec<u8>> = std::iter::once(live).chain(corpus("checkpoint").into_iter().map(|(_, b)| b)).collect();
    let (restored, refused) = (Cell::new(0u32), Cell::new(0u32));
    let ex = RefCell::new(ex);
    runner()
        .run(&(0..seeds.len(), mutation(), any::<bool>()), |(i, m, reseal)| {
            match checkpoint_target(&mut ex.borrow_mut(), &trainable, &mutate_checkpoint(&seeds[i], &m, reseal)) {
                Ok(()) => restored.set(restored.get() + 1),
                Err(_) => refused.set(refused.get() + 1),
            }
            Ok(())
        })
        .unwrap();
    let (restored, refused) = (restored.get(), refused.get());
    eprintln!("checkpoint: {} executions, {restored} restored, {refused} refused", restored + refused);
    assert!(restored > 0 && refused > 0, "the mutations reach both outcomes ({restored} restored, {refused} refused)");
}

// ---------------------------------------------------------------------------------------
// Target: a parameter file (`--init-from`, `tnc run --params`)

#[test]
fn parameter_files_load_or_are_refused_never_panic() {
    let bundle = Bundle::load(seed_bundle()).unwrap();
    let mut ex = Executor::cpu(&bundle, 1).unwrap();
    ex.set_params_from_seed(5).unwrap();
    let file = std::env::temp_dir().join(format!("tnc-fuzz-params-{}.safetensors", std::process::id()));
    ex.save_params(&file).unwrap();
    let live = std::fs::read(&file).unwrap();
    ex.set_params_from_bytes(&live, "seed").unwrap();
    for (name, bytes) in corpus("params") {
        eprintln!("params corpus {name}: {:?}", ex.set_params_from_bytes(&bytes, &name).err());
    }
    let seeds: Vec<Vec<u8>> = std::iter::once(live).chain(corpus("params").into_iter().map(|(_, b)| b)).collect();
    let (loaded, refused) = (Cell::new(0u32), Cell::new(0u32));
    let ex = RefCell::new(ex);
    runner()
        .run(&(0..seeds.len(), mutation()), |(i, m)| {
            let bytes = match &m {
                Mutation::Bytes(edits) => {
                    let mut b = seeds[i].clone();
                    edits.iter().for_each(|e| apply_bytes(&mut b, e));
                    b
                }
                Mutation::Json(edits) => edit_safetensors_header(&seeds[i], edits),
            };
            match ex.borrow_mut().set_params_from_bytes(&bytes, "fuzz") {
                Ok(()) => loaded.set(loaded.get() + 1),
                Err(_) => refused.set(refused.get() + 1),
            }
            Ok(())
        })
        .unwrap();
    let (loaded, refused) = (loaded.get(), refused.get());
    eprintln!("params: {} executions, {loaded} loaded, {refused} refused", loaded + refused);
    assert!(loaded > 0 && refused > 0, "the mutations reach both outcomes ({loaded} loaded, {refused} refused)");
}
