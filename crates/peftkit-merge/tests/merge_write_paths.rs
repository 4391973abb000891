//! Both ways a LoRA or DoRA merge writes a merged weight (docs/architecture.md, "Output IO"):
//! synced, through the page cache or around it (the weight merged whole in a buffer and its
//! aligned middle written directly); unsynced, streamed block by block through the page cache.
//! Both must give the weight merged in memory ([`merge_linear`], [`merge_dora_linear`],
//! [`merge_embedding`]), for a weight of several blocks that starts at an offset not aligned to
//! the disk's blocks (so that the direct write has unaligned edges).

use std::path::Path;

use peftkit_checkpoint::{
    save_pretrained, Checkpoint, Dtype, SaveOptions, StateDict, Tensor, WeightsKind,
};
use peftkit_merge::{
    encode_f32, merge, merge_dora_embedding, merge_dora_linear, merge_embedding, merge_linear,
    AdapterInput, BaseTensorMut, F32Tensor, MergeJob, MergeOptions,
};

/// What the adapter adapts.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Layer {
    Linear,
    Dora,
    /// A `ROWS`-token embedding of width `COLS`.
    Embedding,
    /// The same with DoRA: its norm runs over columns.
    DoraEmbedding,
}

impl Layer {
    fn module(self) -> &'static str {
        match self {
            Layer::Embedding | Layer::DoraEmbedding => "model.embed_tokens",
            _ => "model.layers.0.self_attn.q_proj",
        }
    }

    fn dora(self) -> bool {
        matches!(self, Layer::Dora | Layer::DoraEmbedding)
    }
}
/// 4 KiB rows of BF16: 3 blocks of 512 rows and a short one.
const ROWS: usize = 1544;
const COLS: usize = 2048;
const RANK: usize = 8;
const ALPHA: u32 = 16;

fn values(n: usize, k: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * k) % 251) as f32 / 251.0 - 0.5)
        .collect()
}

fn f32_tensor(shape: Vec<usize>, vals: &[f32]) -> Tensor {
    let bytes = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::from_bytes(Dtype::F32, shape, bytes).unwrap()
}

fn save(dir: &Path, sd: &StateDict, kind: WeightsKind) {
    let opts = SaveOptions {
        kind,
        durable: false,
        ..Default::default()
    };
    save_pretrained(dir, sd, &opts).unwrap();
}

/// The adapter config peft writes for `lora_basic`, targeting `layer` with this rank.
fn adapter_config(layer: Layer) -> String {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/peft/lora_basic/adapter/adapter_config.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
    v["r"] = RANK.into();
    v["lora_alpha"] = ALPHA.into();
    let target = layer.module().rsplit('.').next().unwrap();
    v["target_modules"] = serde_json::json!([target]);
    v["use_dora"] = layer.dora().into();
    v.to_string()
}

fn weight(dir: &Path, layer: Layer) -> Vec<u8> {
    let ckpt = Checkpoint::open(dir).unwrap();
    let t = ckpt.get(&format!("{}.weight", layer.module())).unwrap();
    t.bytes().unwrap().into_owned()
}

#[test]
fn a_merged_weight_synced_or_not_is_the_weight_merged_in_memory() {
    merged_both_ways(Layer::Linear, MergeOptions::default());
}

/// `--safe-merge` rounds `Δ` to the base dtype before the add, streamed as in memory.
#[test]
fn a_safe_merged_weight_synced_or_not_is_the_weight_merged_in_memory() {
    merged_both_ways(
        Layer::Linear,
        MergeOptions {
            safe_merge: true,
            ..MergeOptions::default()
        },
    );
}

/// DoRA's norm is taken per row, so its merge streams by bands of rows too.
#[test]
fn a_dora_merged_weight_synced_or_not_is_the_weight_merged_in_memory() {
    merged_both_ways(Layer::Dora, MergeOptions::default());
}

/// An embedding's `Δ` is rounded to the base dtype before the add, streamed as in memory.
#[test]
fn a_merged_embedding_synced_or_not_is_the_embedding_merged_in_memory() {
    merged_both_ways(Layer::Embedding, MergeOptions::default());
}

/// A DoRA embedding takes its norm over columns: it streams in two passes.
#[test]
fn a_dora_merged_embedding_synced_or_not_is_the_embedding_merged_in_memory() {
    merged_both_ways(Layer::DoraEmbedding, MergeOptions::default());
}

