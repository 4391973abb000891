//! The tables, the ops and the engine's guarantees, on small synthetic state dicts.

use std::path::Path;

use peftkit_checkpoint::{save_pretrained, Checkpoint, Dtype, SaveOptions, StateDict, Tensor};
use peftkit_remap::{
    remap, ConversionTable, Op, Registry, RemapError, RemapOptions, Revert, SizeExpr, TensorLayout,
    UsedRules, EMBEDDED_ALIASES, EMBEDDED_TABLES,
};

/// A float32 tensor holding `start, start+1, …`.
fn iota(shape: &[usize], start: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let bytes = (start..start + n)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    Tensor::from_bytes(Dtype::F32, shape.to_vec(), bytes).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.bytes()
        .unwrap()
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn names(sd: &StateDict) -> Vec<&str> {
    sd.keys().map(String::as_str).collect()
}

#[test]
fn every_embedded_table_compiles_and_cites_transformers_5_24() {
    let reg = Registry::builtin().unwrap();
    assert_eq!(EMBEDDED_TABLES.len(), reg.table_names().count());
    for name in reg.table_names() {
        let t = reg.table(name).unwrap();
        assert_eq!(t.transformers_version, "5.24.0", "{name}");
        assert!(
            t.follows.contains("5.24.0"),
            "{name}: `follows` cites the version"
        );
        let m = reg.mapping_for_table(name).unwrap();
        assert!(!m.is_empty());
    }
    let aliases: serde_json::Value = serde_json::from_str(EMBEDDED_ALIASES).unwrap();
    assert_eq!(aliases["transformers_version"], "5.24.0");
    for (model_type, table) in reg.aliases() {
        assert!(reg.table(table).is_some(), "{model_type} -> {table}");
        reg.mapping(model_type).unwrap();
    }
    // Model types with their own extra rules are not plain aliases.
    assert_eq!(reg.table_for("minimax_m2"), Some("minimax_m2"));
    assert_eq!(reg.table_for("minimax"), Some("mixtral"));
    assert_eq!(reg.table_for("phimoe"), Some("phimoe"));
    assert_eq!(reg.table_for("ernie4_5_moe"), None);
    assert_eq!(
        reg.table_for("legacy"),
        None,
        "legacy is appended, not a model type"
    );
    // Every model gets the legacy renames at load, even without a table.
    let llama = reg.mapping("llama").unwrap();
    assert_eq!(llama.table(), None);
    assert_eq!(llama.len(), reg.table("legacy").unwrap().rules.len());
    assert_eq!(
        reg.mapping("minimax_m2").unwrap().len(),
        reg.mapping("mixtral").unwrap().len() + 1
    );
}

#[test]
fn every_op_is_undone_by_its_inverse() {
    let ops = [
        Op::Stack { dim: 1 },
        Op::Unstack { dim: 0 },
        Op::Concat {
            dim: 2,
            sizes: None,
        },
        Op::Concat {
            dim: 0,
            sizes: Some(vec![SizeExpr::Fixed(3), SizeExpr::Config("a*b".into())]),
        },
        Op::Chunk { dim: 1 },
        Op::Split {
            dim: 0,
            sizes: vec![SizeExpr::Fixed(1)],
        },
        Op::Transpose { dim0: 0, dim1: 2 },
    ];
    for op in ops {
        assert_eq!(op.inverse().inverse(), op);
    }
}

#[test]
fn mixtral_experts_stack_in_natural_order_and_split_back() {
    let m = Registry::builtin().unwrap().mapping("mixtral").unwrap();
    let mut original = StateDict::new();
    // 12 experts: natural order puts 2 before 10; code-point order would not.
    for e in 0..12 {
        let p = format!("model.layers.0.block_sparse_moe.experts.{e}");
        original.insert(format!("{p}.w1.weight"), iota(&[2, 3], 100 * e));
        original.insert(format!("{p}.w3.weight"), iota(&[2, 3], 100 * e + 50));
        original.insert(format!("{p}.w2.weight"), iota(&[3, 2], 100 * e + 80));
    }
    original.insert(
        "model.layers.0.block_sparse_moe.gate.weight".into(),
        iota(&[12, 3], 0),
    );
    let fwd = m.forward(&original).unwrap();
    assert_eq!(
        names(&fwd.state),
        [
            "model.layers.0.mlp.experts.down_proj",
            "model.layers.0.mlp.experts.gate_up_proj",
            "model.layers.0.mlp.gate.weight"
        ]
    );
    let gate_up = &fwd.state["model.layers.0.mlp.experts.gate_up_proj"];
    assert_eq!(gate_up.shape(), &[12, 4, 3]);
    let v = f32s(gate_up);
    // expert 10: rows 0..2 are its w1 (1000..), rows 2..4 its w3 (1050..)
    assert_eq!(
        &v[10 * 12..10 * 12 + 12],
        &[1000., 1001., 1002., 1003., 1004., 1005., 1050., 1051., 1052., 1053., 1054., 1055.]
    );
    let back = m
        .reverse(&fwd.state, &Revert::AsLoaded(fwd.used.clone()))
        .unwrap();
    assert_eq!(back.len(), original.len());
    for (k, t) in &original {
        assert_eq!(f32s(&back[k]), f32s(t), "{k}");
    }
    // down_proj outputs come first (its v5 name sorts first), experts 0..11 in order.
    assert_eq!(
        names(&back)[0],
        "model.layers.0.block_sparse_moe.experts.0.w2.weight"
    );
    assert_eq!(
        names(&back)[11],
        "model.layers.0.block_sparse_moe.experts.11.w2.weight"
    );
    assert_eq!(
        names(&back)[12],
        "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    );
    assert_eq!(
        names(&back)[24],
        "model.layers.0.block_sparse_moe.experts.0.w3.weight"
    );
    assert_eq!(
        names(&back)[36],
        "model.layers.0.block_sparse_moe.gate.weight"
    );
    // Storage families: w2s (views of down_proj), w1s and w3s (views of one contiguous chunk each).
    let fam = |k: &str| back[k].family();
    let w2 = fam("model.layers.0.block_sparse_moe.experts.3.w2.weight");
    let w1 = fam("model.layers.0.block_sparse_moe.experts.3.w1.weight");
    let w3 = fam("model.layers.0.block_sparse_moe.experts.3.w3.weight");
    assert!(w2.is_some() && w1.is_some() && w3.is_some());
    assert!(w2 != w1 && w1 != w3 && w2 != w3);
    assert_eq!(
        fam("model.layers.0.block_sparse_moe.experts.0.w1.weight"),
        w1
    );
    assert_eq!(fam("model.layers.0.block_sparse_moe.gate.weight"), None);
}

#[test]
fn one_expert_chunks_share_the_fused_storage_as_in_torch() {
    // With E = 1, gate_up_proj.chunk(2, dim=1) is already contiguous, so .contiguous() keeps the
    // view: w1 and w3 share the fused storage (one family), as torch has them.
    let m = Registry::builtin().unwrap().mapping("mixtral").unwrap();
    let mut v5 = StateDict::new();
    v5.insert(
        "model.layers.0.mlp.experts.gate_up_proj".into(),
        iota(&[1, 4, 3], 0),
    );
    let back = m.reverse(&v5, &Revert::FromConfig).unwrap();
    let f: Vec<Option<u64>> = back.values().map(Tensor::family).collect();
    assert!(f[0].is_some() && f[0] == f[1]);
}

#[test]
fn a_missing_expert_is_refused_instead_of_shifting_the_others() {
    let m = Registry::builtin().unwrap().mapping("qwen2_moe").unwrap();
    let mut original = StateDict::new();
    for e in [0, 1, 3] {
        original.insert(
            format!("model.layers.0.mlp.experts.{e}.down_proj.weight"),
            iota(&[2, 2], 0),
        );
    }
    let err = m.forward(&original).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RemapError::Tensor { .. }), "{msg}");
    assert!(
        msg.contains("model.layers.0.mlp.experts.0.down_proj.weight") && msg.contains("experts.2."),
        "{msg}"
    );
    // Mismatched shapes name the tensor too.
    let mut bad = StateDict::new();
    bad.insert(
        "model.layers.0.mlp.experts.0.down_proj.weight".into(),
        iota(&[2, 2], 0),
    );
    bad.insert(
        "model.layers.0.mlp.experts.1.down_proj.weight".into(),
        iota(&[2, 3], 0),
    );
    let msg = m.forward(&bad).unwrap_err().to_string();
    assert!(
        msg.contains("stack") && msg.contains("experts.0.down_proj"),
        "{msg}"
    );
}

