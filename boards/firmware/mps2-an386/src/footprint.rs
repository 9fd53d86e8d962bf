//! What the image costs: flash and static RAM from the linker's section symbols, and the stack
//! high-water mark from the paint cortex-m-rt's `paint-stack` feature lays down at reset.

use core::fmt;
use core::ops::Range;
use core::ptr::addr_of;

/// The value cortex-m-rt paints the stack with (`cortex_m_rt::STACK_PAINT_VALUE`).
const PAINT: u32 = 0xCCCC_CCCC;

extern "C" {
    // Section boundaries defined by cortex-m-rt's link.x and our memory.x.
    static __vector_table: u8;
    static __stext: u8;
    static __etext: u8;
    static __srodata: u8;
    static __erodata: u8;
    static __sdata: u8;
    static __edata: u8;
    static __sidata: u8;
    static __sbss: u8;
    static __ebss: u8;
    static __suninit: u8;
    static __euninit: u8;
    static __sadapter: u8;
    static __eadapter: u8;
    static __spsram: u8;
    static __epsram: u8;
    static _stack_start: u8;
    static _stack_end: u8;
}

macro_rules! sym {
    ($s:ident) => {
        addr_of!($s) as usize
    };
}

/// The stack's address range: `start` is its lowest address, `end` the initial stack pointer.
pub fn stack_bounds() -> Range<usize> {
    sym!(_stack_end)..sym!(_stack_start)
}

/// Deepest stack use since reset, in bytes: the span from the top of the stack down to the
/// lowest word that no longer holds the paint.
pub fn stack_high_water() -> usize {
    let stack = stack_bounds();
    let mut addr = stack.start;
    while addr < stack.end {
        // SAFETY: inside the stack region, word aligned (memory.x), below the live stack.
        if unsafe { (addr as *const u32).read_volatile() } != PAINT {
            break;
        }
        addr += 4;
    }
    stack.end - addr
}

/// Sizes of the image's parts, in bytes.
pub struct Footprint {
    /// Vector table (with the padding up to .text).
    pub vectors: usize,
    /// Code.
    pub text: usize,
    /// Constants, including the embedded model and test data.
    pub rodata: usize,
    /// Initialised statics (stored in flash, copied to RAM at reset).
    pub data_section: usize,
    /// Zeroed statics.
    pub bss: usize,
    /// Uninitialised statics (the arena, unless it is in PSRAM).
    pub uninit: usize,
    /// Adapter store (the board's NOR flash region).
    pub adapter_store: usize,
    /// PSRAM buffers.
    pub psram: usize,
    /// Stack region size.
    pub stack_size: usize,
    /// Deepest stack use so far.
    pub stack_used: usize,
    /// Embedded model bytes (in `.rodata`).
    pub model: usize,
    /// Embedded data bytes: test and training subsets, initial adapter (in `.rodata`).
    pub data: usize,
    /// Activation arena (in `.uninit` or PSRAM).
    pub arena: usize,
    /// Fine-tuning buffers: adapter values, workspace, one `.eta` file (in `.bss`).
    pub trainer: usize,
}

impl Footprint {
    /// Measures the running image.
    pub fn measure() -> Footprint {
        let stack = stack_bounds();
        Footprint {
            vectors: sym!(__stext) - sym!(__vector_table),
            text: sym!(__etext) - sym!(__stext),
            rodata: sym!(__erodata) - sym!(__srodata),
            data_section: sym!(__edata) - sym!(__sdata),
            bss: sym!(__ebss) - sym!(__sbss),
            uninit: sym!(__euninit) - sym!(__suninit),
            adapter_store: sym!(__eadapter) - sym!(__sadapter),
            psram: sym!(__epsram) - sym!(__spsram),
            stack_size: stack.end - stack.start,
            stack_used: stack_high_water(),
            model: crate::hooks::model_bytes().len(),
            data: crate::hooks::embedded_data_bytes(),
            arena: crate::hooks::ARENA_BYTES,
            trainer: crate::hooks::TRAIN_BUFFER_BYTES,
        }
    }

    /// Bytes of flash the image occupies: vectors, code, constants and `.data`'s initial values.
    pub fn flash(&self) -> usize {
        // .data's load image follows .rodata; alignment padding is counted via the LMA.
        sym!(__sidata) + self.data_section - sym!(__vector_table)
    }

    /// Bytes of RAM taken by statics.
    pub fn static_ram(&self) -> usize {
        self.data_section + self.bss + self.uninit
    }
}

impl fmt::Display for Footprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "footprint:")?;
        writeln!(
            f,
            "  flash        {:>9} B  (.vector_table {} + .text {} + .rodata {} + .data {})",
            self.flash(),
            self.vectors,
            self.text,
            self.rodata,
            self.data_section
        )?;
        writeln!(
            f,
            "  static RAM   {:>9} B  (.data {} + .bss {} + .uninit {})",
            self.static_ram(),
            self.data_section,
            self.bss,
            self.uninit
        )?;
        writeln!(
            f,
            "  of flash: model {} B, data {} B, runtime and firmware code {} B",
            self.model,
            self.data,
            self.flash() - self.model - self.data
        )?;
        writeln!(
            f,
            "  of RAM: arena {} B, fine-tuning buffers {} B; with the stack used: {} B",
            self.arena,
            self.trainer,
            self.static_ram() + self.stack_used
        )?;
        writeln!(
            f,
            "  stack used   {:>9} B  of {} B (high-water mark since reset)",
            self.stack_used, self.stack_size
        )?;
        writeln!(
            f,
            "  adapter store {:>8} B  (at {:#010x})",
            self.adapter_store,
            sym!(__sadapter)
        )?;
        write!(f, "  PSRAM        {:>9} B", self.psram)
    }
}
