//! Adam without weight decay on host vectors: candle-nn's `AdamW` arithmetic at weight decay 0,
//! step for step, with its whole state in plain vectors so that rows can leave a batch (target
//! optimisation) and training can be checkpointed and resumed bit for bit (MEND).

/// Parameters `theta` with their moment estimates and one step count.
#[derive(Clone, Debug, PartialEq)]
pub struct Adam {
    pub theta: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub lr: f64,
    /// Steps counted so far (the bias corrections follow it).
    pub t: i32,
}

impl Adam {
    const BETA1: f64 = 0.9;
    const BETA2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    /// `len` parameters starting at zero.
    pub fn new(len: usize, lr: f64) -> Self {
        Adam::from_values(vec![0.0; len], lr)
    }

    /// Parameters starting at `theta`.
    pub fn from_values(theta: Vec<f32>, lr: f64) -> Self {
        let len = theta.len();
        Adam { theta, m: vec![0.0; len], v: vec![0.0; len], lr, t: 0 }
    }

    /// Counts one step of the whole batch (the bias corrections follow it).
    pub fn tick(&mut self) {
        self.t += 1;
    }

    /// Updates the elements `range` with their gradient `g`.
    pub fn step(&mut self, range: std::ops::Range<usize>, g: &[f32]) {
        let (b1, b2) = (Self::BETA1 as f32, Self::BETA2 as f32);
        let scale_m = (1.0 / (1.0 - Self::BETA1.powi(self.t))) as f32;
        let scale_v = (1.0 / (1.0 - Self::BETA2.powi(self.t))) as f32;
        let (lr, eps) = (self.lr as f32, Self::EPS as f32);
        for (i, &g) in range.zip(g) {
            self.m[i] = self.m[i] * b1 + g * (1.0 - Self::BETA1) as f32;
            self.v[i] = self.v[i] * b2 + g * g * (1.0 - Self::BETA2) as f32;
            let step = (self.m[i] * scale_m) / ((self.v[i] * scale_v).sqrt() + eps);
            self.theta[i] -= step * lr;
        }
    }
}
