//! Power-safe adapter persistence: two slots, and the newest valid copy wins.
//!
//! A fine-tuned adapter is an opaque blob (the `.eta` bytes) that must survive a power cut in the
//! middle of a save: after any cut, a reboot reads either the adapter saved before or the new
//! one, never garbage, and never loses both. The store keeps two slots, each with a header
//! (magic, format version, generation counter, payload length, payload CRC32, header CRC32). A
//! save goes to the slot that does *not* hold the newest valid copy, writes the payload first and
//! the header last, with a generation one above the newest. Until the header's last byte lands,
//! the slot being written is invalid and the other one is untouched; once it lands, the new copy
//! is the newest. There is no separate "active slot" flag to flip: the generation is the flip.
//!
//! - [`FlashStore`] works on any [`NorFlash`] (no heap, no `std`), e.g. a board's internal flash.
//! - `FileStore` (with the `std` feature) keeps the two slots as a file pair on a host or a
//!   Linux board, replaced with write + fsync + rename.
//!
//! # On-flash layout
//!
//! The store occupies `2 * slot_size` bytes from `base`; slot `i` starts at
//! `base + i * slot_size`. `base` and `slot_size` are whole erase sectors. Inside a slot:
//!
//! | offset | size | contents |
//! |---|---|---|
//! | `0` | [`Header::LEN`] (24) | the [`Header`] (table there), little-endian |
//! | `24` | up to `H - 24` | `0xFF` padding up to `H` |
//! | `H` | `len` | payload |
//! | `H + len` | up to the next write unit | `0xFF` padding |
//!
//! `H` = [`FlashStore::HEADER_AREA`] is 24 rounded up to the flash's write (and read) unit, so the
//! header has write units of its own and is programmed in a separate, final write, after the
//! payload. No write unit is ever programmed twice between erases (safe on flash with ECC).
//!
//! # Example
//!
//! ```
//! # use embedded_storage::nor_flash::{ErrorType, NorFlash, NorFlashErrorKind, ReadNorFlash};
//! # /// 16 KiB of RAM with 4 KiB sectors and 4-byte write units.
//! # struct Ram([u8; 16384]);
//! # impl ErrorType for Ram { type Error = NorFlashErrorKind; }
//! # impl ReadNorFlash for Ram {
//! #     const READ_SIZE: usize = 1;
//! #     fn read(&mut self, off: u32, b: &mut [u8]) -> Result<(), Self::Error> {
//! #         b.copy_from_slice(&self.0[off as usize..off as usize + b.len()]); Ok(())
//! #     }
//! #     fn capacity(&self) -> usize { self.0.len() }
//! # }
//! # impl NorFlash for Ram {
//! #     const WRITE_SIZE: usize = 4;
//! #     const ERASE_SIZE: usize = 4096;
//! #     fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
//! #         self.0[from as usize..to as usize].fill(0xFF); Ok(())
//! #     }
//! #     fn write(&mut self, off: u32, b: &[u8]) -> Result<(), Self::Error> {
//! #         for (c, n) in self.0[off as usize..].iter_mut().zip(b) { *c &= n } Ok(())
//! #     }
//! # }
//! use edgetune_runtime::store::{FlashStore, StoreError};
//!
//! # fn main() -> Result<(), StoreError> {
//! // Two slots of 8 KiB (two sectors each) at the start of the flash.
//! let mut store = FlashStore::new(Ram([0xFF; 16384]), 0, 8192)?;
//! let mut buf = [0u8; 1024];
//! assert_eq!(store.load(&mut buf)?, None); // first boot
//!
//! store.save(b"adapter v1")?;
//! store.save(b"adapter v2")?;
//! let loaded = store.load(&mut buf)?.expect("saved above");
//! assert_eq!(&buf[..loaded.len], b"adapter v2");
//! assert_eq!(loaded.generation, 2);
//! # Ok(())
//! # }
//! ```

use core::fmt;

use embedded_storage::nor_flash::{NorFlash, NorFlashError, NorFlashErrorKind};

/// First four bytes of a slot header: `ETAS` ("edgetune adapter store").
pub const MAGIC: [u8; 4] = *b"ETAS";

/// Version of the slot layout; a header with another version is not valid.
pub const FORMAT_VERSION: u16 = 1;

/// Largest flash write/read unit [`FlashStore`] supports, in bytes; also the size of the stack
/// buffer it works through.
pub const MAX_UNIT: usize = 256;

