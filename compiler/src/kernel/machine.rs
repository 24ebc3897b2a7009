//! The machine of the reference executor: a kernel's variables, local arrays and
//! buffers, and the evaluation of its expressions and statements on one thread (in a
//! block kernel, the thread `gpu_exec.rs` is running, with the block's checked shared
//! memory, `shared_memory.rs`).

use super::ir::*;
use super::shared_memory::BlockState;
use super::value::{Buffer, Slots, Val};

pub(super) struct Machine<'a> {
    pub(super) kernel: &'a Kernel,
    pub(super) buffers: &'a mut [Buffer],
    pub(super) sizes: &'a [i64],
    pub(super) vars: Slots<Val>,
    pub(super) arrays: Slots<Vec<Val>>,
    /// In a block kernel: the running thread and the block's shared memory.
    pub(super) gpu: Option<BlockState>,
}

fn unary(op: Unary, v: Val) -> Result<Val, String> {
    if op == Unary::Not {
        return Ok(Val::B(!v.b()?));
    }
    if let (Unary::Neg, Val::I(i)) = (op, v) {
        return Ok(Val::I(i.wrapping_neg()));
    }
    if let (Unary::Abs, Val::I(i)) = (op, v) {
        return Ok(Val::I(i.wrapping_abs()));
    }
    let x = v.f()?;
    Ok(Val::F(match op {
        Unary::Neg => -x,
        Unary::Exp => super::math::exp(x),
        Unary::Log => x.ln(),
        Unary::Sqrt => x.sqrt(),
        Unary::Rsqrt => 1.0 / x.sqrt(),
        Unary::Recip => 1.0 / x,
        Unary::Abs => x.abs(),
        Unary::Tanh => x.tanh(),
        Unary::Sin => super::math::sin(x),
        Unary::Cos => super::math::cos(x),
        Unary::RoundBf16 => super::math::round_bf16(x),
        Unary::RoundF16 => super::math::round_f16(x),
        Unary::Not => unreachable!("handled above"),
    }))
}

fn binary(op: Binary, a: Val, b: Val) -> Result<Val, String> {
    use Binary::*;
    Ok(match (a, b) {
        (Val::F(x), Val::F(y)) => match op {
            Add => Val::F(x + y),
            Sub => Val::F(x - y),
            Mul => Val::F(x * y),
            Div => Val::F(x / y),
            Rem => Val::F(x % y),
            Max => Val::F(if x.is_nan() || y.is_nan() { f32::NAN } else { x.max(y) }),
            Min => Val::F(if x.is_nan() || y.is_nan() { f32::NAN } else { x.min(y) }),
            Pow => Val::F(x.powf(y)),
            Lt => Val::B(x < y),
            Le => Val::B(x <= y),
            Gt => Val::B(x > y),
            Ge => Val::B(x >= y),
            Eq => Val::B(x == y),
            Ne => Val::B(x != y),
            And | Or => return Err("logical op on f32".into()),
        },
        (Val::I(x), Val::I(y)) => match op {
            Add => Val::I(x.wrapping_add(y)),
            Sub => Val::I(x.wrapping_sub(y)),
            Mul => Val::I(x.wrapping_mul(y)),
            Div => Val::I(if y == 0 { return Err("integer division by zero".into()) } else { x.wrapping_div(y) }),
            Rem => Val::I(if y == 0 { return Err("integer remainder by zero".into()) } else { x.wrapping_rem(y) }),
            Max => Val::I(x.max(y)),
            Min => Val::I(x.min(y)),
            Pow => Val::I(x.wrapping_pow(y.clamp(0, u32::MAX as i64) as u32)),
            Lt => Val::B(x < y),
            Le => Val::B(x <= y),
            Gt => Val::B(x > y),
            Ge => Val::B(x >= y),
            Eq => Val::B(x == y),
            Ne => Val::B(x != y),
            And | Or => return Err("logical op on integers".into()),
        },
        (Val::B(x), Val::B(y)) => match op {
            And => Val::B(x && y),
            Or => Val::B(x || y),
            Eq => Val::B(x == y),
            Ne => Val::B(x != y),
            _ => return Err(format!("{op:?} on bools")),
        },
        (a, b) => return Err(format!("{op:?} on mismatched operands {a:?} and {b:?}")),
    })
}

