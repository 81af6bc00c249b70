//! i32 tensors: exact round trips (views included), explicit casts with PyTorch's semantics,
//! i32 indices and class targets in the index ops, Embedding and the losses (the same results
//! as f32 indices), out-of-range i32 indices as an `Err`, and float ops refusing i32 tensors.

mod common;

use common::*;
use kiln::loss::{self, Reduction};
use kiln::nn::{Embedding, Init, Module};
use kiln::{DType, Tensor};

#[test]
fn i32_tensors_round_trip_exactly() {
    let d = dev();
    // Values an f32 cannot hold, and bit patterns that are NaNs as f32 (-1 is 0xffffffff).
    let v = vec![
        0,
        1,
        -1,
        i32::MAX,
        i32::MIN,
        16_777_217,
        -16_777_219,
        7,
        0x7fc0_0001,
    ];
    let t = Tensor::from_slice_i32(&v, &[3, 3], &d).unwrap();
    assert_eq!(t.dtype(), DType::I32);
    assert_eq!(t.to_vec_i32().unwrap(), v);
    // Views are read exactly too: transposed and narrowed.
    let want_t: Vec<i32> = (0..9).map(|i| v[(i % 3) * 3 + i / 3]).collect();
    assert_eq!(t.t().unwrap().to_vec_i32().unwrap(), want_t);
    assert_eq!(
        t.narrow(1, 1, 2).unwrap().to_vec_i32().unwrap(),
        vec![1, -1, i32::MIN, 16_777_217, 7, 0x7fc0_0001]
    );
    assert_eq!(t.reshape(&[9]).unwrap().dtype(), DType::I32);
    assert!(Tensor::from_slice_i32(&[1, 2], &[3], &d).is_err());
    // f32 readers refuse i32 and the other way round, naming the cast.
    let e = t.to_vec().unwrap_err().to_string();
    assert!(e.contains("to_dtype") && e.contains("I32"), "{e}");
    assert!(Tensor::ones(&[2], &d).unwrap().to_vec_i32().is_err());
    assert!(format!("{t}").contains("2147483648") || format!("{t}").contains("2147483600"));
}

#[test]
fn casts_follow_pytorch() {
    let d = dev();
    let f = Tensor::from_slice(
        &[2.7, -2.7, 0.5, -0.5, 1e10, -1e10, 3.0, 16_777_217.0],
        &[8],
        &d,
    )
    .unwrap();
    // f32 -> i32 truncates toward zero and saturates (WGSL clamps to the f32 values in range:
    // 2^31 - 128 at the top).
    let i = f.to_dtype(DType::I32).unwrap();
    assert_eq!(i.dtype(), DType::I32);
    assert_eq!(
        i.to_vec_i32().unwrap(),
        vec![2, -2, 0, 0, 2_147_483_520, i32::MIN, 3, 16_777_216]
    );
    // i32 -> f32: exact up to 2^24, then the nearest f32; through a transposed view.
    let m = Tensor::from_slice_i32(
        &[1, -5, 16_777_216, 16_777_217, 123_456_789, -7],
        &[2, 3],
        &d,
    )
    .unwrap();
    let back = m.t().unwrap().to_dtype(DType::F32).unwrap();
    assert_eq!(back.dims(), &[3, 2]);
    let want: Vec<f32> = [1, 16_777_217, -5, 123_456_789, 16_777_216, -7]
        .iter()
        .map(|&x| x as f32)
        .collect();
    assert_eq!(back.to_vec().unwrap(), want);
    assert!(
        Tensor::shares_storage(&f.to_dtype(DType::F32).unwrap(), &f),
        "same type: the tensor itself"
    );
}