/// Why a save or load failed.
///
/// A failed save leaves the copy that was newest before it readable; see the [module
/// documentation](self).
///
/// ```
/// use edgetune_runtime::store::StoreError;
/// let e = StoreError::PayloadTooLarge { len: 9000, capacity: 8160 };
/// assert_eq!(e.to_string(), "adapter of 9000 bytes does not fit a slot of 8160 bytes");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// The adapter is larger than a slot holds. Nothing was written.
    PayloadTooLarge {
        /// Bytes given.
        len: usize,
        /// Bytes a slot holds.
        capacity: usize,
    },
    /// The newest valid adapter is larger than the caller's buffer (a buffer of the store's
    /// capacity always suffices). Nothing was changed.
    BufferTooSmall {
        /// Bytes of the stored adapter.
        needed: usize,
        /// Bytes of the buffer.
        available: usize,
    },
    /// The region does not fit the flash or its geometry (see [`FlashStore::new`]).
    InvalidGeometry {
        /// What is wrong.
        reason: &'static str,
    },
    /// The flash reported an error (a power loss shows as [`NorFlashErrorKind::Other`]).
    Flash(NorFlashErrorKind),
    /// The slot just written did not read back as the adapter saved (a worn or failing flash).
    /// The previous copy is still in the other slot.
    VerifyFailed,
    /// A file operation of `FileStore` failed.
    #[cfg(feature = "std")]
    Io(std::io::ErrorKind),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            StoreError::PayloadTooLarge { len, capacity } => write!(
                f,
                "adapter of {len} bytes does not fit a slot of {capacity} bytes"
            ),
            StoreError::BufferTooSmall { needed, available } => write!(
                f,
                "stored adapter has {needed} bytes, the buffer only {available}"
            ),
            StoreError::InvalidGeometry { reason } => {
                write!(f, "invalid adapter store geometry: {reason}")
            }
            StoreError::Flash(kind) => write!(f, "flash error: {kind}"),
            StoreError::VerifyFailed => {
                write!(f, "the adapter just written did not read back intact")
            }
            #[cfg(feature = "std")]
            StoreError::Io(kind) => write!(f, "adapter file I/O error: {kind}"),
        }
    }
}

impl core::error::Error for StoreError {}

/// The header at the start of a slot: which save this is, and how to check its payload.
///
/// Encoded as [`Header::LEN`] little-endian bytes:
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | [`MAGIC`] `ETAS` |
/// | 4 | 2 | [`FORMAT_VERSION`] |
/// | 6 | 2 | reserved, `0` |
/// | 8 | 4 | `generation` |
/// | 12 | 4 | `len` (payload bytes) |
/// | 16 | 4 | `payload_crc` (CRC-32/ISO-HDLC, as `crc32fast`) |
/// | 20 | 4 | CRC-32 of bytes `0..20` |
///
/// Public so that host tools can build a store image offline.
///
/// ```
/// use edgetune_runtime::store::Header;
/// let h = Header::for_payload(7, b"abc");
/// let bytes = h.encode();
/// assert_eq!(&bytes[..4], b"ETAS");
/// assert_eq!(Header::decode(&bytes), Some(h));
/// let mut torn = bytes;
/// torn[23] = 0xFF; // last byte never landed
/// assert_eq!(Header::decode(&torn), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Save counter: one above the newest valid copy at the time of the save (wrapping; compared
    /// with [`is_newer`]).
    pub generation: u32,
    /// Payload length in bytes.
    pub len: u32,
    /// CRC-32 of the payload.
    pub payload_crc: u32,
}

impl Header {
    /// Encoded size in bytes.
    pub const LEN: usize = 24;

    /// The header for `payload` saved as `generation`.
    ///
    /// `payload` must be shorter than 4 GiB (the length is stored as a `u32`; longer payloads
    /// are refused by the stores before a header is built).
    ///
    /// ```
    /// use edgetune_runtime::store::Header;
    /// let h = Header::for_payload(1, b"");
    /// assert_eq!((h.len, h.payload_crc), (0, 0));
    /// ```
    pub fn for_payload(generation: u32, payload: &[u8]) -> Header {
        Header {
            generation,
            len: payload.len() as u32,
            payload_crc: crc32fast::hash(payload),
        }
    }

    /// The encoded header, header CRC included.
    ///
    /// ```
    /// use edgetune_runtime::store::Header;
    /// let bytes = Header::for_payload(0x0102_0304, b"x").encode();
    /// assert_eq!(&bytes[8..12], &[4, 3, 2, 1]);
    /// ```
    pub fn encode(&self) -> [u8; Header::LEN] {
        let mut out = [0u8; Header::LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&0u16.to_le_bytes());
        out[8..12].copy_from_slice(&self.generation.to_le_bytes());
        out[12..16].copy_from_slice(&self.len.to_le_bytes());
        out[16..20].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32fast::hash(&out[..20]);
        out[20..24].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses the first [`Header::LEN`] bytes of `bytes`: `None` unless magic, version, reserved
    /// field and header CRC all check out (an erased, torn or foreign header). The payload is
    /// not checked here.
    ///
    /// ```
    /// use edgetune_runtime::store::Header;
    /// assert_eq!(Header::decode(&[0xFF; 24]), None); // erased
    /// assert_eq!(Header::decode(&[0; 10]), None); // too short
    /// ```
    pub fn decode(bytes: &[u8]) -> Option<Header> {
        let b = bytes.get(..Header::LEN)?;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if b[0..4] != MAGIC
            || u16::from_le_bytes([b[4], b[5]]) != FORMAT_VERSION
            || u16::from_le_bytes([b[6], b[7]]) != 0
            || crc32fast::hash(&b[..20]) != u32_at(20)
        {
            return None;
        }
        Some(Header {
            generation: u32_at(8),
            len: u32_at(12),
            payload_crc: u32_at(16),
        })
    }
}

/// Whether generation `a` is newer than `b`, in serial-number arithmetic (RFC 1982 style): `a`
/// is newer if it is ahead of `b` by less than half the `u32` range, so counting survives the
/// wrap from `u32::MAX` to `0`. Equal generations, and the single ambiguous distance of exactly
/// 2^31, are newer in neither direction.
///
/// ```
/// use edgetune_runtime::store::is_newer;
/// assert!(is_newer(2, 1));
/// assert!(is_newer(0, u32::MAX)); // wrapped
/// assert!(!is_newer(u32::MAX, 0));
/// assert!(!is_newer(5, 5));
/// ```
pub fn is_newer(a: u32, b: u32) -> bool {
    let d = a.wrapping_sub(b);
    d != 0 && d < 0x8000_0000
}

/// What [`FlashStore::load`] (or `FileStore::load`) found.
///
/// ```
/// use edgetune_runtime::store::Loaded;
/// let l = Loaded { generation: 3, len: 10, slot: 0 };
/// assert_eq!(l.len, 10);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// Generation of the copy loaded.
    pub generation: u32,
    /// Payload bytes, now at the start of the caller's buffer.
    pub len: usize,
    /// Slot it came from (0 or 1).
    pub slot: usize,
}

