//! SysTick as a 64-bit monotonic counter and a busy-wait delay: the same on every Cortex-M
//! board, given its core clock.

use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m::peripheral::{SCB, SYST};
use cortex_m_rt::exception;
use edgetune_boards::MonotonicCounter;
use embedded_hal::delay::DelayNs;

const SYST_RELOAD: u32 = 0x00FF_FFFF;
const SYST_PERIOD: u64 = SYST_RELOAD as u64 + 1;

/// SysTick wraps counted by the SysTick exception.
static SYST_WRAPS: AtomicU32 = AtomicU32::new(0);

/// Starts SysTick on the core clock with its wrap interrupt.
pub fn start(syst: &mut SYST) {
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(SYST_RELOAD);
    syst.clear_current();
    syst.enable_counter();
    // VAL reads 0 until the counter has loaded RELOAD (in QEMU this can take milliseconds);
    // starting the count before that would make the first readings jump back by a period.
    let mut spins = 0u32;
    while SYST::get_current() == 0 && spins < 10_000_000 {
        spins += 1;
    }
    SCB::clear_pendst();
    SYST_WRAPS.store(0, Ordering::Release);
    syst.enable_interrupt();
}

#[exception]
fn SysTick() {
    SYST_WRAPS.fetch_add(1, Ordering::Relaxed);
}

/// Core-clock ticks since boot: SysTick's 24-bit down-counter, extended by its wrap interrupt.
///
/// Correct with interrupts enabled, and inside a critical section shorter than one SysTick
/// period (0.67 s at 25 MHz): a wrap whose interrupt is still pending is counted.
#[derive(Clone, Copy)]
pub struct SysTickCounter {
    hz: u32,
}

impl SysTickCounter {
    /// The counter of a core clocked at `hz` (after [`start`]).
    pub fn new(hz: u32) -> SysTickCounter {
        SysTickCounter { hz }
    }
}

impl MonotonicCounter for SysTickCounter {
    fn frequency_hz(&self) -> u32 {
        self.hz
    }

    fn now(&mut self) -> u64 {
        loop {
            let wraps = SYST_WRAPS.load(Ordering::Acquire);
            let pending = SCB::is_pendst_pending();
            let current = SYST::get_current();
            // Retry if a wrap happened between the reads: it shows as a change of the pending
            // bit, or, if the SysTick handler ran meanwhile (clearing the bit), of the count.
            // Pending must be re-read before the count, or a handler that runs between the two
            // re-reads would go unnoticed.
            if SCB::is_pendst_pending() != pending || SYST_WRAPS.load(Ordering::Acquire) != wraps {
                continue;
            }
            let wraps = u64::from(wraps) + u64::from(pending);
            return wraps * SYST_PERIOD + u64::from(SYST_RELOAD - current);
        }
    }
}

/// Busy-wait delay on [`SysTickCounter`].
pub struct SysTickDelay {
    counter: SysTickCounter,
}

impl SysTickDelay {
    /// The delay of a core clocked at `hz` (after [`start`]).
    pub fn new(hz: u32) -> SysTickDelay {
        SysTickDelay {
            counter: SysTickCounter::new(hz),
        }
    }
}

impl DelayNs for SysTickDelay {
    fn delay_ns(&mut self, ns: u32) {
        let ticks = (u64::from(ns) * u64::from(self.counter.hz)).div_ceil(1_000_000_000);
        let start = self.counter.now();
        while self.counter.now() - start < ticks {
            core::hint::spin_loop();
        }
    }
}
