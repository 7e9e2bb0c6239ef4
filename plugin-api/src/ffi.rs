//! The raw C-ABI tables that cross the boundary. Plugin authors use [`crate::Tensor`] and
//! [`crate::MergeMethod`] instead; the host implements [`BackendVTable`].
//!
//! # Compatibility rules (append-only)
//!
//! - Every table starts with `struct_size`, the size of the table as its producer compiled it.
//! - New entries are only appended, each documented with the minor version that added it.
//! - A reader checks `struct_size` before touching an entry past the 1.0 layout
//!   ([`BackendVTable::has`]); entries it does not know are simply never read.
//! - Codes ([`dtype`], [`unary`], …) are `u32` constants, never Rust enums, so a new code is not a
//!   layout change; an unknown code is an error at the call, not undefined behaviour.

use abi_stable::std_types::{RResult, RSlice, RStr, RString, RVec};
use abi_stable::StableAbi;
use std::ffi::c_void;

/// Result of a call across the boundary; the error is a human-readable message.
pub type FfiResult<T> = RResult<T, RString>;

/// An opaque, host-owned tensor. Null means "none". Ownership: every handle a backend op returns
/// must be released exactly once with [`BackendVTable::release`] (the [`crate::Tensor`] wrapper does
/// this); handles passed into a plugin call stay owned by the host.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorHandle(pub *mut c_void);

// SAFETY: a handle is an address the host dereferences on its side only; the host's tensors are
// Send + Sync (candle tensors are).
unsafe impl Send for TensorHandle {}
// SAFETY: see above.
unsafe impl Sync for TensorHandle {}

impl TensorHandle {
    /// The "no tensor" handle.
    pub const NULL: TensorHandle = TensorHandle(std::ptr::null_mut());
    /// Whether this is [`TensorHandle::NULL`].
    pub fn is_null(self) -> bool {
        self.0.is_null()
    }
}

/// A pointer to one of this module's tables, not inspected by abi_stable's layout check.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct OpaqueTable {
    #[sabi(unsafe_opaque_field)]
    ptr: *const c_void,
}

// SAFETY: tables are immutable statics.
unsafe impl Send for OpaqueTable {}
// SAFETY: see above.
unsafe impl Sync for OpaqueTable {}

impl OpaqueTable {
    /// Wraps a pointer to a `'static` table.
    pub fn new<T>(table: &'static T) -> Self {
        OpaqueTable {
            ptr: table as *const T as *const c_void,
        }
    }
    /// The raw pointer.
    pub fn as_ptr(self) -> *const c_void {
        self.ptr
    }
}

/// Element types, as codes.
pub mod dtype {
    /// 32-bit float.
    pub const F32: u32 = 0;
    /// IEEE half.
    pub const F16: u32 = 1;
    /// bfloat16.
    pub const BF16: u32 = 2;
    /// 64-bit float.
    pub const F64: u32 = 3;
    /// Unsigned byte.
    pub const U8: u32 = 4;
    /// Unsigned 32-bit.
    pub const U32: u32 = 5;
    /// Signed 64-bit.
    pub const I64: u32 = 6;
}

/// Elementwise unary ops, as codes.
pub mod unary {
    /// `-x`
    pub const NEG: u32 = 0;
    /// `|x|`
    pub const ABS: u32 = 1;
    /// `sign(x)` (−1, 0, +1)
    pub const SIGN: u32 = 2;
    /// `sqrt(x)`
    pub const SQRT: u32 = 3;
    /// `exp(x)`
    pub const EXP: u32 = 4;
    /// `ln(x)`
    pub const LOG: u32 = 5;
    /// `x²`
    pub const SQR: u32 = 6;
}

/// Elementwise binary ops (same shape), as codes.
pub mod binary {
    /// `a + b`
    pub const ADD: u32 = 0;
    /// `a − b`
    pub const SUB: u32 = 1;
    /// `a · b`
    pub const MUL: u32 = 2;
    /// `a / b`
    pub const DIV: u32 = 3;
    /// `max(a, b)`
    pub const MAXIMUM: u32 = 4;
    /// `min(a, b)`
    pub const MINIMUM: u32 = 5;
}

