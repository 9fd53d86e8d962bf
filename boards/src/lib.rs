//! Board support for edgetune firmware.
//!
//! Firmware that runs an edgetune model needs four things from the board it is on, and nothing
//! else: somewhere to print ([`core::fmt::Write`]), a way to wait ([`DelayNs`]), a clock to
//! measure with ([`MonotonicCounter`]) and non-volatile storage for fine-tuned adapters
//! ([`NorFlash`]). The [`Board`] trait names these four; a board crate implements it once and
//! hands the parts to generic firmware code.
//!
//! The crate also carries host-testable doubles for them: [`RamNorFlash`] (NOR flash semantics in
//! RAM), [`PowerCutFlash`] (loses power after a chosen number of bytes, to test that adapter
//! saving survives a cut at every offset) and [`ManualClock`] (time that only moves when told).
//!
//! ```
//! use core::fmt::Write;
//! use edgetune_boards::{Board, MonotonicCounter, Parts};
//! use edgetune_boards::embedded_hal::delay::DelayNs;
//!
//! /// Firmware written once, for every board.
//! fn blink_report<B: Board>(board: B) -> u64 {
//!     let Parts { mut log, mut delay, mut counter, .. } = board.split();
//!     let start = counter.now();
//!     delay.delay_ms(5);
//!     let us = counter.elapsed_micros(start);
//!     writeln!(log, "{}: waited {} us", B::NAME, us).ok();
//!     us
//! }
//! # use core::cell::Cell;
//! # use edgetune_boards::{ManualClock, RamNorFlash};
//! # struct Sim<'a>(&'a Cell<u64>);
//! # impl<'a> Board for Sim<'a> {
//! #     const NAME: &'static str = "sim";
//! #     type Log = String;
//! #     type Delay = ManualClock<'a>;
//! #     type Counter = ManualClock<'a>;
//! #     type Storage = RamNorFlash<4096>;
//! #     fn split(self) -> Parts<Self> {
//! #         let clock = ManualClock::new(self.0, 1_000_000);
//! #         Parts { log: String::new(), delay: clock, counter: clock, storage: RamNorFlash::new() }
//! #     }
//! # }
//! # let time = Cell::new(0);
//! assert!(blink_report(Sim(&time)) >= 5_000);
//! ```
#![no_std]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

pub mod clock;
pub mod flash;

pub use clock::{ManualClock, MonotonicCounter};
pub use flash::{PowerCutError, PowerCutFlash, RamNorFlash};

/// Re-export of the `embedded-hal` version this crate's traits are written against.
pub use embedded_hal;
/// Re-export of the `embedded-storage` version this crate's traits are written against.
pub use embedded_storage;

use embedded_hal::delay::DelayNs;
use embedded_storage::nor_flash::NorFlash;

/// What edgetune firmware needs from a board: a log sink, a delay, a monotonic counter and NOR
/// flash for adapter storage.
///
/// A board type is taken once at boot (it owns the peripherals) and [split](Board::split) into
/// its [`Parts`], which generic firmware code then uses independently of each other.
///
/// # Example
///
/// A board for host tests, built from this crate's doubles:
///
/// ```
/// use core::cell::Cell;
/// use core::fmt::Write;
/// use edgetune_boards::{Board, ManualClock, MonotonicCounter, Parts, RamNorFlash};
/// use edgetune_boards::embedded_storage::nor_flash::{NorFlash, ReadNorFlash};
///
/// struct HostBoard<'a> {
///     time: &'a Cell<u64>,
/// }
///
/// impl<'a> Board for HostBoard<'a> {
///     const NAME: &'static str = "host";
///     type Log = String;
///     type Delay = ManualClock<'a>;
///     type Counter = ManualClock<'a>;
///     type Storage = RamNorFlash<8192, 4, 4096>;
///
///     fn split(self) -> Parts<Self> {
///         // Delay and counter share one time base, so a delay shows up on the counter.
///         let clock = ManualClock::new(self.time, 1_000_000);
///         Parts { log: String::new(), delay: clock, counter: clock, storage: RamNorFlash::new() }
///     }
/// }
///
/// let time = Cell::new(0);
/// let mut parts = HostBoard { time: &time }.split();
/// parts.storage.write(0, b"slot").unwrap();
/// let mut back = [0u8; 4];
/// parts.storage.read(0, &mut back).unwrap();
/// write!(parts.log, "{} read {:?}", HostBoard::NAME, core::str::from_utf8(&back).unwrap()).unwrap();
/// assert_eq!(parts.log, "host read \"slot\"");
/// ```
pub trait Board: Sized {
    /// Short board name for banners and reports, e.g. `"mps2-an386"`.
    const NAME: &'static str;

    /// Text output: a UART, semihosting, RTT, or a `String` on the host.
    type Log: core::fmt::Write;

    /// Busy or sleeping wait.
    type Delay: DelayNs;

    /// Monotonic cycle or time counter used to measure inference and fine-tuning steps.
    type Counter: MonotonicCounter;

    /// Non-volatile storage for adapters (`.eta` A/B slots).
    type Storage: NorFlash;

    /// Hands out the board's parts, each usable on its own.
    ///
    /// ```
    /// # use core::cell::Cell;
    /// # use edgetune_boards::{Board, ManualClock, MonotonicCounter, Parts, RamNorFlash};
    /// # struct B<'a>(&'a Cell<u64>);
    /// # impl<'a> Board for B<'a> {
    /// #     const NAME: &'static str = "b";
    /// #     type Log = String;
    /// #     type Delay = ManualClock<'a>;
    /// #     type Counter = ManualClock<'a>;
    /// #     type Storage = RamNorFlash<4096>;
    /// #     fn split(self) -> Parts<Self> {
    /// #         let c = ManualClock::new(self.0, 1_000);
    /// #         Parts { log: String::new(), delay: c, counter: c, storage: RamNorFlash::new() }
    /// #     }
    /// # }
    /// # let time = Cell::new(0);
    /// # let board = B(&time);
    /// let Parts { mut counter, .. } = board.split();
    /// assert_eq!(counter.now(), 0);
    /// ```
    fn split(self) -> Parts<Self>;
}

/// The parts of a [`Board`], as handed out by [`Board::split`].
///
/// Each field is an independent value, so firmware can log while it times a step and writes an
/// adapter.
///
/// ```
/// use edgetune_boards::{Board, Parts};
///
/// fn log_only<B: Board>(parts: &mut Parts<B>) -> &mut B::Log {
///     &mut parts.log
/// }
/// # let _ = log_only::<NoBoard>;
/// # struct NoBoard;
/// # impl Board for NoBoard {
/// #     const NAME: &'static str = "none";
/// #     type Log = String;
/// #     type Delay = edgetune_boards::ManualClock<'static>;
/// #     type Counter = edgetune_boards::ManualClock<'static>;
/// #     type Storage = edgetune_boards::RamNorFlash<4096>;
/// #     fn split(self) -> Parts<Self> { unimplemented!() }
/// # }
/// ```
pub struct Parts<B: Board> {
    /// Text output.
    pub log: B::Log,
    /// Delay provider.
    pub delay: B::Delay,
    /// Monotonic counter.
    pub counter: B::Counter,
    /// Adapter storage.
    pub storage: B::Storage,
}
