//! The kernel IR: small loop nests over flat buffers, the common input of every back end
//! (LLVM → native objects, LLVM → PTX, the reference executor and the GPU-semantics
//! executor). It knows nothing of the graph IR.
//!
//! A kernel is a function of (buffers, run-time sizes, a range of its outermost parallel
//! loop). Every kernel has the same calling convention, so the runtime can launch any of
//! them without per-kernel glue:
//!
//! ```text
//! void name(void **buffers, const int64_t *sizes, int64_t begin, int64_t end)
//! ```
//!
//! `buffers[i]` points at the i-th declared buffer; `sizes[i]` is the value of the i-th
//! size symbol (e.g. `B`, `N`); the kernel runs the iterations `begin..end` of its top
//! `Parallel` loop, so the runtime splits that range over threads (or, on GPUs, blocks).
//!
//! A block kernel (`Kernel::threads`) is the GPU's model made explicit: each iteration is
//! a block of threads running the body together, with shared arrays and barriers. The
//! GPU-semantics executor (`gpu_exec.rs`) runs them on the CPU and checks their use of
//! shared memory.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Scalar types of kernel values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scalar {
    F32,
    I32,
    /// Index arithmetic.
    I64,
    Bool,
}

/// Element type of a buffer (bools are stored as one byte). A 16-bit float (bfloat16,
/// IEEE half) is an f32 in registers: a load widens it exactly, a store rounds the f32
/// to nearest, ties to even (`kernel::math::round_bf16`, `round_f16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Elem {
    F32,
    BF16,
    F16,
    I32,
    U8,
}

impl Elem {
    pub fn bytes(self) -> usize {
        match self {
            Elem::F32 | Elem::I32 => 4,
            Elem::BF16 | Elem::F16 => 2,
            Elem::U8 => 1,
        }
    }

