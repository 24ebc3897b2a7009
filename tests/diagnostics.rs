//! Malformed inputs: each must produce a diagnostic (never a panic) that points at the
//! source with a caret and says what was expected. The rendered text is snapshotted.

mod common;
use common::*;

/// Every `tests/malformed/*.tn` fixture, snapshotted by file name.
#[test]
fn malformed_fixtures() {
    let dir = repo().join("tests/malformed");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "tn"))
        .collect();
    files.sort();
    assert!(files.len() >= 40, "expected at least 40 fixtures, found {}", files.len());
    for f in files {
        let name = f.file_stem().unwrap().to_string_lossy().into_owned();
        let sets: Vec<String> = Vec::new();
        let rendered = relative(&expect_error(elaborate_path(&f, &sets)));
        assert!(rendered.contains("error"), "{name}: {rendered}");
        insta::assert_snapshot!(name, rendered);
    }
}

#[test]
fn cyclic_import() {
    let rendered = relative(&expect_error(elaborate_path(&repo().join("tests/malformed/cycle/a.tn"), &[])));
    insta::assert_snapshot!(rendered);
}

#[test]
fn empty_file() {
    insta::assert_snapshot!(expect_error(elaborate_text("empty.tn", "", &[])));
}

#[test]
fn non_utf8_bytes() {
    let dir = std::env::temp_dir().join(format!("tnc-nonutf8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("latin1.tn");
    std::fs::write(&path, b"model m() {\n  output loss = 1.0 // caf\xe9\n}\n").unwrap();
    let rendered = expect_error(elaborate_path(&path, &[])).replace(&dir.display().to_string(), "<tmp>");
    std::fs::remove_dir_all(&dir).unwrap();
    insta::assert_snapshot!(rendered);
}

#[test]
fn one_megabyte_of_open_parens() {
    let text = format!("model m() {{\n  x = {}\n}}\n", "(".repeat(1 << 20));
    let rendered = expect_error(elaborate_text("parens.tn", &text, &[]));
    assert!(rendered.contains("nested too deeply"), "{rendered}");
    insta::assert_snapshot!(rendered.lines().take(3).collect::<Vec<_>>().join("\n"));
}

#[test]
fn one_megabyte_of_garbage() {
    // Deterministic printable garbage (an LCG), not valid tnc.
    let mut state: u32 = 12345;
    let text: String = (0..(1 << 20))
        .map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (b' ' + ((state >> 16) % 95) as u8) as char
        })
        .collect();
    let rendered = expect_error(elaborate_text("garbage.tn", &text, &[]));
    assert!(rendered.contains("syntax error"), "{}", &rendered[..rendered.len().min(500)]);
}

#[test]
fn very_long_expression_chain() {
    let text = format!("model m() {{\n  x = 1.0{}\n  output loss = x\n}}\n", " + 1.0".repeat(100_000));
    let rendered = expect_error(elaborate_text("chain.tn", &text, &[]));
    assert!(rendered.contains("nested too deeply"), "{}", &rendered[..rendered.len().min(500)]);
}

#[test]
fn many_prefix_operators() {
    let text = format!("model m() {{\n  output loss = {}1.0\n}}\n", "-".repeat(100_000));
    let rendered = expect_error(elaborate_text("minus.tn", &text, &[]));
    assert!(rendered.contains("syntax error"), "{}", &rendered[..rendered.len().min(500)]);
}

fn t1() -> std::path::PathBuf {
    repo().join("models/transnormer_t1.tn")
}

#[test]
fn bad_set_unknown_name() {
    let rendered = relative(&expect_error(elaborate_path(&t1(), &["layres=2".into()])));
    insta::assert_snapshot!(rendered);
}

#[test]
fn bad_set_missing_value() {
    let rendered = relative(&expect_error(elaborate_path(&t1(), &["dim=".into()])));
    insta::assert_snapshot!(rendered);
}

#[test]
fn bad_set_no_equals() {
    let rendered = relative(&expect_error(elaborate_path(&t1(), &["dim".into()])));
    insta::assert_snapshot!(rendered);
}

#[test]
fn bad_set_unknown_function_argument() {
    let rendered = relative(&expect_error(elaborate_path(&t1(), &["srms_norm.epsilon=1e-6".into()])));
    insta::assert_snapshot!(rendered);
}

