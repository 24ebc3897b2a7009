//! The reference interpreter: evaluate every node of a graph on concrete inputs.
//!
//! It is the oracle that compiled kernels, fused normal-form ops and gradients are
//! checked against, so it favors obviousness: one op at a time, in topological order,
//! every intermediate value kept (tests inspect them).

use super::block_attention;
use super::linear_attention;
use super::math;
use super::shape;
use super::tensor::{Precision, Tensor};
use crate::ir::dim::shape_to_string;
use crate::ir::{DType, Dim, Graph, NodeId, Op};
use std::collections::HashMap;

/// Evaluates a size expression / a shape with the bound symbols.
type SizeFn<'a> = &'a dyn Fn(&Dim) -> Result<i64, String>;
type ShapeFn<'a> = &'a dyn Fn(&[Dim]) -> Result<Vec<usize>, String>;

#[derive(Clone, Debug, Default)]
pub struct EvalOptions {
    pub precision: Precision,
    /// `None`: evaluation mode, dropout is the identity. `Some((seed, step))`: training
    /// mode, masks drawn from the run seed and the optimizer step.
    pub dropout: Option<(u64, u64)>,
    /// Symbol values given up front, for symbols no input shape determines (a graph
    /// whose only use of `N` is a `SizeOf`). Input shapes must agree with them.
    pub symbols: HashMap<String, i64>,
    /// How normal-form ops are evaluated: `None` by their naive definition, `Some(C)` by
    /// the chunked algorithm with chunks of C tokens.
    pub chunk: Option<usize>,
}

/// The value of every node, and the symbol values the inputs bound.
#[derive(Clone, Debug, Default)]
pub struct Evaluation {
    pub values: HashMap<NodeId, Tensor>,
    pub symbols: HashMap<String, i64>,
}

impl Evaluation {
    pub fn get(&self, id: NodeId) -> Option<&Tensor> {
        self.values.get(&id)
    }

    /// The value of the graph output called `name`.
    pub fn output<'a>(&'a self, g: &Graph, name: &str) -> Option<&'a Tensor> {
        let (_, id) = g.outputs.iter().find(|(n, _)| n == name)?;
        self.values.get(id)
    }

    /// All graph outputs, in the graph's order.
    pub fn outputs(&self, g: &Graph) -> Vec<(String, Tensor)> {
        g.outputs.iter().filter_map(|(n, id)| self.values.get(id).map(|t| (n.clone(), t.clone()))).collect()
    }
}

/// Evaluate `g` on named `inputs` and positional `params` (`params[i]` is `g.params[i]`).
pub fn evaluate(
    g: &Graph,
    inputs: &HashMap<String, Tensor>,
    params: &[Tensor],
    opts: &EvalOptions,
) -> Result<Evaluation, String> {
    if params.len() != g.params.len() {
        return Err(format!("graph `{}` has {} parameters, {} were given", g.name, g.params.len(), params.len()));
    }
    let symbols = bind_symbols(g, inputs, &opts.symbols)?;
    let size = |d: &Dim| -> Result<i64, String> {
        d.eval(&|s| symbols.get(s).copied())
            .ok_or_else(|| format!("cannot evaluate the size `{d}`: unbound symbol or overflow"))
    };
    let sizes = |ds: &[Dim]| -> Result<Vec<usize>, String> {
        ds.iter()
            .map(|d| {
                let v = size(d)?;
                usize::try_from(v).map_err(|_| format!("the size `{d}` is negative ({v})"))
            })
            .collect()
    };
    for (info, t) in g.params.iter().zip(params) {
        let want = sizes(&info.ty.shape)?;
        if want != t.shape {
            return Err(format!(
                "parameter `{}` should have shape {} but has {:?}",
                info.name,
                shape_to_string(&info.ty.shape),
                t.shape
            ));
        }
    }

    let mut values: HashMap<NodeId, Tensor> = HashMap::with_capacity(g.len());
    for id in g.topo_order() {
        let node = g.node(id);
        let operands = g.operands(id);
        let args: Vec<&Tensor> =
            operands.iter().map(|o| values.get(o).ok_or("an operand was not evaluated")).collect::<Result<_, _>>()?;
        let arg_dtype = operands.first().map(|&o| g.ty(o).dtype);
        let result = eval_op(&node.op, arg_dtype, &args, inputs, params, g, opts, &size, &sizes, &symbols)
            .map_err(|e| format!("evaluating node {id:?} ({}): {e}", node.op.kind()))?;
        let mut result = result;
        if node.ty.dtype == DType::F32 && opts.precision == Precision::F32 {
            for v in &mut result.data {
                *v = opts.precision.round(*v);
            }
        }
        // A 16-bit float is rounded after every op in either precision (through f32, as
        // kernels round: in f64 a tie of the f32 rounding may differ from a direct one).
        let round16 = match node.ty.dtype {
            DType::BF16 => Some(crate::kernel::math::round_bf16 as fn(f32) -> f32),
            DType::F16 => Some(crate::kernel::math::round_f16 as fn(f32) -> f32),
            _ => None,
        };
        if let Some(round) = round16 {
            for v in &mut result.data {
                *v = round(*v as f32) as f64;
            }
        }
        values.insert(id, result);
    }
    Ok(Evaluation { values, symbols })
}