impl Machine<'_> {
    /// A library GEMM node, naively: each element a sequential f32 sum over k. The row
    /// blocks and bounds checks are the runtime's own, so both agree on the semantics.
    pub(super) fn gemm(&mut self, g: &super::gemm::Gemm, begin: i64, end: i64) -> Result<(), String> {
        use tnc_bundle::gemm::{Shape, View};
        let mut int = |e: &Expr| self.eval(e)?.i();
        let mut view = |v: &super::gemm::Matrix| -> Result<View, String> {
            Ok(View { offset: int(&v.offset)?, rows: int(&v.rows)?, cols: int(&v.cols)? })
        };
        let (a, b, c) = (view(&g.a)?, view(&g.b)?, view(&g.c)?);
        let mut batch = Vec::new();
        for ax in &g.batch {
            batch.push((int(&ax.extent)?, int(&ax.a)?, int(&ax.b)?, int(&ax.c)?));
        }
        let shape = Shape { batch, m: int(&g.m)?, n: int(&g.n)?, k: int(&g.k)?, a, b, c, accumulate: g.accumulate };
        // A and B may be 16-bit (widened exactly); C is f32.
        fn floats(b: &Buffer) -> Option<std::borrow::Cow<'_, [f32]>> {
            match b {
                Buffer::F32(v) => Some(std::borrow::Cow::Borrowed(v.as_slice())),
                other => other.widened().map(std::borrow::Cow::Owned),
            }
        }
        let (Some(x), Some(y)) = (floats(&self.buffers[0]), floats(&self.buffers[1])) else {
            return Err("GEMM operands hold floats".to_string());
        };
        let Buffer::F32(z) = &self.buffers[2] else { return Err("a GEMM's C holds f32".to_string()) };
        shape.check([x.len(), y.len(), z.len()])?;
        let mut out = Vec::new();
        for blk in shape.blocks(begin, end) {
            for r in blk.rows.0..blk.rows.1 {
                for j in 0..shape.n {
                    let mut acc = 0.0f32;
                    for k in 0..shape.k {
                        acc += x[(blk.a + r * a.rows + k * a.cols) as usize]
                            * y[(blk.b + k * b.rows + j * b.cols) as usize];
                    }
                    out.push(((blk.c + r * c.rows + j * c.cols) as usize, acc));
                }
            }
        }
        let Buffer::F32(z) = &mut self.buffers[2] else { unreachable!("checked") };
        for (i, v) in out {
            z[i] = if g.accumulate { z[i] + v } else { v };
        }
        Ok(())
    }

    pub(super) fn eval(&mut self, e: &Expr) -> Result<Val, String> {
        Ok(match e {
            Expr::F32(x) => Val::F(*x),
            Expr::I64(i) => Val::I(*i),
            Expr::Bool(b) => Val::B(*b),
            Expr::Var(v) => *self.vars.get(*v).ok_or_else(|| format!("{v} is not defined"))?,
            Expr::Size(i) => Val::I(*self.sizes.get(*i).ok_or_else(|| format!("size argument {i} is missing"))?),
            Expr::Thread => Val::I(self.gpu.as_ref().ok_or("`thread` outside a block kernel")?.thread as i64),
            Expr::Load { buffer, index } => {
                let i = self.eval(index)?.i()?;
                let buf = self.buffers.get(*buffer).ok_or_else(|| format!("buffer {buffer} is missing"))?;
                let name = &self.kernel.buffers[*buffer].name;
                let oob = || format!("load {name}[{i}] is out of bounds (length {})", buf.len());
                let at = usize::try_from(i).map_err(|_| oob())?;
                match buf {
                    Buffer::F32(v) => Val::F(*v.get(at).ok_or_else(oob)?),
                    Buffer::BF16(v) => Val::F(super::math::bf16_value(*v.get(at).ok_or_else(oob)?)),
                    Buffer::F16(v) => Val::F(super::math::f16_value(*v.get(at).ok_or_else(oob)?)),
                    Buffer::I32(v) => Val::I(*v.get(at).ok_or_else(oob)? as i64),
                    Buffer::U8(v) => Val::B(*v.get(at).ok_or_else(oob)? != 0),
                }
            }
            Expr::LoadArray { array, index } => {
                let i = self.eval(index)?.i()?;
                if let Some(gpu) = self.gpu.as_mut().filter(|g| g.is_shared(*array)) {
                    return gpu.read(*array, i);
                }
                let arr = self.arrays.get(*array).ok_or_else(|| format!("array {array} is not defined"))?;
                *usize::try_from(i)
                    .ok()
                    .and_then(|i| arr.get(i))
                    .ok_or_else(|| format!("array {array}[{i}] is out of bounds (length {})", arr.len()))?
            }
            Expr::Unary(op, a) => {
                let a = self.eval(a)?;
                unary(*op, a)?
            }
            Expr::Binary(op, a, b) => {
                let a = self.eval(a)?;
                let b = self.eval(b)?;
                binary(*op, a, b)?
            }
            Expr::Select(c, a, b) => {
                if self.eval(c)?.b()? {
                    self.eval(a)?
                } else {
                    self.eval(b)?
                }
            }
            Expr::MulAdd(a, b, c) => {
                let (a, b, c) = (self.eval(a)?.f()?, self.eval(b)?.f()?, self.eval(c)?.f()?);
                Val::F(a.mul_add(b, c))
            }
            Expr::Cast(to, a) => {
                let v = self.eval(a)?;
                match (to, v) {
                    (Scalar::F32, Val::F(x)) => Val::F(x),
                    (Scalar::F32, Val::I(i)) => Val::F(i as f32),
                    (Scalar::F32, Val::B(b)) => Val::F(if b { 1.0 } else { 0.0 }),
                    (Scalar::I32, Val::F(x)) => Val::I(x as i32 as i64),
                    (Scalar::I32, Val::I(i)) => Val::I(i as i32 as i64),
                    (Scalar::I64, Val::F(x)) => Val::I(x as i64),
                    (Scalar::I64, Val::I(i)) => Val::I(i),
                    (Scalar::I32 | Scalar::I64, Val::B(b)) => Val::I(b as i64),
                    (Scalar::Bool, Val::I(i)) => Val::B(i != 0),
                    (Scalar::Bool, Val::F(x)) => Val::B(x != 0.0),
                    (Scalar::Bool, Val::B(b)) => Val::B(b),
                }
            }
            Expr::DropoutKeep { seed, salt, index, step, rate } => {
                let seed = self.eval(seed)?.i()? as u64;
                let index = self.eval(index)?.i()? as u64;
                let step = self.eval(step)?.i()? as u64;
                Val::B(tnc_bundle::rng::dropout_keep(seed, *salt, index, step, *rate))
            }
        })
    }

    pub(super) fn block(&mut self, body: &[Stmt]) -> Result<(), String> {
        for s in body {
            self.stmt(s)?;
        }
        Ok(())
    }

    pub(super) fn stmt(&mut self, s: &Stmt) -> Result<(), String> {
        match s {
            Stmt::For { var, extent, body, .. } => {
                let n = self.eval(extent)?.i()?;
                for i in 0..n {
                    self.vars.insert(*var, Val::I(i));
                    self.block(body)?;
                }
            }
            Stmt::Let { var, value } | Stmt::Assign { var, value } => {
                let v = self.eval(value)?;
                self.vars.insert(*var, v);
            }
            Stmt::Mut { var, init, .. } => {
                let v = self.eval(init)?;
                self.vars.insert(*var, v);
            }
            Stmt::Store { buffer, index, value } => {
                let i = self.eval(index)?.i()?;
                let v = self.eval(value)?;
                let name = || &self.kernel.buffers[*buffer].name;
                let buf = self.buffers.get_mut(*buffer).ok_or_else(|| format!("buffer {buffer} is missing"))?;
                let len = buf.len();
                let at = usize::try_from(i)
                    .ok()
                    .filter(|&a| a < len)
                    .ok_or_else(|| format!("store {}[{i}] is out of bounds (length {len})", name()))?;
                match (buf, v) {
                    (Buffer::F32(b), Val::F(x)) => b[at] = x,
                    (Buffer::BF16(b), Val::F(x)) => b[at] = super::math::bf16_bits(x),
                    (Buffer::F16(b), Val::F(x)) => b[at] = super::math::f16_bits(x),
                    (Buffer::I32(b), Val::I(x)) => b[at] = x as i32,
                    (Buffer::U8(b), Val::B(x)) => b[at] = x as u8,
                    (_, v) => return Err(format!("store of {v:?} into buffer `{}` of another type", name())),
                }
            }
            Stmt::Array { var, elem, len } => {
                let zero = match elem {
                    Scalar::F32 => Val::F(0.0),
                    Scalar::Bool => Val::B(false),
                    _ => Val::I(0),
                };
                self.arrays.insert(*var, vec![zero; *len]);
            }
            Stmt::StoreArray { array, index, value } => {
                let i = self.eval(index)?.i()?;
                let v = self.eval(value)?;
                if let Some(gpu) = self.gpu.as_mut().filter(|g| g.is_shared(*array)) {
                    return gpu.write(*array, i, v);
                }
                let arr = self.arrays.get_mut(*array).ok_or_else(|| format!("array {array} is not defined"))?;
                let len = arr.len();
                *usize::try_from(i)
                    .ok()
                    .and_then(|i| arr.get_mut(i))
                    .ok_or_else(|| format!("array {array}[{i}] is out of bounds (length {len})"))? = v;
            }
            Stmt::If { cond, then, otherwise } => {
                if self.eval(cond)?.b()? {
                    self.block(then)?;
                } else {
                    self.block(otherwise)?;
                }
            }
            Stmt::Shared { .. } | Stmt::Barrier | Stmt::Mma { .. } if self.gpu.is_some() => {
                return Err("a shared array, barrier or warp product under thread-dependent control flow".into())
            }
            Stmt::Shared { .. } | Stmt::Barrier | Stmt::Mma { .. } => {
                return Err("a shared array, barrier or warp product outside a block kernel".into())
            }
        }
        Ok(())
    }
}
