//! The Llama-family decoder in burn. Every field is named as transformers names the module,
//! so a parameter's burn path (`model.layers.0.self_attn.q_proj.weight`) is its Hugging Face
//! key: loading and saving map names one to one, and peft's targeting rules see the names
//! peft sees.

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};

use super::config::LlamaConfig;
use super::rope::{Rope, RopeTables};

/// transformers' `LlamaRMSNorm`: normalised in f32, cast back, then scaled by `weight`.
/// Named so that burn-store's PyTorch adapters (which rename an `RmsNorm`'s `weight` to
/// `gamma`) leave it alone: its field already has the Hugging Face name.
#[derive(Module, Debug)]
pub struct LlamaRmsNorm {
    /// The scale, `[hidden]`.
    pub weight: Param<Tensor<1>>,
    #[module(skip)]
    eps: f64,
}

impl LlamaRmsNorm {
    fn new(size: usize, eps: f64, device: &Device) -> Self {
        LlamaRmsNorm {
            weight: Param::from_tensor(Tensor::ones([size], device)),
            eps,
        }
    }

    /// `weight * (x · rsqrt(mean(x²) + eps))`, the statistics in f32 as transformers computes
    /// them whatever the model's dtype.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let dtype = x.dtype();
        let x32 = x.cast(DType::F32);
        let variance = x32.clone().powi_scalar(2).mean_dim(2);
        let normed = (x32 * variance.add_scalar(self.eps).sqrt().recip()).cast(dtype);
        normed * self.weight.val().unsqueeze::<3>()
    }
}

/// transformers' eager attention: RoPE on q and k, grouped-query heads, causal softmax.
#[derive(Module, Debug)]
pub struct LlamaAttention {
    /// `[hidden, heads·head_dim]` (burn stores linear weights as `[in, out]`).
    pub q_proj: Linear,
    /// `[hidden, kv_heads·head_dim]`.
    pub k_proj: Linear,
    /// `[hidden, kv_heads·head_dim]`.
    pub v_proj: Linear,
    /// `[heads·head_dim, hidden]`.
    pub o_proj: Linear,
    #[module(skip)]
    heads: usize,
    #[module(skip)]
    kv_heads: usize,
    #[module(skip)]
    head_dim: usize,
    #[module(skip)]
    sliding_window: Option<usize>,
}

fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out).with_bias(bias).init(device)
}

impl LlamaAttention {
    fn new(c: &LlamaConfig, device: &Device) -> Self {
        let (q, kv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        LlamaAttention {
            q_proj: linear(c.hidden_size, q, c.attention_bias, device),
            k_proj: linear(c.hidden_size, kv, c.attention_bias, device),
            v_proj: linear(c.hidden_size, kv, c.attention_bias, device),
            o_proj: linear(q, c.hidden_size, c.o_proj_bias, device),
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            sliding_window: c.sliding_window,
        }
    }

    /// `[batch, seq, hidden]` → `[batch, heads, seq, head_dim]`.
    fn split_heads(&self, x: Tensor<3>, heads: usize) -> Tensor<4> {
        let [b, t, _] = x.dims();
        x.reshape([b, t, heads, self.head_dim]).swap_dims(1, 2)
    }

    /// transformers' `repeat_kv`: each key/value head serves `heads / kv_heads` query heads.
    fn repeat_kv(&self, x: Tensor<4>) -> Tensor<4> {
        let groups = self.heads / self.kv_heads;
        if groups == 1 {
            return x;
        }
        let [b, h, t, d] = x.dims();
        x.unsqueeze_dim::<5>(2)
            .repeat_dim(2, groups)
            .reshape([b, h * groups, t, d])
    }

    /// The attention block on `[batch, seq, hidden]`.
    pub(crate) fn forward(&self, x: Tensor<3>, rope: &RopeTables) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let q = rope.apply(self.split_heads(self.q_proj.forward(x.clone()), self.heads));
        let k = rope.apply(self.split_heads(self.k_proj.forward(x.clone()), self.kv_heads));
        let v = self.split_heads(self.v_proj.forward(x), self.kv_heads);
        let (k, v) = (self.repeat_kv(k), self.repeat_kv(v));
        let dtype = q.dtype();
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar((self.head_dim as f64).powf(-0.5));
        let mask = causal_mask(t, self.sliding_window, &scores.device());
        let scores = scores.cast(DType::F32).mask_fill(mask, f32::MIN);
        // Softmax in f32, as transformers' eager attention does.
        let probs = softmax(scores, 3).cast(dtype);
        let out = probs
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([b, t, self.heads * self.head_dim]);
        self.o_proj.forward(out)
    }
}

/// `true` where a query may not see a key: later positions, and (with a sliding window)
/// keys `window` or more positions back, as transformers' mask functions decide.
fn causal_mask(t: usize, window: Option<usize>, device: &Device) -> Tensor<4, Bool> {
    let mut hidden = Vec::with_capacity(t * t);
    for q in 0..t {
        for k in 0..t {
            hidden.push(k > q || window.is_some_and(|w| q - k.min(q) >= w));
        }
    }
    Tensor::<2, Bool>::from_data(TensorData::new(hidden, [t, t]), device).unsqueeze::<4>()
}