const FUSED_TABLE: &str = r#"{
  "name": "toy_fused",
  "transformers_version": "5.24.0",
  "follows": "a test table (transformers 5.24.0 op semantics)",
  "model_types": ["toy"],
  "rules": [
    { "rename": { "original": "^transformer\\.", "v5": "^model." } },
    {
      "convert": {
        "original": ["attn.qkv.weight"],
        "v5": ["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"],
        "ops": [{ "op": "split", "dim": 0, "sizes": ["heads*head_dim", "head_dim", "head_dim"] }]
      }
    },
    {
      "convert": {
        "original": ["mlp.w_in.weight"],
        "v5": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
        "ops": [{ "op": "chunk", "dim": 0 }]
      }
    },
    {
      "convert": {
        "original": ["mlp.experts.fused_t"],
        "v5": ["mlp.experts.fused"],
        "ops": [{ "op": "transpose", "dim0": 1, "dim1": 2 }]
      }
    }
  ]
}"#;

fn toy_registry() -> Registry {
    let mut reg = Registry::builtin().unwrap();
    reg.add_table_json(FUSED_TABLE, "toy.json").unwrap();
    reg
}

#[test]
fn user_tables_split_chunk_and_transpose_with_exact_inverses() {
    let config: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(r#"{"heads": 2, "head_dim": 2}"#).unwrap();
    let m = toy_registry().mapping("toy").unwrap().with_config(config);
    let mut original = StateDict::new();
    original.insert("transformer.h.0.attn.qkv.weight".into(), iota(&[8, 3], 0));
    original.insert("transformer.h.0.mlp.w_in.weight".into(), iota(&[4, 3], 100));
    original.insert(
        "transformer.h.0.mlp.experts.fused_t".into(),
        iota(&[2, 3, 2], 200),
    );
    let fwd = m.forward(&original).unwrap();
    assert_eq!(
        names(&fwd.state),
        [
            "model.h.0.attn.k_proj.weight",
            "model.h.0.attn.q_proj.weight",
            "model.h.0.attn.v_proj.weight",
            "model.h.0.mlp.experts.fused",
            "model.h.0.mlp.gate_proj.weight",
            "model.h.0.mlp.up_proj.weight"
        ]
    );
    assert_eq!(fwd.state["model.h.0.attn.q_proj.weight"].shape(), &[4, 3]);
    assert_eq!(
        f32s(&fwd.state["model.h.0.attn.k_proj.weight"]),
        [12., 13., 14., 15., 16., 17.]
    );
    assert_eq!(
        f32s(&fwd.state["model.h.0.mlp.up_proj.weight"]),
        [106., 107., 108., 109., 110., 111.]
    );
    let fused = &fwd.state["model.h.0.mlp.experts.fused"];
    assert_eq!(fused.shape(), &[2, 2, 3]);
    assert_eq!(&f32s(fused)[..6], &[200., 202., 204., 201., 203., 205.]);
    // Forward outputs are separate parameters in memory: no storage families.
    assert!(fwd.state.values().all(|t| t.family().is_none()));

    let back = m.reverse(&fwd.state, &Revert::FromConfig).unwrap();
    assert_eq!(
        names(&back),
        [
            "transformer.h.0.attn.qkv.weight",
            "transformer.h.0.mlp.experts.fused_t",
            "transformer.h.0.mlp.w_in.weight"
        ]
    );
    for (k, t) in &original {
        assert_eq!(f32s(&back[k]), f32s(t), "{k}");
    }
}

#[test]
fn chunks_along_dim_0_are_views_of_one_storage() {
    // The reverse of a concat is a chunk (transformers' Chunk, which calls .contiguous()).
    let mut reg = Registry::builtin().unwrap();
    reg.add_table_json(
        r#"{"name": "cat", "transformers_version": "5.24.0", "rules": [
            {"convert": {"original": ["a.weight", "b.weight"], "v5": ["ab.weight"],
                         "ops": [{"op": "concat", "dim": 0}]}}]}"#,
        "cat.json",
    )
    .unwrap();
    let cat = reg.mapping_for_table("cat").unwrap();
    let mut v5 = StateDict::new();
    v5.insert("x.ab.weight".into(), iota(&[4, 2], 0));
    let back = cat.reverse(&v5, &Revert::FromConfig).unwrap();
    assert_eq!(names(&back), ["x.a.weight", "x.b.weight"]);
    let f: Vec<Option<u64>> = back.values().map(Tensor::family).collect();
    assert!(
        f[0].is_some() && f[0] == f[1],
        "torch.chunk(dim=0) gives contiguous views: one storage"
    );
    assert_eq!(f32s(&back["x.b.weight"]), [4., 5., 6., 7.]);
}

