//! A hand-written bundle: a small C file compiled with `cc -shared` stands in for
//! `kernels.so`, with a manifest written through the format's own types.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tnc_runtime::bundle::BundleError;
use tnc_runtime::manifest::*;
use tnc_runtime::{init, rng, Bundle, ExecError, Executor, Tensor};

const KERNELS_C: &str = r#"
#include <stdint.h>
#include <math.h>

/* y[i] = x[i] * w[i % 3] + sinf(i), i over B*N */
void k_scale(void **b, const int64_t *s, int64_t begin, int64_t end) {
    const float *x = b[0], *w = b[1];
    float *y = b[2];
    for (int64_t i = begin; i < end; i++) y[i] = x[i] * w[i % 3] + sinf((float)i);
}

/* out[r] = sum_j y[r*N + j], r over B */
void k_rowsum(void **b, const int64_t *s, int64_t begin, int64_t end) {
    const float *y = b[0];
    float *out = b[1];
    int64_t n = s[1];
    for (int64_t r = begin; r < end; r++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < n; j++) acc += y[r * n + j];
        out[r] = acc;
    }
}

/* meta = [seed, step] */
void k_meta(void **b, const int64_t *s, int64_t begin, int64_t end) {
    float *m = b[0];
    for (int64_t i = begin; i < end; i++) m[i] = (float)s[2 + i];
}

/* gw[k] = sum_{i % 3 == k} x[i]: d(sum s)/dw */
void k_gradw(void **b, const int64_t *s, int64_t begin, int64_t end) {
    const float *x = b[0];
    float *gw = b[1];
    int64_t total = s[0] * s[1];
    for (int64_t k = begin; k < end; k++) {
        float acc = 0.0f;
        for (int64_t i = k; i < total; i += 3) acc += x[i];
        gw[k] = acc;
    }
}

/* writes only the even elements of p (a deliberately incomplete kernel) */
void k_partial(void **b, const int64_t *s, int64_t begin, int64_t end) {
    float *p = b[0];
    for (int64_t i = begin; i < end; i++) if (i % 2 == 0) p[i] = 1.0f;
}
"#;

fn compile_kernels(dir: &Path) -> Vec<u8> {
    let src = dir.join("kernels.c");
    let out = dir.join("kernels.built.so");
    std::fs::write(&src, KERNELS_C).unwrap();
    let st = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .arg("-lm")
        .status()
        .expect("run cc");
    assert!(st.success(), "cc failed");
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    std::fs::remove_file(&src).unwrap();
    bytes
}

fn sym(s: &str) -> Atom {
    Atom::Sym(s.into())
}

fn kernel(name: &str, slots: &[(DType, Access)], extent: Poly) -> KernelEntry {
    KernelEntry {
        name: name.into(),
        symbol: format!("k_{name}"),
        buffers: slots.iter().map(|&(elem, access)| KernelBuffer { elem, access }).collect(),
        extent,
        library: false,
        gemm: None,
        args: vec![],
        gpu: None,
    }
}

fn buffer(bytes: Poly, role: BufferRole, name: Option<&str>) -> BufferEntry {
    BufferEntry { bytes, role, name: name.map(String::from) }
}

/// Baked values of the non-trainable `theta`.
const THETA: [f32; 2] = [0.25, -4.0];

