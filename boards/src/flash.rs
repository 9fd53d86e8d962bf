//! NOR flash doubles: flash semantics in RAM, and flash that loses power on cue.
//!
//! Both implement [`embedded_storage::nor_flash`]'s traits, so adapter persistence code can be
//! written once against [`NorFlash`] and tested on the host against every power-loss point before
//! it runs on a board.

use core::fmt;
use core::mem::MaybeUninit;

use embedded_storage::nor_flash::{
    check_erase, check_read, check_write, ErrorType, MultiwriteNorFlash, NorFlash, NorFlashError,
    NorFlashErrorKind, ReadNorFlash,
};

/// `N` bytes of RAM that behave like NOR flash.
///
/// - Erased bytes read `0xFF`; [`erase`](NorFlash::erase) works on whole `ERASE`-byte sectors.
/// - [`write`](NorFlash::write) takes `WRITE`-aligned offsets and lengths and can only clear
///   bits: the stored byte becomes `old & new`, as on real NOR. Writing over data that was not
///   erased first therefore corrupts it, as it would on a chip.
/// - Out-of-bounds and misaligned requests fail with [`NorFlashErrorKind`] and change nothing.
///
/// `N` must be a multiple of `ERASE`, and `ERASE` a multiple of `WRITE`; this is checked when the
/// type is first constructed (a compile error, not a panic):
///
/// ```compile_fail
/// # use edgetune_boards::RamNorFlash;
/// let flash: RamNorFlash<1000, 4, 4096> = RamNorFlash::new(); // 1000 is not a whole sector
/// ```
///
/// # Examples
///
/// ```
/// use edgetune_boards::RamNorFlash;
/// use edgetune_boards::embedded_storage::nor_flash::{NorFlash, ReadNorFlash};
///
/// // 8 KiB in two 4 KiB sectors, programmed in 4-byte words.
/// let mut flash: RamNorFlash<8192, 4, 4096> = RamNorFlash::new();
///
/// flash.write(0, &[0x12, 0x34, 0x56, 0x78]).unwrap();
/// // Writing again can only clear more bits.
/// flash.write(0, &[0xF0, 0xF0, 0xF0, 0xF0]).unwrap();
///
/// let mut word = [0; 4];
/// flash.read(0, &mut word).unwrap();
/// assert_eq!(word, [0x10, 0x30, 0x50, 0x70]);
///
/// flash.erase(0, 4096).unwrap();
/// flash.read(0, &mut word).unwrap();
/// assert_eq!(word, [0xFF; 4]);
/// ```
///
/// Misaligned and out-of-bounds requests are refused:
///
/// ```
/// use edgetune_boards::RamNorFlash;
/// use edgetune_boards::embedded_storage::nor_flash::{NorFlash, NorFlashErrorKind};
///
/// let mut flash: RamNorFlash<4096, 4, 1024> = RamNorFlash::new();
/// assert_eq!(flash.write(2, &[0; 4]), Err(NorFlashErrorKind::NotAligned));
/// assert_eq!(flash.write(4096, &[0; 4]), Err(NorFlashErrorKind::OutOfBounds));
/// assert_eq!(flash.erase(0, 512), Err(NorFlashErrorKind::NotAligned));
/// ```
#[repr(transparent)]
pub struct RamNorFlash<const N: usize, const WRITE: usize = 4, const ERASE: usize = 4096> {
    bytes: [u8; N],
}

impl<const N: usize, const WRITE: usize, const ERASE: usize> RamNorFlash<N, WRITE, ERASE> {
    /// Compile-time check of the geometry, evaluated when a constructor is instantiated.
    const GEOMETRY_OK: () = {
        assert!(WRITE > 0, "RamNorFlash: WRITE must be at least 1");
        assert!(ERASE > 0, "RamNorFlash: ERASE must be at least 1");
        assert!(
            ERASE.is_multiple_of(WRITE),
            "RamNorFlash: ERASE must be a multiple of WRITE"
        );
        assert!(
            N.is_multiple_of(ERASE),
            "RamNorFlash: N must be a multiple of ERASE"
        );
        assert!(
            N as u64 <= u32::MAX as u64,
            "RamNorFlash: N must fit in a u32 offset"
        );
    };