#[test]
fn bad_set_heads_do_not_divide_width() {
    let rendered = relative(&expect_error(elaborate_path(&t1(), &["heads=7".into()])));
    insta::assert_snapshot!(rendered);
}

/// Found by the fuzzer: a model tensor combined with a number inside an initializer
/// (`normal(dim * tokens)`), or picked by `where`, used to read the tensor's type from the
/// initializer's own graph and panic; it is the same clear error as any other use.
#[test]
fn model_tensors_in_initializer_arithmetic_are_an_error_not_a_panic() {
    for init in ["normal(dim * tokens)", "where(tokens > 0, 1.0, 2.0)", "where(true, tokens, 2.0)"] {
        let text = format!(
            "model m(dim = 4) {{\n  input tokens: i32[B, N]\n  param w: [dim] ~ {init}\n  output loss = sum(w)\n}}\n"
        );
        let rendered = expect_error(elaborate_text("init.tn", &text, &[]));
        assert!(rendered.contains("an initializer can only be computed from constants"), "{init}:\n{rendered}");
    }
}

/// A whole size written as a float (`--set dim=1e9`) is called a float, with the integer
/// to write instead (it used to read "must be a whole number, but this is 1000000000").
#[test]
fn a_whole_float_size_says_it_is_a_float() {
    let text = "model m(dim = 4) {\n  param w: [dim, 2]\n  output loss = sum(w)\n}\n";
    let rendered = expect_error(elaborate_text("f.tn", text, &["dim=1e9".to_string()]));
    assert!(rendered.contains("a size must be an integer, but this is the float 1000000000"), "{rendered}");
    assert!(rendered.contains("hint: write it as an integer: 1000000000"), "{rendered}");
    let rendered = expect_error(elaborate_text("f.tn", text, &["dim=2.5".to_string()]));
    assert!(rendered.contains("must be a whole number, but this is 2.5"), "{rendered}");
}

/// A missing `}` points at the bracket it should close: here the loop's, although the
/// model's `}` at the end makes the count come out one short only at the end of the file
/// (its indentation gives the loop's brace away).
#[test]
fn a_missing_brace_points_at_the_bracket_it_should_close() {
    let text = "model m() {\n  input x: [N, 4]\n  for i in 0..2 {\n    x = x * 2.0\n  output loss = sum(x)\n}\n";
    let rendered = expect_error(elaborate_text("brace.tn", text, &[]));
    assert!(rendered.contains("unexpected end of file"), "{rendered}");
    assert!(rendered.contains("3 │   for i in 0..2 {") && rendered.contains("this `{` is never closed"), "{rendered}");
    assert!(rendered.contains("hint: add the missing `}`"), "{rendered}");
    // With nothing closed at all, the innermost open bracket.
    let rendered = expect_error(elaborate_text("paren.tn", "model m() {\n  output loss = sum((1.0\n", &[]));
    assert!(rendered.contains("this `(` is never closed") && rendered.contains("add the missing `)`"), "{rendered}");
}

/// `--set f.arg=v` that no call takes from its default changes nothing, so an ablation
/// would compare a model with itself: an error at the `--set`, pointing at a call that
/// passes the argument itself; and for a function the model never calls.
#[test]
fn a_set_that_changes_nothing_is_an_error() {
    let path = repo().join("models/transnormer_t1.tn");
    let rendered = relative(&expect_error(elaborate_path(&path, &["norm_attention.phi=relu".into()])));
    assert!(rendered.contains("`--set norm_attention.phi` changes nothing"), "{rendered}");
    assert!(rendered.contains("every call of `norm_attention` passes `phi` itself"), "{rendered}");
    assert!(rendered.contains("this call passes `phi`"), "{rendered}");
    let rendered = relative(&expect_error(elaborate_path(&path, &["layer_norm.eps=0.1".into()])));
    assert!(rendered.contains("the model never calls `layer_norm`"), "{rendered}");
    // One that some call takes from its default is fine.
    let (_, g) = elaborate_path(&path, &["srms_norm.eps=1e-6".into()]);
    assert!(g.is_ok());
}
