//! Zeroth-order training allocates nothing: every buffer (arena, adapter values, workspace) is
//! the caller's, sized before the first step. A counting global allocator checks it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use edgetune_cli::commands::finetune::build_entries;
use edgetune_cli::import::{import, LowerOptions};
use edgetune_cli::model_file::AlignedBytes;
use edgetune_cli::npy;
use edgetune_cli::pack::pack;
use edgetune_core::Model;
use edgetune_runtime::adapter::Adapter;
use edgetune_runtime::kernels::Kernels;
use edgetune_runtime::train::{cross_entropy, zo_step, ZoConfig};
use edgetune_runtime::Session;
use edgetune_tests::digits;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn training_steps_do_not_allocate() {
    let g = import(
        &digits("cnn.onnx"),
        &["x=16x1x8x8".parse().unwrap()],
        LowerOptions::default(),
    )
    .unwrap();
    let (bytes, _) = pack(&g).unwrap();
    let ab = AlignedBytes::from(&bytes[..]);
    let model = Model::from_bytes(ab.as_bytes()).unwrap();
    let (entries, init) = build_entries(&model, "bias,lora:r=4", "*", 0).unwrap();
    let mut values = init.clone();
    let mut work = vec![0f32; 16 * 4 * 64];
    let mut adapter = Adapter::from_parts(&model, &entries, &mut values, &mut work).unwrap();
    let mut arena = AlignedBytes::zeroed(model.arena_bytes() as usize);
    let mut session = Session::with_kernels(&model, arena.as_bytes_mut(), Kernels::best()).unwrap();
    let x = npy::read(&digits("x_train.npy")).unwrap().to_f32();
    let y: Vec<usize> = npy::read(&digits("y_train.npy"))
        .unwrap()
        .to_i64()
        .iter()
        .map(|&v| v as usize)
        .collect();
    session.set_input(0, &x[..16 * 64]).unwrap();
    let cfg = ZoConfig::default();
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    // The counter sees allocations (the set-up above made many), so zero below means zero.
    assert!(before > 100, "counting allocator not in use");
    let mut last = 0.0;
    for step in 0..20 {
        let rec = zo_step(&mut adapter, &cfg, step, &|_| false, |ad| {
            session.run_with(Some(ad)).unwrap();
            cross_entropy(
                session.output::<f32>(0).unwrap(),
                10,
                y[..16].iter().copied(),
            )
        });
        last = rec.loss;
    }
    let during = ALLOCATIONS.load(Ordering::SeqCst) - before;
    assert!(last.is_finite());
    assert_eq!(during, 0, "{during} heap allocations in 20 training steps");
}