    /// The scalar a load produces.
    pub fn scalar(self) -> Scalar {
        match self {
            Elem::F32 | Elem::BF16 | Elem::F16 => Scalar::F32,
            Elem::I32 => Scalar::I32,
            Elem::U8 => Scalar::Bool,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BufferDecl {
    pub name: String,
    pub elem: Elem,
    pub access: Access,
}

/// A local variable (loop index, let-bound value or accumulator), numbered per kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Var(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Unary {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Abs,
    Tanh,
    Sin,
    Cos,
    Not,
    /// An f32 rounded to the nearest bfloat16 (IEEE half) value, still an f32: what a store
    /// to a 16-bit buffer keeps, for values used before (or without) one.
    RoundBf16,
    RoundF16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    /// Float division; for I64/I32 it is truncating integer division (operands ≥ 0 in
    /// index arithmetic).
    Div,
    /// Integer remainder (index arithmetic, operands ≥ 0).
    Rem,
    Max,
    Min,
    Pow,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Expr {
    /// Serialized by its bits: JSON has no infinities or NaNs.
    F32(#[serde(with = "f32_bits")] f32),
    I64(i64),
    Bool(bool),
    Var(Var),
    /// The run-time value of size symbol `i` (an I64).
    Size(usize),
    /// The thread's index within its block, `0..threads` (an I64; block kernels only).
    Thread,
    Load {
        buffer: usize,
        index: Box<Expr>,
    },
    /// A read of a local array (see [`Stmt::Array`]).
    LoadArray {
        array: Var,
        index: Box<Expr>,
    },
    Unary(Unary, Box<Expr>),
    Binary(Binary, Box<Expr>, Box<Expr>),
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
    /// `a · b + c` on f32 rounded once (IEEE 754 fusedMultiplyAdd, Rust's `mul_add`):
    /// one instruction where a product is accumulated, on every target, with the same
    /// result everywhere.
    MulAdd(Box<Expr>, Box<Expr>, Box<Expr>),
    Cast(Scalar, Box<Expr>),
    /// Dropout's keep decision, `rng::dropout_keep` (Philox4x32-10): a Bool.
    /// `seed` and `step` are I64 expressions (run-time arguments), `index` the element.
    DropoutKeep {
        seed: Box<Expr>,
        salt: u64,
        index: Box<Expr>,
        step: Box<Expr>,
        rate: f64,
    },
}

/// An f32 serialized as its IEEE bits, so infinities and NaNs survive JSON.
mod f32_bits {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(x.to_bits())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        u32::deserialize(d).map(f32::from_bits)
    }
}

impl Expr {
    pub fn binary(op: Binary, a: Expr, b: Expr) -> Expr {
        Expr::Binary(op, Box::new(a), Box::new(b))
    }

    /// `a · b + c`, rounded once.
    pub fn mul_add(a: Expr, b: Expr, c: Expr) -> Expr {
        Expr::MulAdd(Box::new(a), Box::new(b), Box::new(c))
    }

    /// Element `index` of local or shared array `array`.
    pub fn load_array(array: Var, index: Expr) -> Expr {
        Expr::LoadArray { array, index: Box::new(index) }
    }

    /// Whether evaluating the expression may trap or touch memory (a load, an integer
    /// division), so that a `Select` must not evaluate it unless it is chosen.
    pub fn may_trap(&self) -> bool {
        match self {
            Expr::F32(_) | Expr::I64(_) | Expr::Bool(_) | Expr::Var(_) | Expr::Size(_) | Expr::Thread => false,
            Expr::Load { .. } | Expr::LoadArray { .. } => true,
            Expr::Binary(Binary::Div | Binary::Rem, _, _) => true,
            Expr::Unary(_, a) | Expr::Cast(_, a) => a.may_trap(),
            Expr::Binary(_, a, b) => a.may_trap() || b.may_trap(),
            Expr::Select(c, a, b) | Expr::MulAdd(c, a, b) => c.may_trap() || a.may_trap() || b.may_trap(),
            Expr::DropoutKeep { seed, index, step, .. } => seed.may_trap() || index.may_trap() || step.may_trap(),
        }
    }

    /// Calls `f` on every variable the expression reads, local arrays included.
    pub fn visit_vars(&self, f: &mut dyn FnMut(Var)) {
        match self {
            Expr::Var(v) => f(*v),
            Expr::F32(_) | Expr::I64(_) | Expr::Bool(_) | Expr::Size(_) | Expr::Thread => {}
            Expr::Load { index, .. } => index.visit_vars(f),
            Expr::LoadArray { array, index } => {
                f(*array);
                index.visit_vars(f)
            }
            Expr::Unary(_, a) | Expr::Cast(_, a) => a.visit_vars(f),
            Expr::Binary(_, a, b) => {
                a.visit_vars(f);
                b.visit_vars(f)
            }
            Expr::Select(c, a, b) | Expr::MulAdd(c, a, b) => {
                c.visit_vars(f);
                a.visit_vars(f);
                b.visit_vars(f)
            }
            Expr::DropoutKeep { seed, index, step, .. } => {
                seed.visit_vars(f);
                index.visit_vars(f);
                step.visit_vars(f)
            }
        }
    }
}

/// How a loop may be executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LoopKind {
    Serial,
    /// Iterations are independent; the kernel's outermost parallel loop is the one the
    /// runtime splits over threads or GPU blocks.
    Parallel,
    /// Iterations are independent and contiguous in memory: a vectorization hint.
    Vector,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Stmt {
    /// `for var in 0..extent`.
    For {
        var: Var,
        extent: Expr,
        kind: LoopKind,
        body: Vec<Stmt>,
    },
    /// An immutable local.
    Let {
        var: Var,
        value: Expr,
    },
    /// A mutable local (accumulators) with its initial value; update with `Assign`.
    Mut {
        var: Var,
        ty: Scalar,
        init: Expr,
    },
    Assign {
        var: Var,
        value: Expr,
    },
    Store {
        buffer: usize,
        index: Expr,
        value: Expr,
    },
    /// A local array of `len` elements (stack / registers on CPU, shared memory for a
    /// GPU block), zero-initialized.
    Array {
        var: Var,
        elem: Scalar,
        len: usize,
    },
    StoreArray {
        array: Var,
        index: Expr,
        value: Expr,
    },
    If {
        cond: Expr,
        then: Vec<Stmt>,
        otherwise: Vec<Stmt>,
    },
    /// A block's shared array of `len` elements (block kernels only, at the top of the
    /// body): one per block, read and written by all its threads with `LoadArray` and
    /// `StoreArray`, not initialized.
    Shared {
        var: Var,
        elem: Scalar,
        len: usize,
    },
    /// Every thread of the block waits here until all have arrived, and the shared
    /// writes before it are visible after it (block kernels only; every thread of the
    /// block must reach the same barriers, so not under thread-dependent control flow).
    Barrier,
    /// A warp's tensor-core product, PTX `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}`:
    /// `D(16×8) = A(16×16) · B(16×8) + C` over the 32 threads of a warp, each holding the
    /// elements of A, B and C that PTX assigns it (`kernel/mma.rs`). `a` and `b` are this
    /// thread's f32 variables, which the instruction rounds to `input` (BF16 or F16); `acc`
    /// its four f32 accumulators, C before and D after. Like a barrier it is collective
    /// (block kernels only, every thread of the warp together, so not under
    /// thread-dependent control flow; the block's threads are a whole number of warps).
    Mma {
        input: Elem,
        acc: [Var; 4],
        a: [Var; 8],
        b: [Var; 4],
    },
}

impl Stmt {
    /// Whether the statement synchronizes threads: a barrier, or a warp's product.
    pub fn is_collective(&self) -> bool {
        matches!(self, Stmt::Barrier | Stmt::Mma { .. })
    }
}

/// Bytes of shared memory a block may declare statically (PTX `.shared` variables). A
/// kernel that declares more gets its shared arrays in dynamic shared memory, whose size
/// each launch passes (the manifest's `shared_bytes`; beyond 48 KB the function must also
/// opt in, up to the device's limit per block).
pub const STATIC_SHARED_BYTES: usize = 48 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Kernel {
    pub name: String,
    pub buffers: Vec<BufferDecl>,
    /// Size symbols in the order of the `sizes` argument.
    pub sizes: Vec<String>,
    /// Run-time scalar arguments beyond sizes (dropout seed and step), appended to
    /// `sizes` in this order.
    pub scalars: Vec<String>,
    /// The parallel iteration: `body` runs once for every `index` in `0..extent`
    /// (`extent` depends on sizes only); a launch runs a sub-range `begin..end`.
    pub index: Var,
    pub extent: Expr,
    pub body: Vec<Stmt>,
    /// A library node (see `gemm.rs`): the body is empty, back ends emit no code, and the
    /// runtime calls a GEMM library on buffer slots 0 (A), 1 (B), 2 (C).
    pub gemm: Option<super::gemm::Gemm>,
    /// A block kernel (GPU schedules): `index` numbers blocks, and `body` runs once for
    /// every thread `Expr::Thread` in `0..threads` of the block, which may share arrays
    /// (`Stmt::Shared`) and synchronize (`Stmt::Barrier`). `None`: each iteration is
    /// independent (one thread per iteration on GPUs).
    pub threads: Option<u32>,
}

impl Kernel {
    /// Where each shared array (`Stmt::Shared`, in declaration order) starts in the
    /// block's shared memory, in bytes, each aligned to 16; and the bytes in all.
    pub fn shared_layout(&self) -> (Vec<(Var, usize)>, usize) {
        fn walk(stmts: &[Stmt], out: &mut Vec<(Var, usize)>, end: &mut usize) {
            for s in stmts {
                match s {
                    Stmt::Shared { var, elem, len } => {
                        let bytes = match elem {
                            Scalar::F32 | Scalar::I32 => 4,
                            Scalar::I64 => 8,
                            Scalar::Bool => 1,
                        };
                        let start = end.div_ceil(16) * 16;
                        out.push((*var, start));
                        *end = start + bytes * len;
                    }
                    Stmt::For { body, .. } => walk(body, out, end),
                    Stmt::If { then, otherwise, .. } => {
                        walk(then, out, end);
                        walk(otherwise, out, end);
                    }
                    _ => {}
                }
            }
        }
        let (mut layout, mut end) = (Vec::new(), 0);
        walk(&self.body, &mut layout, &mut end);
        (layout, end)
    }

    /// The dynamic shared memory each launch provides: all of the kernel's shared arrays
    /// when they exceed [`STATIC_SHARED_BYTES`], otherwise none (they are static).
    pub fn dynamic_shared_bytes(&self) -> usize {
        let (_, bytes) = self.shared_layout();
        if bytes > STATIC_SHARED_BYTES {
            bytes
        } else {
            0
        }
    }

    /// The first variable number the kernel does not use (for rewrites adding variables).
    pub fn next_var(&self) -> u32 {
        fn max_var(stmts: &[Stmt]) -> u32 {
            stmts
                .iter()
                .map(|s| match s {
                    Stmt::For { var, body, .. } => var.0.max(max_var(body)),
                    Stmt::Let { var, .. } | Stmt::Mut { var, .. } | Stmt::Assign { var, .. } => var.0,
                    Stmt::Array { var, .. } | Stmt::Shared { var, .. } => var.0,
                    Stmt::If { then, otherwise, .. } => max_var(then).max(max_var(otherwise)),
                    Stmt::Mma { acc, .. } => acc.iter().map(|v| v.0).max().unwrap_or(0),
                    Stmt::Store { .. } | Stmt::StoreArray { .. } | Stmt::Barrier => 0,
                })
                .max()
                .unwrap_or(0)
        }
        max_var(&self.body).max(self.index.0) + 1
    }
}

impl fmt::Display for Var {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}