/// What a save wrote.
///
/// ```
/// use edgetune_runtime::store::Saved;
/// let s = Saved { generation: 4, slot: 1 };
/// assert_eq!(s.slot, 1);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    /// Generation given to the new copy.
    pub generation: u32,
    /// Slot written (0 or 1).
    pub slot: usize,
}

const fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

const fn round_up(n: usize, unit: usize) -> usize {
    n.div_ceil(unit) * unit
}

fn flash_err<E: NorFlashError>(e: E) -> StoreError {
    StoreError::Flash(e.kind())
}

/// An adapter store of two slots in a [`NorFlash`] region: power-safe saves, newest-valid loads.
///
/// Layout and guarantees: see the [module documentation](self). Works through a
/// [`MAX_UNIT`]-byte stack buffer; no heap.
///
/// # Example
///
/// Firmware written against the board's flash:
///
/// ```
/// use edgetune_runtime::store::{FlashStore, StoreError};
/// use embedded_storage::nor_flash::NorFlash;
///
/// /// Restores the last adapter (if any), then saves an improved one.
/// fn boot_and_save<F: NorFlash>(flash: F, adapter: &mut [u8]) -> Result<u32, StoreError> {
///     // The last 16 KiB of a 1 MiB flash, two 8 KiB slots.
///     let mut store = FlashStore::new(flash, 0x000F_C000, 0x2000)?;
///     let len = match store.load(adapter)? {
///         Some(loaded) => loaded.len,
///         None => 0, // first boot: start from the model's defaults
///     };
///     // ... fine-tune the adapter in RAM ...
///     Ok(store.save(&adapter[..len])?.generation)
/// }
/// ```
pub struct FlashStore<F: NorFlash> {
    flash: F,
    base: u32,
    slot_size: u32,
}

impl<F: NorFlash> FlashStore<F> {
    /// Bytes a write and a read both align to: the least common multiple of the flash's
    /// `WRITE_SIZE` and `READ_SIZE`.
    pub const UNIT: usize = {
        let (w, r) = (F::WRITE_SIZE, F::READ_SIZE);
        if w == 0 || r == 0 {
            0 // refused by `new`
        } else {
            w / gcd(w, r) * r
        }
    };

    /// Bytes reserved for the header at the start of each slot: [`Header::LEN`] rounded up to
    /// [`UNIT`](Self::UNIT). The payload starts here.
    pub const HEADER_AREA: usize = if Self::UNIT == 0 {
        Header::LEN
    } else {
        round_up(Header::LEN, Self::UNIT)
    };

    /// A store over `flash[base .. base + 2 * slot_size]`.
    ///
    /// Nothing is read or written yet. Fails with [`StoreError::InvalidGeometry`] unless `base`
    /// and `slot_size` are multiples of the erase sector and of [`UNIT`](Self::UNIT), both slots
    /// fit the flash, a slot holds at least the header, and the flash's write and read units are
    /// at most [`MAX_UNIT`].
    ///
    /// ```
    /// use edgetune_runtime::store::{FlashStore, StoreError};
    /// use embedded_storage::nor_flash::NorFlash;
    ///
    /// fn open<F: NorFlash>(flash: F) -> Result<FlashStore<F>, StoreError> {
    ///     FlashStore::new(flash, 0, 2 * F::ERASE_SIZE as u32)
    /// }
    /// ```
    pub fn new(flash: F, base: u32, slot_size: u32) -> Result<Self, StoreError> {
        let bad = |reason| Err(StoreError::InvalidGeometry { reason });
        let erase = F::ERASE_SIZE as u64;
        let unit = Self::UNIT as u64;
        if F::WRITE_SIZE == 0 || F::READ_SIZE == 0 || erase == 0 {
            return bad("flash reports a zero write, read or erase size");
        }
        if Self::UNIT > MAX_UNIT {
            return bad("flash write/read unit larger than MAX_UNIT");
        }
        if slot_size == 0 {
            return bad("slot size is zero");
        }
        let (b, s) = (base as u64, slot_size as u64);
        if b % erase != 0 || s % erase != 0 {
            return bad("base and slot size must be whole erase sectors");
        }
        if b % unit != 0 || s % unit != 0 {
            return bad("base and slot size must be multiples of the write and read units");
        }
        if b + 2 * s > flash.capacity() as u64 {
            return bad("two slots from base do not fit the flash");
        }
        if b + 2 * s > u32::MAX as u64 {
            return bad("the region must end below 4 GiB (offsets are u32)");
        }
        if s < Self::HEADER_AREA as u64 {
            return bad("slot smaller than its header");
        }
        Ok(FlashStore {
            flash,
            base,
            slot_size,
        })
    }

