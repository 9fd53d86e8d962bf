//! Real models end to end: ONNX → `.etm` → our runtime, against tract on the same ONNX file, and
//! against the training framework's saved outputs and accuracy.

use edgetune_cli::commands::eval::evaluate;
use edgetune_cli::metrics;
use edgetune_cli::npy;
use edgetune_cli::runner::Reference;
use edgetune_runtime::kernels::Kernels;
use edgetune_tests::{cached, digits, import_model, shared};

/// Top-1 accuracy of the torch logits saved with the fixture: the figure to reproduce.
fn torch_accuracy(logits: &str) -> f64 {
    let l = npy::read(&digits(logits)).unwrap();
    let y = npy::read(&digits("y_test.npy")).unwrap().to_i64();
    metrics::accuracy(&l.to_f32(), 10, &y)
}

fn digits_model(onnx: &str, logits: &str, batch: usize, reference_kernels: bool) {
    let path = digits(onnx);
    let (mut ours, _) = import_model(&path, &[&format!("x={batch}x1x8x8")]).unwrap();
    if reference_kernels {
        ours.kernels = Kernels::reference();
    }
    let reference = Reference::load(&path, &ours.inputs()).unwrap();
    let x = npy::read(&digits("x_test.npy")).unwrap();
    let y = npy::read(&digits("y_test.npy")).unwrap().to_i64();
    let expected = npy::read(&digits(logits)).unwrap();
    let r = evaluate(&mut ours, Some(&reference), &[x], Some(&y), Some(&expected)).unwrap();
    assert_eq!(r.samples, 450);
    assert!(
        r.vs_reference[0].max_abs <= 1e-4,
        "{onnx}: max abs vs tract {}",
        r.vs_reference[0].max_abs
    );
    assert!(
        r.vs_expected.as_ref().unwrap().max_abs <= 1e-4,
        "{onnx}: max abs vs torch {:?}",
        r.vs_expected
    );
    let want = torch_accuracy(logits);
    assert_eq!(
        r.accuracy.unwrap(),
        want,
        "{onnx}: accuracy differs from torch's"
    );
}

#[test]
fn digits_cnn_matches_tract_and_torch() {
    // 99.56% in the fixture's README; computed here from torch's logits.
    assert!((torch_accuracy("cnn_logits_torch.npy") - 0.9956).abs() < 1e-4);
    digits_model("cnn.onnx", "cnn_logits_torch.npy", 1, false);
    digits_model("cnn.onnx", "cnn_logits_torch.npy", 64, false);
}

#[test]
fn digits_cnn_reference_kernels() {
    digits_model("cnn.onnx", "cnn_logits_torch.npy", 16, true);
}

#[test]
fn digits_mlp_matches_tract_and_torch() {
    assert!((torch_accuracy("mlp_logits_torch.npy") - 0.9733).abs() < 1e-4);
    digits_model("mlp.onnx", "mlp_logits_torch.npy", 1, false);
    digits_model("mlp.onnx", "mlp_logits_torch.npy", 50, false);
}

fn minilm(seq: usize, batch: usize) {
    let path = shared("minilm-l6/model.onnx");
    let dims = format!("{batch}x{seq}");
    let (mut ours, _) = import_model(
        &path,
        &[
            &format!("input_ids={dims}"),
            &format!("attention_mask={dims}"),
            &format!("token_type_ids={dims}"),
        ],
    )
    .unwrap();
    let names = ["input_ids", "attention_mask", "token_type_ids"];
    let data: Vec<_> = ours
        .inputs()
        .iter()
        .map(|i| {
            assert!(names.contains(&i.name.as_str()));
            npy::read(&shared(&format!("minilm-l6/seq{seq}_{}.npy", i.name))).unwrap()
        })
        .collect();
    let expected = npy::read(&shared(&format!("minilm-l6/seq{seq}_embeddings_torch.npy"))).unwrap();
    let reference = Reference::load(&path, &ours.inputs()).unwrap();
    let r = evaluate(&mut ours, Some(&reference), &data, None, Some(&expected)).unwrap();
    assert_eq!(r.samples, 32);
    assert!(
        r.vs_reference[0].max_abs <= 1e-4,
        "max abs vs tract {}",
        r.vs_reference[0].max_abs
    );
    let e = r.vs_expected.unwrap();
    assert!(e.cosine_min >= 0.9999, "cosine to torch {}", e.cosine_min);
}

#[test]
fn minilm_seq128_batch32_matches_tract_and_torch() {
    minilm(128, 32);
}

#[test]
fn minilm_seq16_batch1() {
    minilm(16, 1);
}

#[test]
fn ppocr_mobile_classifier_matches_tract() {
    let path = cached("ppocr_cls.onnx").unwrap();
    let (mut ours, _) = import_model(&path, &["x=1x3x48x192"]).unwrap();
    let reference = Reference::load(&path, &ours.inputs()).unwrap();
    // Four deterministic pseudo-random images (the classifier takes normalised RGB in [-1, 1]).
    let mut s = 12345u32;
    let mut img = Vec::new();
    for _ in 0..4 * 3 * 48 * 192 {
        s = s.wrapping_mul(1664525).wrapping_add(1013904223);
        img.push((s >> 8) as f32 / (1 << 23) as f32 - 1.0);
    }
    let x = npy::Array {
        shape: vec![4, 3, 48, 192],
        data: npy::ArrayData::F32(img),
    };
    let r = evaluate(&mut ours, Some(&reference), &[x], None, None).unwrap();
    assert!(
        r.vs_reference[0].max_abs <= 1e-4,
        "max abs vs tract {}",
        r.vs_reference[0].max_abs
    );
}