#[test]
fn bad_tables_are_reported_with_their_origin() {
    let mut reg = Registry::builtin().unwrap();
    let err = reg.add_table_json("{\"name\": 1}", "my.json").unwrap_err();
    assert!(err.to_string().contains("my.json"), "{err}");
    let err = reg
        .add_table_json(
            r#"{"name": "x", "transformers_version": "5.24.0", "rules": [
                {"rename": {"original": "a", "v5": "b"}},
                {"rename": {"original": "layers\\.\\d+", "v5": "b"}}]}"#,
            "x.json",
        )
        .unwrap_err();
    assert!(
        matches!(err, RemapError::InvalidRule { rule: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("x.json"), "{err}");
    let err = reg
        .add_table_json(
            r#"{"name": "y", "transformers_version": "5.24.0", "extends": ["nope"], "rules": []}"#,
            "y.json",
        )
        .unwrap_err();
    assert!(matches!(err, RemapError::UnknownTable { .. }), "{err}");
    let err = reg
        .add_table_json(
            r#"{"name": "z", "transformers_version": "5.24.0", "rules": [{"rename": {"original": "a", "v5": "b"}, "convert": {"original": "a", "v5": "b", "ops": []}}]}"#,
            "z.json",
        )
        .unwrap_err();
    assert!(
        matches!(err, RemapError::InvalidRule { rule: 0, .. }),
        "{err}"
    );
    let err = ConversionTable::from_json(
        r#"{"name": "w", "transformers_version": "5.24.0", "rules": [], "extra": 1}"#,
        "w.json",
    )
    .unwrap_err();
    assert!(err.to_string().contains("extra"), "{err}");
}

#[test]
fn two_names_onto_one_is_a_collision() {
    let mut reg = Registry::builtin().unwrap();
    reg.add_table_json(
        r#"{"name": "c", "transformers_version": "5.24.0", "rules": [
            {"rename": {"original": "old", "v5": "new"}}]}"#,
        "c.json",
    )
    .unwrap();
    let m = reg.mapping("c").unwrap();
    let mut sd = StateDict::new();
    sd.insert("a.old".into(), iota(&[1], 0));
    sd.insert("a.new".into(), iota(&[1], 0));
    let err = m.forward(&sd).unwrap_err();
    assert!(matches!(err, RemapError::Collision { .. }), "{err}");
}