/// Bind symbols from input shapes: a dim that is a bare symbol binds it; then every
/// dim of every input is checked against its actual size.
fn bind_symbols(
    g: &Graph,
    inputs: &HashMap<String, Tensor>,
    given: &HashMap<String, i64>,
) -> Result<HashMap<String, i64>, String> {
    let mut symbols = given.clone();
    let mismatch = |name: &str, want: &[Dim], got: &[usize]| {
        format!("input `{name}` should have shape {} but has {got:?}", shape_to_string(want))
    };
    for info in &g.inputs {
        let t = inputs.get(&info.name).ok_or_else(|| format!("missing input `{}`", info.name))?;
        if t.rank() != info.ty.rank() {
            return Err(mismatch(&info.name, &info.ty.shape, &t.shape));
        }
        for (d, &n) in info.ty.shape.iter().zip(&t.shape) {
            if let [s] = d.symbols().as_slice() {
                if *d == Dim::sym(s.as_str()) {
                    match symbols.get(s) {
                        Some(&v) if v != n as i64 => {
                            return Err(format!(
                                "{} (`{s}` is {v} from another input)",
                                mismatch(&info.name, &info.ty.shape, &t.shape)
                            ))
                        }
                        _ => {
                            symbols.insert(s.clone(), n as i64);
                        }
                    }
                }
            }
        }
    }
    for info in &g.inputs {
        let t = &inputs[&info.name];
        for (d, &n) in info.ty.shape.iter().zip(&t.shape) {
            if d.eval(&|s| symbols.get(s).copied()) != Some(n as i64) {
                return Err(mismatch(&info.name, &info.ty.shape, &t.shape));
            }
        }
    }
    if let Some(extra) = inputs.keys().find(|k| !g.inputs.iter().any(|i| &i.name == *k)) {
        return Err(format!("graph `{}` has no input `{extra}`", g.name));
    }
    // Integer inputs that index tables: the check every executor makes, before any op.
    for (info, bounds) in g.inputs.iter().zip(crate::ir::index_bounds::input_bounds(g)) {
        let t = &inputs[&info.name];
        if info.ty.dtype == crate::ir::DType::I32 {
            if let Some((i, v)) = t.data.iter().enumerate().find(|(_, v)| v.fract() != 0.0 || !v.is_finite()) {
                return Err(format!("input `{}` is i32 but holds {v} at flat index {i}", info.name));
            }
        }
        let limits: Vec<i64> = bounds
            .iter()
            .map(|b| b.eval(&|s| symbols.get(s).copied()).ok_or_else(|| format!("cannot evaluate the bound `{b}`")))
            .collect::<Result<_, _>>()?;
        tnc_bundle::index_bounds::check_values(t.data.iter().map(|&v| v as i64), &limits)
            .map_err(|e| format!("input `{}` {e}", info.name))?;
    }
    Ok(symbols)
}

