//! Writing a bundle: the manifest (`tnc_bundle::manifest`) that describes a scheduled
//! program — kernels, buffers as polynomials in B and N, parameters with their
//! initializers, inputs, outputs, entry points — and the code (`kernels.so` for CPUs).
//! Initializers the runtime cannot compute (`Init::Computed`, e.g. LRPE's angles) are
//! evaluated here and stored in `init.safetensors`.

use crate::interp;
use crate::ir::dim::Atom as DimAtom;
use crate::ir::{DType, Dim, Graph, Init};
use crate::kernel::{self, Binary, Expr, Kernel};
use crate::schedule::{Role, Schedule};
use std::collections::BTreeMap;
use tnc_bundle::manifest::{self as m, Manifest, Poly};

pub const INIT_FILE: &str = "init.safetensors";

/// A size polynomial in the runtime's form.
pub fn poly(d: &Dim) -> Poly {
    let mut p = Poly::default();
    for (coeff, atoms) in d.terms() {
        let atoms = atoms
            .iter()
            .map(|a| match a {
                DimAtom::Sym(s) => m::Atom::Sym(s.clone()),
                DimAtom::CeilDiv(inner, k) => m::Atom::CeilDiv { ceil: poly(inner), div: *k },
            })
            .collect();
        p = p.plus(Poly::term(coeff, atoms));
    }
    p
}

fn times(a: &Poly, b: &Poly) -> Poly {
    let mut out = Poly::default();
    for x in &a.terms {
        for y in &b.terms {
            let mut atoms = x.atoms.clone();
            atoms.extend(y.atoms.iter().cloned());
            out = out.plus(Poly::term(x.coeff * y.coeff, atoms));
        }
    }
    out
}

/// A kernel's parallel extent (an index expression over sizes) as a polynomial.
fn extent_poly(e: &Expr, sizes: &[String]) -> Result<Poly, String> {
    Ok(match e {
        Expr::I64(c) => Poly::constant(*c),
        Expr::Size(i) => Poly::sym(sizes.get(*i).ok_or("a kernel extent uses a scalar argument")?.clone()),
        Expr::Binary(Binary::Add, a, b) => extent_poly(a, sizes)?.plus(extent_poly(b, sizes)?),
        Expr::Binary(Binary::Mul, a, b) => times(&extent_poly(a, sizes)?, &extent_poly(b, sizes)?),
        // ceil(p / k) is written (p + k - 1) / k by the scheduler.
        Expr::Binary(Binary::Div, a, b) => match (a.as_ref(), b.as_ref()) {
            (Expr::Binary(Binary::Add, p, km1), Expr::I64(k)) if matches!(km1.as_ref(), Expr::I64(x) if x + 1 == *k) => {
                Poly::ceil_div(extent_poly(p, sizes)?, *k)
            }
            _ => return Err(format!("kernel extent `{e:?}` is not a polynomial")),
        },
        other => return Err(format!("kernel extent `{other:?}` is not a polynomial")),
    })
}

/// The run-time arguments a GEMM's polynomials may name: sizes, scalars, launch arguments.
fn gemm_names(k: &kernel::Kernel) -> Vec<String> {
    k.sizes.iter().chain(&k.scalars).cloned().collect()
}

/// A library node's GEMM with every index expression as a polynomial.
fn gemm_entry(g: &kernel::gemm::Gemm, sizes: &[String]) -> Result<m::GemmEntry, String> {
    let p = |e: &Expr| extent_poly(e, sizes);
    let matrix = |v: &kernel::gemm::Matrix| -> Result<m::MatrixEntry, String> {
        Ok(m::MatrixEntry { offset: p(&v.offset)?, rows: p(&v.rows)?, cols: p(&v.cols)? })
    };
    Ok(m::GemmEntry {
        batch: g
            .batch
            .iter()
            .map(|b| Ok(m::BatchEntry { extent: p(&b.extent)?, a: p(&b.a)?, b: p(&b.b)?, c: p(&b.c)? }))
            .collect::<Result<_, String>>()?,
        m: p(&g.m)?,
        n: p(&g.n)?,
        k: p(&g.k)?,
        accumulate: g.accumulate,
        a: matrix(&g.a)?,
        b: matrix(&g.b)?,
        c: matrix(&g.c)?,
    })
}

fn dtype(d: DType) -> m::DType {
    match d {
        DType::F32 => m::DType::F32,
        DType::BF16 => m::DType::BF16,
        DType::F16 => m::DType::F16,
        DType::I32 => m::DType::I32,
        DType::Bool => m::DType::U8,
    }
}

fn elem(e: kernel::Elem) -> m::DType {
    match e {
        kernel::Elem::F32 => m::DType::F32,
        kernel::Elem::BF16 => m::DType::BF16,
        kernel::Elem::F16 => m::DType::F16,
        kernel::Elem::I32 => m::DType::I32,
        kernel::Elem::U8 => m::DType::U8,
    }
}

fn access(a: kernel::Access) -> m::Access {
    match a {
        kernel::Access::Read => m::Access::Read,
        kernel::Access::Write => m::Access::Write,
        kernel::Access::ReadWrite => m::Access::ReadWrite,
    }
}

