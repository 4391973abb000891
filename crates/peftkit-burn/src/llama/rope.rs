//! transformers' default rotary embedding with `rotate_half` (the two halves of a head
//! rotate together), not burn-nn's interleaved `RotaryEncoding`: with the HF layout the q/k
//! weights need no permutation, so LoRA factors on q/k mean what they mean in peft.

use burn::tensor::{DType, Device, Tensor, TensorData};

/// The inverse frequencies of a head: `1 / θ^(2i/d)`, in f32 as transformers computes them.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    head_dim: usize,
    inv_freq: Vec<f32>,
}

/// The cos/sin tables of one sequence length, `[1, 1, seq, head_dim]`.
pub(crate) struct RopeTables {
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl Rope {
    pub(crate) fn new(head_dim: usize, theta: f64) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Rope { head_dim, inv_freq }
    }

    /// The tables for positions `0..t`: `emb = cat(freqs, freqs)`, then `cos`/`sin`, computed
    /// in f32 and cast to the model's dtype as transformers does.
    pub(crate) fn at(&self, t: usize, device: &Device, dtype: DType) -> RopeTables {
        let (mut cos, mut sin) = (Vec::with_capacity(t * self.head_dim), Vec::new());
        for pos in 0..t {
            // The two halves of a head share their frequencies.
            for _ in 0..2 {
                for f in &self.inv_freq {
                    let angle = pos as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let table = |v: Vec<f32>| {
            Tensor::<2>::from_data(TensorData::new(v, [t, self.head_dim]), device)
                .cast(dtype)
                .unsqueeze::<4>()
        };
        RopeTables {
            cos: table(cos),
            sin: table(sin),
        }
    }
}

impl RopeTables {
    /// `x·cos + rotate_half(x)·sin` on `[batch, heads, seq, head_dim]`.
    pub(crate) fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, h, t, d] = x.dims();
        let first = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
        let second = x.clone().slice([0..b, 0..h, 0..t, d / 2..d]);
        let rotated = Tensor::cat(vec![second.neg(), first], 3);
        x * self.cos.clone() + rotated * self.sin.clone()
    }
}