fn manifest() -> Manifest {
    use Access::*;
    use DType::F32;
    let bn4 = Poly::term(4, vec![sym("B"), sym("N")]);
    let pad = Poly::term(64, vec![Atom::CeilDiv { ceil: Poly::sym("N"), div: 64 }]);
    Manifest {
        format_version: FORMAT_VERSION,
        tnc_version: "0.1.0".into(),
        model: "toy".into(),
        target: Target {
            name: "native".into(),
            kind: TargetKind::Cpu,
            arch: Some(std::env::consts::ARCH.into()),
            cpu_features: vec![],
        },
        sizes: vec!["B".into(), "N".into()],
        scalars: vec!["seed".into(), "step".into()],
        kernels: vec![
            kernel("scale", &[(F32, Read), (F32, Read), (F32, Write)], Poly::term(1, vec![sym("B"), sym("N")])),
            kernel("rowsum", &[(F32, Read), (F32, Write)], Poly::sym("B")),
            kernel("meta", &[(F32, Write)], Poly::constant(2)),
            kernel("gradw", &[(F32, Read), (F32, Write)], Poly::constant(3)),
            kernel("partial", &[(F32, Write)], pad.clone()),
        ],
        buffers: vec![
            buffer(bn4.clone(), BufferRole::Input, Some("x")),
            buffer(Poly::constant(12), BufferRole::Param, Some("w")),
            buffer(bn4, BufferRole::Output, Some("y")),
            buffer(Poly::term(4, vec![sym("B")]), BufferRole::Output, Some("s")),
            buffer(Poly::constant(12), BufferRole::Grad, Some("w")),
            buffer(Poly::constant(8), BufferRole::Output, Some("meta")),
            buffer(Poly::term(256, vec![Atom::CeilDiv { ceil: Poly::sym("N"), div: 64 }]), BufferRole::Output, None),
            buffer(Poly::constant(8), BufferRole::Param, Some("theta")),
        ],
        params: vec![
            ParamEntry {
                name: "w".into(),
                shape: vec![3],
                dtype: F32,
                trainable: true,
                attrs: vec![],
                init: InitSpec::Normal { mean: 1.0, std: 0.5 },
                seed: None,
                buffer: 1,
            },
            ParamEntry {
                name: "theta".into(),
                shape: vec![2],
                dtype: F32,
                trainable: false,
                attrs: vec!["no_decay".into()],
                init: InitSpec::Baked { file: "consts.safetensors".into(), tensor: "theta".into() },
                seed: None,
                buffer: 7,
            },
        ],
        inputs: vec![IoEntry {
            name: "x".into(),
            dtype: F32,
            shape: vec![Poly::sym("B"), Poly::sym("N")],
            buffer: 0,
            entry: "forward".into(),
            bounds: vec![],
        }],
        outputs: vec![
            IoEntry {
                name: "y".into(),
                dtype: F32,
                shape: vec![Poly::sym("B"), Poly::sym("N")],
                buffer: 2,
                entry: "forward".into(),
                bounds: vec![],
            },
            IoEntry {
                name: "s".into(),
                dtype: F32,
                shape: vec![Poly::sym("B")],
                buffer: 3,
                entry: "forward".into(),
                bounds: vec![],
            },
            IoEntry {
                name: "meta".into(),
                dtype: F32,
                shape: vec![Poly::constant(2)],
                buffer: 5,
                entry: "forward".into(),
                bounds: vec![],
            },
            IoEntry {
                name: "p".into(),
                dtype: F32,
                shape: vec![pad],
                buffer: 6,
                entry: "probe".into(),
                bounds: vec![],
            },
        ],
        entry_points: BTreeMap::from([
            (
                "forward".into(),
                vec![
                    Step { kernel: 0, buffers: vec![0, 1, 2], args: vec![] },
                    Step { kernel: 1, buffers: vec![2, 3], args: vec![] },
                    Step { kernel: 2, buffers: vec![5], args: vec![] },
                ],
            ),
            ("backward".into(), vec![Step { kernel: 3, buffers: vec![0, 4], args: vec![] }]),
            ("probe".into(), vec![Step { kernel: 4, buffers: vec![6], args: vec![] }]),
            ("decode".into(), vec![]),
        ]),
        files: BTreeMap::new(),
        model_sha256: None,
    }
}

fn consts_file() -> Vec<u8> {
    let bytes: Vec<u8> = THETA.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &bytes).unwrap();
    safetensors::serialize([("theta", view)], None).unwrap()
}