    /// A fully erased flash (every byte `0xFF`).
    ///
    /// `const`, so it can initialise a `static`; note that such a static then lives in `.data`
    /// and costs `N` bytes of image size. On a device, prefer
    /// [`init_erased`](RamNorFlash::init_erased) on an uninitialised static.
    ///
    /// ```
    /// use edgetune_boards::RamNorFlash;
    /// static STORE: RamNorFlash<1024, 4, 256> = RamNorFlash::new();
    /// assert!(STORE.as_bytes().iter().all(|&b| b == 0xFF));
    /// ```
    pub const fn new() -> Self {
        #[allow(clippy::let_unit_value)]
        let () = Self::GEOMETRY_OK;
        RamNorFlash { bytes: [0xFF; N] }
    }

    /// Erases `slot` in place and returns it, without building an `N`-byte value on the stack.
    ///
    /// For large stores in static memory, e.g. a `static mut` `MaybeUninit` placed in a
    /// `.uninit` section so that it costs neither image size nor a copy at boot.
    ///
    /// ```
    /// use core::mem::MaybeUninit;
    /// use edgetune_boards::RamNorFlash;
    /// use edgetune_boards::embedded_storage::nor_flash::ReadNorFlash;
    ///
    /// let mut slot = MaybeUninit::<RamNorFlash<4096, 4, 4096>>::uninit();
    /// let flash = RamNorFlash::init_erased(&mut slot);
    /// assert_eq!(flash.capacity(), 4096);
    /// assert_eq!(flash.as_bytes()[4095], 0xFF);
    /// ```
    pub fn init_erased(slot: &mut MaybeUninit<Self>) -> &mut Self {
        #[allow(clippy::let_unit_value)]
        let () = Self::GEOMETRY_OK;
        // SAFETY: `Self` is `repr(transparent)` over `[u8; N]`, so filling its `N` bytes fully
        // initialises it; every byte pattern is a valid `u8`.
        unsafe {
            slot.as_mut_ptr().cast::<u8>().write_bytes(0xFF, N);
            slot.assume_init_mut()
        }
    }

    /// The raw contents.
    ///
    /// ```
    /// # use edgetune_boards::RamNorFlash;
    /// let flash: RamNorFlash<256, 1, 256> = RamNorFlash::new();
    /// assert_eq!(flash.as_bytes().len(), 256);
    /// ```
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The raw contents, writable without NOR rules: to inject bit flips or torn sectors in
    /// tests, or to preload an image.
    ///
    /// ```
    /// # use edgetune_boards::RamNorFlash;
    /// let mut flash: RamNorFlash<256, 1, 256> = RamNorFlash::new();
    /// flash.as_mut_bytes()[7] ^= 0x01; // a single-bit upset
    /// assert_eq!(flash.as_bytes()[7], 0xFE);
    /// ```
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        &mut self.bytes
    }
}

impl<const N: usize, const WRITE: usize, const ERASE: usize> Default
    for RamNorFlash<N, WRITE, ERASE>
{
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize, const WRITE: usize, const ERASE: usize> Clone
    for RamNorFlash<N, WRITE, ERASE>
{
    fn clone(&self) -> Self {
        RamNorFlash { bytes: self.bytes }
    }
}

impl<const N: usize, const WRITE: usize, const ERASE: usize> fmt::Debug
    for RamNorFlash<N, WRITE, ERASE>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamNorFlash")
            .field("capacity", &N)
            .field("write_size", &WRITE)
            .field("erase_size", &ERASE)
            .finish_non_exhaustive()
    }
}

impl<const N: usize, const WRITE: usize, const ERASE: usize> ErrorType
    for RamNorFlash<N, WRITE, ERASE>
{
    type Error = NorFlashErrorKind;
}

impl<const N: usize, const WRITE: usize, const ERASE: usize> ReadNorFlash
    for RamNorFlash<N, WRITE, ERASE>
{
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        check_read(self, offset, bytes.len())?;
        let start = offset as usize;
        bytes.copy_from_slice(&self.bytes[start..start + bytes.len()]);
        Ok(())
    }

    fn capacity(&self) -> usize {
        N
    }
}

