//! `tnc run` and `tnc init`: the interpreter from the command line, and the joint
//! forward+backward graph after `autodiff`.

mod common;
use common::*;
use std::process::Command;
use tnc_compiler::interp::{read_safetensors, write_safetensors, FileDType, Tensor};
use tnc_compiler::ir::print::to_text;

const TINY: &[&str] =
    &["--set", "vocab=32", "--set", "dim=16", "--set", "heads=2", "--set", "layers=2", "--set", "glu_dim=24"];

fn tnc(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tnc")).args(args).current_dir(repo()).output().expect("tnc runs");
    (
        out.status.code().expect("exited normally"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("tnc-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tokens(b: usize, n: usize, vocab: usize) -> Tensor {
    Tensor::new(vec![b, n], (0..b * n).map(|i| ((i * 7 + 3) % vocab) as f64).collect()).unwrap()
}

#[test]
fn run_with_grad_matches_init_then_run() {
    let s = Scratch::new("run");
    write_safetensors(s.path("in.st").as_ref(), &[("tokens".into(), &tokens(2, 9, 32))], FileDType::I32).unwrap();
    let model = "models/tnl.tn";
    let mut args = vec!["init", model, "--seed", "5", "--dtype", "f64", "--out"];
    let params = s.path("params.st");
    args.push(&params);
    args.extend(TINY);
    let (code, _, err) = tnc(&args);
    assert_eq!(code, 0, "{err}");

    let run = |extra: &[&str], out: &str| {
        let mut a = vec!["run", model, "--inputs"];
        let inp = s.path("in.st");
        a.push(&inp);
        a.extend(["--out", out, "--grad", "--dtype", "f64"]);
        a.extend(extra);
        a.extend(TINY);
        let (code, stdout, err) = tnc(&a);
        assert_eq!(code, 0, "{err}");
        assert!(stdout.contains("loss = "), "{stdout}");
        read_safetensors(out.as_ref()).unwrap()
    };
    let from_seed = run(&["--seed", "5"], &s.path("a.st"));
    let from_file = run(&["--params", &params], &s.path("b.st"));
    assert_eq!(from_seed.len(), from_file.len());
    let (_, g) =
        elaborate_path(&repo().join(model), &TINY.iter().skip(1).step_by(2).map(|s| s.to_string()).collect::<Vec<_>>());
    let g = g.unwrap();
    let trainable = g.params.iter().filter(|p| p.trainable).count();
    assert_eq!(from_seed.len(), 1 + trainable, "loss and one gradient per trainable parameter");
    for ((na, ta), (nb, tb)) in from_seed.iter().zip(&from_file) {
        assert_eq!(na, nb);
        assert_eq!(ta, tb, "{na}: f64 parameters written and read back give identical results");
    }
    let loss = &from_seed.iter().find(|(n, _)| n == "loss").unwrap().1;
    // A freshly initialized LM predicts roughly uniformly over 32 tokens.
    assert!((loss.data[0] - (32f64).ln()).abs() < 0.5, "loss {}", loss.data[0]);
    assert!(from_seed.iter().any(|(n, _)| n == "grad.layers.1.attn.wq"));
}

#[test]
fn missing_and_misshapen_inputs_are_named() {
    let s = Scratch::new("bad-inputs");
    let bad = Tensor::new(vec![2, 3, 4], vec![1.0; 24]).unwrap();
    write_safetensors(s.path("wrong_rank.st").as_ref(), &[("tokens".into(), &bad)], FileDType::I32).unwrap();
    write_safetensors(s.path("wrong_name.st").as_ref(), &[("tokenz".into(), &tokens(1, 4, 32))], FileDType::I32)
        .unwrap();
    let run = |inputs: &str| {
        let mut a = vec!["run", "models/transnormer_t1.tn", "--inputs", inputs, "--out"];
        let out = s.path("o.st");
        a.push(&out);
        a.extend(TINY);
        a.extend(["--set", "block=4"]);
        tnc(&a)
    };
    let (code, _, err) = run(&s.path("wrong_name.st"));
    assert_eq!(code, 1);
    assert!(err.contains("missing input `tokens` (i32[B, N])"), "{err}");
    let (code, _, err) = run(&s.path("wrong_rank.st"));
    assert_eq!(code, 1);
    assert!(err.contains("tokens") && err.contains("[B, N]") && err.contains("[2, 3, 4]"), "{err}");
    let (code, _, err) = run(&s.path("does_not_exist.st"));
    assert_eq!(code, 1);
    assert!(err.contains("does_not_exist.st"), "{err}");
}

/// Inputs a run cannot honour are refused, by the interpreter and by a compiled bundle
/// alike: tokens that are not integers (1.5 was once truncated to 1, NaN to 0), an empty
/// batch (its loss was NaN, exit 0), a tensor the model has no input for, and `--grad` on
/// a bundle without a backward pass (it was ignored).
#[test]
fn inputs_a_run_cannot_honour_are_refused() {
    let s = Scratch::new("refused-inputs");
    let model = "models/tnl.tn";
    let bundle = s.path("b.tnb");
    let next = s.path("next.tnb");
    for (out, extra) in [(&bundle, None), (&next, Some("--next-token"))] {
        let mut a = vec!["compile", model, "--target", "native", "-o", out];
        a.extend(TINY);
        a.extend(extra);
        let (code, _, err) = tnc(&a);
        assert_eq!(code, 0, "{err}");
    }
    let half = Tensor::new(vec![1, 4], vec![1.5, 2.0, 3.0, 4.0]).unwrap();
    write_safetensors(s.path("half.st").as_ref(), &[("tokens".into(), &half)], FileDType::F32).unwrap();
    let empty = Tensor::new(vec![0, 16], vec![]).unwrap();
    write_safetensors(s.path("empty.st").as_ref(), &[("tokens".into(), &empty)], FileDType::I32).unwrap();
    let extra = [("tokens".to_string(), &tokens(1, 4, 32)), ("labels".to_string(), &tokens(1, 4, 32))];
    write_safetensors(s.path("extra.st").as_ref(), &extra, FileDType::I32).unwrap();
    write_safetensors(s.path("ok.st").as_ref(), &[("tokens".into(), &tokens(1, 4, 32))], FileDType::I32).unwrap();
    let run = |what: &str, inputs: &str, extra: &[&str]| {
        let (i, o) = (s.path(inputs), s.path("o.st"));
        let mut a = vec!["run", what, "--inputs", &i, "--out", &o];
        if what == model {
            a.extend(TINY);
        }
        a.extend(extra);
        tnc(&a)
    };
    for (what, inputs, want) in [
        (&bundle, "half.st", "input `tokens` holds 1.5, not an i32"),
        (&bundle, "empty.st", "input `tokens` is empty (shape [0, 16])"),
        (&bundle, "extra.st", "the bundle has no input `labels`"),
        (&model.to_string(), "half.st", "input `tokens` must hold integers"),
        (&model.to_string(), "empty.st", "input `tokens` is empty (shape [0, 16]"),
    ] {
        let (code, _, err) = run(what, inputs, &[]);
        assert_eq!(code, 1, "{what} {inputs}: {err}");
        assert!(err.contains(want), "{what} {inputs}: {err}");
    }
    // Integer parameters: refused by the compiled model and by the interpreter alike.
    let init = s.path("init.st");
    let mut a = vec!["init", model, "--seed", "1", "--out", &init];
    a.extend(TINY);
    assert_eq!(tnc(&a).0, 0);
    let rounded: Vec<(String, Tensor)> = tnc_compiler::interp::read_safetensors(init.as_ref())
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, Tensor::new(t.shape.clone(), t.data.iter().map(|x| x.round()).collect()).unwrap()))
        .collect();
    let named: Vec<(String, &Tensor)> = rounded.iter().map(|(n, t)| (n.clone(), t)).collect();
    write_safetensors(s.path("int-params.st").as_ref(), &named, FileDType::I32).unwrap();
    let int_params = s.path("int-params.st");
    for what in [bundle.as_str(), model] {
        let (code, _, err) = run(what, "ok.st", &["--params", &int_params]);
        assert_eq!(code, 1, "{what}: {err}");
        assert!(err.contains("I32; expected F32, F64, BF16 or F16"), "{what}: {err}");
    }
    let (code, _, err) = run(&next, "ok.st", &["--grad"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("has no backward pass"), "{err}");
    let (code, _, err) = run(&next, "ok.st", &[]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn joint_graph_after_autodiff() {
    let path = repo().join("models/tnl.tn");
    let sets: Vec<String> = ["vocab=8", "dim=4", "heads=2", "layers=1", "glu_dim=6"].map(String::from).to_vec();
    let (sources, g) = elaborate_path(&path, &sets);
    let g = g.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let g = tnc_compiler::passes::differentiate_loss(g).unwrap();
    tnc_compiler::ir::verify::verify(&g).unwrap();
    insta::assert_snapshot!(to_text(&g));
}
