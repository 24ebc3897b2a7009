//! Entry points' launches in `manifest.json` as runs: a block of launches repeated
//! `repeat` times, each launch's arguments advancing by its `stride` per repetition.
//!
//! The CPU cross-entropy sweeps the vocabulary in chunks of 1,024 words, each chunk the
//! same few kernels with its first word as a launch argument. Listed one by one, the
//! manifest grew with the vocabulary (T1 at vocab 2^24: 98,361 backward launches, 27 MB
//! of JSON); as runs it does not. In memory the entry points stay plain lists
//! ([`Manifest::entry_points`](crate::Manifest)): only the JSON form changes, so the
//! executor and every device are untouched.
//!
//! ```json
//! [{"kernel": 15, "buffers": [45, 91]},
//!  {"repeat": 16382, "steps": [{"kernel": 16, "buffers": [91, 1, 92], "args": [1024]}],
//!   "stride": [[1024]]}]
//! ```
//!
//! Reading expands at most [`MAX_LAUNCHES`] launches per entry point, so a manifest cannot
//! make the loader allocate without bound.

use crate::manifest::Step;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

/// The most launches one entry point may expand to (a vocabulary of 2^31 words is 12.6M).
pub const MAX_LAUNCHES: usize = 1 << 24;

/// Blocks longer than this are not looked for (the cross-entropy's are 1 to 3 launches).
const MAX_BLOCK: usize = 16;

/// A run is written only where it replaces at least this many launches.
const MIN_RUN: usize = 4;

#[derive(Serialize)]
#[serde(untagged)]
enum Item {
    Run(Run),
    Step(Step),
}

#[derive(Serialize)]
struct Run {
    repeat: u64,
    /// The first repetition.
    steps: Vec<Step>,
    /// Per launch of the block, what repetition `r` adds to each argument (`r · stride`).
    stride: Vec<Vec<i64>>,
}

/// An item as read: a launch (`kernel`, `buffers`, `args`) or a run (`repeat`, `steps`,
/// `stride`), told apart by `repeat`, so that an error names the field at fault (an
/// untagged enum would only say that nothing matched).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawItem {
    kernel: Option<usize>,
    buffers: Option<Vec<usize>>,
    #[serde(default)]
    args: Vec<i64>,
    repeat: Option<u64>,
    steps: Option<Vec<Step>>,
    stride: Option<Vec<Vec<i64>>>,
}

impl RawItem {
    fn item(self, name: &str, i: usize) -> Result<Item, String> {
        let at = |what: &str| format!("entry `{name}` item {i}: {what}");
        match self {
            RawItem {
                repeat: Some(repeat),
                steps: Some(steps),
                stride: Some(stride),
                kernel: None,
                buffers: None,
                args,
            } if args.is_empty() => Ok(Item::Run(Run { repeat, steps, stride })),
            RawItem { repeat: Some(_), .. } => Err(at("a run has `repeat`, `steps` and `stride` and nothing else")),
            RawItem { steps: Some(_), .. } | RawItem { stride: Some(_), .. } => {
                Err(at("`steps` and `stride` belong to a run, which needs `repeat`"))
            }
            RawItem { kernel: Some(kernel), buffers: Some(buffers), args, .. } => {
                Ok(Item::Step(Step { kernel, buffers, args }))
            }
            RawItem { kernel: None, .. } => Err(at("missing field `kernel`")),
            RawItem { buffers: None, .. } => Err(at("missing field `buffers`")),
        }
    }
}

/// The strides that make `later` repetition `r` of `first`, if it is one.
fn stride_between(first: &Step, later: &Step) -> Option<Vec<i64>> {
    if first.kernel != later.kernel || first.buffers != later.buffers || first.args.len() != later.args.len() {
        return None;
    }
    first.args.iter().zip(&later.args).map(|(a, b)| b.checked_sub(*a)).collect()
}

