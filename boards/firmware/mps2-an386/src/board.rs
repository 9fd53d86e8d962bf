//! The mps2-an386 board (Arm MPS2 with the AN386 FPGA image: Cortex-M4F at 25 MHz), as QEMU
//! models it, behind the [`Board`] trait.
//!
//! | part    | implementation                                                               |
//! |---------|------------------------------------------------------------------------------|
//! | log     | CMSDK APB UART0 at 0x4000_4000 (QEMU's serial0; run-qemu.sh sends it to stdout) |
//! | delay   | busy wait on the counter                                                     |
//! | counter | SysTick on the 25 MHz core clock, 24-bit, extended to 64 bits by its interrupt |
//! | storage | 64 KiB [`RamNorFlash`] at the top of SSRAM1 (NOR rules, erased at boot)       |
//!
//! QEMU emulates SysTick (counting in virtual time: host time by default, or instructions with
//! `-icount`) but not the DWT cycle counter, so cycle counts here are core-clock ticks.
//!
//! Boot also sets up what makes failures visible to a runner: a 1 MiB no-access MPU region under
//! the stack (overflow faults at once), enabled MemManage/BusFault/UsageFault, and fault handlers
//! that print the fault and exit QEMU with a non-zero status (see [`exit`]).

use core::fmt;
use core::mem::MaybeUninit;
use core::ptr::addr_of_mut;

use cortex_m::peripheral::scb::Exception;
use cortex_m::peripheral::{MPU, SCB};
use edgetune_boards::{Board, Parts, RamNorFlash};

use crate::status;
pub use crate::systick::{SysTickCounter, SysTickDelay};

/// Core clock (QEMU's SYSCLK for the MPS2 machines).
pub const CORE_CLOCK_HZ: u32 = 25_000_000;

/// Size of the adapter store; must match the ADAPTER region in memory-mps2-an386.x.
pub const ADAPTER_STORE_BYTES: usize = 64 * 1024;

/// The adapter store: NOR-like, programmed in 4-byte words, erased in 4 KiB sectors.
pub type AdapterStore = RamNorFlash<ADAPTER_STORE_BYTES, 4, 4096>;

#[link_section = ".adapter_store"]
static mut ADAPTER_STORE: MaybeUninit<AdapterStore> = MaybeUninit::uninit();

/// The board this image is built for.
pub type ThisBoard = Mps2An386;

/// The board. Owns the core peripherals; there is at most one.
pub struct Mps2An386 {
    _private: (),
}

impl Mps2An386 {
    /// Takes the board: configures UART0, SysTick, the stack guard and fault handling.
    /// Returns `None` if it (or the core peripherals) was already taken.
    pub fn take() -> Option<Self> {
        let mut p = cortex_m::Peripherals::take()?;
        Uart0::init();
        p.SCB.enable(Exception::MemoryManagement);
        p.SCB.enable(Exception::BusFault);
        p.SCB.enable(Exception::UsageFault);
        install_stack_guard(&mut p.MPU);
        crate::systick::start(&mut p.SYST);
        Some(Mps2An386 { _private: () })
    }
}

impl Board for Mps2An386 {
    const NAME: &'static str = "mps2-an386";
    type Log = Uart0;
    type Delay = SysTickDelay;
    type Counter = SysTickCounter;
    type Storage = &'static mut AdapterStore;

