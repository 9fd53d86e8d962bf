//! The STM32F407 (Cortex-M4F; e.g. the STM32F4DISCOVERY board) behind the [`Board`] trait:
//! build with `--features stm32f407` (`boards/run-qemu.sh --board stm32f407`), flash the ELF
//! with probe-rs (`probe-rs run --chip STM32F407VGTx <elf>`). QEMU does not model this chip, so
//! CI builds it and checks its memory map; it runs on hardware.
//!
//! | part    | implementation                                                                 |
//! |---------|--------------------------------------------------------------------------------|
//! | log     | USART2 TX on PA2 (AF7), 115200 8N1, from the 16 MHz HSI clock the chip resets to |
//! | delay   | busy wait on the counter                                                       |
//! | counter | SysTick on the 16 MHz core clock, extended to 64 bits by its interrupt         |
//! | storage | internal flash sectors 10 and 11 (2 × 128 KiB at 0x080C_0000): one A/B slot each |
//!
//! The stack is in the 64 KiB core-coupled RAM (0x1000_0000); below it is reserved address
//! space, where an access bus-faults on this chip, so an overflow stops at once.

use core::fmt;
use core::ptr::{read_volatile, write_volatile};

use cortex_m_rt::{exception, ExceptionFrame};
use edgetune_boards::{Board, Parts};
use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};

use crate::status;
pub use crate::systick::{SysTickCounter, SysTickDelay};

/// Core clock after reset (HSI, no PLL).
pub const CORE_CLOCK_HZ: u32 = 16_000_000;

/// The board this image is built for.
pub type ThisBoard = Stm32f407;

/// The board. Owns the core peripherals; there is at most one.
pub struct Stm32f407 {
    _private: (),
}

impl Stm32f407 {
    /// Takes the board: configures USART2 and SysTick. `None` if already taken.
    pub fn take() -> Option<Self> {
        let mut p = cortex_m::Peripherals::take()?;
        Usart2::init();
        crate::systick::start(&mut p.SYST);
        Some(Stm32f407 { _private: () })
    }
}

impl Board for Stm32f407 {
    const NAME: &'static str = "stm32f407";
    type Log = Usart2;
    type Delay = SysTickDelay;
    type Counter = SysTickCounter;
    type Storage = InternalFlash;

    fn split(self) -> Parts<Self> {
        Parts {
            log: Usart2 { _private: () },
            delay: SysTickDelay::new(CORE_CLOCK_HZ),
            counter: SysTickCounter::new(CORE_CLOCK_HZ),
            storage: InternalFlash { _private: () },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// USART2

const RCC_AHB1ENR: *mut u32 = 0x4002_3830 as *mut u32;
const RCC_APB1ENR: *mut u32 = 0x4002_3840 as *mut u32;
const GPIOA_MODER: *mut u32 = 0x4002_0000 as *mut u32;
const GPIOA_AFRL: *mut u32 = 0x4002_0020 as *mut u32;
const USART2_SR: *mut u32 = 0x4000_4400 as *mut u32;
const USART2_DR: *mut u32 = 0x4000_4404 as *mut u32;
const USART2_BRR: *mut u32 = 0x4000_4408 as *mut u32;
const USART2_CR1: *mut u32 = 0x4000_440C as *mut u32;

/// USART2, transmit only. A [`fmt::Write`] log sink.
pub struct Usart2 {
    _private: (),
}

impl Usart2 {
    fn init() {
        // SAFETY: RCC, GPIOA and USART2 registers of the STM32F407 reference manual (RM0090);
        // nothing else configures them.
        unsafe {
            write_volatile(RCC_AHB1ENR, read_volatile(RCC_AHB1ENR) | 1); // GPIOAEN
            write_volatile(RCC_APB1ENR, read_volatile(RCC_APB1ENR) | 1 << 17); // USART2EN
            write_volatile(
                GPIOA_MODER,
                (read_volatile(GPIOA_MODER) & !(0b11 << 4)) | 0b10 << 4,
            ); // PA2: AF
            write_volatile(
                GPIOA_AFRL,
                (read_volatile(GPIOA_AFRL) & !(0xF << 8)) | 7 << 8,
            ); // AF7
            write_volatile(USART2_BRR, CORE_CLOCK_HZ.div_ceil(115_200));
            write_volatile(USART2_CR1, 1 << 13 | 1 << 3); // UE, TE
        }
    }

    /// Sends one byte, waiting for the transmit register to empty.
    pub fn write_byte(&mut self, byte: u8) {
        // SAFETY: as in `init`.
        unsafe {
            while read_volatile(USART2_SR) & 1 << 7 == 0 {} // TXE
            write_volatile(USART2_DR, u32::from(byte));
        }
    }
}

impl fmt::Write for Usart2 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(|b| self.write_byte(b));
        Ok(())
    }
}

/// The log for panic and fault handlers (a second handle on USART2).
pub fn panic_log() -> Usart2 {
    Usart2 { _private: () }
}

// ---------------------------------------------------------------------------------------------
// Internal flash as the adapter store

/// Start of the adapter store: sector 10; must match ADAPTER in memory-stm32f407.x.
const STORE_BASE: u32 = 0x080C_0000;
/// Sectors 10 and 11.
const STORE_BYTES: u32 = 2 * SECTOR_BYTES;
const SECTOR_BYTES: u32 = 128 * 1024;
const FIRST_SECTOR: u32 = 10;

const FLASH_KEYR: *mut u32 = 0x4002_3C04 as *mut u32;
const FLASH_SR: *mut u32 = 0x4002_3C0C as *mut u32;
const FLASH_CR: *mut u32 = 0x4002_3C10 as *mut u32;
const SR_BSY: u32 = 1 << 16;
const SR_ERRORS: u32 = 0xF0; // WRPERR, PGAERR, PGPERR, PGSERR
const CR_PG: u32 = 1 << 0;
const CR_SER: u32 = 1 << 1;
const CR_PSIZE_X32: u32 = 0b10 << 8;
const CR_STRT: u32 = 1 << 16;
const CR_LOCK: u32 = 1 << 31;

/// Sectors 10–11 of the on-chip flash, through its controller (RM0090 §3): 32-bit programming,
/// 128 KiB sector erase.
pub struct InternalFlash {
    _private: (),
}

/// A flash controller error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashError {
    /// Outside the store, or not on a write/erase boundary.
    Bounds(NorFlashErrorKind),
    /// The controller reported an error (`FLASH_SR` error bits).
    Controller(u32),
}

