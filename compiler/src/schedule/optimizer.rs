//! The optimizer of a training bundle (`tnc compile --train`): AdamW with decoupled
//! weight decay and optional global-norm clipping, as kernels of the kernel IR like every
//! other kernel (the runtime does no arithmetic of its own).
//!
//! Three entry points, run by the trainer in this order for each optimizer step:
//!
//! - `accumulate` (after every `backward`): `grad_sum.p += grad.p`, so `K` backward
//!   passes can feed one update (gradient accumulation);
//! - `grad_norm`: `grad_sqnorm.p = Σ (scale · grad_sum.p)²` for each parameter, one
//!   serial (Kahan-compensated) sum per parameter so the result does not depend on the
//!   thread count, then one kernel that adds them, takes the square root and writes the
//!   clipping factor. The host reads `grad_sqnorm.*` here to stop on a non-finite
//!   gradient before any parameter changes, and can name the parameter;
//! - `step`: AdamW on every trainable parameter, then `grad_sum.p = 0`.
//!
//! The hyper-parameters (learning rate, betas, bias corrections, …) live in one small
//! buffer the host writes before `grad_norm` (layout: `tnc_bundle::manifest::Hyper`), so
//! a schedule of learning rates needs no recompilation.
//!
//! Weight decay applies to every trainable parameter except those with the `no_decay`
//! attribute (fairseq's AdamW decays everything; models mark gains and biases).

use super::{BufferInfo, Entry, Role, Schedule, Step};
use crate::ir::{Dim, Graph};
use crate::kernel::{print, Access, Binary, BufferDecl, Elem, Expr, Kernel, LoopKind, Scalar, Stmt, Unary, Var};
use std::collections::HashMap;
use tnc_bundle::manifest::{Hyper, OPTIMIZER_HYPER};

/// The attribute that exempts a parameter from weight decay.
pub const NO_DECAY: &str = "no_decay";

/// Appends the optimizer's buffers, kernels and entry points to `s`.
pub fn add_optimizer(s: &mut Schedule, g: &Graph) -> Result<(), String> {
    let mut kernels = Dedup::new(s);
    s.buffers.push(BufferInfo {
        bytes: Dim::from(4 * Hyper::LEN as i64),
        role: Role::Optimizer,
        name: Some(OPTIMIZER_HYPER.into()),
    });
    let hyper = s.buffers.len() - 1;
    let mut norms = Vec::new();
    let mut updates = Vec::new();
    for (i, p) in g.params.iter().enumerate() {
        if !p.trainable {
            continue;
        }
        let grad_name = format!("grad.{}", p.name);
        let Some(&(_, grad)) = s.outputs.iter().find(|(n, _)| *n == grad_name) else {
            // A trainable parameter the loss does not depend on gets no update.
            continue;
        };
        let numel =
            p.ty.shape
                .iter()
                .try_fold(1i64, |a, d| a.checked_mul(d.as_const()?))
                .ok_or_else(|| format!("parameter `{}` does not have a constant size", p.name))?;
        let mut state = |prefix: &str, bytes: i64| {
            s.buffers.push(BufferInfo {
                bytes: Dim::from(bytes),
                role: Role::Optimizer,
                name: Some(format!("{prefix}.{}", p.name)),
            });
            s.buffers.len() - 1
        };
        let sum = state("grad_sum", 4 * numel);
        let m = state("adam_m", 4 * numel);
        let v = state("adam_v", 4 * numel);
        let sqnorm = state("grad_sqnorm", 4);
        let param = s.params[i];
        kernels.add(s, accumulate_kernel(numel, &s.sizes, &s.scalars), vec![grad, sum], Entry::Accumulate);
        kernels.add(s, sqnorm_kernel(numel, &s.sizes, &s.scalars), vec![sum, hyper, sqnorm], Entry::GradNorm);
        norms.push(sqnorm);
        let decay = !p.attrs.iter().any(|a| a == NO_DECAY);
        updates.push((adamw_kernel(numel, decay, &s.sizes, &s.scalars), vec![param, sum, m, v, hyper]));
    }
    let mut clip_buffers = norms.clone();
    clip_buffers.push(hyper);
    kernels.add(s, clip_kernel(norms.len(), &s.sizes, &s.scalars), clip_buffers, Entry::GradNorm);
    for (k, b) in updates {
        kernels.add(s, k, b, Entry::Step);
    }
    Ok(())
}

/// Adds kernels to a schedule, keeping one copy of identical kernels.
struct Dedup {
    text: HashMap<String, usize>,
}

impl Dedup {
    fn new(s: &Schedule) -> Dedup {
        let text = s.kernels.iter().enumerate().map(|(i, k)| (body_text(k), i)).collect();
        Dedup { text }
    }