#[test]
fn as_loaded_reverts_exactly_the_used_rules() {
    let m = Registry::builtin().unwrap().mapping("bert").unwrap();
    let mut original = StateDict::new();
    original.insert(
        "encoder.layer.0.output.LayerNorm.gamma".into(),
        iota(&[2], 0),
    );
    original.insert(
        "encoder.layer.0.output.LayerNorm.beta".into(),
        iota(&[2], 0),
    );
    original.insert("embeddings.word_embeddings.weight".into(), iota(&[2], 0));
    let fwd = m.forward(&original).unwrap();
    assert_eq!(fwd.used.0.len(), 2);
    let back = m
        .reverse(&fwd.state, &Revert::AsLoaded(fwd.used.clone()))
        .unwrap();
    assert_eq!(
        names(&back),
        [
            "embeddings.word_embeddings.weight",
            "encoder.layer.0.output.LayerNorm.beta",
            "encoder.layer.0.output.LayerNorm.gamma"
        ]
    );
    // With nothing used the names stay, but the order is natural (transformers sorts).
    let mut unsorted = StateDict::new();
    unsorted.insert("b".into(), iota(&[1], 0));
    unsorted.insert("a".into(), iota(&[1], 0));
    let same = m
        .reverse(&unsorted, &Revert::AsLoaded(UsedRules::default()))
        .unwrap();
    assert_eq!(names(&same), ["a", "b"]);
    let same = m.reverse(&unsorted, &Revert::FromConfig).unwrap();
    assert_eq!(names(&same), ["b", "a"], "quick escape keeps the order");
}