impl<const N: usize, const WRITE: usize, const ERASE: usize> NorFlash
    for RamNorFlash<N, WRITE, ERASE>
{
    const WRITE_SIZE: usize = WRITE;
    const ERASE_SIZE: usize = ERASE;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        check_erase(self, from, to)?;
        self.bytes[from as usize..to as usize].fill(0xFF);
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        check_write(self, offset, bytes.len())?;
        let start = offset as usize;
        for (cell, &new) in self.bytes[start..start + bytes.len()].iter_mut().zip(bytes) {
            *cell &= new;
        }
        Ok(())
    }
}

/// Writes AND into the stored bits, so writing a word twice is well defined.
impl<const N: usize, const WRITE: usize, const ERASE: usize> MultiwriteNorFlash
    for RamNorFlash<N, WRITE, ERASE>
{
}

/// Error of a [`PowerCutFlash`].
///
/// ```
/// use edgetune_boards::PowerCutError;
/// use edgetune_boards::embedded_storage::nor_flash::{NorFlashError, NorFlashErrorKind};
///
/// let cut: PowerCutError<NorFlashErrorKind> = PowerCutError::PowerLost;
/// assert_eq!(cut.kind(), NorFlashErrorKind::Other);
/// assert_eq!(PowerCutError::Flash(NorFlashErrorKind::NotAligned).kind(), NorFlashErrorKind::NotAligned);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerCutError<E> {
    /// The simulated power cut happened during or before this operation.
    PowerLost,
    /// The wrapped flash refused the operation.
    Flash(E),
}

impl<E: NorFlashError> NorFlashError for PowerCutError<E> {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            PowerCutError::PowerLost => NorFlashErrorKind::Other,
            PowerCutError::Flash(e) => e.kind(),
        }
    }
}

impl<E: fmt::Debug> fmt::Display for PowerCutError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PowerCutError::PowerLost => f.write_str("power lost (simulated)"),
            PowerCutError::Flash(e) => write!(f, "flash error: {e:?}"),
        }
    }
}

/// Largest `WRITE_SIZE` for which a torn (partly programmed) write unit is simulated; with a
/// larger one the unit the cut falls into is left untouched instead.
const MAX_TORN_UNIT: usize = 256;

/// A [`NorFlash`] wrapper that loses power after a given number of bytes have been written.
///
/// Up to `cut_after` bytes reach the wrapped flash, in order; the write that would exceed it
/// applies only the bytes that fit and returns [`PowerCutError::PowerLost`], and every later
/// operation (reads included: the device is off) fails the same way until
/// [`restore_power`](PowerCutFlash::restore_power). If the cut falls inside a `WRITE_SIZE` unit,
/// that unit is left torn: its leading bytes programmed, the rest as they were.
///
/// Erases cost nothing by default; with [`counting_erases`](PowerCutFlash::counting_erases) each
/// erase costs one step of the budget, so a cut between an erase and the next write, or between
/// two erases, can be simulated too. (An erase is never torn: it happens whole or not at all.)
///
/// To test recovery at every power-loss point: do one uncut run to count the steps, then replay
/// the operation once per cut point and check what a reboot would read.
///
/// # Example
///
/// ```
/// use edgetune_boards::{PowerCutError, PowerCutFlash, RamNorFlash};
/// use edgetune_boards::embedded_storage::nor_flash::{NorFlash, ReadNorFlash};
///
/// type Flash = RamNorFlash<1024, 4, 256>;
///
/// // The operation under test: save an 8-byte record in sector 0.
/// fn save<F: NorFlash>(flash: &mut F) -> Result<(), F::Error> {
///     flash.erase(0, 256)?;
///     flash.write(0, b"ADAPTER1")
/// }
///
/// // Dry run: how many steps does a save take?
/// let mut dry = PowerCutFlash::unlimited(Flash::new()).counting_erases();
/// save(&mut dry).unwrap();
/// let steps = dry.steps();
/// assert_eq!(steps, 1 + 8); // one erase, eight bytes
///
/// // Cut the power at every step and look at what survives.
/// for cut in 0..steps {
///     let mut flash = PowerCutFlash::new(Flash::new(), cut).counting_erases();
///     assert_eq!(save(&mut flash), Err(PowerCutError::PowerLost));
///     let after_reboot = flash.into_inner();
///     let landed = cut.saturating_sub(1); // bytes written after the erase
///     assert_eq!(&after_reboot.as_bytes()[..landed], &b"ADAPTER1"[..landed]);
///     assert!(after_reboot.as_bytes()[landed..8].iter().all(|&b| b == 0xFF));
/// }
/// ```
#[derive(Debug, Clone)]
pub struct PowerCutFlash<F> {
    inner: F,
    /// Steps that may still be taken before the cut; `None` never cuts.
    remaining: Option<usize>,
    steps: usize,
    bytes_written: usize,
    erase_cost: usize,
    cut: bool,
}