#[allow(clippy::too_many_arguments)]
fn eval_op(
    op: &Op,
    arg_dtype: Option<DType>,
    args: &[&Tensor],
    inputs: &HashMap<String, Tensor>,
    params: &[Tensor],
    g: &Graph,
    opts: &EvalOptions,
    size: SizeFn,
    sizes: ShapeFn,
    symbols: &HashMap<String, i64>,
) -> Result<Tensor, String> {
    let arg =
        |i: usize| -> Result<&Tensor, String> { args.get(i).copied().ok_or_else(|| format!("missing operand {i}")) };
    let dtype = arg_dtype.unwrap_or(DType::F32);
    match op {
        Op::Input { index } => {
            let info = g.inputs.get(*index as usize).ok_or("bad input index")?;
            inputs.get(&info.name).cloned().ok_or_else(|| format!("missing input `{}`", info.name))
        }
        Op::Param { index } => params.get(*index as usize).cloned().ok_or_else(|| "bad parameter index".into()),
        Op::Constant { value, .. } => Ok(Tensor::scalar(value.get())),
        Op::Iota { len, .. } => {
            let n = sizes(std::slice::from_ref(len))?[0];
            Tensor::new(vec![n], (0..n).map(|i| i as f64).collect())
        }
        Op::SizeOf { size: d, .. } => Ok(Tensor::scalar(size(d)? as f64)),
        Op::Unary(u) => Ok(math::unary(*u, dtype, arg(0)?)),
        Op::Binary(b) => math::binary(*b, dtype, arg(0)?, arg(1)?),
        Op::Select => math::select(arg(0)?, arg(1)?, arg(2)?),
        Op::Cast { to } => Ok(math::cast(*to, arg(0)?)),
        Op::Reduce { op, axes } => math::reduce(*op, axes, arg(0)?),
        Op::Einsum(spec) => math::einsum(spec, args),
        Op::Scan { axis, reverse } => math::scan(*axis, *reverse, arg(0)?, args.get(1).copied()),
        Op::Reshape { shape: s } => shape::reshape(arg(0)?, sizes(s)?),
        Op::Broadcast { shape: s } => shape::broadcast(arg(0)?, sizes(s)?),
        Op::Permute { perm } => shape::permute(arg(0)?, perm),
        Op::Slice { axis, start, end } => shape::slice(arg(0)?, *axis, size(start)?, size(end)?),
        Op::Pad { axis, before, after } => shape::pad(arg(0)?, *axis, size(before)?, size(after)?),
        Op::Concat { axis } => shape::concat(args, *axis),
        Op::Gather => shape::gather(arg(0)?, arg(1)?),
        Op::ScatterAdd { rows } => super::scatter::scatter_add(arg(0)?, arg(1)?, sizes(std::slice::from_ref(rows))?[0]),
        Op::CrossEntropy(ce)
        | Op::CrossEntropyGradX(ce)
        | Op::CrossEntropyGradTable(ce)
        | Op::CrossEntropyCorrect(ce) => {
            use crate::ir::cross_entropy::CeOp;
            let which = match op {
                Op::CrossEntropy(_) => CeOp::Loss,
                Op::CrossEntropyGradX(_) => CeOp::GradX,
                Op::CrossEntropyCorrect(_) => CeOp::Correct,
                _ => CeOp::GradTable,
            };
            let g = if matches!(which, CeOp::Loss | CeOp::Correct) { None } else { Some(arg(3)?) };
            // With 16-bit operands the gradients' products read P rounded likewise.
            let round: Option<fn(f32) -> f32> = match arg_dtype {
                Some(DType::BF16) => Some(crate::kernel::math::round_bf16),
                Some(DType::F16) => Some(crate::kernel::math::round_f16),
                _ => None,
            };
            super::cross_entropy::eval(ce, which, arg(0)?, arg(1)?, arg(2)?, (g, round), opts.chunk)
        }
        Op::Dropout { rate, salt } => match opts.dropout {
            None => Ok(arg(0)?.clone()),
            Some((seed, step)) => Ok(shape::dropout(arg(0)?, rate.get(), *salt, seed, step)),
        },
        Op::BlockAttention(ba) => block_attention::eval(ba, args, symbols, opts),
        Op::BlockAttentionGrad(bg) => block_attention::eval_grad(bg, args, symbols, opts),
        Op::LinearAttention(la) => {
            let (qa, ka, va, lam) = la.split(args);
            let q = linear_attention::eval_region(&la.q, qa, symbols, opts)?;
            let k = linear_attention::eval_region(&la.k, ka, symbols, opts)?;
            let v = linear_attention::eval_region(&la.v, va, symbols, opts)?;
            linear_attention::eval(la, &q, &k, &v, lam.copied(), opts.chunk)
        }
    }
}
