//! Bad input gets typed errors that say what and where.

use edgetune_cli::import::{import, LowerOptions, UnsupportedOps};
use edgetune_cli::model_file::AlignedBytes;
use edgetune_core::{FormatError, Model};
use edgetune_tests::{digits, import_model};
use prost::Message;
use tract_onnx::pb;
use tract_onnx::prelude::*;

/// The digits CNN with two extra outputs through ops edgetune does not lower (ArgMax, Sign).
fn cnn_with_unsupported_ops(dir: &std::path::Path) -> std::path::PathBuf {
    let bytes = std::fs::read(digits("cnn.onnx")).unwrap();
    let mut proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .unwrap();
    let graph = proto.graph.as_mut().unwrap();
    let logits = graph.output[0].name.clone();
    let attr = pb::AttributeProto {
        name: "axis".into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: 1,
        ..Default::default()
    };
    graph.node.push(pb::NodeProto {
        input: vec![logits.clone()],
        output: vec!["label".into()],
        name: "pick_label".into(),
        op_type: "ArgMax".into(),
        attribute: vec![attr],
        ..Default::default()
    });
    graph.node.push(pb::NodeProto {
        input: vec![logits],
        output: vec!["signs".into()],
        name: "logit_signs".into(),
        op_type: "Sign".into(),
        ..Default::default()
    });
    for name in ["label", "signs"] {
        graph.output.push(pb::ValueInfoProto {
            name: name.into(),
            ..Default::default()
        });
    }
    let path = dir.join("cnn_unsupported.onnx");
    std::fs::write(&path, proto.encode_to_vec()).unwrap();
    path
}

#[test]
fn unsupported_ops_are_listed_together() {
    let dir = std::env::temp_dir().join(format!("edgetune-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = cnn_with_unsupported_ops(&dir);
    // tract itself runs the model: the failure is ours to report.
    assert!(edgetune_cli::runner::Reference::load(
        &path,
        &[edgetune_cli::runner::InputInfo {
            name: "x".into(),
            dtype: edgetune_core::DType::F32,
            shape: vec![1, 1, 8, 8],
        }]
    )
    .is_ok());
    let err = import(
        &path,
        &["x=1x1x8x8".parse().unwrap()],
        LowerOptions::default(),
    )
    .unwrap_err();
    let list = err
        .downcast_ref::<UnsupportedOps>()
        .expect("an UnsupportedOps error");
    let names: Vec<&str> = list.0.iter().map(|u| u.node.as_str()).collect();
    assert!(
        names.contains(&"pick_label") && names.contains(&"logit_signs"),
        "{names:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("pick_label") && text.contains("logit_signs"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn symbolic_input_needs_a_shape() {
    let err = import(&digits("cnn.onnx"), &[], LowerOptions::default()).unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("--input x="), "{text}");
}

#[test]
fn truncated_and_corrupt_files_give_typed_errors() {
    let (ours, _) = import_model(&digits("cnn.onnx"), &["x=1x1x8x8"]).unwrap();
    let bytes = ours.bytes().to_vec();
    for cut in [0, 10, 63, 64, 200, bytes.len() / 2, bytes.len() - 1] {
        let b = AlignedBytes::from(&bytes[..cut]);
        match Model::from_bytes(b.as_bytes()) {
            Err(FormatError::Truncated { .. }) => {}
            other => panic!("cut at {cut}: expected Truncated, got {:?}", other.err()),
        }
    }
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x10;
    let b = AlignedBytes::from(&flipped[..]);
    assert!(matches!(
        Model::from_bytes(b.as_bytes()),
        Err(FormatError::Checksum { .. })
    ));
}

#[test]
fn wrong_input_length_is_an_error() {
    let (mut ours, _) = import_model(&digits("cnn.onnx"), &["x=1x1x8x8"]).unwrap();
    let bad = edgetune_cli::npy::Array {
        shape: vec![1, 1, 8, 7],
        data: edgetune_cli::npy::ArrayData::F32(vec![0.0; 56]),
    };
    let err = ours.run(&[bad]).unwrap_err();
    assert!(format!("{err}").contains("64 elements"), "{err}");
}