impl<F: NorFlash> PowerCutFlash<F> {
    /// Wraps `inner`, cutting the power once `cut_after` bytes have been written.
    ///
    /// `cut_after == 0` cuts at the first byte written.
    ///
    /// ```
    /// use edgetune_boards::{PowerCutError, PowerCutFlash, RamNorFlash};
    /// use edgetune_boards::embedded_storage::nor_flash::NorFlash;
    ///
    /// let mut flash = PowerCutFlash::new(RamNorFlash::<256, 1, 256>::new(), 3);
    /// assert_eq!(flash.write(0, b"abcdef"), Err(PowerCutError::PowerLost));
    /// assert_eq!(&flash.inner().as_bytes()[..4], b"abc\xFF");
    /// ```
    pub fn new(inner: F, cut_after: usize) -> Self {
        PowerCutFlash {
            inner,
            remaining: Some(cut_after),
            steps: 0,
            bytes_written: 0,
            erase_cost: 0,
            cut: false,
        }
    }

    /// Wraps `inner` without ever cutting: counts the steps of a dry run.
    ///
    /// ```
    /// use edgetune_boards::{PowerCutFlash, RamNorFlash};
    /// use edgetune_boards::embedded_storage::nor_flash::NorFlash;
    ///
    /// let mut flash = PowerCutFlash::unlimited(RamNorFlash::<256, 1, 256>::new());
    /// flash.write(0, b"abc").unwrap();
    /// assert_eq!(flash.bytes_written(), 3);
    /// ```
    pub fn unlimited(inner: F) -> Self {
        PowerCutFlash {
            remaining: None,
            ..PowerCutFlash::new(inner, 0)
        }
    }

    /// Makes each erase cost one step of the budget (see the type's documentation).
    ///
    /// ```
    /// use edgetune_boards::{PowerCutError, PowerCutFlash, RamNorFlash};
    /// use edgetune_boards::embedded_storage::nor_flash::NorFlash;
    ///
    /// // A budget of one step: the erase happens, the first byte does not.
    /// let mut flash = PowerCutFlash::new(RamNorFlash::<256, 1, 128>::new(), 1).counting_erases();
    /// flash.erase(0, 128).unwrap();
    /// assert_eq!(flash.write(0, b"x"), Err(PowerCutError::PowerLost));
    /// ```
    pub fn counting_erases(mut self) -> Self {
        self.erase_cost = 1;
        self
    }

    /// Steps taken so far: bytes written, plus erases when they are counted.
    ///
    /// ```
    /// # use edgetune_boards::{PowerCutFlash, RamNorFlash};
    /// # use edgetune_boards::embedded_storage::nor_flash::NorFlash;
    /// let mut flash = PowerCutFlash::unlimited(RamNorFlash::<256, 1, 128>::new()).counting_erases();
    /// flash.erase(0, 256).unwrap();
    /// flash.write(0, b"ab").unwrap();
    /// assert_eq!((flash.steps(), flash.bytes_written()), (3, 2));
    /// ```
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Bytes that reached the wrapped flash, including those of a torn write.
    ///
    /// ```
    /// # use edgetune_boards::{PowerCutFlash, RamNorFlash};
    /// # use edgetune_boards::embedded_storage::nor_flash::NorFlash;
    /// let mut flash = PowerCutFlash::new(RamNorFlash::<256, 4, 256>::new(), 6);
    /// let _ = flash.write(0, &[0u8; 8]);
    /// assert_eq!(flash.bytes_written(), 6);
    /// ```
    pub fn bytes_written(&self) -> usize {
        self.bytes_written
    }