    /// Largest payload a slot holds: the slot minus [`HEADER_AREA`](Self::HEADER_AREA), rounded
    /// down to [`UNIT`](Self::UNIT). A load buffer of this size always suffices.
    ///
    /// ```
    /// use edgetune_runtime::store::FlashStore;
    /// use embedded_storage::nor_flash::NorFlash;
    /// fn room<F: NorFlash>(store: &FlashStore<F>) -> usize {
    ///     store.capacity()
    /// }
    /// ```
    pub fn capacity(&self) -> usize {
        let room = self.slot_size as usize - Self::HEADER_AREA;
        room / Self::UNIT * Self::UNIT
    }

    /// Flash offset where slot `slot` (0 or 1) starts.
    ///
    /// ```
    /// use edgetune_runtime::store::FlashStore;
    /// use embedded_storage::nor_flash::NorFlash;
    /// fn second<F: NorFlash>(store: &FlashStore<F>) -> u32 {
    ///     store.slot_offset(1)
    /// }
    /// ```
    pub fn slot_offset(&self, slot: usize) -> u32 {
        self.base + (slot as u32 & 1) * self.slot_size
    }

    /// The flash, e.g. to inspect it.
    ///
    /// ```
    /// use edgetune_runtime::store::FlashStore;
    /// use embedded_storage::nor_flash::{NorFlash, ReadNorFlash};
    /// fn size<F: NorFlash>(store: &FlashStore<F>) -> usize {
    ///     store.flash().capacity()
    /// }
    /// ```
    pub fn flash(&self) -> &F {
        &self.flash
    }

    /// The flash, mutably. Writing inside the store's region behind its back can only make a
    /// slot invalid, never make garbage load.
    ///
    /// ```
    /// use edgetune_runtime::store::FlashStore;
    /// use embedded_storage::nor_flash::NorFlash;
    /// fn flash_of<F: NorFlash>(store: &mut FlashStore<F>) -> &mut F {
    ///     store.flash_mut()
    /// }
    /// ```
    pub fn flash_mut(&mut self) -> &mut F {
        &mut self.flash
    }

    /// Gives the flash back.
    ///
    /// ```
    /// use edgetune_runtime::store::FlashStore;
    /// use embedded_storage::nor_flash::NorFlash;
    /// fn close<F: NorFlash>(store: FlashStore<F>) -> F {
    ///     store.into_inner()
    /// }
    /// ```
    pub fn into_inner(self) -> F {
        self.flash
    }

    /// Reads the newest valid adapter into `buf` and says which it is; `Ok(None)` if neither
    /// slot holds a valid one (first boot, or both damaged).
    ///
    /// Both headers are read; a slot counts only if its magic, version, header CRC and length
    /// are right and its payload matches the payload CRC. Of two valid slots, the one with the
    /// newer generation ([`is_newer`]) wins; if the newer one's payload turns out damaged, the
    /// other is used. Fails with [`StoreError::BufferTooSmall`] if the newest valid adapter does
    /// not fit `buf` (then `buf` may have been overwritten), and [`StoreError::Flash`] on a
    /// flash error. On success `buf[..len]` holds the adapter; the rest of `buf` is unspecified.
    ///
    /// ```
    /// use edgetune_runtime::store::{FlashStore, StoreError};
    /// use embedded_storage::nor_flash::NorFlash;
    ///
    /// fn restore<F: NorFlash>(store: &mut FlashStore<F>, buf: &mut [u8]) -> Result<usize, StoreError> {
    ///     Ok(store.load(buf)?.map_or(0, |loaded| loaded.len))
    /// }
    /// ```
    pub fn load(&mut self, buf: &mut [u8]) -> Result<Option<Loaded>, StoreError> {
        let headers = [self.read_header(0)?, self.read_header(1)?];
        // Newest first; on a tie or the ambiguous half-range distance, slot 0 first.
        let order = match headers {
            [Some(h0), Some(h1)] if is_newer(h1.generation, h0.generation) => [1, 0],
            _ => [0, 1],
        };
        for slot in order {
            let Some(h) = headers[slot] else { continue };
            let len = h.len as usize;
            if len <= buf.len() {
                self.read_payload(slot, &mut buf[..len])?;
                if crc32fast::hash(&buf[..len]) == h.payload_crc {
                    return Ok(Some(Loaded {
                        generation: h.generation,
                        len,
                        slot,
                    }));
                }
            } else if self.payload_ok(slot, &h)? {
                return Err(StoreError::BufferTooSmall {
                    needed: len,
                    available: buf.len(),
                });
            }
        }
        Ok(None)
    }