#[test]
fn split_outputs_read_only_their_own_bytes() {
    // Save a fused v5 tensor, revert it from the file, then corrupt expert 1's bytes on disk:
    // expert 0's tensors must still read correctly (they never touch expert 1's region).
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut v5 = StateDict::new();
    v5.insert(
        "model.layers.0.mlp.experts.gate_up_proj".into(),
        iota(&[2, 4, 3], 0),
    );
    save_pretrained(&src, &v5, &SaveOptions::default()).unwrap();
    let ckpt = Checkpoint::open(&src).unwrap();
    let m = Registry::builtin().unwrap().mapping("qwen2_moe").unwrap();
    let back = m.reverse(&ckpt.state_dict(), &Revert::FromConfig).unwrap();
    let (path, offset) = {
        let t = ckpt.get("model.layers.0.mlp.experts.gate_up_proj").unwrap();
        let (p, o) = t.file_source().unwrap();
        (p.to_owned(), o)
    };
    let mut bytes = std::fs::read(&path).unwrap();
    let expert1 = offset as usize + 12 * 4;
    for b in &mut bytes[expert1..expert1 + 12 * 4] {
        *b = 0xff;
    }
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(
        f32s(&back["model.layers.0.mlp.experts.0.gate_proj.weight"]),
        [0., 1., 2., 3., 4., 5.]
    );
    assert_eq!(
        f32s(&back["model.layers.0.mlp.experts.0.up_proj.weight"]),
        [6., 7., 8., 9., 10., 11.]
    );
    assert!(f32s(&back["model.layers.0.mlp.experts.1.gate_proj.weight"])[0].is_nan());
}

