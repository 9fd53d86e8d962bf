//! Kernel families and the choice of fast paths for this CPU.
//!
//! Each family has a scalar reference that defines its result; fast paths for x86_64 (AVX2+FMA)
//! and aarch64 (NEON) are tested against it and chosen once per session.

pub mod conv;
pub mod elementwise;
pub mod gemm;
pub mod linear;
pub mod movement;
pub mod norm;
pub mod pool;

/// The kernels a session uses, chosen once.
///
/// ```
/// use edgetune_runtime::kernels::Kernels;
/// let fast = Kernels::best();
/// let reference = Kernels::reference();
/// println!("gemm: {} (reference: {})", fast.gemm.name, reference.gemm.name);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Kernels {
    /// f32 matrix-multiply micro-kernel.
    pub gemm: gemm::GemmKernel,
    /// Threads large kernels may use (with the `std` feature; 1 otherwise).
    pub threads: usize,
}

impl Kernels {
    /// The scalar reference kernels: bit-identical on every target.
    pub fn reference() -> Kernels {
        Kernels {
            gemm: gemm::generic::KERNEL,
            threads: 1,
        }
    }

    /// The same kernels with a thread budget (used with the `std` feature).
    pub fn with_threads(self, threads: usize) -> Kernels {
        Kernels {
            threads: threads.max(1),
            ..self
        }
    }

    /// The fastest kernels this CPU supports, on one thread (runtime detection with `std`,
    /// compile-time target features without).
    pub fn best() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        {
            if x86_64_has_avx2_fma() {
                return Kernels {
                    gemm: gemm::x86_64::KERNEL,
                    threads: 1,
                };
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            // NEON is part of the aarch64 baseline.
            return Kernels {
                gemm: gemm::aarch64::KERNEL,
                threads: 1,
            };
        }
        #[allow(unreachable_code)]
        Kernels::reference()
    }
}

#[cfg(target_arch = "x86_64")]
fn x86_64_has_avx2_fma() -> bool {
    #[cfg(feature = "std")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(feature = "std"))]
    {
        cfg!(all(target_feature = "avx2", target_feature = "fma"))
    }
}