/// `down(silu(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct LlamaMlp {
    /// `[hidden, intermediate]`.
    pub gate_proj: Linear,
    /// `[hidden, intermediate]`.
    pub up_proj: Linear,
    /// `[intermediate, hidden]`.
    pub down_proj: Linear,
}

impl LlamaMlp {
    fn new(c: &LlamaConfig, device: &Device) -> Self {
        LlamaMlp {
            gate_proj: linear(c.hidden_size, c.intermediate_size, c.mlp_bias, device),
            up_proj: linear(c.hidden_size, c.intermediate_size, c.mlp_bias, device),
            down_proj: linear(c.intermediate_size, c.hidden_size, c.mlp_bias, device),
        }
    }

    /// The MLP on `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}

/// One pre-norm decoder layer. Fields in transformers' registration order, so that a saved
/// state dict lists them as `model.state_dict()` does.
#[derive(Module, Debug)]
pub struct LlamaDecoderLayer {
    /// The attention block.
    pub self_attn: LlamaAttention,
    /// The MLP.
    pub mlp: LlamaMlp,
    /// The norm before attention.
    pub input_layernorm: LlamaRmsNorm,
    /// The norm before the MLP.
    pub post_attention_layernorm: LlamaRmsNorm,
}

impl LlamaDecoderLayer {
    fn forward(&self, x: Tensor<3>, rope: &RopeTables) -> Tensor<3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rope);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// transformers' `LlamaModel`: the embedding, the layers and the final norm.
#[derive(Module, Debug)]
pub struct LlamaModel {
    /// `[vocab, hidden]`.
    pub embed_tokens: Embedding,
    /// The decoder layers (`model.layers.{i}`).
    pub layers: Vec<LlamaDecoderLayer>,
    /// The final norm.
    pub norm: LlamaRmsNorm,
    #[module(skip)]
    rope: Rope,
}

/// A Llama, Mistral or Qwen2 causal LM whose parameter paths are the Hugging Face keys.
///
/// ```
/// use burn::tensor::{Device, Int, Tensor};
/// use peftkit_burn::{LlamaConfig, LlamaForCausalLM};
/// use peftkit_checkpoint::ModelConfig;
///
/// let hf = ModelConfig::from_json(r#"{"model_type": "llama", "vocab_size": 32,
///     "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
///     "num_attention_heads": 2, "tie_word_embeddings": false}"#).unwrap();
/// let device = Device::flex();
/// let model = LlamaForCausalLM::new(&LlamaConfig::from_hf(&hf).unwrap(), &device);
/// let logits = model.forward(Tensor::<2, Int>::from_data([[1, 2, 3]], &device));
/// assert_eq!(logits.dims(), [1, 3, 32]);
/// ```
#[derive(Module, Debug)]
pub struct LlamaForCausalLM {
    /// The decoder.
    pub model: LlamaModel,
    /// The output head, `None` when it is tied to `model.embed_tokens`.
    pub lm_head: Option<Linear>,
}

impl LlamaForCausalLM {
    /// A model of this shape, its weights to be loaded (see [`crate::load_hf`]); burn
    /// initialises parameters lazily, so nothing is computed for the placeholder values a
    /// load replaces.
    pub fn new(c: &LlamaConfig, device: &Device) -> Self {
        let model = LlamaModel {
            embed_tokens: EmbeddingConfig::new(c.vocab_size, c.hidden_size).init(device),
            layers: (0..c.num_hidden_layers)
                .map(|_| LlamaDecoderLayer {
                    self_attn: LlamaAttention::new(c, device),
                    mlp: LlamaMlp::new(c, device),
                    input_layernorm: LlamaRmsNorm::new(c.hidden_size, c.rms_norm_eps, device),
                    post_attention_layernorm: LlamaRmsNorm::new(
                        c.hidden_size,
                        c.rms_norm_eps,
                        device,
                    ),
                })
                .collect(),
            norm: LlamaRmsNorm::new(c.hidden_size, c.rms_norm_eps, device),
            rope: Rope::new(c.head_dim, c.rope_theta),
        };
        let lm_head =
            (!c.tie_word_embeddings).then(|| linear(c.hidden_size, c.vocab_size, false, device));
        LlamaForCausalLM { model, lm_head }
    }

    /// The logits `[batch, seq, vocab]` of token ids `[batch, seq]` (positions from 0).
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        let [_, t] = input_ids.dims();
        let mut h = self.model.embed_tokens.forward(input_ids);
        let rope = self.model.rope.at(t, &h.device(), h.dtype());
        for layer in &self.model.layers {
            h = layer.forward(h, &rope);
        }
        let h = self.model.norm.forward(h);
        match &self.lm_head {
            Some(head) => head.forward(h),
            // A tied head is the embedding matrix, `[vocab, hidden]`, used as `[in, out]`ᵀ.
            None => burn::tensor::module::linear(
                h,
                self.model.embed_tokens.weight.val().transpose(),
                None,
            ),
        }
    }
}