    fn add(&mut self, s: &mut Schedule, kernel: Kernel, buffers: Vec<usize>, entry: Entry) {
        let k = *self.text.entry(body_text(&kernel)).or_insert_with(|| {
            s.kernels.push(kernel);
            s.flat.insert(s.kernels.len() - 1);
            s.kernels.len() - 1
        });
        s.steps.push(Step { kernel: k, buffers, entry, args: Vec::new() });
    }
}

fn body_text(k: &Kernel) -> String {
    print::to_text(&Kernel { name: String::new(), ..k.clone() })
}

fn load(buffer: usize, index: Expr) -> Expr {
    Expr::Load { buffer, index: Box::new(index) }
}

fn bin(op: Binary, a: Expr, b: Expr) -> Expr {
    Expr::Binary(op, Box::new(a), Box::new(b))
}

fn hyper(buffer: usize, slot: Hyper) -> Expr {
    load(buffer, Expr::I64(slot as i64))
}

fn buf(name: &str, access: Access) -> BufferDecl {
    BufferDecl { name: name.into(), elem: Elem::F32, access }
}

fn kernel(
    name: String,
    buffers: Vec<BufferDecl>,
    extent: i64,
    body: Vec<Stmt>,
    sizes: &[String],
    scalars: &[String],
) -> Kernel {
    Kernel {
        name,
        buffers,
        sizes: sizes.to_vec(),
        scalars: scalars.to_vec(),
        index: Var(0),
        extent: Expr::I64(extent),
        body,
        gemm: None,
        threads: None,
    }
}

/// `sum[i] += grad[i]`.
fn accumulate_kernel(n: i64, sizes: &[String], scalars: &[String]) -> Kernel {
    let i = Expr::Var(Var(0));
    let body =
        vec![Stmt::Store { buffer: 1, index: i.clone(), value: bin(Binary::Add, load(1, i.clone()), load(0, i)) }];
    kernel(
        format!("opt_accumulate_{n}"),
        vec![buf("grad", Access::Read), buf("grad_sum", Access::ReadWrite)],
        n,
        body,
        sizes,
        scalars,
    )
}

/// `out[0] = Σ_j (scale · sum[j])²`, one thread, Kahan-compensated.
fn sqnorm_kernel(n: i64, sizes: &[String], scalars: &[String]) -> Kernel {
    let (j, acc, comp, x, y, t) = (Var(1), Var(2), Var(3), Var(4), Var(5), Var(6));
    let scale = hyper(1, Hyper::GradScale);
    let body = vec![
        Stmt::Mut { var: acc, ty: Scalar::F32, init: Expr::F32(0.0) },
        Stmt::Mut { var: comp, ty: Scalar::F32, init: Expr::F32(0.0) },
        Stmt::For {
            var: j,
            extent: Expr::I64(n),
            kind: LoopKind::Serial,
            body: vec![
                Stmt::Let { var: x, value: bin(Binary::Mul, load(0, Expr::Var(j)), scale) },
                Stmt::Let {
                    var: y,
                    value: bin(Binary::Sub, bin(Binary::Mul, Expr::Var(x), Expr::Var(x)), Expr::Var(comp)),
                },
                Stmt::Let { var: t, value: bin(Binary::Add, Expr::Var(acc), Expr::Var(y)) },
                Stmt::Assign {
                    var: comp,
                    value: bin(Binary::Sub, bin(Binary::Sub, Expr::Var(t), Expr::Var(acc)), Expr::Var(y)),
                },
                Stmt::Assign { var: acc, value: Expr::Var(t) },
            ],
        },
        Stmt::Store { buffer: 2, index: Expr::I64(0), value: Expr::Var(acc) },
    ];
    kernel(
        format!("opt_sqnorm_{n}"),
        vec![buf("grad_sum", Access::Read), buf("hyper", Access::Read), buf("sqnorm", Access::Write)],
        1,
        body,
        sizes,
        scalars,
    )
}