    /// Saves `payload` as the newest adapter, power-safely.
    ///
    /// Writes the slot that does not hold the newest valid copy (slot 0 on first save): erases
    /// the sectors it needs, writes the payload, then the header with generation = newest + 1
    /// (wrapping; 1 on first save), then reads the slot back. If the power fails at any point,
    /// the next [`load`](Self::load) returns the previous adapter or this one. Fails with
    /// [`StoreError::PayloadTooLarge`] before touching the flash if `payload` exceeds
    /// [`capacity`](Self::capacity); [`StoreError::Flash`] on a flash error and
    /// [`StoreError::VerifyFailed`] if the read-back differs (in both cases the previous copy
    /// stays loadable).
    ///
    /// ```
    /// use edgetune_runtime::store::{FlashStore, StoreError};
    /// use embedded_storage::nor_flash::NorFlash;
    ///
    /// fn persist<F: NorFlash>(store: &mut FlashStore<F>, adapter: &[u8]) -> Result<u32, StoreError> {
    ///     Ok(store.save(adapter)?.generation)
    /// }
    /// ```
    pub fn save(&mut self, payload: &[u8]) -> Result<Saved, StoreError> {
        let capacity = self.capacity();
        if payload.len() > capacity {
            return Err(StoreError::PayloadTooLarge {
                len: payload.len(),
                capacity,
            });
        }
        let (slot, generation) = match self.newest_valid()? {
            Some((slot, h)) => (slot ^ 1, h.generation.wrapping_add(1)),
            None => (0, 1),
        };
        let header = Header::for_payload(generation, payload);
        let start = self.slot_offset(slot);
        let w = F::WRITE_SIZE;
        let used = Self::HEADER_AREA + round_up(payload.len(), w);
        let erase_len = round_up(used, F::ERASE_SIZE);
        self.flash
            .erase(start, start + erase_len as u32)
            .map_err(flash_err)?;

        // Payload first: whole write units straight from the caller's slice, the last one padded.
        let payload_at = start + Self::HEADER_AREA as u32;
        let whole = payload.len() / w * w;
        if whole > 0 {
            self.flash
                .write(payload_at, &payload[..whole])
                .map_err(flash_err)?;
        }
        let mut scratch = [0xFFu8; MAX_UNIT];
        if whole < payload.len() {
            let tail = &payload[whole..];
            scratch[..tail.len()].copy_from_slice(tail);
            self.flash
                .write(payload_at + whole as u32, &scratch[..w])
                .map_err(flash_err)?;
        }

        // Header last: until its final byte lands, this slot is invalid.
        scratch.fill(0xFF);
        scratch[..Header::LEN].copy_from_slice(&header.encode());
        self.flash
            .write(start, &scratch[..Self::HEADER_AREA])
            .map_err(flash_err)?;

        match self.read_header(slot)? {
            Some(h) if h == header && self.payload_ok(slot, &h)? => Ok(Saved { generation, slot }),
            _ => Err(StoreError::VerifyFailed),
        }
    }

    /// The newest slot whose header and payload are both valid, with its header.
    fn newest_valid(&mut self) -> Result<Option<(usize, Header)>, StoreError> {
        let mut valid = [None, None];
        for (slot, v) in valid.iter_mut().enumerate() {
            if let Some(h) = self.read_header(slot)? {
                if self.payload_ok(slot, &h)? {
                    *v = Some(h);
                }
            }
        }
        Ok(match valid {
            [Some(h0), Some(h1)] if is_newer(h1.generation, h0.generation) => Some((1, h1)),
            [Some(h0), _] => Some((0, h0)),
            [None, Some(h1)] => Some((1, h1)),
            [None, None] => None,
        })
    }

    /// The slot's header if it decodes and its length fits the slot.
    fn read_header(&mut self, slot: usize) -> Result<Option<Header>, StoreError> {
        let mut scratch = [0u8; MAX_UNIT];
        let n = round_up(Header::LEN, F::READ_SIZE);
        self.flash
            .read(self.slot_offset(slot), &mut scratch[..n])
            .map_err(flash_err)?;
        Ok(Header::decode(&scratch[..n]).filter(|h| h.len as usize <= self.capacity()))
    }

    /// Reads the slot's first `out.len()` payload bytes into `out`.
    fn read_payload(&mut self, slot: usize, out: &mut [u8]) -> Result<(), StoreError> {
        let at = self.slot_offset(slot) + Self::HEADER_AREA as u32;
        let r = F::READ_SIZE;
        let whole = out.len() / r * r;
        if whole > 0 {
            self.flash.read(at, &mut out[..whole]).map_err(flash_err)?;
        }
        if whole < out.len() {
            // The padded tail stays inside the slot: capacity is a whole number of units.
            let mut scratch = [0u8; MAX_UNIT];
            self.flash
                .read(at + whole as u32, &mut scratch[..r])
                .map_err(flash_err)?;
            let tail = out.len() - whole;
            out[whole..].copy_from_slice(&scratch[..tail]);
        }
        Ok(())
    }