struct TestBundle {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

fn write_bundle(edit: impl FnOnce(&mut Manifest)) -> TestBundle {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("toy.bundle");
    std::fs::create_dir_all(&dir).unwrap();
    let so = compile_kernels(&dir);
    let mut m = manifest();
    edit(&mut m);
    m.write_bundle(&dir, &[("kernels.so", &so), ("consts.safetensors", &consts_file())]).unwrap();
    TestBundle { _tmp: tmp, dir }
}

fn input(b: usize, n: usize) -> Tensor {
    Tensor::f32(vec![b, n], (0..b * n).map(|i| (i as f32 * 0.37).cos() * 3.0 - 0.5).collect())
}

fn run_forward(dir: &Path, threads: usize, b: usize, n: usize) -> Executor {
    let bundle = Bundle::load(dir).unwrap();
    let mut ex = Executor::cpu(&bundle, threads).unwrap();
    ex.set_params_from_seed(42).unwrap();
    ex.forward(&[("x", &input(b, n))]).unwrap();
    ex
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.as_f32().unwrap().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn forward_and_backward_values() {
    let tb = write_bundle(|_| {});
    let (b, n) = (3, 5);
    let mut ex = run_forward(&tb.dir, 2, b, n);
    let w = init::init_values_f32(&InitSpec::Normal { mean: 1.0, std: 0.5 }, &[3], "w", 42).unwrap();
    assert_eq!(ex.param("w").unwrap().as_f32().unwrap(), w.as_slice());
    assert_eq!(ex.param("theta").unwrap().as_f32().unwrap(), THETA.as_slice());
    let x = input(b, n);
    let x = x.as_f32().unwrap();
    let y = ex.output("y").unwrap();
    assert_eq!(y.shape, vec![b, n]);
    for (i, v) in y.as_f32().unwrap().iter().enumerate() {
        let want = x[i] * w[i % 3] + (i as f32).sin();
        assert!((v - want).abs() <= 1e-6 * want.abs().max(1.0), "y[{i}] = {v}, want {want}");
    }
    let s = ex.output("s").unwrap();
    assert_eq!(s.shape, vec![b]);
    let yv = y.as_f32().unwrap();
    for r in 0..b {
        let want: f32 = yv[r * n..(r + 1) * n].iter().fold(0.0, |a, v| a + v);
        assert_eq!(s.as_f32().unwrap()[r], want);
    }
    assert_eq!(ex.output("meta").unwrap().as_f32().unwrap(), &[0.0, 0.0]);

    // Gradients and scalars.
    assert!(matches!(ex.gradients(), Err(ExecError::Order(_))));
    ex.backward(&[]).unwrap();
    let g = ex.gradients().unwrap();
    assert_eq!(g.keys().collect::<Vec<_>>(), vec!["w"]);
    for k in 0..3 {
        let want: f32 = x.iter().skip(k).step_by(3).fold(0.0, |a, v| a + v);
        assert_eq!(g["w"].as_f32().unwrap()[k], want);
    }
    ex.set_scalar("seed", 7).unwrap();
    ex.set_scalar("step", 11).unwrap();
    ex.forward(&[("x", &input(b, n))]).unwrap();
    assert_eq!(ex.output("meta").unwrap().as_f32().unwrap(), &[7.0, 11.0]);
    assert!(ex.set_scalar("temperature", 1).is_err());
}

#[test]
fn thread_counts_give_bitwise_identical_results() {
    let tb = write_bundle(|_| {});
    let (b, n) = (7, 13);
    let mut one = run_forward(&tb.dir, 1, b, n);
    let mut three = run_forward(&tb.dir, 3, b, n);
    for name in ["y", "s"] {
        assert_eq!(bits(&one.output(name).unwrap()), bits(&three.output(name).unwrap()), "{name}");
    }
    one.backward(&[]).unwrap();
    three.backward(&[]).unwrap();
    assert_eq!(bits(&one.gradients().unwrap()["w"]), bits(&three.gradients().unwrap()["w"]));
    // More threads than iterations.
    let sixteen = run_forward(&tb.dir, 16, 2, 1);
    let one_small = run_forward(&tb.dir, 1, 2, 1);
    assert_eq!(bits(&sixteen.output("y").unwrap()), bits(&one_small.output("y").unwrap()));
}

#[test]
fn sizes_change_between_calls() {
    let tb = write_bundle(|_| {});
    let bundle = Bundle::load(&tb.dir).unwrap();
    let mut ex = Executor::cpu(&bundle, 2).unwrap();
    ex.set_params_from_seed(42).unwrap();
    for (b, n) in [(2, 3), (4, 9), (2, 3), (1, 0), (0, 4)] {
        ex.forward(&[("x", &input(b, n))]).unwrap();
        let fresh = run_forward(&tb.dir, 1, b, n);
        assert_eq!(bits(&ex.output("y").unwrap()), bits(&fresh.output("y").unwrap()), "B={b} N={n}");
        assert_eq!(ex.output("s").unwrap().shape, vec![b]);
    }
}

#[test]
fn chunks_cover_the_range() {
    for extent in [0, 1, 2, 7, 100] {
        for threads in 1..6 {
            let mut next = 0;
            for t in 0..threads {
                let (b, e) = tnc_runtime::cpu::chunk(extent, t, threads);
                assert_eq!(b, next);
                assert!(e >= b);
                next = e;
            }
            assert_eq!(next, extent);
        }
    }
}

#[test]
fn wrong_input_shape_names_tensor_and_shapes() {
    let tb = write_bundle(|_| {});
    let bundle = Bundle::load(&tb.dir).unwrap();
    let mut ex = Executor::cpu(&bundle, 1).unwrap();
    ex.set_params_from_seed(0).unwrap();
    let bad = Tensor::f32(vec![2, 3, 1], vec![0.0; 6]);
    let e = ex.forward(&[("x", &bad)]).unwrap_err().to_string();
    assert!(e.contains("`x`") && e.contains("[2, 3, 1]") && e.contains("[B, N]"), "{e}");
    let e = ex.forward(&[("x", &Tensor::i32(vec![2, 3], vec![0; 6]))]).unwrap_err().to_string();
    assert!(e.contains("`x`") && e.contains("i32") && e.contains("f32"), "{e}");
    let e = ex.forward(&[]).unwrap_err().to_string();
    assert!(e.contains("`x`") && e.contains("missing"), "{e}");
    let e = ex.forward(&[("x", &input(1, 1)), ("z", &input(1, 1))]).unwrap_err().to_string();
    assert!(e.contains("`z`"), "{e}");
    let e = ex.backward(&[]).unwrap_err().to_string();
    assert!(e.contains("forward"), "{e}");
}

#[test]
fn params_must_be_set_first() {
    let tb = write_bundle(|_| {});
    let bundle = Bundle::load(&tb.dir).unwrap();
    let mut ex = Executor::cpu(&bundle, 1).unwrap();
    let e = ex.forward(&[("x", &input(1, 2))]).unwrap_err();
    assert!(matches!(e, ExecError::Order(_)), "{e}");
}

#[test]
fn debug_mode_fills_outputs_with_nan() {
    let tb = write_bundle(|_| {});
    let bundle = Bundle::load(&tb.dir).unwrap();
    let mut ex = Executor::cpu(&bundle, 3).unwrap();
    ex.set_params_from_seed(0).unwrap();
    ex.set_sizes(&[("B", 1), ("N", 70)]).unwrap();
    ex.run("probe", &[]).unwrap();
    let p = ex.output("p").unwrap();
    assert_eq!(p.shape, vec![128]);
    assert!(p.as_f32().unwrap().iter().all(|v| !v.is_nan()));
    ex.set_debug_nan(true);
    ex.run("probe", &[]).unwrap();
    let p = ex.output("p").unwrap();
    for (i, v) in p.as_f32().unwrap().iter().enumerate() {
        assert_eq!(v.is_nan(), i % 2 == 1, "p[{i}] = {v}");
    }
    // Forward in debug mode still computes everything it should (kernels write all of it).
    ex.forward(&[("x", &input(2, 3))]).unwrap();
    assert!(ex.output("y").unwrap().as_f32().unwrap().iter().all(|v| v.is_finite()));
    // The parameters are never overwritten.
    assert!(ex.param("w").unwrap().as_f32().unwrap().iter().all(|v| v.is_finite()));
}

#[test]
fn params_from_file() {
    let tb = write_bundle(|_| {});
    let ex = run_forward(&tb.dir, 1, 1, 1);
    let file = tb.dir.parent().unwrap().join("ckpt.safetensors");
    ex.save_params(&file).unwrap();
    let bundle = Bundle::load(&tb.dir).unwrap();
    let mut other = Executor::cpu(&bundle, 1).unwrap();
    other.set_params_from_file(&file).unwrap();
    assert_eq!(bits(&other.param("w").unwrap()), bits(&ex.param("w").unwrap()));

    // A checkpoint with only trainable parameters: `theta` comes from the bundle.
    let w: Vec<u8> = [1.0f32, 2.0, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3], &w).unwrap();
    safetensors::serialize_to_file([("w", view)], None, &file).unwrap();
    other.set_params_from_file(&file).unwrap();
    assert_eq!(other.param("w").unwrap().as_f32().unwrap(), &[1.0, 2.0, 3.0]);
    assert_eq!(other.param("theta").unwrap().as_f32().unwrap(), THETA.as_slice());

    // Wrong shape.
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 3], &w).unwrap();
    safetensors::serialize_to_file([("w", view)], None, &file).unwrap();
    let e = other.set_params_from_file(&file).unwrap_err().to_string();
    assert!(e.contains("`w`") && e.contains("[1, 3]") && e.contains("[3]"), "{e}");
    // Missing.
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3], &w).unwrap();
    safetensors::serialize_to_file([("v", view)], None, &file).unwrap();
    let e = other.set_params_from_file(&file).unwrap_err().to_string();
    assert!(e.contains("no tensor `w`"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Verification failures

fn load_err(dir: &Path) -> BundleError {
    Bundle::load(dir).expect_err("the bundle should be rejected")
}

#[test]
fn truncated_kernels_are_rejected() {
    let tb = write_bundle(|_| {});
    let so = tb.dir.join("kernels.so");
    let bytes = std::fs::read(&so).unwrap();
    std::fs::write(&so, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&tb.dir);
    assert!(matches!(&e, BundleError::Checksum { file, .. } if file == "kernels.so"), "{e:?}");
    assert!(e.to_string().contains("kernels.so"), "{e}");
}

#[test]
fn missing_file_is_rejected() {
    let tb = write_bundle(|_| {});
    std::fs::remove_file(tb.dir.join("consts.safetensors")).unwrap();
    let e = load_err(&tb.dir).to_string();
    assert!(e.contains("consts.safetensors"), "{e}");
}

#[test]
fn altered_manifest_is_rejected() {
    let tb = write_bundle(|_| {});
    let path = tb.dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"toy\"", "\"yot\"")).unwrap();
    let e = load_err(&tb.dir);
    assert!(matches!(&e, BundleError::Checksum { file, .. } if file == "manifest.json"), "{e:?}");
    assert!(e.to_string().contains("manifest.json"), "{e}");

    // Altered with a matching checksum but no longer a manifest: a parse error naming it.
    write_manifest_bytes(&tb.dir, text.replace("\"extent\"", "\"extant\"").as_bytes()).unwrap();
    let e = load_err(&tb.dir);
    assert!(matches!(e, BundleError::Parse { .. }), "{e:?}");
    assert!(e.to_string().contains("manifest.json") && e.to_string().contains("extant"), "{e}");

    // A checksum of another file altered in the manifest.
    let m: Manifest = serde_json::from_str(&text).unwrap();
    let mut m2 = m.clone();
    m2.files.insert("kernels.so".into(), "00".repeat(32));
    write_manifest_bytes(&tb.dir, &serde_json::to_vec(&m2).unwrap()).unwrap();
    let e = load_err(&tb.dir).to_string();
    assert!(e.contains("kernels.so"), "{e}");

    // An index out of range.
    let mut m3 = m;
    m3.entry_points.get_mut("forward").unwrap()[0].buffers[2] = 99;
    write_manifest_bytes(&tb.dir, &serde_json::to_vec(&m3).unwrap()).unwrap();
    let e = load_err(&tb.dir).to_string();
    assert!(e.contains("forward") && e.contains("99"), "{e}");
}

