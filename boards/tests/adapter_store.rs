//! The runtime's two-slot adapter store on NOR flash, against power cuts at every step of a save.
//!
//! Every sweep: count the steps of a full save (bytes written, plus erases in the counting mode)
//! with an uncut dry run, then replay the save from the same starting flash once per cut point
//! `0..=steps`, restore power, and check what a reboot loads: exactly the previous adapter or
//! exactly the new one, never garbage, never nothing, never an error. The slot holding the
//! previous adapter must come through bit for bit, and a save after the reboot must work.

use edgetune_boards::embedded_storage::nor_flash::{NorFlash, NorFlashErrorKind};
use edgetune_boards::{PowerCutFlash, RamNorFlash};
use edgetune_runtime::store::{FlashStore, Header, Loaded, Saved, StoreError};

/// Deterministic pseudo-random bytes (xorshift32).
fn random_bytes(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// A pseudo-random adapter of 1..3 KiB.
fn adapter(seed: u32) -> Vec<u8> {
    let len = 1024 + (seed.wrapping_mul(2_654_435_761) >> 21) as usize; // 1024..3071
    random_bytes(seed, len)
}

fn load_all<F: NorFlash>(
    store: &mut FlashStore<F>,
) -> Result<Option<(Vec<u8>, Loaded)>, StoreError> {
    let mut buf = vec![0u8; store.capacity()];
    Ok(store
        .load(&mut buf)?
        .map(|loaded| (buf[..loaded.len].to_vec(), loaded)))
}

/// The flash after saving `payloads` in order on an erased flash.
fn flash_with<const N: usize, const W: usize, const E: usize, P: AsRef<[u8]>>(
    slot_size: u32,
    payloads: &[P],
) -> RamNorFlash<N, W, E> {
    let mut store = FlashStore::new(RamNorFlash::<N, W, E>::new(), 0, slot_size).unwrap();
    for p in payloads {
        store.save(p.as_ref()).unwrap();
    }
    store.into_inner()
}

/// Writes a slot image by hand into erased flash (header with any generation, then the
/// payload), bypassing the store: for states a store would take billions of saves to reach.
fn put_slot<const N: usize, const W: usize, const E: usize>(
    flash: &mut RamNorFlash<N, W, E>,
    at: u32,
    generation: u32,
    payload: &[u8],
) {
    let area = FlashStore::<RamNorFlash<N, W, E>>::HEADER_AREA;
    let bytes = flash.as_mut_bytes();
    let at = at as usize;
    bytes[at..at + Header::LEN].copy_from_slice(&Header::for_payload(generation, payload).encode());
    bytes[at + area..at + area + payload.len()].copy_from_slice(payload);
}

/// What one sweep saw.
#[derive(Debug, Default, Clone, Copy)]
struct Sweep {
    /// Cut points replayed (`steps + 1`).
    cuts: usize,
    /// Cut points after which the reboot loaded the previous adapter.
    kept_previous: usize,
    /// Cut points after which the reboot loaded the new adapter.
    got_new: usize,
}

/// Saves `new` over `start` (whose newest adapter is `prev`, generation `prev_gen`) with the
/// power cut at every step, and checks every reboot.
fn sweep<const N: usize, const W: usize, const E: usize>(
    start: &RamNorFlash<N, W, E>,
    slot_size: u32,
    prev: &[u8],
    prev_gen: u32,
    new: &[u8],
    count_erases: bool,
) -> Sweep {
    let wrap = |flash: PowerCutFlash<RamNorFlash<N, W, E>>| {
        if count_erases {
            flash.counting_erases()
        } else {
            flash
        }
    };
    assert_ne!(prev, new);

    // Where things stand before the save.
    let mut before = FlashStore::new(start.clone(), 0, slot_size).unwrap();
    let (got, loaded) = load_all(&mut before).unwrap().unwrap();
    assert_eq!((got.as_slice(), loaded.generation), (prev, prev_gen));
    let prev_slot = loaded.slot;
    let prev_range = {
        let at = before.slot_offset(prev_slot) as usize;
        at..at + slot_size as usize
    };

    // Dry run: the full save, counted.
    let mut dry =
        FlashStore::new(wrap(PowerCutFlash::unlimited(start.clone())), 0, slot_size).unwrap();
    let saved = dry.save(new).unwrap();
    assert_eq!(
        saved,
        Saved {
            generation: prev_gen.wrapping_add(1),
            slot: prev_slot ^ 1
        }
    );
    let steps = dry.flash().steps();
    assert_eq!(
        dry.flash().bytes_written(),
        steps - if count_erases { 1 } else { 0 },
        "one erase per save"
    );

    let mut seen = Sweep::default();
    let mut first_new = None;
    for cut in 0..=steps {
        let mut store =
            FlashStore::new(wrap(PowerCutFlash::new(start.clone(), cut)), 0, slot_size).unwrap();
        let result = store.save(new);
        if cut < steps {
            assert!(store.flash().is_cut(), "cut {cut}: power should be gone");
            assert_eq!(
                result,
                Err(StoreError::Flash(NorFlashErrorKind::Other)),
                "cut {cut}"
            );
        } else {
            assert!(!store.flash().is_cut());
            assert_eq!(result, Ok(saved), "full save");
        }

        // Reboot.
        let mut power_cut = store.into_inner();
        power_cut.restore_power();
        let flash = power_cut.into_inner();
        assert!(
            flash.as_bytes()[prev_range.clone()] == start.as_bytes()[prev_range.clone()],
            "cut {cut}: the previous adapter's slot was touched"
        );
        let mut store = FlashStore::new(flash, 0, slot_size).unwrap();
        let (got, loaded) = match load_all(&mut store) {
            Ok(Some(found)) => found,
            other => panic!("cut {cut} of {steps}: reboot loaded {other:?}"),
        };
        if got == new {
            assert_eq!(
                (loaded.generation, loaded.slot),
                (saved.generation, saved.slot),
                "cut {cut}"
            );
            seen.got_new += 1;
            first_new.get_or_insert(cut);
        } else {
            assert!(
                got == prev,
                "cut {cut} of {steps}: loaded garbage ({} bytes)",
                got.len()
            );
            assert_eq!(
                (loaded.generation, loaded.slot),
                (prev_gen, prev_slot),
                "cut {cut}"
            );
            assert!(
                first_new.is_none(),
                "cut {cut}: the old adapter came back after the new one"
            );
            seen.kept_previous += 1;
        }
        if cut == steps {
            assert_eq!(got, new, "after the full save");
        }

        // Life goes on: the next save lands in the other slot with the next generation.
        let next = random_bytes(cut as u32 ^ 0x5A5A, 1 + cut % 97);
        let s = store.save(&next).unwrap();
        assert_eq!(
            s,
            Saved {
                generation: loaded.generation.wrapping_add(1),
                slot: loaded.slot ^ 1
            },
            "cut {cut}"
        );
        let (got, l) = load_all(&mut store).unwrap().unwrap();
        assert_eq!((got, l.generation), (next, s.generation), "cut {cut}");
        seen.cuts += 1;
    }
    // The new adapter only ever shows up once its header is complete, i.e. in the last steps:
    // the header area's padding, and header bytes that happen to be 0xFF (as erased), may be
    // missing.
    let header_tail = FlashStore::<RamNorFlash<N, W, E>>::HEADER_AREA - Header::LEN;
    let encoded = Header::for_payload(saved.generation, new).encode();
    let erased_like = encoded.iter().rev().take_while(|&&b| b == 0xFF).count();
    assert!(
        first_new.unwrap() >= steps - header_tail - erased_like,
        "new adapter visible at cut {first_new:?} of {steps}"
    );
    seen
}

/// The three starting states, each swept with and without erases counted as steps.
fn sweep_geometry<const N: usize, const W: usize, const E: usize>(
    slot_size: u32,
    seed: u32,
) -> usize {
    let (a, a_old, x, b) = (
        adapter(seed),
        adapter(seed + 1),
        adapter(seed + 2),
        adapter(seed + 3),
    );
    let mut cuts = 0;
    for count_erases in [false, true] {
        // 1. A in slot 0, slot 1 erased.
        let start = flash_with::<N, W, E, _>(slot_size, &[&a]);
        let s = sweep(&start, slot_size, &a, 1, &b, count_erases);
        cuts += s.cuts;
        eprintln!("W={W} E={E} A only, erases counted: {count_erases}: {s:?}");

        // 2. A in slot 0 (generation 3), an older A' in slot 1 (generation 2).
        let start = flash_with::<N, W, E, _>(slot_size, &[&x, &a_old, &a]);
        let s = sweep(&start, slot_size, &a, 3, &b, count_erases);
        cuts += s.cuts;
        eprintln!("W={W} E={E} A + older A', erases counted: {count_erases}: {s:?}");

        // 3. A in slot 1, slot 0 left torn by an earlier interrupted save.
        let mut torn = PowerCutFlash::new(flash_with::<N, W, E, _>(slot_size, &[&x, &a]), 700);
        {
            let mut store = FlashStore::new(&mut torn, 0, slot_size).unwrap();
            assert!(store.save(&a_old).is_err());
        }
        let start = torn.into_inner();
        let s = sweep(&start, slot_size, &a, 2, &b, count_erases);
        cuts += s.cuts;
        eprintln!("W={W} E={E} A + torn slot, erases counted: {count_erases}: {s:?}");
    }
    cuts
}

#[test]
fn power_cut_at_every_step_4_byte_words() {
    let cuts = sweep_geometry::<16384, 4, 4096>(8192, 10);
    eprintln!("cut points: {cuts}");
}

#[test]
fn power_cut_at_every_step_byte_writes() {
    let cuts = sweep_geometry::<8192, 1, 1024>(4096, 20);
    eprintln!("cut points: {cuts}");
}

#[test]
fn power_cut_at_every_step_16_byte_units() {
    // A write unit wider than part of the header: the header area is 32 bytes.
    assert_eq!(FlashStore::<RamNorFlash<16384, 16, 2048>>::HEADER_AREA, 32);
    let cuts = sweep_geometry::<16384, 16, 2048>(4096, 30);
    eprintln!("cut points: {cuts}");
}

#[test]
fn power_cut_across_the_generation_wrap() {
    type Flash = RamNorFlash<16384, 4, 4096>;
    let (a_old, a, b) = (adapter(40), adapter(41), adapter(42));
    let mut start = Flash::new();
    put_slot(&mut start, 0, u32::MAX, &a);
    put_slot(&mut start, 8192, u32::MAX - 1, &a_old);
    for count_erases in [false, true] {
        let s = sweep(&start, 8192, &a, u32::MAX, &b, count_erases);
        eprintln!("wrap, erases counted: {count_erases}: {s:?}");
    }
}

#[test]
fn save_reload_and_alternate_slots() {
    type Flash = RamNorFlash<16384, 4, 4096>;
    let mut store = FlashStore::new(Flash::new(), 0, 8192).unwrap();
    assert_eq!(store.capacity(), 8192 - 24);
    assert_eq!(load_all(&mut store).unwrap(), None, "first boot");

    let (a, b, c) = (adapter(1), adapter(2), adapter(3));
    assert_eq!(
        store.save(&a).unwrap(),
        Saved {
            generation: 1,
            slot: 0
        }
    );
    let (got, l) = load_all(&mut store).unwrap().unwrap();
    assert_eq!(
        (got, l),
        (
            a.clone(),
            Loaded {
                generation: 1,
                len: a.len(),
                slot: 0
            }
        )
    );

    assert_eq!(
        store.save(&b).unwrap(),
        Saved {
            generation: 2,
            slot: 1
        }
    );
    assert_eq!(load_all(&mut store).unwrap().unwrap().0, b);
    assert_eq!(
        store.save(&c).unwrap(),
        Saved {
            generation: 3,
            slot: 0
        }
    );
    let (got, l) = load_all(&mut store).unwrap().unwrap();
    assert_eq!((got, l.generation, l.slot), (c, 3, 0));

    // The header is at the slot start, the payload right after the header area.
    let flash = store.into_inner();
    let bytes = flash.as_bytes();
    assert_eq!(&bytes[0..4], b"ETAS");
    assert_eq!(&bytes[8192..8196], b"ETAS");
    assert_eq!(&bytes[8192 + 24..8192 + 24 + b.len()], &b[..]);

    // An empty adapter is an adapter too; and a fresh store over the same flash sees it all.
    let mut store = FlashStore::new(flash, 0, 8192).unwrap();
    assert_eq!(
        store.save(&[]).unwrap(),
        Saved {
            generation: 4,
            slot: 1
        }
    );
    let (got, l) = load_all(&mut store).unwrap().unwrap();
    assert_eq!((got.len(), l.generation), (0, 4));
}

#[test]
fn payload_too_large_touches_nothing() {
    type Flash = RamNorFlash<16384, 4, 4096>;
    let (a, b) = (adapter(5), adapter(6));
    let start = flash_with::<16384, 4, 4096, _>(8192, &[&a, &b]);
    let mut store = FlashStore::new(
        PowerCutFlash::unlimited(start.clone()).counting_erases(),
        0,
        8192,
    )
    .unwrap();
    let capacity = store.capacity();
    let big = random_bytes(7, capacity + 1);
    assert_eq!(
        store.save(&big),
        Err(StoreError::PayloadTooLarge {
            len: capacity + 1,
            capacity
        })
    );
    assert_eq!(store.flash().steps(), 0, "not a single erase or write");
    assert!(
        store.flash().inner().as_bytes() == start.as_bytes(),
        "flash changed"
    );
    let (got, l) = load_all(&mut store).unwrap().unwrap();
    assert_eq!((got, l.generation), (b, 2));

    // Exactly the capacity fits.
    let full = random_bytes(8, capacity);
    assert_eq!(store.save(&full).unwrap().slot, 0);
    assert_eq!(load_all(&mut store).unwrap().unwrap().0, full);
    // And slot 1 still holds B.
    let flash: Flash = store.into_inner().into_inner();
    assert!(
        flash.as_bytes()[8192..] == start.as_bytes()[8192..],
        "slot 1 changed"
    );
}

#[test]
fn bit_flips_are_detected_and_the_other_slot_is_used() {
    type Flash = RamNorFlash<16384, 4, 4096>;
    let (a, b) = (adapter(11), adapter(12));
    let start: Flash = flash_with(8192, &[&a, &b]); // A: slot 0, gen 1; B: slot 1, gen 2

    // Every bit of B's header, and bits spread over its payload.
    let mut positions: Vec<usize> = (0..24).collect();
    positions.extend((24..24 + b.len()).step_by(97));
    positions.push(24 + b.len() - 1);
    for &pos in &positions {
        for bit in 0..8 {
            let mut flash = start.clone();
            flash.as_mut_bytes()[8192 + pos] ^= 1 << bit;
            let mut store = FlashStore::new(flash, 0, 8192).unwrap();
            let (got, l) = load_all(&mut store).unwrap().unwrap();
            assert_eq!(
                (&got, l.generation, l.slot),
                (&a, 1, 0),
                "flip at {pos}.{bit}"
            );
            if pos == 24 && bit == 0 {
                // The next save replaces the damaged slot, never the good one.
                let c = adapter(13);
                assert_eq!(
                    store.save(&c).unwrap(),
                    Saved {
                        generation: 2,
                        slot: 1
                    }
                );
                assert_eq!(load_all(&mut store).unwrap().unwrap().0, c);
                assert!(
                    store.flash().as_bytes()[..8192] == start.as_bytes()[..8192],
                    "the good slot was touched"
                );
            }
        }
    }

    // A flip in the older slot does not matter while the newer one is intact.
    let mut flash = start.clone();
    flash.as_mut_bytes()[24 + 5] ^= 0x80;
    let mut store = FlashStore::new(flash, 0, 8192).unwrap();
    assert_eq!(load_all(&mut store).unwrap().unwrap().0, b);

    // Both damaged: nothing valid left, which reads as a first boot, and saving works again.
    store.flash_mut().as_mut_bytes()[8192 + 24 + 5] ^= 0x80;
    assert_eq!(load_all(&mut store).unwrap(), None);
    assert_eq!(
        store.save(&a).unwrap(),
        Saved {
            generation: 1,
            slot: 0
        }
    );
    assert_eq!(load_all(&mut store).unwrap().unwrap().0, a);

    // A slot whose bytes beyond the payload got damaged is still fine: they are not used.
    let mut flash = start.clone();
    flash.as_mut_bytes()[8192 + 24 + b.len() + 64] = 0;
    let mut store = FlashStore::new(flash, 0, 8192).unwrap();
    assert_eq!(load_all(&mut store).unwrap().unwrap().0, b);
}

#[test]
fn generation_wraps_around() {
    type Flash = RamNorFlash<8192, 4, 1024>;
    let mut flash = Flash::new();
    let first = adapter(21);
    put_slot(&mut flash, 4096, u32::MAX - 2, &first);
    let mut store = FlashStore::new(flash, 0, 4096).unwrap();
    let (got, l) = load_all(&mut store).unwrap().unwrap();
    assert_eq!((got, l.generation, l.slot), (first, u32::MAX - 2, 1));

    let mut expected = u32::MAX - 2;
    let mut slot = 1;
    for i in 0..6 {
        let p = random_bytes(100 + i, 500 + i as usize);
        expected = expected.wrapping_add(1);
        slot ^= 1;
        assert_eq!(
            store.save(&p).unwrap(),
            Saved {
                generation: expected,
                slot
            }
        );
        let (got, l) = load_all(&mut store).unwrap().unwrap();
        assert_eq!((got, l.generation, l.slot), (p, expected, slot), "save {i}");
    }
    assert_eq!(expected, 3, "went through MAX-1, MAX, 0, 1, 2, 3");
}

#[test]
fn generation_order_is_serial_not_numeric() {
    // 0 after u32::MAX is newer, even though it is numerically smaller.
    type Flash = RamNorFlash<8192, 4, 1024>;
    let (old, new) = (adapter(31), adapter(32));
    let mut flash = Flash::new();
    put_slot(&mut flash, 0, u32::MAX, &old);
    put_slot(&mut flash, 4096, 0, &new);
    let mut store = FlashStore::new(flash, 0, 4096).unwrap();
    let (got, l) = load_all(&mut store).unwrap().unwrap();
    assert_eq!((got, l.generation, l.slot), (new, 0, 1));
    assert_eq!(
        store.save(b"next").unwrap(),
        Saved {
            generation: 1,
            slot: 0
        }
    );
}

#[test]
fn small_buffer_is_an_error_not_a_fallback() {
    let (a, b) = (random_bytes(1, 300), random_bytes(2, 200));
    let flash = flash_with::<8192, 4, 1024, _>(4096, &[&a, &b]);
    let mut store = FlashStore::new(flash, 0, 4096).unwrap();
    let mut buf = [0u8; 199];
    assert_eq!(
        store.load(&mut buf),
        Err(StoreError::BufferTooSmall {
            needed: 200,
            available: 199
        })
    );
    // Unless the newest copy is damaged: then the older one is what there is.
    store.flash_mut().as_mut_bytes()[4096 + 24 + 10] ^= 1;
    assert_eq!(
        store.load(&mut buf),
        Err(StoreError::BufferTooSmall {
            needed: 300,
            available: 199
        })
    );
    let mut buf = [0u8; 300];
    assert_eq!(store.load(&mut buf).unwrap().unwrap().generation, 1);
    assert_eq!(&buf[..], &a[..]);
}

#[test]
fn store_in_the_middle_of_a_bigger_flash() {
    // The store at sectors 2..6 of 8; nothing outside it is touched.
    type Flash = RamNorFlash<8192, 8, 1024>;
    let mut flash = Flash::new();
    flash.write(0, &[0x11; 2048]).unwrap();
    flash.write(6144, &[0x22; 2048]).unwrap();
    let mut store = FlashStore::new(flash, 2048, 2048).unwrap();
    assert_eq!(store.capacity(), 2048 - 24);
    for i in 0..5u32 {
        let p = random_bytes(i, 100 * i as usize + 3);
        store.save(&p).unwrap();
        assert_eq!(load_all(&mut store).unwrap().unwrap().0, p);
    }
    let bytes = store.flash().as_bytes();
    assert!(bytes[..2048].iter().all(|&b| b == 0x11));
    assert!(bytes[6144..].iter().all(|&b| b == 0x22));
}

#[test]
fn geometry_is_checked() {
    type Flash = RamNorFlash<8192, 4, 1024>;
    let bad = |base, slot| match FlashStore::new(Flash::new(), base, slot) {
        Err(StoreError::InvalidGeometry { reason }) => reason,
        other => panic!("{base}, {slot}: {other:?}"),
    };
    bad(512, 1024); // base not a whole sector
    bad(0, 1000); // slot not a whole sector
    bad(0, 0);
    bad(4096, 4096); // runs past the end
    bad(u32::MAX - 1023, 1024); // and does not overflow doing so
    assert!(FlashStore::new(Flash::new(), 4096, 2048).is_ok());

    // Other flash errors surface as their kind, e.g. a store whose flash refuses to work.
    let mut store = FlashStore::new(PowerCutFlash::new(Flash::new(), 0), 0, 4096).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        store.save(b"x"),
        Err(StoreError::Flash(NorFlashErrorKind::Other))
    );
    assert_eq!(
        store.load(&mut buf),
        Err(StoreError::Flash(NorFlashErrorKind::Other))
    );
    store.flash_mut().restore_power();
    assert_eq!(store.load(&mut buf), Ok(None));
}
