//! Audit reports and heatmaps.

mod common;
use common::*;
use factpatch::audit;
use factpatch::checkpoint::{Checkpoint, Dtype};
use factpatch::patch::{Delta, Edit};
use std::path::Path;

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

/// RECT's sparsity shows in the heatmap: on a 300 × 1200 matrix, drawn as 400 × 100 pixels that
/// each sample one element of a 3 × 3 block, the RECT-40 panel is about 60% 'unchanged' pixels
/// (max-pooling left next to none) and the dense one has none. Same inputs, same bytes.
#[test]
fn heatmap_shows_rect_sparsity() {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base");
    write_model(&base, &[(DOWN0, Dtype::F32, vec![300, 1200], values(360_000, 7, 0.1))], 1);
    let ckpt = Checkpoint::open(&base).unwrap();
    let f = factors(300, 1200, 1, 3, 0.01);
    let patch = |name: &str, rect_k: Option<f64>, d: Delta| {
        let mut m = manifest("memit");
        m.rect_k = rect_k;
        write_patch(&t.path().join(name), &ckpt, &[], m, vec![(DOWN0, d)])
    };
    let dense = patch("dense", None, Delta::LowRank(vec![f.clone()]));
    let rect = patch("rect", Some(40.0), Delta::LowRankRect { factors: f, k: 40.0, eps: 1e-6 });
    // (width, height, pixels in the 'unchanged' colour, PNG bytes)
    let draw = |p: &Path, png: &str| {
        let png = t.path().join(png);
        assert_eq!(audit::heatmap(p, &base, &png).unwrap(), [DOWN0]);
        let bytes = std::fs::read(&png).unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(&bytes)).read_info().unwrap();
        let mut rgb = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut rgb).unwrap();
        let grey = factpatch::plot::UNCHANGED;
        let unchanged = rgb.chunks(3).filter(|c| *c == [grey.0, grey.1, grey.2]).count();
        (info.width, info.height, unchanged, bytes)
    };
    let (d, r) = (draw(&dense, "dense.png"), draw(&rect, "rect.png"));
    assert_eq!((d.0, d.1), (r.0, r.1));
    assert!(d.0 > 400 && d.1 > 100, "{} × {}", d.0, d.1);
    // The colour bar's swatch is in both; the difference is the panel's unchanged share.
    let share = (r.2 - d.2) as f64 / (400 * 100) as f64;
    assert!((0.5..0.7).contains(&share), "{share}");
    assert!(d.2 < 2000, "{}", d.2);
    assert_eq!(draw(&rect, "again.png").3, r.3, "same inputs, same bytes");
}