#[test]
fn wrong_format_version_is_rejected() {
    let tb = write_bundle(|m| m.format_version = 3);
    let e = load_err(&tb.dir);
    assert!(matches!(e, BundleError::FormatVersion { found: 3, expected: 2 }), "{e:?}");
    assert!(e.to_string().contains("format version 3 is not supported (this runtime reads versions 1 to 2)"), "{e}");
}

#[test]
fn cuda_bundle_is_rejected_by_cpu_executor() {
    let tb = write_bundle(|m| {
        m.target = Target { name: "sm80".into(), kind: TargetKind::Cuda, arch: None, cpu_features: vec![] };
        // A CUDA bundle's kernels are in kernels.ptx; keep its checksum entry.
        m.kernels.iter_mut().for_each(|k| k.library = false);
    });
    // Give it a kernels.ptx so that it loads as a bundle.
    let mut m: Manifest = serde_json::from_slice(&std::fs::read(tb.dir.join("manifest.json")).unwrap()).unwrap();
    std::fs::write(tb.dir.join("kernels.ptx"), "// ptx").unwrap();
    m.files.insert("kernels.ptx".into(), sha256_hex(b"// ptx"));
    write_manifest_bytes(&tb.dir, &serde_json::to_vec(&m).unwrap()).unwrap();
    let bundle = Bundle::load(&tb.dir).unwrap();
    let e = Executor::cpu(&bundle, 1).err().expect("a CUDA bundle must be rejected");
    assert!(matches!(e, ExecError::Bundle(BundleError::TargetKind { .. })), "{e:?}");
    assert!(e.to_string().contains("cuda") && e.to_string().contains("sm80"), "{e}");
    assert!(Bundle::load_cpu(&tb.dir).is_err());
}