    /// Whether the slot's payload matches `h`, read through the stack buffer.
    fn payload_ok(&mut self, slot: usize, h: &Header) -> Result<bool, StoreError> {
        let at = self.slot_offset(slot) + Self::HEADER_AREA as u32;
        let r = F::READ_SIZE;
        let chunk = MAX_UNIT / r * r;
        let mut scratch = [0u8; MAX_UNIT];
        let mut hasher = crc32fast::Hasher::new();
        let mut done = 0usize;
        let len = h.len as usize;
        while done < len {
            let take = chunk.min(len - done);
            self.flash
                .read(at + done as u32, &mut scratch[..round_up(take, r)])
                .map_err(flash_err)?;
            hasher.update(&scratch[..take]);
            done += take;
        }
        Ok(hasher.finalize() == h.payload_crc)
    }
}

impl<F: NorFlash> fmt::Debug for FlashStore<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlashStore")
            .field("base", &self.base)
            .field("slot_size", &self.slot_size)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "std")]
pub use file::FileStore;

#[cfg(feature = "std")]
mod file {
    use std::fs::{self, File};
    use std::io::{self, Write};
    use std::path::PathBuf;

    use super::{is_newer, Header, Loaded, Saved, StoreError};

    fn io_err(e: io::Error) -> StoreError {
        StoreError::Io(e.kind())
    }

    /// An adapter store of two files, `<name>.a` (slot 0) and `<name>.b` (slot 1), in `dir`.
    ///
    /// Each file is a [`Header`] followed by exactly `len` payload bytes. A save picks the slot
    /// file that does not hold the newest valid copy, writes `<name>.tmp`, fsyncs it, renames it
    /// over that slot file and fsyncs the directory (on Unix), so the other slot file is never
    /// touched. Loads and generations behave as with [`FlashStore`](super::FlashStore): a torn,
    /// truncated or corrupted slot file is ignored and the other one is used. One writer at a
    /// time; `dir` must exist.
    ///
    /// ```
    /// use edgetune_runtime::store::FileStore;
    ///
    /// let dir = std::env::temp_dir().join(format!("edgetune-doc-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir)?;
    /// let store = FileStore::new(&dir, "adapter");
    /// store.save(b"weights v1")?;
    /// let saved = store.save(b"weights v2")?;
    /// let mut buf = [0u8; 64];
    /// let loaded = store.load(&mut buf)?.unwrap();
    /// assert_eq!(&buf[..loaded.len], b"weights v2");
    /// assert_eq!(loaded.generation, saved.generation);
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct FileStore {
        dir: PathBuf,
        name: String,
    }

    impl FileStore {
        /// A store of `dir/<name>.a` and `dir/<name>.b`. Touches nothing yet.
        ///
        /// ```
        /// use edgetune_runtime::store::FileStore;
        /// let store = FileStore::new("/var/lib/edgetune", "adapter");
        /// assert!(store.slot_path(1).ends_with("adapter.b"));
        /// ```
        pub fn new(dir: impl Into<PathBuf>, name: impl Into<String>) -> FileStore {
            FileStore {
                dir: dir.into(),
                name: name.into(),
            }
        }

        /// Path of slot `slot`'s file: `<name>.a` for 0, `<name>.b` for 1.
        ///
        /// ```
        /// use edgetune_runtime::store::FileStore;
        /// let store = FileStore::new("state", "head");
        /// assert_eq!(store.slot_path(0), std::path::Path::new("state/head.a"));
        /// ```
        pub fn slot_path(&self, slot: usize) -> PathBuf {
            let ext = if slot & 1 == 0 { "a" } else { "b" };
            self.dir.join(format!("{}.{ext}", self.name))
        }

        /// Path of the file a save writes before renaming it: `<name>.tmp`.
        ///
        /// ```
        /// use edgetune_runtime::store::FileStore;
        /// let store = FileStore::new("state", "head");
        /// assert!(store.tmp_path().ends_with("head.tmp"));
        /// ```
        pub fn tmp_path(&self) -> PathBuf {
            self.dir.join(format!("{}.tmp", self.name))
        }

        /// Reads the newest valid adapter into `buf`; `Ok(None)` if neither slot file holds one.
        ///
        /// A missing, short, oversized or corrupted slot file does not count. Fails with
        /// [`StoreError::BufferTooSmall`] if the newest valid adapter does not fit `buf`, and
        /// [`StoreError::Io`] if a slot file exists but cannot be read.
        ///
        /// ```
        /// use edgetune_runtime::store::FileStore;
        /// let store = FileStore::new(std::env::temp_dir().join("edgetune-doc-none"), "x");
        /// assert_eq!(store.load(&mut [0u8; 8]).unwrap(), None);
        /// ```
        pub fn load(&self, buf: &mut [u8]) -> Result<Option<Loaded>, StoreError> {
            let Some((slot, h, bytes)) = self.newest_valid()? else {
                return Ok(None);
            };
            let len = h.len as usize;
            let available = buf.len();
            let out = buf.get_mut(..len).ok_or(StoreError::BufferTooSmall {
                needed: len,
                available,
            })?;
            out.copy_from_slice(&bytes[Header::LEN..]);
            Ok(Some(Loaded {
                generation: h.generation,
                len,
                slot,
            }))
        }