/// Adds the `count` squared norms (buffers `0..count`), writes the global norm and the
/// clipping factor into the hyper-parameters (buffer `count`).
fn clip_kernel(count: usize, sizes: &[String], scalars: &[String]) -> Kernel {
    let h = count;
    let (total, norm, clip) = (Var(1), Var(2), Var(3));
    let mut body = vec![Stmt::Mut { var: total, ty: Scalar::F32, init: Expr::F32(0.0) }];
    for b in 0..count {
        body.push(Stmt::Assign { var: total, value: bin(Binary::Add, Expr::Var(total), load(b, Expr::I64(0))) });
    }
    body.push(Stmt::Let { var: norm, value: Expr::Unary(Unary::Sqrt, Box::new(Expr::Var(total))) });
    body.push(Stmt::Let { var: clip, value: hyper(h, Hyper::ClipNorm) });
    // Clip only when enabled and exceeded; `clip / norm` is then finite and below 1.
    let clipping = bin(
        Binary::And,
        bin(Binary::Gt, Expr::Var(clip), Expr::F32(0.0)),
        bin(Binary::Gt, Expr::Var(norm), Expr::Var(clip)),
    );
    let factor = Expr::Select(
        Box::new(clipping),
        Box::new(bin(Binary::Div, Expr::Var(clip), Expr::Var(norm))),
        Box::new(Expr::F32(1.0)),
    );
    body.push(Stmt::Store { buffer: h, index: Expr::I64(Hyper::ClipFactor as i64), value: factor });
    body.push(Stmt::Store { buffer: h, index: Expr::I64(Hyper::GradNorm as i64), value: Expr::Var(norm) });
    let mut buffers: Vec<BufferDecl> = (0..count).map(|b| buf(&format!("sqnorm{b}"), Access::Read)).collect();
    buffers.push(buf("hyper", Access::ReadWrite));
    kernel(format!("opt_clip_{count}"), buffers, 1, body, sizes, scalars)
}

/// AdamW on one parameter (buffers: param, grad_sum, m, v, hyper):
///
/// ```text
/// g  = grad_sum · scale · clip_factor
/// m  = β1 m + (1 − β1) g
/// v  = β2 v + (1 − β2) g²
/// p  = p − lr (m / bc1) / (sqrt(v / bc2) + ε) − lr · wd · p     (the last term if `decay`)
/// grad_sum = 0
/// ```
fn adamw_kernel(n: i64, decay: bool, sizes: &[String], scalars: &[String]) -> Kernel {
    let i = Expr::Var(Var(0));
    let (g, m, v, p, upd) = (Var(1), Var(2), Var(3), Var(4), Var(5));
    let h = |slot| hyper(4, slot);
    let one_minus = |e: Expr| bin(Binary::Sub, Expr::F32(1.0), e);
    let lr = h(Hyper::LearningRate);
    let mut step = bin(Binary::Mul, lr.clone(), Expr::Var(upd));
    if decay {
        step = bin(Binary::Add, step, bin(Binary::Mul, bin(Binary::Mul, lr, h(Hyper::WeightDecay)), Expr::Var(p)));
    }
    let body = vec![
        Stmt::Let {
            var: g,
            value: bin(Binary::Mul, bin(Binary::Mul, load(1, i.clone()), h(Hyper::GradScale)), h(Hyper::ClipFactor)),
        },
        Stmt::Let {
            var: m,
            value: bin(
                Binary::Add,
                bin(Binary::Mul, h(Hyper::Beta1), load(2, i.clone())),
                bin(Binary::Mul, one_minus(h(Hyper::Beta1)), Expr::Var(g)),
            ),
        },
        Stmt::Let {
            var: v,
            value: bin(
                Binary::Add,
                bin(Binary::Mul, h(Hyper::Beta2), load(3, i.clone())),
                bin(Binary::Mul, one_minus(h(Hyper::Beta2)), bin(Binary::Mul, Expr::Var(g), Expr::Var(g))),
            ),
        },
        Stmt::Let { var: p, value: load(0, i.clone()) },
        Stmt::Let {
            var: upd,
            value: bin(
                Binary::Div,
                bin(Binary::Div, Expr::Var(m), h(Hyper::BiasCorrection1)),
                bin(
                    Binary::Add,
                    Expr::Unary(Unary::Sqrt, Box::new(bin(Binary::Div, Expr::Var(v), h(Hyper::BiasCorrection2)))),
                    h(Hyper::Eps),
                ),
            ),
        },
        Stmt::Store { buffer: 0, index: i.clone(), value: bin(Binary::Sub, Expr::Var(p), step) },
        Stmt::Store { buffer: 2, index: i.clone(), value: Expr::Var(m) },
        Stmt::Store { buffer: 3, index: i.clone(), value: Expr::Var(v) },
        Stmt::Store { buffer: 1, index: i, value: Expr::F32(0.0) },
    ];
    kernel(
        format!("opt_adamw_{}{n}", if decay { "" } else { "nodecay_" }),
        vec![
            buf("param", Access::ReadWrite),
            buf("grad_sum", Access::ReadWrite),
            buf("adam_m", Access::ReadWrite),
            buf("adam_v", Access::ReadWrite),
            buf("hyper", Access::Read),
        ],
        n,
        body,
        sizes,
        scalars,
    )
}