#[test]
fn missing_cpu_feature_is_rejected() {
    let tb = write_bundle(|m| m.target.cpu_features = vec!["avx512_made_up".into()]);
    let e = load_err(&tb.dir);
    assert!(matches!(&e, BundleError::CpuFeatures { missing, .. } if missing[0].starts_with("avx512_made_up")));
    assert!(e.to_string().contains("avx512_made_up"), "{e}");
}

#[test]
fn wrong_architecture_is_rejected() {
    let other = if std::env::consts::ARCH == "x86_64" { "aarch64" } else { "x86_64" };
    let tb = write_bundle(|m| m.target.arch = Some(other.into()));
    let e = load_err(&tb.dir).to_string();
    assert!(e.contains(other), "{e}");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn cpu_features_match_the_host() {
    use tnc_runtime::bundle::host_has_feature;
    assert_eq!(host_has_feature("sse2"), Some(true));
    assert_eq!(host_has_feature("+sse2"), Some(true));
    assert_eq!(host_has_feature("avx512f"), Some(std::is_x86_feature_detected!("avx512f")));
    assert_eq!(host_has_feature("avx512_made_up"), None);
    // An x86-64-v4 bundle on a host without AVX-512 is an error, never SIGILL.
    let v4 = ["avx2", "fma", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"];
    let tb = write_bundle(|m| m.target.cpu_features = v4.iter().map(|s| s.to_string()).collect());
    let has_v4 = v4.iter().all(|f| host_has_feature(f) == Some(true));
    assert_eq!(Bundle::load(&tb.dir).is_ok(), has_v4);
}

#[test]
fn a_library_kernel_without_its_gemm_is_a_corrupt_manifest() {
    let tb = write_bundle(|m| m.kernels[1].library = true);
    let e = load_err(&tb.dir).to_string();
    assert!(e.contains("rowsum") && e.contains("library") && e.contains("gemm"), "{e}");
}

#[test]
fn missing_symbol_is_reported() {
    let tb = write_bundle(|m| m.kernels[0].symbol = "k_nowhere".into());
    let bundle = Bundle::load(&tb.dir).unwrap();
    let e = Executor::cpu(&bundle, 1).err().unwrap().to_string();
    assert!(e.contains("k_nowhere") && e.contains("scale"), "{e}");
}

// ---------------------------------------------------------------------------------------
// The format, pinned by a hand-written manifest

#[test]
fn hand_written_manifest_parses() {
    let json = r#"{
      "format_version": 1,
      "tnc_version": "0.1.0",
      "model": "toy",
      "target": { "name": "x86-64-v3", "kind": "cpu", "arch": "x86_64", "cpu_features": ["avx2", "fma"] },
      "sizes": ["B", "N"],
      "scalars": ["seed", "step"],
      "kernels": [
        { "name": "scale", "symbol": "k_scale",
          "buffers": [{"elem": "f32", "access": "read"}, {"elem": "f32", "access": "read"},
                      {"elem": "f32", "access": "write"}],
          "extent": [{"coeff": 1, "atoms": ["B", "N"]}] },
        { "name": "qk", "symbol": "k_qk", "extent": [{"coeff": 1, "atoms": ["B", "N"]}], "library": true,
          "buffers": [{"elem": "f32", "access": "read"}, {"elem": "f32", "access": "read"},
                      {"elem": "f32", "access": "write"}],
          "gemm": { "batch": [{ "extent": "B", "a": [{"coeff": 64, "atoms": ["N"]}], "b": 0, "c": [{"coeff": 1, "atoms": ["N", "N"]}] }],
                    "m": "N", "n": "N", "k": 64,
                    "a": { "offset": 0, "rows": 64, "cols": 1 },
                    "b": { "offset": 0, "rows": 1, "cols": 64 },
                    "c": { "offset": 0, "rows": "N", "cols": 1 } },
          "gpu": { "block": [128, 1, 1], "grid": [[{"coeff": 1, "atoms": [{"ceil": "N", "div": 64}]}], 1, 1], "shared_bytes": 0 } }
      ],
      "buffers": [
        { "bytes": [{"coeff": 4, "atoms": ["B", "N"]}], "role": "input", "name": "x" },
        { "bytes": 12, "role": "param", "name": "w" },
        { "bytes": [{"coeff": 4, "atoms": ["B", "N"]}], "role": "output", "name": "y" },
        { "bytes": 12, "role": "grad", "name": "w" },
        { "bytes": 1024, "role": "workspace" }
      ],
      "params": [
        { "name": "w", "shape": [3], "dtype": "f32", "trainable": true, "attrs": [],
          "init": {"xavier": {"gain": 1.0}}, "buffer": 1 },
        { "name": "h", "shape": [3], "dtype": "f32", "trainable": false, "init": {"normal": {"mean": 0, "std": 1}}, "seed": 7, "buffer": 1 },
        { "name": "c", "shape": [3], "dtype": "f32", "trainable": false, "init": {"constant": 0.5}, "buffer": 1 },
        { "name": "z", "shape": [3], "dtype": "f32", "trainable": false, "init": "zeros", "buffer": 1 },
        { "name": "t", "shape": [3], "dtype": "f32", "trainable": false,
          "init": {"baked": {"file": "consts.safetensors", "tensor": "t"}}, "buffer": 1 }
      ],
      "inputs": [{ "name": "x", "dtype": "f32", "shape": ["B", "N"], "buffer": 0 }],
      "outputs": [{ "name": "y", "dtype": "f32", "shape": [[{"coeff": 1, "atoms": ["B"]}], "N"], "buffer": 2 }],
      "entry_points": {
        "forward": [{ "kernel": 0, "buffers": [0, 1, 2] }],
        "backward": [],
        "decode": []
      },
      "files": { "kernels.so": "ab12", "consts.safetensors": "cd34" }
    }"#;
    let m: Manifest = serde_json::from_str(json).unwrap();
    assert_eq!(m.kernels[0].extent, Poly::term(1, vec![sym("B"), sym("N")]));
    assert!(m.kernels[1].library);
    assert_eq!(m.kernels[1].gemm.as_ref().unwrap().batch[0].extent.as_sym(), Some("B"));
    assert_eq!(m.kernels[1].gpu.as_ref().unwrap().grid[0].to_string(), "ceil((N)/64)");
    assert_eq!(m.params[0].init, InitSpec::Xavier { gain: 1.0 });
    assert_eq!(m.params[1].seed, Some(7));
    assert_eq!(m.params[3].init, InitSpec::Zeros);
    assert_eq!(m.inputs[0].entry, "forward");
    assert_eq!(m.inputs[0].shape[1].as_sym(), Some("N"));
    assert_eq!(m.buffers[4].role, BufferRole::Workspace);
    assert!(m.validate().is_ok());
    // Round trip.
    let again: Manifest = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
    assert_eq!(again, m);
    // Unknown fields are errors, not silently ignored.
    let bad = json.replace("\"tnc_version\"", "\"tnc_verison\"");
    assert!(serde_json::from_str::<Manifest>(&bad).is_err());
}

// ---------------------------------------------------------------------------------------
// Initialization shared with the compiler's interpreter

#[test]
fn init_matches_the_interpreter_draws() {
    // The interpreter draws element i of parameter p as
    // rng::normal/uniform(seed_used, stable_hash(&p.name), i, 0).
    let name = "layers.0.attn.wq";
    let h = rng::stable_hash(name);
    let v = init::init_values(&InitSpec::Normal { mean: 0.0, std: 0.02 }, &[4, 8], name, 1234).unwrap();
    for i in [0usize, 1, 17, 31] {
        assert_eq!(v[i], 0.02 * rng::normal(1234, h, i as u64, 0));
    }
    let u = init::init_values(&InitSpec::Uniform { lo: -2.0, hi: 3.0 }, &[5], name, 9).unwrap();
    assert_eq!(u[3], -2.0 + 5.0 * rng::uniform(9, h, 3, 0));
    // Xavier on [2, 4, 6]: bound sqrt(6 / ((4 + 6) * 2)).
    let x = init::init_values(&InitSpec::Xavier { gain: 2.0 }, &[2, 4, 6], name, 5).unwrap();
    let bound = 2.0 * (6.0f64 / 20.0).sqrt();
    assert_eq!(x[47], bound * (2.0 * rng::uniform(5, h, 47, 0) - 1.0));
    // Golden values, so a change to the generator or the keying is noticed.
    let g = init::init_values(&InitSpec::Normal { mean: 0.0, std: 1.0 }, &[3], "w", 42).unwrap();
    let golden = [13833610994988865809u64, 13820529204960404473, 4586188002754373548].map(f64::from_bits);
    assert_eq!(g, golden, "{:?}", g.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    assert_eq!(golden[0], -1.6786880688719672);
}

#[test]
fn documented_example_parses() {
    let doc = include_str!("../../docs/bundle.md");
    let start = doc.find("```json\n").expect("a json block") + 8;
    let end = start + doc[start..].find("```").unwrap();
    let m: Manifest = serde_json::from_str(&doc[start..end]).unwrap();
    m.validate().unwrap();
    assert_eq!(m.kernels[2].extent.to_string(), "64*ceil((N)/64)");
    assert_eq!(m.kernels[2].gpu.as_ref().unwrap().grid[0], Poly::sym("B"));
    let env = std::collections::HashMap::from([("B", 2), ("N", 65)]);
    assert_eq!(m.buffers[5].bytes.eval(&env).unwrap(), 512);
}

#[test]
fn executor_is_send() {
    fn send<T: Send>() {}
    send::<Executor>();
}

// ---------------------------------------------------------------------------------------
// Library GEMM nodes

/// Adds an entry point `gram` with one library kernel: `G = X·Xᵀ` (B×B) from the input
/// `x` [B, N], its C matrix's row stride given by `c_rows`.
fn with_gram(m: &mut Manifest, c_rows: Poly) {
    use Access::*;
    use DType::F32;
    let mut k = kernel("gram", &[(F32, Read), (F32, Read), (F32, Write)], Poly::sym("B"));
    k.library = true;
    k.gemm = Some(GemmEntry {
        batch: vec![],
        accumulate: false,
        m: Poly::sym("B"),
        n: Poly::sym("B"),
        k: Poly::sym("N"),
        a: MatrixEntry { offset: 0.into(), rows: Poly::sym("N"), cols: 1.into() },
        b: MatrixEntry { offset: 0.into(), rows: 1.into(), cols: Poly::sym("N") },
        c: MatrixEntry { offset: 0.into(), rows: c_rows, cols: 1.into() },
    });
    m.kernels.push(k);
    m.buffers.push(buffer(Poly::term(4, vec![sym("B"), sym("B")]), BufferRole::Output, Some("gram")));
    let (kernel, buffer) = (m.kernels.len() - 1, m.buffers.len() - 1);
    m.outputs.push(IoEntry {
        name: "gram".into(),
        dtype: F32,
        shape: vec![Poly::sym("B"), Poly::sym("B")],
        buffer,
        entry: "gram".into(),
        bounds: vec![],
    });
    m.entry_points.insert("gram".into(), vec![Step { kernel, buffers: vec![0, 0, buffer], args: vec![] }]);
}

#[test]
fn a_library_gemm_node_runs_on_the_gemm_library() {
    let tb = write_bundle(|m| with_gram(m, Poly::sym("B")));
    let (b, n) = (5, 7);
    let x = input(b, n);
    let xs = x.as_f32().unwrap().to_vec();
    for threads in [1, 3] {
        let mut ex = run_forward(&tb.dir, threads, b, n);
        ex.run("gram", &[]).unwrap();
        let g = ex.output("gram").unwrap();
        assert_eq!(g.shape, vec![b, b]);
        for i in 0..b {
            for j in 0..b {
                let want: f64 = (0..n).map(|k| xs[i * n + k] as f64 * xs[j * n + k] as f64).sum();
                let got = g.as_f32().unwrap()[i * b + j] as f64;
                assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "G[{i},{j}] = {got}, want {want}");
            }
        }
    }
}

#[test]
fn a_library_gemm_reaching_past_its_buffer_is_an_error() {
    // Rows of C one element apart too far: the last row ends past the B×B buffer.
    let tb = write_bundle(|m| with_gram(m, Poly::sym("B").plus(Poly::constant(1))));
    let mut ex = run_forward(&tb.dir, 2, 4, 3);
    let e = ex.run("gram", &[]).unwrap_err().to_string();
    assert!(e.contains("gram") && e.contains("matrix C") && e.contains("past"), "{e}");
}
