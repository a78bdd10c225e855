//! Audit reports and heatmaps.

mod common;
use common::*;
use factpatch::audit;
use factpatch::patch::{Delta, Edit};

const DOWN0: &str = "model.layers.0.mlp.down_proj.weight";
const UP0: &str = "model.layers.0.mlp.up_proj.weight";

#[test]
fn report_with_and_without_model() {
    let (t, base, ckpt) = tiny_model();
    let mut m = manifest("rome");
    m.edits.push(Edit {
        subject: "France".into(),
        relation: "capital".into(),
        prompt: "The capital of France is".into(),
        target_old: "Paris".into(),
        target_new: "Lyon".into(),
    });
    m.rect_k = Some(10.0);
    let p = write_patch(
        &t.path().join("p"),
        &ckpt,
        &[],
        m,
        vec![
            (DOWN0, Delta::LowRankRect { factors: factors(16, 24, 1, 3, 1e-4), k: 10.0, eps: 1e-6 }),
            (UP0, Delta::LowRank(vec![factors(24, 16, 1, 4, 0.01)])),
        ],
    );
    let r = audit::report(&p, None).unwrap();
    assert_eq!(r.tensors.len(), 2);
    assert_eq!(r.tensors[0].nonzeros, None); // RECT needs the model
    assert!(r.tensors[1].nonzeros.unwrap() > 0);
    assert_eq!(r.bytes_by_encoding.len(), 2);
    let r = audit::report(&p, Some(&base)).unwrap();
    let down = &r.tensors[0];
    assert_eq!(down.nonzeros, Some(factpatch::rect::keep_count(10.0, 384) as u64));
    let a = down.against_base.as_ref().unwrap();
    // BF16 drops most changes this small: fewer elements change than the delta touches.
    assert!(a.changed_after_rounding < down.nonzeros.unwrap(), "{a:?}");
    assert_eq!(a.relative_histogram.iter().sum::<u64>(), down.nonzeros.unwrap());
    let text = r.to_string();
    assert!(text.contains("France") && text.contains(DOWN0) && text.contains("changed after rounding"), "{text}");
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["tensors"][0]["encoding"], "low_rank_rect");
    let png = t.path().join("h.png");
    let names = audit::heatmap(&p, &base, &png).unwrap();
    assert_eq!(names, [DOWN0, UP0]);
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    assert!(audit::heatmap(&p, &base, &png).is_err()); // exists
}
