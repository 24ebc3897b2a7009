//! A sum over the tokens into a small output (the gradient of a norm's weight or of a
//! bias: Σ over B·N) is a kernel of few parallel iterations, each walking every token —
//! on a GPU one or a few blocks for the whole device, on a CPU one thread. Such a kernel
//! is split in two, over `parts` parts of the token range ([`PARTS`] on GPUs,
//! [`CPU_PARTS`] on CPUs):
//!
//! ```text
//! parallel r { for vector c {             partial: parallel (s, r) { for vector c {
//!   acc = 0                                 acc = 0
//!   for b, n: acc += f(r, c, b, n)   →      for t in part s of 0..B·N: acc += f(r, c, b(t), n(t))
//!   out[idx(r, c)] = g(acc)                 part[s, r, c] = acc }}
//! }}                                      combine: parallel (r, c) { acc = Σ_s part[s, r, c]; out[idx(r, c)] = g(acc) }
//! ```
//!
//! The token nest is flattened into one index `t` (`b = t / N`, `n = t % N`), so any nest
//! of serial loops splits evenly. The combine adds the parts in order, so results do not
//! depend on the launch (no atomics), and then finishes as the kernel did (`g`: a mean's
//! division). Only a kernel of exactly this shape is split: one sum (`blocks::reduction`),
//! in one vector loop or (a scalar, the loss's mean) in the body itself, over a nest whose
//! extent depends on the run-time sizes, into an output that does not, followed by lets
//! and one store. One workspace per split kernel serves all its launches: launches run
//! one after another (CPU threads per launch, one CUDA stream).

use super::emit::bin;
use super::{BufferInfo, Role, Step};
use crate::ir::Dim;
use crate::kernel::blocks::reduction;
use crate::kernel::{Access, Binary, BufferDecl, Elem, Expr, Kernel, LoopKind, Scalar, Stmt, Var};
use std::collections::{HashMap, HashSet};

/// Parts of the token range by default: enough blocks to fill a GPU for a one-row output.
pub const PARTS: usize = 64;

/// Parts on CPUs: a few per core of the machines tnc targets, each part still a long run
/// of whole rows (one part per thread would make the split depend on the machine).
pub const CPU_PARTS: usize = 8;

/// A kernel of the splittable shape, taken apart.
struct Shape {
    /// Top-level lets (before the vector loop).
    top: Vec<Stmt>,
    /// The vector loop over the output's columns holding the sum, if there is one (a
    /// scalar, the loss's mean, has none).
    column: Option<Var>,
    columns: Expr,
    /// The statements before the token nest (lets and accumulators).
    before: Vec<Stmt>,
    /// The nest's loops, outermost first, and its statements inside out (lets between
    /// loops, then the innermost body).
    loops: Vec<(Var, Expr)>,
    inner: Vec<Stmt>,
    /// Lets after the nest (they may use the sum), and the store.
    after: Vec<Stmt>,
    store: Stmt,
    /// The store's buffer slot.
    out: usize,
    acc: Var,
    comp: Option<Var>,
}

fn mentions(e: &Expr, vars: &[Var]) -> bool {
    let mut found = false;
    e.visit_vars(&mut |v| found |= vars.contains(&v));
    found
}

