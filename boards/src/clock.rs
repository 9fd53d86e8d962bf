//! Monotonic counters.

use core::cell::Cell;

use embedded_hal::delay::DelayNs;

/// A monotonic counter of cycles or time ticks, for measuring how long a step takes.
///
/// The count starts at some point at or before boot, never goes backwards and does not wrap in
/// practice (64 bits of a 1 GHz counter last 584 years). Implementations on hardware usually
/// extend a 24-bit or 32-bit hardware counter in software.
///
/// # Example
///
/// ```
/// use edgetune_boards::MonotonicCounter;
///
/// fn time_it<C: MonotonicCounter>(counter: &mut C, work: impl FnOnce()) -> u64 {
///     let start = counter.now();
///     work();
///     counter.elapsed_micros(start)
/// }
/// # let time = core::cell::Cell::new(0);
/// # let mut clock = edgetune_boards::ManualClock::new(&time, 25_000_000);
/// # let c2 = clock;
/// # assert_eq!(time_it(&mut clock, || c2.advance(25_000)), 1_000);
/// ```
pub trait MonotonicCounter {
    /// Ticks per second.
    fn frequency_hz(&self) -> u32;

    /// The current count in ticks.
    fn now(&mut self) -> u64;

    /// Converts a number of ticks to microseconds, rounding down (saturating at `u64::MAX`).
    ///
    /// ```
    /// # use edgetune_boards::{ManualClock, MonotonicCounter};
    /// # let time = core::cell::Cell::new(0);
    /// let clock = ManualClock::new(&time, 25_000_000); // 25 MHz
    /// assert_eq!(clock.ticks_to_micros(25), 1);
    /// assert_eq!(clock.ticks_to_micros(u64::MAX), u64::MAX / 25);
    /// ```
    fn ticks_to_micros(&self, ticks: u64) -> u64 {
        let hz = u64::from(self.frequency_hz().max(1));
        // Split to stay in u64 (no 128-bit division on Cortex-M); saturates for counters slower
        // than 1 MHz that have run for longer than u64::MAX microseconds.
        (ticks / hz)
            .saturating_mul(1_000_000)
            .saturating_add((ticks % hz) * 1_000_000 / hz)
    }

    /// Microseconds elapsed since an earlier [`now`](MonotonicCounter::now) reading.
    ///
    /// ```
    /// # use edgetune_boards::{ManualClock, MonotonicCounter};
    /// # let time = core::cell::Cell::new(0);
    /// let mut clock = ManualClock::new(&time, 1_000_000);
    /// let start = clock.now();
    /// clock.advance(1_500);
    /// assert_eq!(clock.elapsed_micros(start), 1_500);
    /// ```
    fn elapsed_micros(&mut self, since: u64) -> u64 {
        let now = self.now();
        self.ticks_to_micros(now.saturating_sub(since))
    }
}

impl<T: MonotonicCounter + ?Sized> MonotonicCounter for &mut T {
    #[inline]
    fn frequency_hz(&self) -> u32 {
        T::frequency_hz(self)
    }

    #[inline]
    fn now(&mut self) -> u64 {
        T::now(self)
    }
}

/// A clock that moves only when told to: by [`advance`](ManualClock::advance) or by a delay.
///
/// Copies share one time base (a `Cell` the caller owns), so one copy can be a board's delay and
/// another its counter, and a delay on one shows up on the other. For host tests of firmware
/// logic.
///
/// # Example
///
/// ```
/// use core::cell::Cell;
/// use edgetune_boards::{ManualClock, MonotonicCounter};
/// use edgetune_boards::embedded_hal::delay::DelayNs;
///
/// let time = Cell::new(0);
/// let mut delay = ManualClock::new(&time, 1_000_000); // 1 tick = 1 us
/// let mut counter = delay;
///
/// delay.delay_ms(3);
/// assert_eq!(counter.now(), 3_000);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ManualClock<'a> {
    ticks: &'a Cell<u64>,
    hz: u32,
}

impl<'a> ManualClock<'a> {
    /// A clock reading `ticks`, counting at `hz` ticks per second.
    ///
    /// ```
    /// # use edgetune_boards::{ManualClock, MonotonicCounter};
    /// let time = core::cell::Cell::new(42);
    /// let mut clock = ManualClock::new(&time, 1_000);
    /// assert_eq!((clock.now(), clock.frequency_hz()), (42, 1_000));
    /// ```
    pub const fn new(ticks: &'a Cell<u64>, hz: u32) -> Self {
        ManualClock { ticks, hz }
    }

    /// Moves time forward by `ticks`.
    ///
    /// ```
    /// # use edgetune_boards::ManualClock;
    /// let time = core::cell::Cell::new(0);
    /// ManualClock::new(&time, 1_000).advance(7);
    /// assert_eq!(time.get(), 7);
    /// ```
    pub fn advance(&self, ticks: u64) {
        self.ticks.set(self.ticks.get().saturating_add(ticks));
    }
}

impl MonotonicCounter for ManualClock<'_> {
    fn frequency_hz(&self) -> u32 {
        self.hz
    }

    fn now(&mut self) -> u64 {
        self.ticks.get()
    }
}

impl DelayNs for ManualClock<'_> {
    /// Advances time by at least `ns` (rounded up to whole ticks).
    fn delay_ns(&mut self, ns: u32) {
        let ticks = (u64::from(ns) * u64::from(self.hz)).div_ceil(1_000_000_000);
        self.advance(ticks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_rounds_up_to_whole_ticks() {
        let time = Cell::new(0);
        let mut clock = ManualClock::new(&time, 1_000); // 1 tick = 1 ms
        clock.delay_ns(1);
        assert_eq!(time.get(), 1);
        clock.delay_us(1_000);
        assert_eq!(time.get(), 2);
        clock.delay_ms(10);
        assert_eq!(time.get(), 12);
    }

    #[test]
    fn long_delays_do_not_overflow() {
        let time = Cell::new(0);
        let mut clock = ManualClock::new(&time, 25_000_000);
        clock.delay_ms(u32::MAX);
        // 4294967.295 s at 25 MHz, give or take the per-chunk rounding of delay_ms.
        let secs = clock.ticks_to_micros(time.get()) / 1_000_000;
        assert_eq!(secs, u64::from(u32::MAX) / 1_000);
    }

    #[test]
    fn ticks_to_micros_is_exact_for_large_counts() {
        let time = Cell::new(0);
        let clock = ManualClock::new(&time, 3);
        assert_eq!(clock.ticks_to_micros(3), 1_000_000);
        assert_eq!(clock.ticks_to_micros(1), 333_333);
        assert_eq!(clock.ticks_to_micros(u64::MAX), u64::MAX);
        let clock = ManualClock::new(&time, 25_000_000);
        assert_eq!(clock.ticks_to_micros(u64::MAX), u64::MAX / 25);
    }

    #[test]
    fn elapsed_never_underflows() {
        let time = Cell::new(10);
        let mut clock = ManualClock::new(&time, 1_000_000);
        assert_eq!(clock.elapsed_micros(20), 0);
    }
}
