//! edgetune firmware for QEMU's mps2-an386 board (Cortex-M4F).
//!
//! Boots, checks the board's parts, runs the hook points in `hooks.rs` (model, test data, arena,
//! inference, fine-tuning), prints the image's footprint and exits QEMU with a status:
//! 0 when everything passed (see `status` for the others).
#![no_std]
#![no_main]

// One module per board; a new board is a new module with the same items.
#[cfg_attr(feature = "stm32f407", path = "board_stm32f407.rs")]
mod board;
mod footprint;
mod hooks;
mod systick;

/// Exit statuses, as a runner sees them (QEMU's exit status).
pub mod status {
    /// Every check passed.
    pub const OK: i32 = 0;
    /// A hook or a self-test reported an error.
    pub const FAILED: i32 = 1;
    /// HardFault.
    pub const HARD_FAULT: i32 = 2;
    /// MemManage fault; a stack overflow into the guard region ends here.
    pub const MEM_MANAGE: i32 = 3;
    /// BusFault.
    pub const BUS_FAULT: i32 = 4;
    /// UsageFault (undefined instruction, unaligned access, division by zero...).
    pub const USAGE_FAULT: i32 = 5;
    /// A Rust panic.
    pub const PANIC: i32 = 101;
}

use core::fmt::Write;
use core::panic::PanicInfo;

use edgetune_boards::{Board, MonotonicCounter, Parts};
use embedded_hal::delay::DelayNs;
use embedded_storage::nor_flash::{NorFlash, NorFlashError, ReadNorFlash};

#[cortex_m_rt::entry]
fn main() -> ! {
    let Some(board) = board::ThisBoard::take() else {
        board::exit(status::FAILED)
    };
    let mut parts = board.split();
    let code = match run(&mut parts) {
        Ok(()) => status::OK,
        Err(e) => {
            let _ = writeln!(parts.log, "FAILED: {e}");
            status::FAILED
        }
    };
    let _ = writeln!(parts.log, "{}", footprint::Footprint::measure());
    let _ = writeln!(parts.log, "exit status {code}");
    board::exit(code)
}

/// The firmware proper, generic over the board.
fn run<B: Board>(parts: &mut Parts<B>) -> Result<(), hooks::HookError> {
    let hz = parts.counter.frequency_hz();
    let _ = writeln!(
        parts.log,
        "edgetune firmware {} on {}, counter {} MHz, profile {} (opt-level {})",
        env!("CARGO_PKG_VERSION"),
        B::NAME,
        hz / 1_000_000,
        hooks::BUILD_PROFILE,
        hooks::OPT_LEVEL,
    );

    check_counter(parts)?;
    check_storage(parts)?;
    inject_fault(parts)?;

    // HOOK 1: model.
    let model = hooks::model()?;
    let model_bytes = hooks::model_bytes();
    match &model {
        None => {
            let _ = writeln!(
                parts.log,
                "model: placeholder ({} B at {:p}); set EDGETUNE_MODEL to embed a .etm",
                model_bytes.len(),
                model_bytes.as_ptr()
            );
        }
        Some(m) => {
            let _ = writeln!(
                parts.log,
                "model: {} ({} B at {:p}): {} tensors, {} ops, arena plan {} B",
                hooks::MODEL_PATH,
                model_bytes.len(),
                model_bytes.as_ptr(),
                m.tensor_count(),
                m.op_count(),
                m.arena_bytes()
            );
        }
    }

    // HOOK 2: test data.
    let data = hooks::test_data();
    match data {
        None => {
            let _ = writeln!(
                parts.log,
                "test data: placeholder; set EDGETUNE_TEST_DATA to embed some"
            );
        }
        Some(d) => {
            let _ = writeln!(
                parts.log,
                "test data: {} ({} B at {:p})",
                hooks::TEST_DATA_PATH,
                d.len(),
                d.as_ptr()
            );
        }
    }

    // HOOK 3: arena.
    let arena = hooks::take_arena().ok_or(hooks::HookError::Failed("arena already taken"))?;
    let _ = writeln!(
        parts.log,
        "arena: {} B at {:p}",
        arena.len(),
        arena.as_ptr()
    );

    let Some(model) = model else {
        let _ = writeln!(parts.log, "inference: skipped (no model embedded)");
        let _ = writeln!(parts.log, "fine-tune: skipped (no model embedded)");
        return Ok(());
    };
    hooks::check_arena(&model, arena)?;

    // HOOK 4: inference.
    let start = parts.counter.now();
    let outcome = hooks::run_inference(&model, arena, parts)?;
    report(parts, "inference", outcome, start);

    // HOOK 5: fine-tuning.
    let start = parts.counter.now();
    let outcome = hooks::fine_tune(&model, arena, parts)?;
    report(parts, "fine-tune", outcome, start);
    Ok(())
}