/// The target description for the manifest.
pub struct TargetInfo {
    pub name: String,
    pub kind: m::TargetKind,
    pub cpu_features: Vec<String>,
}

/// The manifest of a scheduled graph, and the baked initial values it refers to.
pub fn manifest(
    g: &Graph,
    s: &Schedule,
    target: TargetInfo,
) -> Result<(Manifest, Vec<(String, interp::Tensor)>), String> {
    let mut baked = Vec::new();
    let mut params = Vec::new();
    for (i, p) in g.params.iter().enumerate() {
        let init = match &p.init {
            Init::Zeros => m::InitSpec::Zeros,
            Init::Ones => m::InitSpec::Ones,
            Init::Constant(c) => m::InitSpec::Constant(*c),
            Init::Normal { mean, std } => m::InitSpec::Normal { mean: *mean, std: *std },
            Init::Uniform { lo, hi } => m::InitSpec::Uniform { lo: *lo, hi: *hi },
            Init::Xavier { gain } => m::InitSpec::Xavier { gain: *gain },
            Init::Computed(_) => {
                // Evaluate once, here; the runtime reads the values.
                let t = interp::init_param(p, 0)?;
                baked.push((p.name.clone(), t));
                m::InitSpec::Baked { file: INIT_FILE.into(), tensor: p.name.clone() }
            }
        };
        params.push(m::ParamEntry {
            name: p.name.clone(),
            shape: p.ty.shape.iter().map(|d| d.as_const().unwrap_or(0)).collect(),
            dtype: dtype(p.ty.dtype),
            trainable: p.trainable,
            attrs: p.attrs.clone(),
            init,
            seed: p.seed,
            buffer: s.params[i],
        });
    }
    let kernels = s
        .kernels
        .iter()
        .map(|k: &Kernel| {
            Ok(m::KernelEntry {
                name: k.name.clone(),
                symbol: k.name.clone(),
                buffers: k
                    .buffers
                    .iter()
                    .map(|b| m::KernelBuffer { elem: elem(b.elem), access: access(b.access) })
                    .collect(),
                extent: extent_poly(&k.extent, &k.sizes)?,
                args: k.scalars.get(s.scalars.len()..).unwrap_or_default().to_vec(),
                library: k.gemm.is_some(),
                // Its views may use launch arguments (the kernel's scalars beyond the
                // program's), named like sizes.
                gemm: k.gemm.as_ref().map(|g| gemm_entry(g, &gemm_names(k))).transpose()?,
                gpu: None,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let buffers = s
        .buffers
        .iter()
        .map(|b| m::BufferEntry {
            bytes: poly(&b.bytes),
            role: match b.role {
                Role::Activation => m::BufferRole::Activation,
                Role::Param => m::BufferRole::Param,
                Role::Grad => m::BufferRole::Grad,
                Role::Input => m::BufferRole::Input,
                Role::Output => m::BufferRole::Output,
                Role::Workspace => m::BufferRole::Workspace,
                Role::Optimizer => m::BufferRole::Optimizer,
            },
            name: b.name.as_ref().map(|n| n.strip_prefix("grad.").unwrap_or(n).to_string()),
        })
        .collect();
    let bounds = crate::ir::index_bounds::input_bounds(g);
    let inputs = g
        .inputs
        .iter()
        .zip(&s.inputs)
        .zip(bounds)
        .map(|((i, &b), bounds)| m::IoEntry {
            name: i.name.clone(),
            dtype: dtype(i.ty.dtype),
            shape: i.ty.shape.iter().map(poly).collect(),
            buffer: b,
            entry: "forward".into(),
            bounds: bounds.iter().map(poly).collect(),
        })
        .collect();
    let outputs = g
        .outputs
        .iter()
        .zip(&s.outputs)
        .map(|((name, n), (_, b))| m::IoEntry {
            name: name.clone(),
            dtype: dtype(g.ty(*n).dtype),
            shape: g.ty(*n).shape.iter().map(poly).collect(),
            buffer: *b,
            entry: if name.starts_with("grad.") { "backward".into() } else { "forward".into() },
            bounds: Vec::new(),
        })
        .collect();
    let mut entry_points: BTreeMap<String, Vec<m::Step>> = BTreeMap::new();
    for name in ["forward", "backward", "decode"] {
        entry_points.insert(name.into(), Vec::new());
    }
    for st in &s.steps {
        entry_points.entry(st.entry.name().to_string()).or_default().push(m::Step {
            kernel: st.kernel,
            buffers: st.buffers.clone(),
            args: st.args.clone(),
        });
    }
    let manifest = Manifest {
        format_version: m::FORMAT_VERSION,
        tnc_version: env!("CARGO_PKG_VERSION").into(),
        model: g.name.clone(),
        target: m::Target {
            name: target.name,
            kind: target.kind,
            arch: Some(std::env::consts::ARCH.into()),
            cpu_features: target.cpu_features,
        },
        sizes: s.sizes.clone(),
        scalars: s.scalars.clone(),
        kernels,
        buffers,
        params,
        inputs,
        outputs,
        entry_points,
        files: BTreeMap::new(),
        model_sha256: None,
    };
    manifest.validate()?;
    Ok((manifest, baked))
}
