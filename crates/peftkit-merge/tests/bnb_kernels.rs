//! bitsandbytes' CPU kernels and torch's mean, compared bit for bit with what the real
//! libraries returned (tests/fixtures/bnb/kernels.safetensors, made by bnb_cases.py on the CPU
//! described in tests/fixtures/HOST.json).

mod common;

use peftkit_checkpoint::{Checkpoint, Dtype};
use peftkit_merge::{
    bnb_dequantize_4bit, bnb_dequantize_blockwise, bnb_quantize_4bit, bnb_quantize_blockwise,
    decode_f32, encode_f32, torch_mean_f32, Bnb4Type, Code4,
};

struct Fixture(Checkpoint);

impl Fixture {
    fn open() -> Self {
        let path = common::fixture_root("bnb").join("kernels.safetensors");
        Fixture(Checkpoint::open(&path).unwrap())
    }

    fn bytes(&self, name: &str) -> Vec<u8> {
        let t = self.0.get(name).unwrap_or_else(|| panic!("{name} missing"));
        t.bytes().unwrap().into_owned()
    }

    fn dtype(&self, name: &str) -> Dtype {
        self.0.get(name).unwrap().dtype()
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        decode_f32("fixture", self.dtype(name), &self.bytes(name)).unwrap()
    }

    fn has(&self, name: &str) -> bool {
        self.0.get(name).is_some()
    }
}

/// The CPU the fixtures were made on runs bitsandbytes' AVX-512 kernel.
fn fixture_host_avx512() -> bool {
    let text = std::fs::read_to_string(common::fixture_root("HOST.json")).unwrap();
    let host: serde_json::Value = serde_json::from_str(&text).unwrap();
    host["isa"]["avx512f"].as_bool().unwrap()
}

fn code4(kind: Bnb4Type) -> Code4 {
    // bitsandbytes' get_4bit_type, as transformers stores it in `quant_map`.
    let case = match kind {
        Bnb4Type::Nf4 => "nf4_nested_bf16",
        Bnb4Type::Fp4 => "fp4_f16",
    };
    let path = common::fixture_root("bnb").join(case).join("base4");
    let base = Checkpoint::open(&path).unwrap();
    let t = base
        .get("model.layers.0.self_attn.q_proj.weight.quant_map")
        .unwrap();
    let v = decode_f32("quant_map", t.dtype(), &t.bytes().unwrap()).unwrap();
    Code4::new(kind, v.try_into().unwrap())
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn four_bit_round_trips_equal_bitsandbytes() {
    let fx = Fixture::open();
    let avx512 = fixture_host_avx512();
    let mut checked = 0;
    for dtype in ["float32", "bfloat16", "float16"] {
        let input = format!("q4.{dtype}.input");
        let x = fx.f32s(&input);
        for (qt, kind) in [("nf4", Bnb4Type::Nf4), ("fp4", Bnb4Type::Fp4)] {
            let code = code4(kind);
            let key = format!("q4.{qt}.{dtype}.plain");
            let (packed, absmax) = bnb_quantize_4bit(&x, 64, &code);
            assert_eq!(packed, fx.bytes(&format!("{key}.packed")), "{key}");
            assert_eq!(
                bits(&absmax),
                bits(&fx.f32s(&format!("{key}.absmax"))),
                "{key}"
            );
            let back =
                bnb_dequantize_4bit(&packed, &absmax, &code, 64, &[x.len()], avx512).unwrap();
            let encoded = encode_f32("dequantized", fx.dtype(&input), &back).unwrap();
            assert_eq!(encoded, fx.bytes(&format!("{key}.dequantized")), "{key}");
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
}

#[test]
fn nested_absmax_equals_bitsandbytes() {
    let fx = Fixture::open();
    for dtype in ["float32", "bfloat16", "float16"] {
        for qt in ["nf4", "fp4"] {
            let key = format!("q4.{qt}.{dtype}.nested");
            assert!(fx.has(&format!("{key}.offset")), "{key}");
            let absmax = fx.f32s(&format!("q4.{qt}.{dtype}.plain.absmax"));
            let offset = torch_mean_f32(&absmax, 2);
            assert_eq!(
                offset.to_bits(),
                fx.f32s(&format!("{key}.offset"))[0].to_bits(),
                "{key}"
            );
            let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
            let code: [f32; 256] = fx.f32s(&format!("{key}.nested_code")).try_into().unwrap();
            let (q, nested) = bnb_quantize_blockwise(&centred, &code, 256);
            assert_eq!(q, fx.bytes(&format!("{key}.absmax")), "{key}");
            assert_eq!(
                bits(&nested),
                bits(&fx.f32s(&format!("{key}.nested_absmax"))),
                "{key}"
            );
        }
    }
}

#[test]
fn blockwise_8bit_equals_bitsandbytes() {
    let fx = Fixture::open();
    let x = fx.f32s("q8.input");
    let code: [f32; 256] = fx.f32s("q8.code").try_into().unwrap();
    let (q, absmax) = bnb_quantize_blockwise(&x, &code, 256);
    let expected = fx.bytes("q8.out");
    let wrong = q.iter().zip(&expected).filter(|(a, b)| a != b).count();
    assert_eq!(wrong, 0, "{wrong} of {} codes differ", q.len());
    assert_eq!(bits(&absmax), bits(&fx.f32s("q8.absmax")));
    let back = bnb_dequantize_blockwise(&q, &absmax, &code, 256).unwrap();
    assert_eq!(bits(&back), bits(&fx.f32s("q8.dequantized")));
}

#[test]
fn mean_follows_torch_order_and_threads() {
    let fx = Fixture::open();
    let mut lengths = 0;
    for n in [1, 7, 8, 31, 33, 1000, 4097, 32768, 40001] {
        let x = fx.f32s(&format!("mean.{n}.input"));
        for threads in [1, 2] {
            let want = fx.f32s(&format!("mean.{n}.threads{threads}"))[0];
            let got = torch_mean_f32(&x, threads);
            assert_eq!(got.to_bits(), want.to_bits(), "n={n}, {threads} threads");
        }
        lengths += 1;
    }
    assert_eq!(lengths, 9);
}