fn shape(k: &Kernel) -> Option<Shape> {
    if k.gemm.is_some() || k.threads.is_some() {
        return None;
    }
    // Lets, then one vector loop holding the sum; or the sum in the body itself.
    let (top, column, columns, body) = match k.body.split_last() {
        Some((Stmt::For { var, extent, kind: LoopKind::Vector, body }, top))
            if top.iter().all(|s| matches!(s, Stmt::Let { .. })) =>
        {
            (top.to_vec(), Some(*var), extent.clone(), body.as_slice())
        }
        _ => (Vec::new(), None, Expr::I64(1), k.body.as_slice()),
    };
    // Lets and accumulators, the nest, lets, the store.
    let at = body.iter().position(|s| matches!(s, Stmt::For { .. }))?;
    let (before, rest) = body.split_at(at);
    let (nest, rest) = rest.split_first()?;
    let (store, after) = rest.split_last()?;
    let lets_or_muts = before.iter().all(|s| matches!(s, Stmt::Let { .. } | Stmt::Mut { .. }));
    if !lets_or_muts || !after.iter().all(|s| matches!(s, Stmt::Let { .. })) {
        return None;
    }
    let inits: HashMap<Var, Expr> = before
        .iter()
        .filter_map(|s| match s {
            Stmt::Mut { var, init, .. } => Some((*var, init.clone())),
            _ => None,
        })
        .collect();
    let [sum] = reduction(nest, &inits, true)?[..] else { return None };
    if sum.op != Binary::Add {
        return None;
    }
    // One store; it (and the lets before it) may use the sum: the combine recomputes them.
    let Stmt::Store { buffer: out, .. } = store else { return None };
    // Flatten the nest: serial loops, with only lets besides the next loop.
    let (mut loops, mut inner) = (Vec::new(), Vec::new());
    let mut level = nest;
    loop {
        let Stmt::For { var, extent, kind: LoopKind::Serial, body } = level else { return None };
        loops.push((*var, extent.clone()));
        let lets = body.iter().filter(|s| matches!(s, Stmt::Let { .. })).count();
        match body.iter().find(|s| !matches!(s, Stmt::Let { .. })) {
            Some(next @ Stmt::For { .. }) if lets + 1 == body.len() => {
                inner.extend(body.iter().filter(|s| matches!(s, Stmt::Let { .. })).cloned());
                level = next;
            }
            _ => {
                inner.extend(body.iter().cloned());
                break;
            }
        }
    }
    // Extents fixed before the nest (naming none of its loop variables or lets: a chunk's
    // run-time length cannot be flattened), a token range that grows with the run-time
    // sizes, and an output that does not (the workspace is `parts` times the output).
    let mut inside: Vec<Var> = loops.iter().map(|l| l.0).collect();
    inside.extend(inner.iter().filter_map(|s| match s {
        Stmt::Let { var, .. } => Some(*var),
        _ => None,
    }));
    if loops.iter().any(|(_, e)| mentions(e, &inside)) {
        return None;
    }
    fn sized(e: &Expr) -> bool {
        match e {
            Expr::Size(_) => true,
            Expr::Binary(_, a, b) => sized(a) || sized(b),
            Expr::Unary(_, a) | Expr::Cast(_, a) => sized(a),
            _ => false,
        }
    }
    if !loops.iter().any(|(_, e)| sized(e)) || sized(&k.extent) || sized(&columns) {
        return None;
    }
    Some(Shape {
        top,
        column,
        columns,
        before: before.to_vec(),
        loops,
        inner,
        after: after.to_vec(),
        store: store.clone(),
        out: *out,
        acc: sum.var,
        comp: sum.comp,
    })
}

/// A size polynomial of an index expression over the kernel's sizes, if it is one.
fn dim_of(e: &Expr, sizes: &[String]) -> Option<Dim> {
    match e {
        Expr::I64(c) => Some(Dim::constant(*c)),
        Expr::Size(i) => sizes.get(*i).map(|s| Dim::sym(s.clone())),
        Expr::Binary(Binary::Add, a, b) => dim_of(a, sizes)?.checked_add(&dim_of(b, sizes)?),
        Expr::Binary(Binary::Sub, a, b) => dim_of(a, sizes)?.checked_sub(&dim_of(b, sizes)?),
        Expr::Binary(Binary::Mul, a, b) => dim_of(a, sizes)?.checked_mul(&dim_of(b, sizes)?),
        Expr::Binary(Binary::Div, a, k) => {
            let Expr::I64(k) = **k else { return None };
            match &**a {
                Expr::Binary(Binary::Add, x, c) if **c == Expr::I64(k - 1) => dim_of(x, sizes)?.ceil_div(k),
                _ => dim_of(a, sizes)?.div_exact(k),
            }
        }
        _ => None,
    }
}

