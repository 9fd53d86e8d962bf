//! `Model::from_bytes` must never panic, and a model it accepts must be usable without panics.
//!
//! Each input is parsed three ways, all from an 8-byte aligned copy:
//! 1. as is (exercises the header and checksum checks);
//! 2. with the CRC recomputed, so mutations reach the validation behind the checksum;
//! 3. with `file_len` set to the input length and the CRC recomputed, so inserting or removing
//!    bytes does not just end at the length check.
#![no_main]

use edgetune_core::format::{file_crc, CRC_OFFSET};
use edgetune_core::{Encoding, Model, Op, Place, Storage};
use libfuzzer_sys::fuzz_target;
use zerocopy::IntoBytes;

/// Byte offset of `file_len` in the header.
const FILE_LEN_OFFSET: usize = core::mem::offset_of!(edgetune_core::format::FileHeader, file_len);

fuzz_target!(|data: &[u8]| {
    let mut words = vec![0u64; data.len().div_ceil(8)];
    let buf = &mut words.as_mut_bytes()[..data.len()];
    buf.copy_from_slice(data);
    check(buf);
    if buf.len() >= 64 {
        let crc = file_crc(buf);
        buf[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        check(buf);
        let len = buf.len() as u64;
        buf[FILE_LEN_OFFSET..FILE_LEN_OFFSET + 8].copy_from_slice(&len.to_le_bytes());
        let crc = file_crc(buf);
        buf[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        check(buf);
    }
});

fn check(bytes: &[u8]) {
    if let Ok(m) = Model::from_bytes(bytes) {
        walk(&m);
    }
}

/// Uses everything an accepted model exposes and checks what validation promises.
fn walk(m: &Model<'_>) {
    assert_eq!(m.bytes().len() as u64, m.file_len());
    let _ = (m.arena_bytes(), m.checksum());
    let n = m.tensor_count();
    for i in 0..n {
        let t = m.tensor(i);
        assert!(!t.meta.shape.dims().contains(&0));
        assert!(t.meta.shape.checked_numel().is_some());
        let _ = (t.name.len(), t.params, t.meta.shape.strides(), t.meta.dtype.name(), t.meta.encoding.name());
        match t.meta.storage {
            Storage::Const => {
                let b = m.const_bytes(i);
                assert_eq!(b.len() as u64, t.len);
                assert_eq!(b.as_ptr() as usize % 8, 0);
            }
            Storage::Arena => {
                assert_eq!(t.meta.encoding, Encoding::Plain);
                let end = t.offset.checked_add(t.len).expect("arena range overflows");
                assert!(end <= m.arena_bytes(), "tensor {i} outside the arena");
                assert!(t.live.0 <= t.live.1);
                if let Some(r) = t.alias_of {
                    assert!(r < n);
                    let root = m.tensor(r);
                    assert!(root.alias_of.is_none());
                    assert_eq!((root.offset, root.len, root.live), (t.offset, t.len, t.live));
                }
            }
        }
    }
    let n_ops = m.op_count();
    for op in m.ops() {
        let t_now = op.index + 1;
        let words = op.op.encode();
        let again = Op::decode(op.op.code() as u16, words.as_slice(), Place::Op(op.index)).expect("re-decodes");
        assert_eq!(again.encode(), words);
        let _ = (op.name.len(), op.op.name());
        for k in 0..op.n_inputs() {
            let id = op.input(k);
            assert!(id < n);
            let t = m.tensor(id);
            if t.meta.storage == Storage::Arena {
                assert!(t.live.0 < t_now && t.live.1 >= t_now, "op {} reads a dead tensor", op.index);
            }
        }
        assert_eq!(op.inputs().count(), op.n_inputs());
        let mut outs = 0;
        for id in op.outputs() {
            outs += 1;
            assert!(id < n);
            let t = m.tensor(id);
            assert_eq!(t.meta.storage, Storage::Arena);
            assert_eq!(t.live.0, t_now);
        }
        assert_eq!(outs, 1);
        let _ = op.output(0);
        if let Some(s) = op.scratch {
            assert!(s < n);
            assert_eq!(m.tensor(s).live, (t_now, t_now));
        }
    }
    let mut outputs = 0;
    for io in m.inputs() {
        assert!(io.tensor < n);
        assert_eq!(m.tensor(io.tensor).live.0, 0);
    }
    for io in m.outputs() {
        assert!(io.tensor < n);
        assert_eq!(m.tensor(io.tensor).live.1, n_ops + 1);
        outputs += 1;
    }
    assert!(outputs >= 1);
    let _ = (m.input(0), m.output(0), m.input(usize::MAX));
    for (k, _) in m.meta_entries() {
        assert!(m.meta(k).is_some());
    }
}
