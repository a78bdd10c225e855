//! Used by `fixtures/check_patched_loads.py` (ignored otherwise): applies a low-rank patch and a
//! RECT patch to the model at `$FACTPATCH_HF_BASE`, writing `$FACTPATCH_HF_OUT`.

use factpatch::apply;
use factpatch::checkpoint::Checkpoint;
use factpatch::patch::{self, BaseTensor, Delta, Factors, Manifest, Method, ModelInfo};
use std::path::PathBuf;

#[test]
#[ignore = "run by fixtures/check_patched_loads.py"]
fn apply_for_transformers() {
    let (Ok(base), Ok(out)) = (std::env::var("FACTPATCH_HF_BASE"), std::env::var("FACTPATCH_HF_OUT")) else {
        panic!("set FACTPATCH_HF_BASE and FACTPATCH_HF_OUT");
    };
    let base = PathBuf::from(base);
    let ckpt = Checkpoint::open(&base).unwrap();
    let m = || Manifest::new(ModelInfo { name: "tiny".into(), family: "llama".into() }, Method { name: "rome".into(), hyperparameters: Default::default() });
    let mut deltas = Vec::new();
    for (l, rect) in [(0, false), (1, true)] {
        let t = ckpt.tensor(&format!("model.layers.{l}.mlp.down_proj.weight")).unwrap();
        let (r, c) = (t.shape[0], t.shape[1]);
        let f = Factors { rank: 1, u: (0..r).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect(), v: (0..c).map(|j| ((j % 5) as f32 - 2.0) * 0.5).collect() };
        let d = if rect { Delta::LowRankRect { factors: f, k: 10.0, eps: 1e-6 } } else { Delta::LowRank(vec![f]) };
        deltas.push((BaseTensor::of(&t), d));
    }
    let p = PathBuf::from(&out).with_extension("fp");
    std::fs::write(&p, patch::encode(m(), deltas).unwrap().bytes).unwrap();
    let s = apply::apply(&base, &[p], &PathBuf::from(out)).unwrap();
    println!("applied; output identity {}", s.identity);
}