/// Splits every kernel of the splittable shape (see the module notes): its launches
/// become a partial launch and a combine launch over a new workspace. Returns the
/// combine kernels (one thread per output element: coalesced as they are).
pub fn split_reductions(
    kernels: &mut Vec<Kernel>,
    steps: &mut Vec<Step>,
    buffers: &mut Vec<BufferInfo>,
    parts: usize,
) -> HashSet<usize> {
    let parts = parts.max(1) as i64;
    let mut combiners = HashSet::new();
    let mut replaced: HashMap<usize, (usize, usize, usize)> = HashMap::new();
    for ki in 0..kernels.len() {
        let k = &kernels[ki];
        let Some(sh) = shape(k) else { continue };
        let rows_columns = bin(Binary::Mul, k.extent.clone(), sh.columns.clone());
        let Some(count) = dim_of(&rows_columns, &k.sizes) else { continue };
        let Some(bytes) = count.checked_scale(parts * 4) else { continue };
        let (partial, combine) = build(k, &sh, rows_columns, parts);
        buffers.push(BufferInfo { bytes, role: Role::Workspace, name: None });
        let workspace = buffers.len() - 1;
        kernels[ki] = partial;
        kernels.push(combine);
        combiners.insert(kernels.len() - 1);
        replaced.insert(ki, (ki, kernels.len() - 1, workspace));
    }
    let old = std::mem::take(steps);
    for st in old {
        match replaced.get(&st.kernel) {
            Some(&(partial, combine, workspace)) => {
                let mut bound = st.buffers.clone();
                bound.push(workspace);
                steps.push(Step { kernel: partial, buffers: bound.clone(), ..st.clone() });
                steps.push(Step { kernel: combine, buffers: bound, ..st });
            }
            None => steps.push(st),
        }
    }
    combiners
}