    fn split(self) -> Parts<Self> {
        // SAFETY: `self` exists at most once (`take`) and `split` consumes it, so this is the
        // only reference ever made to ADAPTER_STORE.
        let storage = unsafe { RamNorFlash::init_erased(&mut *addr_of_mut!(ADAPTER_STORE)) };
        Parts {
            log: Uart0 { _private: () },
            delay: SysTickDelay::new(CORE_CLOCK_HZ),
            counter: SysTickCounter::new(CORE_CLOCK_HZ),
            storage,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// UART0

const UART0_BASE: usize = 0x4000_4000;
const UART_DATA: usize = 0x00;
const UART_STATE: usize = 0x04;
const UART_CTRL: usize = 0x08;
const UART_BAUDDIV: usize = 0x10;
const UART_STATE_TXFULL: u32 = 1 << 0;
const UART_CTRL_TX_EN: u32 = 1 << 0;

fn uart_reg(offset: usize) -> *mut u32 {
    (UART0_BASE + offset) as *mut u32
}

/// CMSDK APB UART0, transmit only, 115200 8N1. A [`fmt::Write`] log sink.
pub struct Uart0 {
    _private: (),
}

impl Uart0 {
    fn init() {
        // SAFETY: UART0's registers are valid MMIO on this board; nothing else drives UART0.
        unsafe {
            uart_reg(UART_BAUDDIV).write_volatile(CORE_CLOCK_HZ / 115_200);
            uart_reg(UART_CTRL).write_volatile(UART_CTRL_TX_EN);
        }
    }

    /// A second handle on UART0, for fault and panic handlers that cannot reach the board's.
    /// Output of the two may interleave.
    pub fn steal() -> Uart0 {
        Uart0 { _private: () }
    }

    /// Sends one byte, waiting while the transmit buffer is full.
    pub fn write_byte(&mut self, byte: u8) {
        // SAFETY: as in `init`.
        unsafe {
            while uart_reg(UART_STATE).read_volatile() & UART_STATE_TXFULL != 0 {}
            uart_reg(UART_DATA).write_volatile(u32::from(byte));
        }
    }
}

impl fmt::Write for Uart0 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(|b| self.write_byte(b));
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Stack guard

/// Size of the no-access MPU region right below the stack (log2 of bytes: 1 MiB).
const GUARD_SIZE_LOG2: u32 = 20;

/// Makes the 1 MiB below the stack (reserved address space, where QEMU ignores writes) a
/// no-access MPU region: a stack overflow, even by a frame of almost 1 MiB, then faults at once.
fn install_stack_guard(mpu: &mut MPU) {
    const RASR_ENABLE: u32 = 1;
    const RASR_SIZE: u32 = (GUARD_SIZE_LOG2 - 1) << 1; // region size = 2^(SIZE+1) bytes
    const RASR_AP_NONE: u32 = 0b000 << 24;
    const RASR_XN: u32 = 1 << 28;
    const CTRL_ENABLE: u32 = 1 << 0;
    const CTRL_PRIVDEFENA: u32 = 1 << 2; // everything else keeps the default memory map
    let stack_end = crate::footprint::stack_bounds().start as u32;
    let base = stack_end - (1 << GUARD_SIZE_LOG2);
    assert!(
        base % (1 << GUARD_SIZE_LOG2) == 0,
        "stack must start on a 1 MiB boundary"
    );
    // SAFETY: region 0 is not used by anything else and covers only reserved address space.
    unsafe {
        mpu.rnr.write(0);
        mpu.rbar.write(base);
        mpu.rasr
            .write(RASR_XN | RASR_AP_NONE | RASR_SIZE | RASR_ENABLE);
        mpu.ctrl.write(CTRL_ENABLE | CTRL_PRIVDEFENA);
    }
    cortex_m::asm::dsb();
    cortex_m::asm::isb();
}

// ---------------------------------------------------------------------------------------------
// Exit and fault handling

/// Ends the program: semihosting SYS_EXIT_EXTENDED, so QEMU exits with `code` as its status.
///
/// Needs a semihosting host (QEMU with `-semihosting-config enable=on`, or a debugger); without
/// one the BKPT instruction faults.
pub fn exit(code: i32) -> ! {
    const SYS_EXIT_EXTENDED: usize = 0x20;
    const ADP_STOPPED_APPLICATION_EXIT: usize = 0x20026;
    let block = [ADP_STOPPED_APPLICATION_EXIT, code as usize];
    // SAFETY: a semihosting call with a valid parameter block.
    unsafe {
        cortex_m_semihosting::syscall(SYS_EXIT_EXTENDED, &block);
    }
    // A host without SYS_EXIT_EXTENDED: fall back to plain success/failure.
    cortex_m_semihosting::debug::exit(if code == 0 {
        cortex_m_semihosting::debug::EXIT_SUCCESS
    } else {
        cortex_m_semihosting::debug::EXIT_FAILURE
    });
    loop {
        cortex_m::asm::wfi();
    }
}

// The fault vectors call `edgetune_fault` with the fault kind and the stack pointer at the time
// of the fault (where the exception frame is). If that stack pointer is below the stack (an
// overflow into the guard region), MSP is first moved back to the top of the stack so the report
// can run; otherwise the report runs below the exception frame, leaving it intact.
core::arch::global_asm!(
    ".section .text.edgetune_fault_entry,\"ax\",%progbits",
    ".global HardFault",
    ".type HardFault,%function",
    ".thumb_func",
    "HardFault:",
    "    movs r2, #2",
    "    b edgetune_fault_entry",
    ".global MemoryManagement",
    ".type MemoryManagement,%function",
    ".thumb_func",
    "MemoryManagement:",
    "    movs r2, #3",
    "    b edgetune_fault_entry",
    ".global BusFault",
    ".type BusFault,%function",
    ".thumb_func",
    "BusFault:",
    "    movs r2, #4",
    "    b edgetune_fault_entry",
    ".global UsageFault",
    ".type UsageFault,%function",
    ".thumb_func",
    "UsageFault:",
    "    movs r2, #5",
    "    b edgetune_fault_entry",
    ".thumb_func",
    "edgetune_fault_entry:",
    "    tst lr, #4",
    "    ite eq",
    "    mrseq r1, msp",
    "    mrsne r1, psp",
    "    ldr r0, =_stack_end",
    "    cmp r1, r0",
    "    bhs 1f",
    "    ldr r0, =_stack_start",
    "    msr msp, r0",
    "1:  mov r0, r2",
    "    b edgetune_fault",
    ".ltorg",
);

#[no_mangle]
extern "C" fn edgetune_fault(code: u32, frame_sp: u32) -> ! {
    use core::fmt::Write;
    // SAFETY: reads of the System Control Block's fault status registers.
    let (cfsr, hfsr, mmfar, bfar) = unsafe {
        let scb = &*SCB::PTR;
        (
            scb.cfsr.read(),
            scb.hfsr.read(),
            scb.mmfar.read(),
            scb.bfar.read(),
        )
    };
    let name = match code as i32 {
        status::HARD_FAULT => "HardFault",
        status::MEM_MANAGE => "MemManage fault",
        status::BUS_FAULT => "BusFault",
        status::USAGE_FAULT => "UsageFault",
        _ => "fault",
    };
    let mut log = Uart0::steal();
    let _ = write!(
        log,
        "\n!! {name}: CFSR={cfsr:#010x} HFSR={hfsr:#010x} MMFAR={mmfar:#010x} BFAR={bfar:#010x} SP={frame_sp:#010x}"
    );
    let stack = crate::footprint::stack_bounds();
    if frame_sp < stack.start as u32 {
        let _ = write!(
            log,
            "\n!! stack overflow: SP below the stack's lowest address {:#010x}",
            stack.start
        );
    } else if (frame_sp as usize) + 32 <= stack.end {
        // SAFETY: the exception frame lies within the stack (checked above).
        let pc = unsafe { ((frame_sp + 24) as *const u32).read_volatile() };
        let lr = unsafe { ((frame_sp + 20) as *const u32).read_volatile() };
        let _ = write!(log, "\n!! PC={pc:#010x} LR={lr:#010x}");
    }
    let _ = writeln!(log, "\n!! exit status {code}");
    exit(code as i32)
}

/// The log for panic and fault handlers.
pub fn panic_log() -> Uart0 {
    Uart0::steal()
}