    /// Whether the power has been cut.
    ///
    /// ```
    /// # use edgetune_boards::{PowerCutFlash, RamNorFlash};
    /// # use edgetune_boards::embedded_storage::nor_flash::NorFlash;
    /// let mut flash = PowerCutFlash::new(RamNorFlash::<256, 1, 256>::new(), 0);
    /// assert!(!flash.is_cut());
    /// let _ = flash.write(0, b"a");
    /// assert!(flash.is_cut());
    /// ```
    pub fn is_cut(&self) -> bool {
        self.cut
    }

    /// Power comes back (a reboot): operations work again, with no further cut.
    ///
    /// ```
    /// # use edgetune_boards::{PowerCutFlash, RamNorFlash};
    /// # use edgetune_boards::embedded_storage::nor_flash::{NorFlash, ReadNorFlash};
    /// let mut flash = PowerCutFlash::new(RamNorFlash::<256, 1, 256>::new(), 1);
    /// assert!(flash.write(0, b"ab").is_err());
    /// flash.restore_power();
    /// let mut b = [0; 2];
    /// flash.read(0, &mut b).unwrap();
    /// assert_eq!(&b, b"a\xFF");
    /// ```
    pub fn restore_power(&mut self) {
        self.cut = false;
        self.remaining = None;
    }

    /// The wrapped flash.
    ///
    /// ```
    /// # use edgetune_boards::{PowerCutFlash, RamNorFlash};
    /// # use edgetune_boards::embedded_storage::nor_flash::ReadNorFlash;
    /// let flash = PowerCutFlash::new(RamNorFlash::<256, 1, 256>::new(), 0);
    /// assert_eq!(flash.inner().capacity(), 256);
    /// ```
    pub fn inner(&self) -> &F {
        &self.inner
    }

    /// The wrapped flash, mutably (bypasses the power-cut accounting).
    ///
    /// ```
    /// # use edgetune_boards::{PowerCutFlash, RamNorFlash};
    /// let mut flash = PowerCutFlash::new(RamNorFlash::<256, 1, 256>::new(), 0);
    /// flash.inner_mut().as_mut_bytes()[0] = 0;
    /// ```
    pub fn inner_mut(&mut self) -> &mut F {
        &mut self.inner
    }

    /// Unwraps the flash, e.g. to "reboot" and read what survived.
    ///
    /// ```
    /// # use edgetune_boards::{PowerCutFlash, RamNorFlash};
    /// let flash: RamNorFlash<256, 1, 256> = PowerCutFlash::new(RamNorFlash::new(), 0).into_inner();
    /// # let _ = flash;
    /// ```
    pub fn into_inner(self) -> F {
        self.inner
    }

    fn check_power(&self) -> Result<(), PowerCutError<F::Error>> {
        if self.cut {
            Err(PowerCutError::PowerLost)
        } else {
            Ok(())
        }
    }

    /// Writes the first `n < bytes.len()` bytes of a write that was validated, then cuts.
    fn torn_write(&mut self, offset: u32, bytes: &[u8], n: usize) -> Result<(), F::Error> {
        let unit = F::WRITE_SIZE;
        let whole = n / unit * unit;
        if whole > 0 {
            self.inner.write(offset, &bytes[..whole])?;
        }
        let partial = n - whole;
        if partial > 0 && unit <= MAX_TORN_UNIT {
            // The unit being programmed when the power went: its leading bytes landed, the others
            // are written as 0xFF, which leaves them as they were on NOR (bits only clear).
            let mut buf = [0xFF; MAX_TORN_UNIT];
            buf[..partial].copy_from_slice(&bytes[whole..n]);
            self.inner.write(offset + whole as u32, &buf[..unit])?;
        }
        Ok(())
    }
}