/// The partial and combine kernels of `k` (shape `sh`, `rc` = rows × columns). Both take
/// `k`'s buffers plus the workspace `part[parts × rc]` as a last slot.
fn build(k: &Kernel, sh: &Shape, rc: Expr, parts: i64) -> (Kernel, Kernel) {
    let mut next = k.next_var();
    let mut fresh = || {
        next += 1;
        Var(next - 1)
    };
    let part_slot = k.buffers.len();
    let splits = Expr::I64(parts);
    let rows = k.extent.clone();
    let flat = |row: Expr, column: Expr| bin(Binary::Add, bin(Binary::Mul, row, sh.columns.clone()), column);

    // Partial: iteration p = s·R + r.
    let (p, s) = (fresh(), fresh());
    let (total, len, t, g) = (fresh(), fresh(), fresh(), fresh());
    let mut body = vec![
        Stmt::Let { var: k.index, value: bin(Binary::Rem, Expr::Var(p), rows.clone()) },
        Stmt::Let { var: s, value: bin(Binary::Div, Expr::Var(p), rows.clone()) },
    ];
    body.extend(sh.top.iter().cloned());
    let tokens = sh.loops.iter().map(|l| l.1.clone()).reduce(|a, b| bin(Binary::Mul, a, b)).expect("a loop");
    let mut column_body = sh.before.clone();
    column_body.push(Stmt::Let { var: total, value: tokens });
    let ceil = bin(Binary::Div, bin(Binary::Add, Expr::Var(total), Expr::I64(parts - 1)), splits.clone());
    column_body.push(Stmt::Let { var: len, value: ceil });
    // Token g of the flattened nest: each loop's index from the innermost out.
    let mut unflatten = Vec::new();
    let mut stride = Expr::I64(1);
    for (i, (var, extent)) in sh.loops.iter().enumerate().rev() {
        let q = bin(Binary::Div, Expr::Var(g), stride.clone());
        let value = if i == 0 { q } else { bin(Binary::Rem, q, extent.clone()) };
        unflatten.push(Stmt::Let { var: *var, value });
        stride = bin(Binary::Mul, stride, extent.clone());
    }
    unflatten.reverse();
    unflatten.extend(sh.inner.iter().cloned());
    // Part s is tokens s·len … min((s + 1)·len, total) − 1 (none for a part past the end):
    // a loop without a guard, which CPUs interchange with the column loop.
    let first = bin(Binary::Mul, Expr::Var(s), Expr::Var(len));
    let in_part = bin(
        Binary::Max,
        Expr::I64(0),
        bin(Binary::Min, Expr::Var(len), bin(Binary::Sub, Expr::Var(total), first.clone())),
    );
    let mut token_body = vec![Stmt::Let { var: g, value: bin(Binary::Add, first, Expr::Var(t)) }];
    token_body.extend(unflatten);
    column_body.push(Stmt::For { var: t, extent: in_part, kind: LoopKind::Serial, body: token_body });
    let value = match sh.comp {
        Some(c) => bin(Binary::Sub, Expr::Var(sh.acc), Expr::Var(c)),
        None => Expr::Var(sh.acc),
    };
    let column = sh.column.map_or(Expr::I64(0), Expr::Var);
    let at = bin(Binary::Add, bin(Binary::Mul, Expr::Var(s), rc.clone()), flat(Expr::Var(k.index), column));
    column_body.push(Stmt::Store { buffer: part_slot, index: at, value });
    match sh.column {
        Some(c) => {
            body.push(Stmt::For { var: c, extent: sh.columns.clone(), kind: LoopKind::Vector, body: column_body })
        }
        None => body.extend(column_body),
    }
    let out = sh.out;
    let mut decls = k.buffers.clone();
    decls[out].access = Access::Read; // written by the combine (and perhaps read here)
    decls.push(BufferDecl { name: "part".into(), elem: Elem::F32, access: Access::Write });
    let partial = Kernel {
        name: format!("{}_part", k.name),
        buffers: decls.clone(),
        index: p,
        extent: bin(Binary::Mul, rows.clone(), splits),
        body,
        ..k.clone()
    };
    // Combine: iteration q = r·C + c, the parts added in order (Kahan) into the sum's own
    // variables, then the lets after the nest and the store, as in `k`.
    let (q, x, y, z) = (fresh(), fresh(), fresh(), fresh());
    let (sum, comp) = (sh.acc, sh.comp.unwrap_or_else(&mut fresh));
    let mut body = vec![Stmt::Let { var: k.index, value: bin(Binary::Div, Expr::Var(q), sh.columns.clone()) }];
    if let Some(c) = sh.column {
        body.push(Stmt::Let { var: c, value: bin(Binary::Rem, Expr::Var(q), sh.columns.clone()) });
    }
    body.extend(sh.top.iter().cloned());
    // Everything before the nest but the sum's own accumulators, which the parts refill.
    let own = |v: &Var| *v == sh.acc || Some(*v) == sh.comp;
    body.extend(sh.before.iter().filter(|s| !matches!(s, Stmt::Mut { var, .. } if own(var))).cloned());
    body.push(Stmt::Mut { var: sum, ty: Scalar::F32, init: Expr::F32(0.0) });
    body.push(Stmt::Mut { var: comp, ty: Scalar::F32, init: Expr::F32(0.0) });
    let load = Expr::Load {
        buffer: part_slot,
        index: Box::new(bin(Binary::Add, bin(Binary::Mul, Expr::Var(x), rc.clone()), Expr::Var(q))),
    };
    body.push(Stmt::For {
        var: x,
        extent: Expr::I64(parts),
        kind: LoopKind::Serial,
        body: vec![
            Stmt::Let { var: y, value: bin(Binary::Sub, load, Expr::Var(comp)) },
            Stmt::Let { var: z, value: bin(Binary::Add, Expr::Var(sum), Expr::Var(y)) },
            Stmt::Assign {
                var: comp,
                value: bin(Binary::Sub, bin(Binary::Sub, Expr::Var(z), Expr::Var(sum)), Expr::Var(y)),
            },
            Stmt::Assign { var: sum, value: Expr::Var(z) },
        ],
    });
    body.extend(sh.after.iter().cloned());
    body.push(sh.store.clone());
    decls[part_slot].access = Access::Read;
    decls[out].access = k.buffers[out].access;
    let combine = Kernel { name: format!("{}_sum", k.name), buffers: decls, index: q, extent: rc, body, ..k.clone() };
    (partial, combine)
}