/// Repetition `r` of `step` under `stride`, or `None` on overflow.
fn repeated(step: &Step, stride: &[i64], r: i64) -> Option<Step> {
    let args = step.args.iter().zip(stride).map(|(a, s)| s.checked_mul(r)?.checked_add(*a)).collect::<Option<_>>()?;
    Some(Step { kernel: step.kernel, buffers: step.buffers.clone(), args })
}

/// How many times `steps[..len]` repeats from the start of `steps` (at least 1), and the
/// strides of its launches.
fn repetitions(steps: &[Step], len: usize) -> (usize, Vec<Vec<i64>>) {
    let block = &steps[..len];
    let Some(stride) = block.iter().zip(&steps[len..]).map(|(a, b)| stride_between(a, b)).collect::<Option<Vec<_>>>()
    else {
        return (1, Vec::new());
    };
    if stride.len() < len {
        return (1, Vec::new());
    }
    let mut reps = 1;
    'next: while (reps + 1) * len <= steps.len() {
        for (j, (step, s)) in block.iter().zip(&stride).enumerate() {
            if repeated(step, s, reps as i64).as_ref() != Some(&steps[reps * len + j]) {
                break 'next;
            }
        }
        reps += 1;
    }
    (reps, stride)
}

fn compress(steps: &[Step]) -> Vec<Item> {
    let mut items = Vec::new();
    let mut i = 0;
    while i < steps.len() {
        let rest = &steps[i..];
        let best = (1..=MAX_BLOCK.min(rest.len() / 2))
            .map(|len| (len, repetitions(rest, len)))
            .filter(|(len, (reps, _))| *reps >= 2 && len * reps >= MIN_RUN)
            .max_by_key(|(len, (reps, _))| (len * reps, std::cmp::Reverse(*len)));
        match best {
            Some((len, (reps, stride))) => {
                items.push(Item::Run(Run { repeat: reps as u64, steps: rest[..len].to_vec(), stride }));
                i += len * reps;
            }
            None => {
                items.push(Item::Step(rest[0].clone()));
                i += 1;
            }
        }
    }
    items
}

fn expand(name: &str, items: Vec<Item>) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    let too_many = || format!("entry `{name}` expands to more than {MAX_LAUNCHES} launches");
    for item in items {
        match item {
            Item::Step(s) => steps.push(s),
            Item::Run(run) => {
                if run.stride.len() != run.steps.len() {
                    return Err(format!(
                        "entry `{name}`: a run of {} launches has {} strides",
                        run.steps.len(),
                        run.stride.len()
                    ));
                }
                if let Some((s, st)) = run.steps.iter().zip(&run.stride).find(|(s, st)| s.args.len() != st.len()) {
                    return Err(format!(
                        "entry `{name}`: a run's launch of kernel {} has {} arguments and {} strides",
                        s.kernel,
                        s.args.len(),
                        st.len()
                    ));
                }
                let total = usize::try_from(run.repeat)
                    .ok()
                    .and_then(|r| r.checked_mul(run.steps.len()))
                    .and_then(|n| n.checked_add(steps.len()))
                    .filter(|&n| n <= MAX_LAUNCHES)
                    .ok_or_else(too_many)?;
                steps.reserve(total - steps.len());
                for r in 0..run.repeat as i64 {
                    for (s, st) in run.steps.iter().zip(&run.stride) {
                        let step = repeated(s, st, r)
                            .ok_or_else(|| format!("entry `{name}`: a run's launch arguments overflow 64 bits"))?;
                        steps.push(step);
                    }
                }
            }
        }
        if steps.len() > MAX_LAUNCHES {
            return Err(too_many());
        }
    }
    Ok(steps)
}