impl<F: NorFlash> ErrorType for PowerCutFlash<F> {
    type Error = PowerCutError<F::Error>;
}

impl<F: NorFlash> ReadNorFlash for PowerCutFlash<F> {
    const READ_SIZE: usize = F::READ_SIZE;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        self.check_power()?;
        self.inner.read(offset, bytes).map_err(PowerCutError::Flash)
    }

    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
}

impl<F: NorFlash> NorFlash for PowerCutFlash<F> {
    const WRITE_SIZE: usize = F::WRITE_SIZE;
    const ERASE_SIZE: usize = F::ERASE_SIZE;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        self.check_power()?;
        if let Some(remaining) = self.remaining {
            if remaining < self.erase_cost {
                self.cut = true;
                return Err(PowerCutError::PowerLost);
            }
        }
        self.inner.erase(from, to).map_err(PowerCutError::Flash)?;
        self.steps += self.erase_cost;
        if let Some(remaining) = &mut self.remaining {
            *remaining -= self.erase_cost;
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        self.check_power()?;
        let n = match self.remaining {
            Some(remaining) if remaining < bytes.len() => remaining,
            _ => {
                self.inner
                    .write(offset, bytes)
                    .map_err(PowerCutError::Flash)?;
                self.steps += bytes.len();
                self.bytes_written += bytes.len();
                if let Some(remaining) = &mut self.remaining {
                    *remaining -= bytes.len();
                }
                return Ok(());
            }
        };
        // A bad request is refused before anything happens, cut or not.
        if check_write(&self.inner, offset, bytes.len()).is_err() {
            return self
                .inner
                .write(offset, bytes)
                .map_err(PowerCutError::Flash);
        }
        self.torn_write(offset, bytes, n)
            .map_err(PowerCutError::Flash)?;
        self.steps += n;
        self.bytes_written += n;
        self.remaining = Some(0);
        self.cut = true;
        Err(PowerCutError::PowerLost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Small = RamNorFlash<1024, 4, 256>;

    fn read_all<F: ReadNorFlash>(flash: &mut F) -> [u8; 1024] {
        let mut out = [0u8; 1024];
        flash.read(0, &mut out).ok().unwrap();
        out
    }

    #[test]
    fn starts_erased() {
        let mut flash = Small::new();
        assert!(read_all(&mut flash).iter().all(|&b| b == 0xFF));
        assert_eq!(flash.capacity(), 1024);
        assert_eq!(Small::WRITE_SIZE, 4);
        assert_eq!(Small::ERASE_SIZE, 256);
        assert_eq!(Small::READ_SIZE, 1);
    }

    #[test]
    fn init_erased_fills_uninitialised_memory() {
        let mut slot = MaybeUninit::<Small>::zeroed();
        let flash = Small::init_erased(&mut slot);
        assert!(flash.as_bytes().iter().all(|&b| b == 0xFF));
    }

    #[test]
    fn write_only_clears_bits() {
        let mut flash = Small::new();
        flash.write(8, &[0b1010_1010, 0xFF, 0x00, 0x0F]).unwrap();
        flash.write(8, &[0b1100_1100, 0x00, 0xFF, 0xF0]).unwrap();
        let mut got = [0u8; 4];
        flash.read(8, &mut got).unwrap();
        assert_eq!(got, [0b1000_1000, 0x00, 0x00, 0x00]);
        // Neighbours untouched.
        let all = read_all(&mut flash);
        assert!(all[..8].iter().chain(&all[12..]).all(|&b| b == 0xFF));
    }

    #[test]
    fn erase_restores_whole_sectors_only() {
        let mut flash = Small::new();
        flash.write(0, &[0u8; 1024]).unwrap();
        flash.erase(256, 512).unwrap();
        let all = read_all(&mut flash);
        assert!(all[..256].iter().all(|&b| b == 0));
        assert!(all[256..512].iter().all(|&b| b == 0xFF));
        assert!(all[512..].iter().all(|&b| b == 0));
        // Empty range is fine.
        flash.erase(512, 512).unwrap();
        flash.erase(1024, 1024).unwrap();
    }

    #[test]
    fn rejects_misaligned_and_out_of_bounds() {
        let mut flash = Small::new();
        let before = read_all(&mut flash);
        assert_eq!(flash.write(1, &[0; 4]), Err(NorFlashErrorKind::NotAligned));
        assert_eq!(flash.write(0, &[0; 3]), Err(NorFlashErrorKind::NotAligned));
        assert_eq!(
            flash.write(1020, &[0; 8]),
            Err(NorFlashErrorKind::OutOfBounds)
        );
        assert_eq!(
            flash.write(u32::MAX - 3, &[0; 4]),
            Err(NorFlashErrorKind::OutOfBounds)
        );
        assert_eq!(flash.erase(0, 100), Err(NorFlashErrorKind::NotAligned));
        assert_eq!(flash.erase(128, 256), Err(NorFlashErrorKind::NotAligned));
        assert_eq!(flash.erase(512, 256), Err(NorFlashErrorKind::OutOfBounds));
        assert_eq!(flash.erase(0, 1280), Err(NorFlashErrorKind::OutOfBounds));
        let mut buf = [0u8; 8];
        assert_eq!(
            flash.read(1020, &mut buf),
            Err(NorFlashErrorKind::OutOfBounds)
        );
        assert_eq!(
            flash.read(u32::MAX, &mut buf[..1]),
            Err(NorFlashErrorKind::OutOfBounds)
        );
        // Reads need no alignment.
        flash.read(1017, &mut buf[..7]).unwrap();
        assert_eq!(read_all(&mut flash), before);
    }

    #[test]
    fn byte_granular_geometry() {
        let mut flash: RamNorFlash<64, 1, 16> = RamNorFlash::new();
        flash.write(3, b"x").unwrap();
        flash.erase(16, 32).unwrap();
        assert_eq!(flash.as_bytes()[3], b'x');
    }

    #[test]
    fn power_cut_at_every_byte_offset() {
        let payload: [u8; 10] = *b"0123456789";
        for cut in 0..=12 {
            for unit_test in [0u8, 1] {
                let (result, bytes, written) = if unit_test == 0 {
                    let mut f = PowerCutFlash::new(RamNorFlash::<256, 1, 256>::new(), cut);
                    let r = f.write(0, &payload);
                    let w = f.bytes_written();
                    let mut out = [0u8; 12];
                    out.copy_from_slice(&f.into_inner().as_bytes()[..12]);
                    (r, out, w)
                } else {
                    // 2-byte write units, so some cuts tear a unit.
                    let mut f = PowerCutFlash::new(RamNorFlash::<256, 2, 256>::new(), cut);
                    let r = f.write(0, &payload);
                    let w = f.bytes_written();
                    let mut out = [0u8; 12];
                    out.copy_from_slice(&f.into_inner().as_bytes()[..12]);
                    (r, out, w)
                };
                let landed = cut.min(payload.len());
                assert_eq!(written, landed, "cut {cut}");
                assert_eq!(&bytes[..landed], &payload[..landed], "cut {cut}");
                assert!(
                    bytes[landed..].iter().all(|&b| b == 0xFF),
                    "cut {cut}: {bytes:?}"
                );
                if cut < payload.len() {
                    assert_eq!(result, Err(PowerCutError::PowerLost));
                } else {
                    assert_eq!(result, Ok(()));
                }
            }
        }
    }

    #[test]
    fn power_cut_spans_several_writes_and_stays_off() {
        let mut f = PowerCutFlash::new(Small::new(), 6);
        f.write(0, &[1, 2, 3, 4]).unwrap();
        assert_eq!(f.write(4, &[5, 6, 7, 8]), Err(PowerCutError::PowerLost));
        assert!(f.is_cut());
        // Everything fails once the power is gone, and nothing more changes.
        assert_eq!(f.write(8, &[0; 4]), Err(PowerCutError::PowerLost));
        assert_eq!(f.erase(0, 256), Err(PowerCutError::PowerLost));
        let mut b = [0u8; 1];
        assert_eq!(f.read(0, &mut b), Err(PowerCutError::PowerLost));
        assert_eq!(
            &f.inner().as_bytes()[..12],
            &[1, 2, 3, 4, 5, 6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]
        );
        // Reboot: works again, with no second cut.
        f.restore_power();
        f.erase(0, 256).unwrap();
        f.write(0, &[9; 256]).unwrap();
        assert_eq!(f.bytes_written(), 6 + 256);
    }

    #[test]
    fn torn_unit_keeps_old_contents_beyond_the_cut() {
        // Program a unit over previously written (not erased) data: the bytes past the cut keep
        // their old value instead of becoming 0xFF.
        let mut inner = Small::new();
        inner.write(0, &[0x0F, 0x0F, 0x0F, 0x0F]).unwrap();
        let mut f = PowerCutFlash::new(inner, 1);
        assert_eq!(f.write(0, &[0x00; 4]), Err(PowerCutError::PowerLost));
        assert_eq!(&f.inner().as_bytes()[..4], &[0x00, 0x0F, 0x0F, 0x0F]);
    }

    #[test]
    fn invalid_requests_are_flash_errors_even_past_the_budget() {
        let mut f = PowerCutFlash::new(Small::new(), 2);
        assert_eq!(
            f.write(1, &[0; 4]),
            Err(PowerCutError::Flash(NorFlashErrorKind::NotAligned))
        );
        assert_eq!(
            f.write(2048, &[0; 4]),
            Err(PowerCutError::Flash(NorFlashErrorKind::OutOfBounds))
        );
        assert_eq!(
            f.erase(0, 3),
            Err(PowerCutError::Flash(NorFlashErrorKind::NotAligned))
        );
        assert!(!f.is_cut());
        assert_eq!(f.bytes_written(), 0);
        assert_eq!(
            PowerCutError::<NorFlashErrorKind>::PowerLost.kind(),
            NorFlashErrorKind::Other
        );
    }

    #[test]
    fn counting_erases_cuts_between_erases() {
        // erase sector 0, write 4 bytes, erase sector 1: steps = 1 + 4 + 1.
        fn op<F: NorFlash>(f: &mut F) -> Result<(), F::Error> {
            f.erase(0, 256)?;
            f.write(0, &[0xAA; 4])?;
            f.erase(256, 512)
        }
        let mut pre = Small::new();
        pre.write(0, &[0u8; 1024]).unwrap();

        let mut dry = PowerCutFlash::unlimited(pre.clone()).counting_erases();
        op(&mut dry).unwrap();
        assert_eq!(dry.steps(), 6);

        for cut in 0..=6 {
            let mut f = PowerCutFlash::new(pre.clone(), cut).counting_erases();
            let r = op(&mut f);
            assert_eq!(r.is_ok(), cut == 6, "cut {cut}");
            let b = f.into_inner();
            let s0_erased_or_written = b.as_bytes()[4..256].iter().all(|&x| x == 0xFF);
            assert_eq!(s0_erased_or_written, cut >= 1, "cut {cut}");
            let written = b.as_bytes()[..4].iter().filter(|&&x| x == 0xAA).count();
            assert_eq!(written, cut.saturating_sub(1).min(4), "cut {cut}");
            let s1_erased = b.as_bytes()[256..512].iter().all(|&x| x == 0xFF);
            assert_eq!(s1_erased, cut == 6, "cut {cut}");
        }
    }

    #[test]
    fn unlimited_never_cuts() {
        let mut f = PowerCutFlash::unlimited(Small::new());
        for i in 0..4u32 {
            f.erase(i * 256, i * 256 + 256).unwrap();
            f.write(i * 256, &[0; 256]).unwrap();
        }
        assert_eq!(f.bytes_written(), 1024);
        assert_eq!(f.steps(), 1024);
        assert!(!f.is_cut());
    }

    #[test]
    fn mutable_reference_is_a_flash_too() {
        fn takes_flash<F: NorFlash>(mut f: F) {
            f.write(0, &[0; 4]).ok().unwrap();
        }
        let mut flash = Small::new();
        takes_flash(&mut flash);
        assert_eq!(flash.as_bytes()[0], 0);
        let dbg = std::format!("{:?}", flash);
        assert!(dbg.contains("capacity: 1024"));
    }
}
