//! The check every run makes of an integer input that indexes tables (a token id: an
//! embedding row, a word of the cross-entropy's vocabulary) before computing anything,
//! shared by the bundle executors and the compiler's interpreter. The compiler finds the
//! bounds (`tnc_compiler::ir::index_bounds`) and writes them into the manifest
//! (`IoEntry::bounds`); kernels themselves do not check indices.

/// The first value of `values` (an input's, in order) outside `0..bound` for a bound of
/// `bounds` (evaluated), as an error saying the value, where it is and the bound (the
/// caller names the input).
pub fn check_values(values: impl Iterator<Item = i64>, bounds: &[i64]) -> Result<(), String> {
    let Some(&limit) = bounds.iter().min() else { return Ok(()) };
    for (i, v) in values.enumerate() {
        if v < 0 || v >= limit {
            return Err(format!(
                "holds {v} at flat index {i}, outside 0..{limit} (it indexes a table of {limit} rows)"
            ));
        }
    }
    Ok(())
}