        /// Saves `payload` as the newest adapter: writes `<name>.tmp`, fsyncs it, renames it over
        /// the slot file not holding the newest valid copy, fsyncs the directory.
        ///
        /// A crash at any point leaves the previous adapter loadable (and a stray `.tmp`, which
        /// the next save overwrites). Payloads of 4 GiB or more are refused with
        /// [`StoreError::PayloadTooLarge`].
        ///
        /// ```no_run
        /// use edgetune_runtime::store::FileStore;
        /// let store = FileStore::new("/var/lib/edgetune", "adapter");
        /// let saved = store.save(b"adapter bytes")?;
        /// println!("saved generation {} to {}", saved.generation, store.slot_path(saved.slot).display());
        /// # Ok::<(), edgetune_runtime::store::StoreError>(())
        /// ```
        pub fn save(&self, payload: &[u8]) -> Result<Saved, StoreError> {
            if payload.len() > u32::MAX as usize {
                return Err(StoreError::PayloadTooLarge {
                    len: payload.len(),
                    capacity: u32::MAX as usize,
                });
            }
            let (slot, generation) = match self.newest_valid()? {
                Some((slot, h, _)) => (slot ^ 1, h.generation.wrapping_add(1)),
                None => (0, 1),
            };
            let header = Header::for_payload(generation, payload);
            let tmp = self.tmp_path();
            {
                let mut file = File::create(&tmp).map_err(io_err)?;
                file.write_all(&header.encode()).map_err(io_err)?;
                file.write_all(payload).map_err(io_err)?;
                file.sync_all().map_err(io_err)?;
            }
            fs::rename(&tmp, self.slot_path(slot)).map_err(io_err)?;
            self.sync_dir()?;
            Ok(Saved { generation, slot })
        }

        /// Makes the rename durable (a directory can be opened and synced on Unix only).
        fn sync_dir(&self) -> Result<(), StoreError> {
            #[cfg(unix)]
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err)?;
            Ok(())
        }

        /// The newest valid slot: its index, header and whole file contents.
        fn newest_valid(&self) -> Result<Option<(usize, Header, Vec<u8>)>, StoreError> {
            let a = self.read_slot(0)?;
            let b = self.read_slot(1)?;
            Ok(match (a, b) {
                (Some(a), Some(b)) if is_newer(b.0.generation, a.0.generation) => {
                    Some((1, b.0, b.1))
                }
                (Some(a), _) => Some((0, a.0, a.1)),
                (None, Some(b)) => Some((1, b.0, b.1)),
                (None, None) => None,
            })
        }