#[test]
fn index_ops_take_i32_indices() {
    let d = own_device();
    let mut rng = Rng::new(1);
    let table = Tensor::from_slice(&rng.vec(7 * 5, -1.0, 1.0), &[7, 5], &d).unwrap();
    let ids: Vec<i32> = vec![6, 0, 3, 3, 1];
    let fids: Vec<f32> = ids.iter().map(|&x| x as f32).collect();
    let i32_idx = Tensor::from_slice_i32(&ids, &[5], &d).unwrap();
    let f32_idx = Tensor::from_slice(&fids, &[5], &d).unwrap();
    assert_eq!(
        table.index_select(0, &i32_idx).unwrap().to_vec().unwrap(),
        table.index_select(0, &f32_idx).unwrap().to_vec().unwrap()
    );
    let g: Vec<i32> = (0..7 * 2).map(|k| k * 3 % 5).collect();
    let gi = Tensor::from_slice_i32(&g, &[7, 2], &d).unwrap();
    let gf = Tensor::from_slice(
        &g.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        &[7, 2],
        &d,
    )
    .unwrap();
    assert_eq!(
        table.gather(1, &gi).unwrap().to_vec().unwrap(),
        table.gather(1, &gf).unwrap().to_vec().unwrap()
    );
    // Embedding over i32 ids of any shape, with its gradient.
    let emb = Embedding::new(&mut Init::new(&d, 2), 7, 3).unwrap();
    let ids2 = Tensor::from_slice_i32(&[1, 6, 6, 0], &[2, 2], &d).unwrap();
    let y = emb.forward(&ids2).unwrap();
    assert_eq!(y.dims(), &[2, 2, 3]);
    y.sum_all().unwrap().backward().unwrap();
    let grad = emb.weight.grad().unwrap().to_vec().unwrap();
    assert_eq!(&grad[18..21], &[2.0, 2.0, 2.0], "row 6 picked twice");
    // one_hot of i32 classes.
    let oh = Tensor::from_slice_i32(&[2, 0], &[2], &d)
        .unwrap()
        .one_hot(3)
        .unwrap();
    assert_eq!(oh.to_vec().unwrap(), vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
    // An out-of-range i32 index is an Err at the next readback, naming it.
    let bad = Tensor::from_slice_i32(&[1, 7], &[2], &d).unwrap();
    let e = table
        .index_select(0, &bad)
        .unwrap()
        .to_vec()
        .unwrap_err()
        .to_string();
    assert!(e.contains("index 7"), "{e}");
    let neg = Tensor::from_slice_i32(&[-1], &[1], &d).unwrap();
    assert!(table.index_select(0, &neg).unwrap().to_vec().is_err());
}

#[test]
fn losses_take_i32_class_targets() {
    let d = dev();
    let mut rng = Rng::new(2);
    let logits = Tensor::from_slice(&rng.vec(4 * 3, -2.0, 2.0), &[4, 3], &d).unwrap();
    let t = [2, 0, 1, 2];
    let ti = Tensor::from_slice_i32(&t, &[4], &d).unwrap();
    let tf = Tensor::from_slice(&t.map(|x| x as f32), &[4], &d).unwrap();
    let ce = |t: &Tensor| {
        loss::cross_entropy(&logits, t, &Default::default())
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    assert_eq!(ce(&ti), ce(&tf));
    let lp = logits.log_softmax(1).unwrap();
    let nll = |t: &Tensor| {
        loss::nll_loss(&lp, t, Reduction::Sum, Some(0))
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    assert_eq!(nll(&ti), nll(&tf));
}

#[test]
fn float_ops_refuse_i32_tensors() {
    let d = dev();
    let i = Tensor::from_slice_i32(&[1, 2, 3], &[3], &d).unwrap();
    let f = Tensor::ones(&[3], &d).unwrap();
    for (what, r) in [
        ("add", f.add(&i)),
        ("relu", i.relu()),
        ("sum", i.sum_all()),
        (
            "matmul",
            i.reshape(&[1, 3])
                .unwrap()
                .matmul(&f.reshape(&[3, 1]).unwrap()),
        ),
        ("concat", Tensor::concat(&[&i, &i], 0)),
    ] {
        let e = r
            .err()
            .unwrap_or_else(|| panic!("{what} took an i32 tensor"))
            .to_string();
        assert!(e.contains("I32") && e.contains("to_dtype"), "{what}: {e}");
    }
    let p = Tensor::ones(&[3], &d).unwrap().requires_grad();
    assert!(p.set_grad(Some(i.clone())).is_err());
    assert!(f.assign(&i).is_err());
    // A non-contiguous i32 view cannot be copied through the f32 kernels; casting works.
    let m = Tensor::from_slice_i32(&[1, 2, 3, 4], &[2, 2], &d).unwrap();
    assert!(m.t().unwrap().contiguous().is_err());
    assert_eq!(
        m.t()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec()
            .unwrap(),
        vec![1.0, 3.0, 2.0, 4.0]
    );
}

/// f16 tensors: the weights of an f16 frozen model are real f16 tensors (their storage type
/// says so, and they take half the bytes); casts to and from f16 round as f16 does; f32 ops and
/// readers refuse f16 tensors until they are cast back.
#[test]
fn f16_tensors_are_real_and_cast_explicitly() {
    use kiln::infer::freeze;
    use kiln::nn::Sequential;
    let d = dev();
    let model =
        Sequential::from_spec(&mut Init::new(&d, 0), "linear(6,5) relu linear(5,3)").unwrap();
    let x = Tensor::randn(&[4, 6], 1, &d).unwrap();
    let frozen = freeze(model, &x).unwrap();
    assert!(frozen.weight_dtypes().iter().all(|&t| t == DType::F32));
    // Without SHADER_F16, to_half_or_refused has asserted the documented Err.
    let Some(half) = to_half_or_refused(frozen) else {
        return;
    };
    let dtypes = half.weight_dtypes();
    assert!(
        !dtypes.is_empty() && dtypes.iter().all(|&t| t == DType::F16),
        "{dtypes:?}"
    );
    let v = [1.0f32, 1.0 / 3.0, -65504.0, 1e-5, 70000.0];
    let t = Tensor::from_slice(&v, &[5], &d).unwrap();
    let h = t.to_dtype(DType::F16).unwrap();
    assert_eq!(h.dtype(), DType::F16);
    assert!(
        h.to_vec().is_err() && h.add(&h).is_err(),
        "f32 readers and ops refuse f16"
    );
    let back = h.to_dtype(DType::F32).unwrap().to_vec().unwrap();
    let want: Vec<f32> = v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
    assert_eq!(back, want, "f16 rounding, inf beyond 65504");
}