impl NorFlashError for FlashError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            FlashError::Bounds(k) => *k,
            FlashError::Controller(_) => NorFlashErrorKind::Other,
        }
    }
}

impl ErrorType for InternalFlash {
    type Error = FlashError;
}

/// Runs `op` with the controller unlocked, waits for it, locks again and reports errors.
fn with_unlocked(op: impl FnOnce()) -> Result<(), FlashError> {
    // SAFETY: the flash controller's registers (RM0090 §3.9); only this driver uses them.
    unsafe {
        while read_volatile(FLASH_SR) & SR_BSY != 0 {}
        write_volatile(FLASH_SR, SR_ERRORS); // clear stale errors
        if read_volatile(FLASH_CR) & CR_LOCK != 0 {
            write_volatile(FLASH_KEYR, 0x4567_0123);
            write_volatile(FLASH_KEYR, 0xCDEF_89AB);
        }
        op();
        while read_volatile(FLASH_SR) & SR_BSY != 0 {}
        write_volatile(FLASH_CR, CR_LOCK);
        let errors = read_volatile(FLASH_SR) & SR_ERRORS;
        if errors != 0 {
            write_volatile(FLASH_SR, errors);
            return Err(FlashError::Controller(errors));
        }
    }
    Ok(())
}

fn check(offset: u32, len: usize, align: u32) -> Result<(), FlashError> {
    if offset % align != 0 || len as u32 % align != 0 {
        return Err(FlashError::Bounds(NorFlashErrorKind::NotAligned));
    }
    if offset as u64 + len as u64 > STORE_BYTES as u64 {
        return Err(FlashError::Bounds(NorFlashErrorKind::OutOfBounds));
    }
    Ok(())
}

impl ReadNorFlash for InternalFlash {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        check(offset, bytes.len(), 1)?;
        for (i, b) in bytes.iter_mut().enumerate() {
            // SAFETY: inside the store (checked), memory-mapped flash.
            *b = unsafe { read_volatile((STORE_BASE + offset + i as u32) as *const u8) };
        }
        Ok(())
    }

    fn capacity(&self) -> usize {
        STORE_BYTES as usize
    }
}

impl NorFlash for InternalFlash {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = SECTOR_BYTES as usize;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        check(from, to.saturating_sub(from) as usize, SECTOR_BYTES)?;
        for sector in from / SECTOR_BYTES..to / SECTOR_BYTES {
            let snb = (FIRST_SECTOR + sector) << 3;
            // SAFETY: sector erase of a store sector (RM0090 §3.6.3).
            with_unlocked(|| unsafe {
                write_volatile(FLASH_CR, CR_PSIZE_X32 | CR_SER | snb);
                write_volatile(FLASH_CR, CR_PSIZE_X32 | CR_SER | snb | CR_STRT);
            })?;
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        check(offset, bytes.len(), 4)?;
        for (i, w) in bytes.chunks_exact(4).enumerate() {
            let addr = (STORE_BASE + offset + 4 * i as u32) as *mut u32;
            let word = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            // SAFETY: programming one word inside the store (checked), PG set (RM0090 §3.6.4).
            with_unlocked(|| unsafe {
                write_volatile(FLASH_CR, CR_PSIZE_X32 | CR_PG);
                write_volatile(addr, word);
            })?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Exit and faults

/// Ends the program: stops at a breakpoint when a debugger (probe-rs) is attached, which then
/// reports the halt; otherwise sleeps. The status is the last line the log printed.
pub fn exit(code: i32) -> ! {
    const DHCSR: *const u32 = 0xE000_EDF0 as *const u32;
    let _ = code;
    // SAFETY: DHCSR is readable at any time; C_DEBUGEN (bit 0) says a debugger is attached.
    if unsafe { read_volatile(DHCSR) } & 1 != 0 {
        cortex_m::asm::bkpt();
    }
    loop {
        cortex_m::asm::wfi();
    }
}

#[exception]
unsafe fn HardFault(frame: &ExceptionFrame) -> ! {
    use core::fmt::Write;
    let _ = writeln!(
        panic_log(),
        "\n!! HardFault at PC={:#010x}\n!! exit status {}",
        frame.pc(),
        status::HARD_FAULT
    );
    exit(status::HARD_FAULT)
}