#[test]
fn remap_uses_user_tables_and_copies_companion_files() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut sd = StateDict::new();
    sd.insert("transformer.h.0.mlp.w_in.weight".into(), iota(&[4, 3], 0));
    let options = SaveOptions {
        extra_files: vec![
            (
                "config.json".into(),
                br#"{"model_type": "toy", "heads": 2, "head_dim": 2}"#.to_vec(),
            ),
            ("tokenizer.json".into(), b"{}".to_vec()),
        ],
        ..SaveOptions::default()
    };
    save_pretrained(&src, &sd, &options).unwrap();
    let table = tmp.path().join("toy.json");
    std::fs::write(&table, FUSED_TABLE).unwrap();
    let out = tmp.path().join("out");
    let opts = RemapOptions {
        tables: vec![table.clone()],
        ..RemapOptions::default()
    };
    let report = remap(&src, &out, TensorLayout::TransformersV5, None, &opts).unwrap();
    assert_eq!(report.model_type, "toy");
    assert_eq!(report.table.as_deref(), Some("toy_fused"));
    assert_eq!(report.tensors_converted, 2);
    assert_eq!(std::fs::read(out.join("tokenizer.json")).unwrap(), b"{}");
    let v5 = Checkpoint::open(&out).unwrap();
    assert!(v5.get("model.h.0.mlp.gate_proj.weight").is_some());
    // And back, with the model type given explicitly.
    let back_dir = tmp.path().join("back");
    remap(&out, &back_dir, TensorLayout::Original, Some("toy"), &opts).unwrap();
    let back = Checkpoint::open(&back_dir).unwrap();
    assert_eq!(
        f32s(back.get("transformer.h.0.mlp.w_in.weight").unwrap()),
        f32s(&sd["transformer.h.0.mlp.w_in.weight"])
    );
    // Without the table the model type is unknown: only legacy renames, nothing converted.
    let plain = tmp.path().join("plain");
    let report = remap(
        &src,
        &plain,
        TensorLayout::TransformersV5,
        None,
        &RemapOptions::default(),
    )
    .unwrap();
    assert_eq!(report.table, None);
    assert_eq!(report.tensors_converted, 0);
    // No config.json and no --model-type: a clear error.
    std::fs::remove_file(src.join("config.json")).unwrap();
    let err = remap(
        &src,
        &tmp.path().join("x"),
        TensorLayout::TransformersV5,
        None,
        &RemapOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, RemapError::NoModelType { .. }), "{err}");
    assert!(Path::new(&table).exists());
}

#[test]
fn layouts_parse_from_cli_words() {
    assert_eq!(
        "original".parse::<TensorLayout>(),
        Ok(TensorLayout::Original)
    );
    assert_eq!(
        "transformers-v5".parse::<TensorLayout>(),
        Ok(TensorLayout::TransformersV5)
    );
    assert!("v4".parse::<TensorLayout>().is_err());
}

#[test]
fn unequal_concat_needs_sizes_so_that_it_can_be_undone() {
    let table = |sizes: &str| {
        format!(
            r#"{{"name": "qkv", "transformers_version": "5.24.0", "rules": [
            {{"convert": {{"original": ["q.weight", "k.weight"], "v5": ["qk.weight"],
                         "ops": [{{"op": "concat", "dim": 0{sizes}}}]}}}}]}}"#
        )
    };
    let mut sd = StateDict::new();
    sd.insert("a.q.weight".into(), iota(&[4, 2], 0));
    sd.insert("a.k.weight".into(), iota(&[2, 2], 100));
    let mut reg = Registry::builtin().unwrap();
    reg.add_table_json(&table(""), "qkv.json").unwrap();
    let err = reg.mapping("qkv").unwrap().forward(&sd).unwrap_err();
    assert!(err.to_string().contains("sizes"), "{err}");
    reg.add_table_json(&table(r#", "sizes": [4, 2]"#), "qkv.json")
        .unwrap();
    let m = reg.mapping("qkv").unwrap();
    let fwd = m.forward(&sd).unwrap();
    assert_eq!(fwd.state["a.qk.weight"].shape(), &[6, 2]);
    let back = m.reverse(&fwd.state, &Revert::FromConfig).unwrap();
    assert_eq!(names(&back), ["a.q.weight", "a.k.weight"]);
    assert_eq!(f32s(&back["a.k.weight"]), f32s(&sd["a.k.weight"]));
}