/// Comparisons producing a 0/1 mask in the dtype of the left operand, as codes.
pub mod compare {
    /// `a == b`
    pub const EQ: u32 = 0;
    /// `a != b`
    pub const NE: u32 = 1;
    /// `a > b`
    pub const GT: u32 = 2;
    /// `a >= b`
    pub const GE: u32 = 3;
    /// `a < b`
    pub const LT: u32 = 4;
    /// `a <= b`
    pub const LE: u32 = 5;
}

/// Reductions to one number (accumulated in f64), as codes.
pub mod reduce {
    /// `Σ x`
    pub const SUM: u32 = 0;
    /// `Σ x²`
    pub const SUM_SQ: u32 = 1;
    /// `max |x|`
    pub const MAX_ABS: u32 = 2;
    /// `Σ |x|`
    pub const SUM_ABS: u32 = 3;
    /// number of non-zero elements
    pub const COUNT_NONZERO: u32 = 4;
}

/// How `task_merge` sparsifies one task vector (plugin-api 1.3), as codes.
pub mod sparsify {
    /// Keep every element.
    pub const NONE: u32 = 0;
    /// Keep exactly the `k` largest `|δ|` (ties at the threshold kept in index order, as
    /// `topk_abs_mask`).
    pub const TOPK: u32 = 1;
    /// Keep element i when `uniform(seed, stream, i) < p` (the generator of `bernoulli_mask`).
    pub const BERNOULLI: u32 = 2;
}

/// How `task_merge` rescales a sparsified task vector (plugin-api 1.3), as codes.
pub mod rescale {
    /// No rescale.
    pub const NONE: u32 = 0;
    /// Times `‖δ‖₁ / ‖δ ⊙ M‖₁` (f64 sums), skipped when either is below 1e-7.
    pub const L1: u32 = 1;
    /// Divided by `p` (the keep probability).
    pub const INVERSE: u32 = 2;
}

/// One task vector of a [`TaskMergeRequest`] (plugin-api 1.3).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TaskVector {
    /// The fine-tuned model's tensor θᵢ (any float dtype; converted to the base's).
    pub tensor: TensorHandle,
    /// wᵢ, already rounded to the base's dtype.
    pub weight: f64,
    /// [`sparsify`] code.
    pub sparsify: u32,
    /// [`rescale`] code (ignored with [`sparsify::NONE`]).
    pub rescale: u32,
    /// [`sparsify::TOPK`]: how many elements to keep.
    pub k: u64,
    /// [`sparsify::BERNOULLI`]: keep probability; [`rescale::INVERSE`]: the divisor.
    pub p: f64,
    /// [`sparsify::BERNOULLI`]: seed.
    pub seed: u64,
    /// [`sparsify::BERNOULLI`]: stream.
    pub stream: u64,
}

/// The arguments of [`BackendVTable::task_merge`] (plugin-api 1.3; append-only like the tables).
#[repr(C)]
pub struct TaskMergeRequest<'a> {
    /// `size_of::<TaskMergeRequest>()` as the plugin compiled it.
    pub struct_size: usize,
    /// θ₀, whose dtype (f32, f16 or bf16) is the compute and output dtype.
    pub base: TensorHandle,
    /// The task vectors, in model order.
    pub vectors: RSlice<'a, TaskVector>,
    /// 1: sign consensus (TIES).
    pub consensus: u8,
    /// 1: divide by the (agreeing) weights.
    pub normalize: u8,
    /// Without consensus and with `normalize`: the divisor, already rounded to the dtype.
    pub divisor: f64,
    /// λ (1 skips the multiplication).
    pub lambda: f64,
}

type Ctx = *const c_void;
type H = TensorHandle;