pub fn serialize<S: Serializer>(entries: &BTreeMap<String, Vec<Step>>, s: S) -> Result<S::Ok, S::Error> {
    let runs: BTreeMap<&String, Vec<Item>> = entries.iter().map(|(k, v)| (k, compress(v))).collect();
    runs.serialize(s)
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Vec<Step>>, D::Error> {
    let raw = BTreeMap::<String, Vec<RawItem>>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            let items = v.into_iter().enumerate().map(|(i, r)| r.item(&k, i)).collect::<Result<Vec<_>, _>>();
            items.and_then(|items| expand(&k, items)).map(|s| (k, s)).map_err(D::Error::custom)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(kernel: usize, args: &[i64]) -> Step {
        Step { kernel, buffers: vec![kernel, 7], args: args.to_vec() }
    }

    fn round_trip(steps: &[Step]) -> (Vec<Step>, String) {
        let map = BTreeMap::from([("backward".to_string(), steps.to_vec())]);
        let mut json = Vec::new();
        serialize(&map, &mut serde_json::Serializer::new(&mut json)).unwrap();
        let json = String::from_utf8(json).unwrap();
        let back = deserialize(&mut serde_json::Deserializer::from_str(&json)).unwrap();
        (back["backward"].clone(), json)
    }

    /// The cross-entropy's pattern: a first chunk, 1,000 middle chunks of the same two
    /// kernels with the word advancing by 1,024, a last chunk of another kernel.
    #[test]
    fn chunked_launches_round_trip_as_one_run() {
        let mut steps = vec![step(1, &[]), step(2, &[0]), step(3, &[0])];
        for c in 1..=1000 {
            steps.extend([step(2, &[c * 1024]), step(4, &[c * 1024])]);
        }
        steps.push(step(5, &[1001 * 1024]));
        let (back, json) = round_trip(&steps);
        assert_eq!(back, steps);
        assert_eq!(json.matches("\"repeat\":1000").count(), 1, "{json}");
        assert!(json.len() < 400, "{} bytes: {json}", json.len());
    }

    #[test]
    fn launches_that_do_not_repeat_are_listed_as_before() {
        let steps = vec![step(1, &[]), step(2, &[3]), step(1, &[]), step(3, &[])];
        let (back, json) = round_trip(&steps);
        assert_eq!(back, steps);
        assert!(!json.contains("repeat"), "{json}");
        // A manifest written before runs existed reads unchanged.
        let old = r#"{"backward": [{"kernel": 1, "buffers": [1, 7]}, {"kernel": 2, "buffers": [2, 7], "args": [3]}]}"#;
        let read = deserialize(&mut serde_json::Deserializer::from_str(old)).unwrap();
        assert_eq!(read["backward"], steps[..2]);
    }

    #[test]
    fn runs_that_expand_too_far_or_overflow_are_errors() {
        let read = |json: &str| deserialize(&mut serde_json::Deserializer::from_str(json)).map(|_| ());
        let huge =
            r#"{"f": [{"repeat": 18446744073709551615, "steps": [{"kernel": 0, "buffers": []}], "stride": [[]]}]}"#;
        let e = read(huge).unwrap_err().to_string();
        assert!(e.contains("entry `f` expands to more than 16777216 launches"), "{e}");
        let overflow = r#"{"f": [{"repeat": 3, "steps": [{"kernel": 0, "buffers": [], "args": [1]}], "stride": [[9223372036854775807]]}]}"#;
        let e = read(overflow).unwrap_err().to_string();
        assert!(e.contains("overflow 64 bits"), "{e}");
        let mismatched =
            r#"{"f": [{"repeat": 3, "steps": [{"kernel": 0, "buffers": [], "args": [1]}], "stride": [[]]}]}"#;
        let e = read(mismatched).unwrap_err().to_string();
        assert!(e.contains("has 1 arguments and 0 strides"), "{e}");
        let e = read(r#"{"f": [{"buffers": [1]}]}"#).unwrap_err().to_string();
        assert!(e.contains("entry `f` item 0: missing field `kernel`"), "{e}");
        let e = read(r#"{"f": [{"kernel": 1, "buffers": [], "stride": []}]}"#).unwrap_err().to_string();
        assert!(e.contains("`steps` and `stride` belong to a run"), "{e}");
    }
}
