//! Scalar element functions: the reference every fast path is measured against.
//!
//! They use `libm` on every target, so a host and a microcontroller produce the same bits.

use edgetune_core::{ActKind, Activation};

/// Applies an element-wise function to one value.
///
/// ```
/// use edgetune_core::{ActKind, Activation};
/// let relu = Activation::plain(ActKind::Relu);
/// assert_eq!(edgetune_runtime::math::apply(&relu, -2.0), 0.0);
/// ```
#[inline]
pub fn apply(act: &Activation, x: f32) -> f32 {
    match act.kind {
        ActKind::Identity => x,
        ActKind::Relu => relu(x),
        ActKind::Clip => clip(x, act.a, act.b),
        ActKind::Sigmoid => sigmoid(x),
        ActKind::HardSigmoid => hard_sigmoid(x, act.a, act.b),
        ActKind::HardSwish => x * hard_sigmoid(x, act.a, act.b),
        ActKind::Tanh => libm::tanhf(x),
        ActKind::Erf => libm::erff(x),
        ActKind::Gelu => 0.5 * x * (1.0 + libm::erff(x * core::f32::consts::FRAC_1_SQRT_2)),
        ActKind::Sqrt => libm::sqrtf(x),
        ActKind::Rsqrt => 1.0 / libm::sqrtf(x),
        ActKind::Exp => libm::expf(x),
        ActKind::Log => libm::logf(x),
        ActKind::Neg => -x,
        ActKind::Abs => libm::fabsf(x),
        ActKind::Recip => 1.0 / x,
        ActKind::Square => x * x,
        ActKind::LeakyRelu => {
            if x >= 0.0 {
                x
            } else {
                act.a * x
            }
        }
        ActKind::Floor => libm::floorf(x),
        ActKind::Ceil => libm::ceilf(x),
        ActKind::Round => libm::rintf(x),
        ActKind::Sin => libm::sinf(x),
        ActKind::Cos => libm::cosf(x),
    }
}

/// Applies an element-wise function to a slice in place (same results as [`apply`]).
pub fn apply_slice(act: &Activation, xs: &mut [f32]) {
    // One dispatch per slice: each loop body is a plain function the compiler can inline.
    fn each(xs: &mut [f32], f: impl Fn(f32) -> f32) {
        xs.iter_mut().for_each(|x| *x = f(*x));
    }
    let (a, b) = (act.a, act.b);
    match act.kind {
        ActKind::Identity => {}
        ActKind::Relu => each(xs, relu),
        ActKind::Clip => each(xs, |x| clip(x, a, b)),
        ActKind::HardSigmoid => each(xs, |x| hard_sigmoid(x, a, b)),
        ActKind::HardSwish => each(xs, |x| x * hard_sigmoid(x, a, b)),
        ActKind::Sigmoid => each(xs, sigmoid),
        ActKind::Gelu => each(xs, |x| {
            0.5 * x * (1.0 + libm::erff(x * core::f32::consts::FRAC_1_SQRT_2))
        }),
        ActKind::Square => each(xs, |x| x * x),
        ActKind::Neg => each(xs, |x| -x),
        _ => each(xs, |x| apply(act, x)),
    }
}

/// `max(x, 0)`, with NaN passed through.
#[inline]
pub fn relu(x: f32) -> f32 {
    if x < 0.0 {
        0.0
    } else {
        x
    }
}

/// `min(max(x, lo), hi)`, with NaN passed through.
#[inline]
pub fn clip(x: f32, lo: f32, hi: f32) -> f32 {
    if x < lo {
        lo
    } else if x > hi {
        hi
    } else {
        x
    }
}

/// Logistic sigmoid, stable for large |x|.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + libm::expf(-x))
    } else {
        let e = libm::expf(x);
        e / (1.0 + e)
    }
}

/// `clip(a·x + b, 0, 1)`.
#[inline]
pub fn hard_sigmoid(x: f32, a: f32, b: f32) -> f32 {
    clip(a * x + b, 0.0, 1.0)
}