fn report<B: Board>(parts: &mut Parts<B>, what: &str, outcome: hooks::Outcome, start: u64) {
    let us = parts.counter.elapsed_micros(start);
    let _ = match outcome {
        hooks::Outcome::Done => writeln!(parts.log, "{what}: done in {us} us"),
        hooks::Outcome::Skipped(why) => writeln!(parts.log, "{what}: skipped ({why})"),
    };
}

/// The counter never goes backwards (watched for 800 ms, longer than one 24-bit SysTick period
/// at 25 MHz, so a wrap is crossed) and a delay lasts at least as long as asked.
fn check_counter<B: Board>(parts: &mut Parts<B>) -> Result<(), hooks::HookError> {
    let window = u64::from(parts.counter.frequency_hz()) * 8 / 10;
    let start = parts.counter.now();
    let (mut last, mut reads) = (start, 0u32);
    while last - start < window {
        let now = parts.counter.now();
        if now < last {
            let _ = writeln!(parts.log, "counter: went back from {last} to {now}");
            return Err(hooks::HookError::Failed("counter is not monotonic"));
        }
        last = now;
        reads += 1;
    }
    let start = parts.counter.now();
    parts.delay.delay_ms(10);
    let us = parts.counter.elapsed_micros(start);
    let _ = writeln!(
        parts.log,
        "counter: monotonic over {reads} reads; delay_ms(10) measured {us} us"
    );
    if us < 10_000 {
        return Err(hooks::HookError::Failed(
            "delay shorter than asked, or counter not running",
        ));
    }
    Ok(())
}

/// The adapter store keeps NOR rules on the target: write, read back, bits only clear, erase.
fn check_storage<B: Board>(parts: &mut Parts<B>) -> Result<(), hooks::HookError> {
    let err = |e: <B::Storage as embedded_storage::nor_flash::ErrorType>::Error| {
        hooks::HookError::Storage(e.kind())
    };
    let s = &mut parts.storage;
    let sector = <B::Storage as NorFlash>::ERASE_SIZE as u32;
    let last = s.capacity() as u32 - sector;
    let pattern: [u8; 16] = *b"edgetune-adapter";
    s.erase(last, last + sector).map_err(err)?;
    s.write(last, &pattern).map_err(err)?;
    s.write(last, &[0x0F; 16]).map_err(err)?; // NOR: AND, not overwrite
    let mut back = [0u8; 16];
    s.read(last, &mut back).map_err(err)?;
    let anded = pattern.map(|b| b & 0x0F);
    s.erase(last, last + sector).map_err(err)?;
    let mut erased = [0u8; 16];
    s.read(last, &mut erased).map_err(err)?;
    if back != anded || erased != [0xFF; 16] {
        return Err(hooks::HookError::Failed(
            "adapter store does not behave like NOR flash",
        ));
    }
    let _ = writeln!(
        parts.log,
        "adapter store: {} KiB, write {} B, erase {} B: NOR self-test ok",
        s.capacity() / 1024,
        <B::Storage as NorFlash>::WRITE_SIZE,
        sector
    );
    Ok(())
}

/// Fails on purpose when built with `EDGETUNE_FW_FAULT`, to show that the runner notices.
fn inject_fault<B: Board>(parts: &mut Parts<B>) -> Result<(), hooks::HookError> {
    if hooks::INJECT_FAULT.is_empty() {
        return Ok(());
    }
    let _ = writeln!(
        parts.log,
        "EDGETUNE_FW_FAULT={}: failing on purpose",
        hooks::INJECT_FAULT
    );
    match hooks::INJECT_FAULT {
        "fail" => return Err(hooks::HookError::Failed("injected failure")),
        "panic" => panic!("injected panic"),
        "stack-overflow" => {
            let _ = core::hint::black_box(recurse(core::hint::black_box(1)));
        }
        "usage-fault" => cortex_m::asm::udf(),
        "hang" => loop {
            cortex_m::asm::nop();
        },
        _ => {}
    }
    Ok(())
}

/// Recursion the optimiser cannot remove, 1 KiB of stack per level.
#[inline(never)]
#[allow(unconditional_recursion)]
fn recurse(n: u32) -> u32 {
    let mut frame = [0u8; 1024];
    frame[n as usize % 1024] = n as u8;
    let frame = core::hint::black_box(frame);
    u32::from(frame[0]) + recurse(n + 1)
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    let mut log = board::panic_log();
    let _ = writeln!(log, "\n!! panic: {info}");
    board::exit(status::PANIC)
}
