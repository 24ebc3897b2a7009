//! Type inference: the type of an op's result from the types of its operands.
//! The same rules serve elaboration (to report shape errors at the source) and the
//! verifier (to check that passes keep the graph well typed).

use super::dim::{numel, shape_to_string, Dim};
use super::op::{BinaryOp, Op, UnaryOp};
use super::types::{DType, TensorType};

fn arity(op: &Op, n: usize, expected: std::ops::RangeInclusive<usize>) -> Result<(), String> {
    if expected.contains(&n) {
        Ok(())
    } else {
        Err(format!("`{}` takes {:?} operands, got {n}", op.kind(), expected))
    }
}

fn check_axis(axis: usize, rank: usize, what: &str) -> Result<(), String> {
    if axis < rank {
        Ok(())
    } else {
        Err(format!("{what}: axis {axis} is out of range for a tensor of rank {rank}"))
    }
}

pub fn infer(op: &Op, ops: &[&TensorType]) -> Result<TensorType, String> {
    match op {
        Op::Input { .. } | Op::Param { .. } => Err("inputs and parameters are typed by their tables".into()),
        Op::Constant { dtype, .. } => {
            arity(op, ops.len(), 0..=0)?;
            Ok(TensorType::scalar(*dtype))
        }
        Op::Iota { len, dtype } => {
            arity(op, ops.len(), 0..=0)?;
            Ok(TensorType::new(*dtype, vec![len.clone()]))
        }
        Op::SizeOf { dtype, .. } => {
            arity(op, ops.len(), 0..=0)?;
            Ok(TensorType::scalar(*dtype))
        }
        Op::Unary(u) => {
            arity(op, ops.len(), 1..=1)?;
            let t = ops[0];
            match u {
                UnaryOp::Not if t.dtype != DType::Bool => Err("`not` needs a bool tensor".into()),
                UnaryOp::Not => Ok(t.clone()),
                UnaryOp::Neg | UnaryOp::Abs if t.dtype.is_numeric() => Ok(t.clone()),
                _ if t.dtype.is_float() => Ok(t.clone()),
                _ => Err(format!("`{}` needs a float tensor, got {}", op.kind(), t)),
            }
        }
        Op::Binary(b) => {
            arity(op, ops.len(), 2..=2)?;
            let (a, c) = (ops[0], ops[1]);
            if a.shape != c.shape {
                return Err(format!(
                    "`{}` needs equal shapes, got {} and {}",
                    op.kind(),
                    shape_to_string(&a.shape),
                    shape_to_string(&c.shape)
                ));
            }
            if a.dtype != c.dtype {
                return Err(format!(
                    "`{}` needs equal element types, got {} and {}",
                    op.kind(),
                    a.dtype.name(),
                    c.dtype.name()
                ));
            }
            if b.is_logical() {
                if a.dtype != DType::Bool {
                    return Err(format!("`{}` needs bool operands", op.kind()));
                }
                Ok(a.clone())
            } else if b.is_comparison() {
                Ok(a.with_dtype(DType::Bool))
            } else if !a.dtype.is_numeric() {
                Err(format!("`{}` needs numbers, got {}", op.kind(), a.dtype.name()))
            } else if *b == BinaryOp::Pow && !a.dtype.is_float() {
                Err("`**` needs float operands".into())
            } else {
                Ok(a.clone())
            }
        }
        Op::Select => {
            arity(op, ops.len(), 3..=3)?;
            if ops[0].dtype != DType::Bool {
                return Err(format!("`where` needs a bool condition, got {}", ops[0].dtype.name()));
            }
            if ops[0].shape != ops[1].shape || ops[1].shape != ops[2].shape {
                return Err("`where` needs equal shapes".into());
            }
            if ops[1].dtype != ops[2].dtype {
                return Err("`where` needs both branches of one element type".into());
            }
            Ok(ops[1].clone())
        }
        Op::Cast { to } => {
            arity(op, ops.len(), 1..=1)?;
            Ok(ops[0].with_dtype(*to))
        }
        Op::Reduce { axes, .. } => {
            arity(op, ops.len(), 1..=1)?;
            let t = ops[0];
            if !t.dtype.is_numeric() {
                return Err("reductions need numbers".into());
            }
            for w in axes.windows(2) {
                if w[0] >= w[1] {
                    return Err("reduction axes must be ascending and distinct".into());
                }
            }
            for &a in axes {
                check_axis(a, t.rank(), "reduction")?;
            }
            let shape = t.shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, d)| d.clone()).collect();
            Ok(TensorType::new(t.dtype, shape))
        }
        Op::Einsum(spec) => {
            arity(op, ops.len(), 1..=2)?;
            if spec.inputs.len() != ops.len() {
                return Err(format!("einsum `{spec}` names {} operands, got {}", spec.inputs.len(), ops.len()));
            }
            let mut size: [Option<Dim>; 26] = Default::default();
            // Any float operands, one type for both: products accumulate (and result) in f32.
            if ops.iter().any(|t| !t.dtype.is_float() || t.dtype != ops[0].dtype) {
                return Err(format!(
                    "einsum needs float operands of one type, got {}",
                    ops.iter().map(|t| t.dtype.name()).collect::<Vec<_>>().join(" and ")
                ));
            }
            for (letters, t) in spec.inputs.iter().zip(ops) {
                if letters.len() != t.rank() {
                    return Err(format!(
                        "einsum `{spec}`: `{}` has {} indices but the operand has rank {} ({})",
                        String::from_utf8_lossy(letters),
                        letters.len(),
                        t.rank(),
                        shape_to_string(&t.shape)
                    ));
                }
                for (i, &l) in letters.iter().enumerate() {
                    if !l.is_ascii_lowercase() {
                        return Err(format!("einsum indices must be letters a-z, got `{}`", l as char));
                    }
                    if letters[..i].contains(&l) {
                        return Err(format!("einsum `{spec}`: index `{}` repeats within one operand", l as char));
                    }
                    let slot = &mut size[(l - b'a') as usize];
                    match slot {
                        None => *slot = Some(t.shape[i].clone()),
                        Some(s) if *s == t.shape[i] => {}
                        Some(s) => {
                            return Err(format!(
                                "einsum `{spec}`: index `{}` has size {s} in one place and {} in another",
                                l as char, t.shape[i]
                            ))
                        }
                    }
                }
            }
            let mut shape = Vec::new();
            for (i, &l) in spec.output.iter().enumerate() {
                if spec.output[..i].contains(&l) {
                    return Err(format!("einsum `{spec}`: output index `{}` repeats", l as char));
                }
                let s =
                    l.is_ascii_lowercase().then(|| size[(l - b'a') as usize].clone()).flatten().ok_or_else(|| {
                        format!("einsum `{spec}`: output index `{}` is not in any operand", l as char)
                    })?;
                shape.push(s);
            }
            Ok(TensorType::new(DType::F32, shape))
        }
        Op::Scan { axis, .. } => {
            arity(op, ops.len(), 1..=2)?;
            let t = ops[0];
            if t.dtype != DType::F32 {
                return Err("cumsum needs an f32 tensor".into());
            }
            check_axis(*axis, t.rank(), "cumsum")?;
            if ops.len() == 2 && ops[1] != t {
                return Err(format!(
                    "a decayed scan needs the decay with the same type as the values ({t}), got {}",
                    ops[1]
                ));
            }
            Ok(t.clone())
        }
        Op::Reshape { shape } => {
            arity(op, ops.len(), 1..=1)?;
            let from = numel(&ops[0].shape).ok_or("size overflow")?;
            let to = numel(shape).ok_or("size overflow")?;
            if from != to {
                return Err(format!(
                    "cannot reshape {} ({from} elements) to {} ({to} elements)",
                    shape_to_string(&ops[0].shape),
                    shape_to_string(shape)
                ));
            }
            Ok(TensorType::new(ops[0].dtype, shape.clone()))
        }
        Op::Broadcast { shape } => {
            arity(op, ops.len(), 1..=1)?;
            let t = ops[0];
            if t.rank() != shape.len() {
                return Err(format!(
                    "broadcast keeps the rank: {} to {}",
                    shape_to_string(&t.shape),
                    shape_to_string(shape)
                ));
            }
            for (a, b) in t.shape.iter().zip(shape) {
                if a != b && a.as_const() != Some(1) {
                    return Err(format!(
                        "cannot broadcast {} to {}",
                        shape_to_string(&t.shape),
                        shape_to_string(shape)
                    ));
                }
            }
            Ok(TensorType::new(t.dtype, shape.clone()))
        }
        Op::Permute { perm } => {
            arity(op, ops.len(), 1..=1)?;
            let t = ops[0];
            let mut seen = vec![false; t.rank()];
            if perm.len() != t.rank() {
                return Err(format!("permutation {perm:?} does not match rank {}", t.rank()));
            }
            for &p in perm {
                if p >= t.rank() || seen[p] {
                    return Err(format!("{perm:?} is not a permutation of 0..{}", t.rank()));
                }
                seen[p] = true;
            }
            Ok(TensorType::new(t.dtype, perm.iter().map(|&p| t.shape[p].clone()).collect()))
        }
        Op::Slice { axis, start, end } => {
            arity(op, ops.len(), 1..=1)?;
            let t = ops[0];
            check_axis(*axis, t.rank(), "slice")?;
            let len = end.checked_sub(start).ok_or("size overflow")?;
            if let Some(l) = len.as_const() {
                if l < 0 {
                    return Err(format!("slice {start}:{end} has negative length"));
                }
            }
            if let (Some(e), Some(n)) = (end.as_const(), t.shape[*axis].as_const()) {
                if e > n {
                    return Err(format!("slice end {e} is past the axis size {n}"));
                }
            }
            if let Some(s) = start.as_const() {
                if s < 0 {
                    return Err(format!("slice start {s} is negative"));
                }
            }
            let mut shape = t.shape.clone();
            shape[*axis] = len;
            Ok(TensorType::new(t.dtype, shape))
        }
        Op::Pad { axis, before, after } => {
            arity(op, ops.len(), 1..=1)?;
            let t = ops[0];
            check_axis(*axis, t.rank(), "pad")?;
            let mut shape = t.shape.clone();
            shape[*axis] =
                shape[*axis].checked_add(before).and_then(|d| d.checked_add(after)).ok_or("size overflow")?;
            Ok(TensorType::new(t.dtype, shape))
        }
        Op::Concat { axis } => {
            if ops.is_empty() {
                return Err("concat needs at least one operand".into());
            }
            let t = ops[0];
            check_axis(*axis, t.rank(), "concat")?;
            let mut total = Dim::constant(0);
            for o in ops {
                if o.dtype != t.dtype || o.rank() != t.rank() {
                    return Err(format!("concat needs operands of one element type and rank, got {t} and {o}"));
                }
                for (i, (a, b)) in o.shape.iter().zip(&t.shape).enumerate() {
                    if i != *axis && a != b {
                        return Err(format!(
                            "concat along axis {axis}: shapes {} and {} differ on axis {i}",
                            shape_to_string(&t.shape),
                            shape_to_string(&o.shape)
                        ));
                    }
                }
                total = total.checked_add(&o.shape[*axis]).ok_or("size overflow")?;
            }
            let mut shape = t.shape.clone();
            shape[*axis] = total;
            Ok(TensorType::new(t.dtype, shape))
        }
        Op::Gather => {
            arity(op, ops.len(), 2..=2)?;
            let (table, idx) = (ops[0], ops[1]);
            if table.rank() == 0 {
                return Err("gather needs a table of rank ≥ 1".into());
            }
            if idx.dtype != DType::I32 {
                return Err(format!("gather needs i32 indices, got {}", idx.dtype.name()));
            }
            let shape = idx.shape.iter().chain(&table.shape[1..]).cloned().collect();
            Ok(TensorType::new(table.dtype, shape))
        }
        Op::LinearAttention(la) => la.infer(ops),
        Op::CrossEntropy(ce) => ce.infer(super::cross_entropy::CeOp::Loss, ops),
        Op::CrossEntropyGradX(ce) => ce.infer(super::cross_entropy::CeOp::GradX, ops),
        Op::CrossEntropyGradTable(ce) => ce.infer(super::cross_entropy::CeOp::GradTable, ops),
        Op::CrossEntropyCorrect(ce) => ce.infer(super::cross_entropy::CeOp::Correct, ops),
        Op::ScatterAdd { rows } => {
            arity(op, ops.len(), 2..=2)?;
            let (values, idx) = (ops[0], ops[1]);
            if idx.dtype != DType::I32 {
                return Err(format!("scatter_add needs i32 indices, got {}", idx.dtype.name()));
            }
            if values.rank() < idx.rank() || values.shape[..idx.rank()] != idx.shape[..] {
                return Err(format!(
                    "scatter_add needs values {} that start with the index shape {}",
                    shape_to_string(&values.shape),
                    shape_to_string(&idx.shape)
                ));
            }
            let shape = std::iter::once(rows.clone()).chain(values.shape[idx.rank()..].iter().cloned()).collect();
            Ok(TensorType::new(values.dtype, shape))
        }
        Op::BlockAttention(ba) => ba.infer(ops),
        Op::BlockAttentionGrad(bg) => bg.infer(ops),
        Op::Dropout { rate, .. } => {
            arity(op, ops.len(), 1..=1)?;
            let r = rate.get();
            if !(0.0..1.0).contains(&r) {
                return Err(format!("dropout rate must be in [0, 1), got {r}"));
            }
            if ops[0].dtype != DType::F32 {
                return Err("dropout needs an f32 tensor".into());
            }
            Ok(ops[0].clone())
        }
    }
}