        /// The slot file's header and contents if it is valid; `None` if missing or invalid.
        fn read_slot(&self, slot: usize) -> Result<Option<(Header, Vec<u8>)>, StoreError> {
            let bytes = match fs::read(self.slot_path(slot)) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_err(e)),
            };
            let Some(h) = Header::decode(&bytes) else {
                return Ok(None);
            };
            let payload = &bytes[Header::LEN..];
            if payload.len() != h.len as usize || crc32fast::hash(payload) != h.payload_crc {
                return Ok(None);
            }
            Ok(Some((h, bytes)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_rejections() {
        let h = Header::for_payload(0xDEAD_BEEF, b"payload");
        let bytes = h.encode();
        assert_eq!(Header::decode(&bytes), Some(h));
        // Any single-byte change, or any torn prefix, is refused.
        for i in 0..Header::LEN {
            let mut b = bytes;
            b[i] ^= 0x01;
            assert_eq!(Header::decode(&b), None, "flip at {i}");
            let mut torn = [0xFF; Header::LEN];
            torn[..i].copy_from_slice(&bytes[..i]);
            assert_eq!(Header::decode(&torn), None, "torn at {i}");
        }
    }

    #[test]
    fn serial_number_order() {
        assert!(is_newer(1, 0));
        assert!(is_newer(0, u32::MAX));
        assert!(is_newer(5, u32::MAX - 5));
        assert!(!is_newer(u32::MAX - 5, 5));
        assert!(!is_newer(0x8000_0000, 0) && !is_newer(0, 0x8000_0000));
    }
}

#[cfg(all(test, feature = "std"))]
mod file_tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh, empty directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "edgetune-store-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn bytes(seed: u32, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn load(store: &FileStore) -> Option<(Vec<u8>, Loaded)> {
        let mut buf = [0u8; 4096];
        store
            .load(&mut buf)
            .unwrap()
            .map(|l| (buf[..l.len].to_vec(), l))
    }

    #[test]
    fn save_load_alternates_slots() {
        let dir = TempDir::new();
        let store = FileStore::new(&dir.0, "adapter");
        assert_eq!(load(&store), None);
        let (a, b, c) = (bytes(1, 1000), bytes(2, 1500), bytes(3, 0));
        assert_eq!(
            store.save(&a).unwrap(),
            Saved {
                generation: 1,
                slot: 0
            }
        );
        assert_eq!(load(&store).unwrap().0, a);
        assert_eq!(
            store.save(&b).unwrap(),
            Saved {
                generation: 2,
                slot: 1
            }
        );
        let (got, l) = load(&store).unwrap();
        assert_eq!((got, l.generation, l.slot), (b, 2, 1));
        assert_eq!(
            store.save(&c).unwrap(),
            Saved {
                generation: 3,
                slot: 0
            }
        );
        assert_eq!(load(&store).unwrap().0, c);
        assert!(!store.tmp_path().exists());
        assert_eq!(
            fs::metadata(store.slot_path(1)).unwrap().len(),
            (Header::LEN + 1500) as u64
        );
    }

    #[test]
    fn torn_or_corrupted_newest_falls_back() {
        let dir = TempDir::new();
        let store = FileStore::new(&dir.0, "adapter");
        let (a, b) = (bytes(4, 700), bytes(5, 900));
        store.save(&a).unwrap();
        store.save(&b).unwrap();
        let newest = store.slot_path(1);
        let good = fs::read(&newest).unwrap();

        // Torn writes: every truncation of the newest file, and a trailing extra byte.
        for cut in 0..good.len() {
            fs::write(&newest, &good[..cut]).unwrap();
            let (got, l) = load(&store).unwrap();
            assert_eq!(
                (got.as_slice(), l.generation),
                (a.as_slice(), 1),
                "cut {cut}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        fs::write(&newest, &longer).unwrap();
        assert_eq!(load(&store).unwrap().0, a);

        // Bit flips in header and payload.
        for i in [0, 5, 9, 13, 17, 22, Header::LEN, good.len() - 1] {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            fs::write(&newest, &bad).unwrap();
            assert_eq!(load(&store).unwrap().0, a, "flip at {i}");
        }

        // The next save replaces the damaged slot, not the good one, and wins.
        let c = bytes(6, 300);
        assert_eq!(
            store.save(&c).unwrap(),
            Saved {
                generation: 2,
                slot: 1
            }
        );
        assert_eq!(load(&store).unwrap().0, c);
        assert_eq!(fs::read(store.slot_path(0)).unwrap()[Header::LEN..], a[..]);
    }

    #[test]
    fn crash_before_rename_keeps_previous() {
        let dir = TempDir::new();
        let store = FileStore::new(&dir.0, "adapter");
        let a = bytes(7, 512);
        store.save(&a).unwrap();
        // A half-written tmp file from a save that never reached its rename.
        let b = bytes(8, 512);
        let mut partial = Header::for_payload(2, &b).encode().to_vec();
        partial.extend_from_slice(&b[..100]);
        fs::write(store.tmp_path(), &partial).unwrap();
        assert_eq!(load(&store).unwrap().0, a);
        store.save(&b).unwrap();
        assert_eq!(load(&store).unwrap().0, b);
        assert!(!store.tmp_path().exists());
    }

    #[test]
    fn both_damaged_is_none_and_missing_dir_is_an_error_on_save() {
        let dir = TempDir::new();
        let store = FileStore::new(&dir.0, "adapter");
        fs::write(store.slot_path(0), b"garbage").unwrap();
        fs::write(store.slot_path(1), [0xFFu8; 64]).unwrap();
        assert_eq!(load(&store), None);
        assert_eq!(
            store.save(b"x").unwrap(),
            Saved {
                generation: 1,
                slot: 0
            }
        );

        let gone = FileStore::new(dir.0.join("missing"), "adapter");
        assert_eq!(gone.load(&mut [0u8; 4]).unwrap(), None);
        assert_eq!(
            gone.save(b"x"),
            Err(StoreError::Io(std::io::ErrorKind::NotFound))
        );
    }

    #[test]
    fn generation_wraps() {
        let dir = TempDir::new();
        let store = FileStore::new(&dir.0, "adapter");
        let old = bytes(9, 64);
        let mut file = Header::for_payload(u32::MAX - 1, &old).encode().to_vec();
        file.extend_from_slice(&old);
        fs::write(store.slot_path(1), &file).unwrap();
        let mut expected = u32::MAX - 1;
        let mut slot = 1;
        for i in 0..4u32 {
            let p = bytes(10 + i, 32 + i as usize);
            expected = expected.wrapping_add(1);
            slot ^= 1;
            assert_eq!(
                store.save(&p).unwrap(),
                Saved {
                    generation: expected,
                    slot
                }
            );
            let (got, l) = load(&store).unwrap();
            assert_eq!((got, l.generation), (p, expected));
        }
        assert_eq!(expected, 2);
    }

    #[test]
    fn buffer_too_small_is_reported() {
        let dir = TempDir::new();
        let store = FileStore::new(&dir.0, "adapter");
        store.save(&bytes(11, 100)).unwrap();
        assert_eq!(
            store.load(&mut [0u8; 99]),
            Err(StoreError::BufferTooSmall {
                needed: 100,
                available: 99
            })
        );
    }
}