/// An unmerge subtracts `Δ` rounded first, streamed as in memory.
#[test]
fn an_unmerged_weight_synced_or_not_is_the_weight_unmerged_in_memory() {
    let unmerge = MergeOptions {
        unmerge: true,
        ..MergeOptions::default()
    };
    merged_both_ways(Layer::Linear, unmerge);
    merged_both_ways(Layer::Embedding, unmerge);
}

fn merged_both_ways(layer: Layer, opts: MergeOptions) {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = (tmp.path().join("base"), tmp.path().join("adapter"));
    let w = encode_f32("w", Dtype::BF16, &values(ROWS * COLS, 7)).unwrap();
    let mut sd = StateDict::new();
    let module = layer.module();
    sd.insert(
        format!("{module}.weight"),
        Tensor::from_bytes(Dtype::BF16, vec![ROWS, COLS], w.clone()).unwrap(),
    );
    // Written before the weight (F32 sorts first): the weight starts 12 bytes further on.
    sd.insert("a.bias".into(), f32_tensor(vec![3], &[1.0, 2.0, 3.0]));
    save(&base, &sd, WeightsKind::Model);
    let (a, b) = (values(RANK * COLS, 13), values(ROWS * RANK, 29));
    let m: Vec<f32> = values(ROWS, 3).iter().map(|v| v + 20.0).collect();
    let m_cols: Vec<f32> = values(COLS, 3).iter().map(|v| v + 40.0).collect();
    let mut ad = StateDict::new();
    let key = |m: &str| format!("base_model.model.{module}.{m}");
    if layer.module() == "model.embed_tokens" {
        // lora_embedding_A is (r, num_embeddings), lora_embedding_B (dim, r).
        ad.insert(key("lora_embedding_A"), f32_tensor(vec![RANK, ROWS], &b));
        ad.insert(key("lora_embedding_B"), f32_tensor(vec![COLS, RANK], &a));
    } else {
        ad.insert(key("lora_A.weight"), f32_tensor(vec![RANK, COLS], &a));
        ad.insert(key("lora_B.weight"), f32_tensor(vec![ROWS, RANK], &b));
    }
    match layer {
        Layer::Dora => ad.insert(key("lora_magnitude_vector"), f32_tensor(vec![ROWS], &m)),
        Layer::DoraEmbedding => ad.insert(
            key("lora_magnitude_vector"),
            f32_tensor(vec![COLS], &m_cols),
        ),
        _ => None,
    };
    save(&adapter, &ad, WeightsKind::Adapter);
    std::fs::write(adapter.join("adapter_config.json"), adapter_config(layer)).unwrap();

    let mut want = w.clone();
    let into = BaseTensorMut::new(Dtype::BF16, &[ROWS, COLS], &mut want);
    let scale = ALPHA as f32 / RANK as f32;
    let (a_lin, b_lin) = (
        F32Tensor::new(&[RANK, COLS], &a),
        F32Tensor::new(&[ROWS, RANK], &b),
    );
    match layer {
        Layer::Linear => merge_linear(into, a_lin, b_lin, scale, false, &opts),
        Layer::Dora => {
            let m = F32Tensor::new(&[ROWS], &m);
            merge_dora_linear(into, a_lin, b_lin, m, scale, false, &opts)
        }
        Layer::Embedding | Layer::DoraEmbedding => {
            let a_emb = F32Tensor::new(&[RANK, ROWS], &b);
            let b_emb = F32Tensor::new(&[COLS, RANK], &a);
            match layer {
                Layer::Embedding => merge_embedding(into, a_emb, b_emb, scale, &opts),
                _ => {
                    let m = F32Tensor::new(&[COLS], &m_cols);
                    merge_dora_embedding(into, a_emb, b_emb, m, scale, &opts)
                }
            }
        }
    }
    .unwrap();
    assert!(want != w, "the adapter changes the weight");
    for durable in [true, false] {
        let out = tmp.path().join(format!("merged-{durable}"));
        let input = vec![AdapterInput::parse(adapter.to_str().unwrap())];
        let job = MergeJob::new(&base, input, &out)
            .durable(durable)
            .safe_merge(opts.safe_merge)
            .unmerge(opts.unmerge);
        assert_eq!(merge(&job).unwrap().tensors_merged, 1);
        assert!(
            weight(&out, layer) == want,
            "{layer:?}, {opts:?}, durable {durable}"
        );
    }
}