/// The tensor operations the host implements. `ctx` is the host's state, passed back on every
/// call. All ops allocate a fresh result unless documented as in-place.
#[repr(C)]
pub struct BackendVTable {
    /// `size_of::<BackendVTable>()` as the host compiled it.
    pub struct_size: usize,
    /// The host's plugin-api minor version.
    pub api_minor: u32,
    /// Host state.
    pub ctx: Ctx,
    /// Releases a handle returned by any op.
    pub release: unsafe extern "C" fn(Ctx, H),
    /// A second handle to the same tensor (shares storage; in-place ops copy first).
    pub dup: unsafe extern "C" fn(Ctx, H) -> FfiResult<H>,
    /// The element type code ([`dtype`]).
    pub dtype: unsafe extern "C" fn(Ctx, H) -> u32,
    /// The dimensions.
    pub shape: unsafe extern "C" fn(Ctx, H) -> RVec<u64>,
    /// Converts to another dtype (round to nearest even).
    pub to_dtype: unsafe extern "C" fn(Ctx, H, u32) -> FfiResult<H>,
    /// Elementwise unary op ([`unary`]).
    pub unary: unsafe extern "C" fn(Ctx, u32, H) -> FfiResult<H>,
    /// Elementwise binary op on equal shapes ([`binary`]), in the operands' dtype.
    pub binary: unsafe extern "C" fn(Ctx, u32, H, H) -> FfiResult<H>,
    /// `x · mul + add`, in the tensor's dtype.
    pub affine: unsafe extern "C" fn(Ctx, H, f64, f64) -> FfiResult<H>,
    /// Fused `(Σᵢ f32(wᵢ) · f32(xᵢ)) / f32(divisor)` in f32, left to right: `acc = w₀x₀`, then
    /// `acc = fma(wᵢ, xᵢ, acc)` (one rounding per step, as torch's CPU kernels), then one division;
    /// written in the dtype code given. `divisor == 1` skips the division.
    pub weighted_sum: unsafe extern "C" fn(Ctx, RSlice<'_, H>, RSlice<'_, f64>, f64, u32) -> FfiResult<H>,
    /// In place: `y ← y + α · x` in y's dtype (y is copied first when its storage is shared).
    pub axpy: unsafe extern "C" fn(Ctx, H, f64, H) -> FfiResult<u8>,
    /// Reduction to one number ([`reduce`]).
    pub reduce: unsafe extern "C" fn(Ctx, u32, H) -> FfiResult<f64>,
    /// `Σ aᵢ bᵢ`, accumulated in f64.
    pub dot: unsafe extern "C" fn(Ctx, H, H) -> FfiResult<f64>,
    /// Comparison mask ([`compare`]).
    pub compare: unsafe extern "C" fn(Ctx, u32, H, H) -> FfiResult<H>,
    /// `cond ≠ 0 ? a : b`.
    pub select: unsafe extern "C" fn(Ctx, H, H, H) -> FfiResult<H>,
    /// The k-th largest `|x|` (k ≥ 1), found by selection (O(n)), not by sorting.
    pub abs_kth_largest: unsafe extern "C" fn(Ctx, H, u64) -> FfiResult<f64>,
    /// A 0/1 mask (x's dtype) keeping exactly the k largest `|x|`; ties at the threshold are
    /// kept in index order.
    pub topk_abs_mask: unsafe extern "C" fn(Ctx, H, u64) -> FfiResult<H>,
    /// A 0/1 mask shaped like the tensor, each element 1 with probability p, from a
    /// counter-based generator keyed by (seed, stream, element index): the same mask for any
    /// thread count and tensor order.
    pub bernoulli_mask: unsafe extern "C" fn(Ctx, H, f64, u64, u64) -> FfiResult<H>,
    /// A tensor shaped and typed like the argument, filled with a value.
    pub full_like: unsafe extern "C" fn(Ctx, H, f64) -> FfiResult<H>,
    /// A new tensor from f32 data, a shape and a dtype code.
    pub from_f32: unsafe extern "C" fn(Ctx, RSlice<'_, f32>, RSlice<'_, u64>, u32) -> FfiResult<H>,
    /// Copies the values out as f32 (escape hatch; slow for big tensors).
    pub to_vec_f32: unsafe extern "C" fn(Ctx, H) -> FfiResult<RVec<f32>>,
    /// Same data, new shape (same element count).
    pub reshape: unsafe extern "C" fn(Ctx, H, RSlice<'_, u64>) -> FfiResult<H>,
    /// Matrix product (batched over leading dims).
    pub matmul: unsafe extern "C" fn(Ctx, H, H) -> FfiResult<H>,
    /// Softmax over the last dimension.
    pub softmax_last: unsafe extern "C" fn(Ctx, H) -> FfiResult<H>,
    /// Swaps two dimensions (result contiguous).
    pub transpose: unsafe extern "C" fn(Ctx, H, u32, u32) -> FfiResult<H>,
    /// A slice `[start, start + len)` along a dimension.
    pub narrow: unsafe extern "C" fn(Ctx, H, u32, u64, u64) -> FfiResult<H>,
    /// Concatenation along a dimension.
    pub cat: unsafe extern "C" fn(Ctx, RSlice<'_, H>, u32) -> FfiResult<H>,
    /// Reduction over the last dimension, keeping it as size 1 ([`reduce`]; results in x's dtype).
    pub reduce_last: unsafe extern "C" fn(Ctx, u32, H) -> FfiResult<H>,
    // ---- 1.0 ends here; entries below were appended later and must be checked with `has`. ----
    /// Added in 1.1: `a + t · (b − a)`, fused, in the operands' dtype.
    pub lerp: unsafe extern "C" fn(Ctx, H, H, f64) -> FfiResult<H>,
    /// Added in 1.2: the rank (1 = smallest) of `|x|` within each row of the last dimension (a
    /// 1-D tensor is one row, a 0-D tensor one element), as an F32 tensor shaped like x. Equal
    /// magnitudes are ranked in index order, so the result is deterministic.
    pub abs_rank_last: unsafe extern "C" fn(Ctx, H) -> FfiResult<H>,
    /// Added in 1.2: a 0/1 mask shaped and typed like `probs`, element i set with probability
    /// `probs[i]` (≤ 0 never, ≥ 1 always), from the same counter-based generator as
    /// `bernoulli_mask` keyed by (seed, stream, i): a constant `probs = p` gives the same mask as
    /// `bernoulli_mask(p)` for any f32-representable p.
    pub bernoulli_probs: unsafe extern "C" fn(Ctx, H, u64, u64) -> FfiResult<H>,
    /// Added in 1.3: the generalized task-arithmetic merge (task arithmetic, TIES, DARE) in one
    /// or a few chunked passes over memory, bit-identical to the op-by-op formula in the base's
    /// dtype D (f32, f16 or bf16). `r(·)` rounds to D; every step is computed in f32. Per
    /// element, for each vector i in order:
    /// `xᵢ = r(θᵢ)`, `δᵢ = r(xᵢ − θ₀)`, `δ̃ᵢ = δᵢ · Mᵢ` (Mᵢ ∈ {0, 1} from [`sparsify`]; top-k
    /// ranks `|δᵢ|` over the whole tensor), rescaled ([`rescale`]: L1 `r(δ̃ᵢ · f32(f) + 0)`,
    /// inverse `r(δ̃ᵢ / f32(p))`), then `aᵢ = r(δ̃ᵢ · f32(wᵢ)) + 0`.
    /// Sums over i run in f32 left to right and round once. Consensus: `s = r(Σ aᵢ)`,
    /// `maj = s ≥ 0 ? 1 : −1`, `gᵢ = [sign(aᵢ) = maj]`, `mixed = r(Σ aᵢ gᵢ)`, with normalize
    /// `d = r(Σ wᵢ gᵢ)`, `d = r(d + [d = 0])`, `mixed = r(mixed / d)`. Without consensus:
    /// `mixed = r(Σ aᵢ)`, with normalize `mixed = r(mixed / f32(divisor))`. Then λ ≠ 1:
    /// `mixed = r(mixed · f32(λ) + 0)`; the result is `r(θ₀ + mixed)` in D.
    pub task_merge: unsafe extern "C" fn(Ctx, *const TaskMergeRequest<'_>) -> FfiResult<H>,
    /// Added in 1.3: `[Σ aᵢ², Σ bᵢ², Σ aᵢbᵢ]` of the values as f32, products and sums in f64 in
    /// index order (the same bits as `reduce(SUM_SQ)` twice and `dot` on f32 tensors), one pass.
    pub dot_norms: unsafe extern "C" fn(Ctx, H, H) -> FfiResult<RVec<f64>>,
    /// Added in 1.3: `Σᵢ (f32(wᵢ) · f32(xᵢ) + 0)` in f32, left to right, each product rounded
    /// before its add (no FMA, unlike `weighted_sum`: the same bits as `scale` then `add` on f32
    /// tensors), written as the dtype code given (f32, f16 or bf16), in one pass.
    pub lincomb: unsafe extern "C" fn(Ctx, RSlice<'_, H>, RSlice<'_, f64>, u32) -> FfiResult<H>,
}

// SAFETY: the table is immutable and the host's ctx is Sync (documented requirement).
unsafe impl Send for BackendVTable {}
// SAFETY: see above.
unsafe impl Sync for BackendVTable {}

impl BackendVTable {
    /// Whether the producer's table is long enough to hold the entry that ends at `end`
    /// (`offset_of!(BackendVTable, entry) + size_of::<usize>()`).
    pub fn has(&self, end: usize) -> bool {
        self.struct_size >= end
    }
}

/// Byte offset just past an entry of a table, for [`BackendVTable::has`].
#[macro_export]
#[doc(hidden)]
macro_rules! __entry_end {
    ($table:ty, $field:ident) => {
        ::core::mem::offset_of!($table, $field) + ::core::mem::size_of::<usize>()
    };
}

/// A request to check one parameter set before any weight is read.
#[repr(C)]
pub struct ValidateRequest<'a> {
    /// `size_of::<ValidateRequest>()` as the host compiled it.
    pub struct_size: usize,
    /// A tensor the parameters apply to (e.g. `model.layers.0.mlp.up_proj.weight`).
    pub tensor_name: RStr<'a>,
    /// The decoder layer index, −1 outside layers.
    pub layer: i64,
    /// Position of the base model among `model_params`, −1 when it is not listed there.
    pub base_index: i64,
    /// 1 when the merge has a base model.
    pub has_base: u8,
    /// Global parameters, a JSON object.
    pub params: RStr<'a>,
    /// Per-model parameters, one JSON object per model, in config order.
    pub model_params: RSlice<'a, RStr<'a>>,
}

/// A request to merge one tensor.
#[repr(C)]
pub struct MergeRequest<'a> {
    /// `size_of::<MergeRequest>()` as the host compiled it.
    pub struct_size: usize,
    /// The tensor's name.
    pub tensor_name: RStr<'a>,
    /// The decoder layer index, −1 outside layers.
    pub layer: i64,
    /// The base model's tensor, or NULL.
    pub base: TensorHandle,
    /// Position of the base model among `models`, −1 when it is not listed there.
    pub base_index: i64,
    /// The models' tensors, in config order (host-owned for the duration of the call).
    pub models: RSlice<'a, TensorHandle>,
    /// Global parameters, a JSON object.
    pub params: RStr<'a>,
    /// Per-model parameters, one JSON object per model.
    pub model_params: RSlice<'a, RStr<'a>>,
    /// Seed for random methods, already mixed with the tensor's identity by the host.
    pub seed: u64,
}

/// Entry points of a [`crate::PluginKind::MergeMethod`] plugin.
#[repr(C)]
pub struct MergeMethodVTable {
    /// `size_of::<MergeMethodVTable>()` as the plugin compiled it.
    pub struct_size: usize,
    /// Checks parameters; never touches weights.
    pub validate: unsafe extern "C" fn(*const ValidateRequest<'_>) -> FfiResult<u8>,
    /// Merges one tensor; the returned handle is owned by the host.
    pub merge_tensor:
        unsafe extern "C" fn(*const BackendVTable, *const MergeRequest<'_>) -> FfiResult<TensorHandle>,
}
