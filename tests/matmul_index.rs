//! Matmul, concat/stack, index_select/gather, and constructors against CPU references.

mod common;

use common::*;
use kiln::Tensor;

/// Matmul: f32 products accumulated in f32 over k <= 300 terms of magnitude <= 1:
/// atol 1e-5 + rtol 1e-5 against the f64 reference.
#[test]
fn matmul_shapes_batches_and_transposes() {
    let mut rng = Rng::new(1);
    let cases: &[(&[usize], &[usize])] = &[
        (&[1, 1], &[1, 1]),
        (&[33, 17], &[17, 31]),
        (&[64, 64], &[64, 64]),
        (&[5, 300], &[300, 3]),
        (&[3, 7, 5], &[3, 5, 9]),
        (&[2, 1, 7, 5], &[3, 5, 9]),
        (&[4, 5], &[2, 3, 5, 6]),
        (&[0, 5], &[5, 3]),
        (&[3, 0], &[0, 4]),
    ];
    for &(sa, sb) in cases {
        let (a, ra) = rand_pair(&mut rng, sa, -1.0, 1.0);
        let (b, rb) = rand_pair(&mut rng, sb, -1.0, 1.0);
        assert_close(
            &format!("matmul {sa:?} x {sb:?}"),
            &a.matmul(&b).unwrap(),
            &ra.matmul(&rb),
            1e-5,
            1e-5,
        );
    }
    // Transposed operands are read through strides.
    let (a, ra) = rand_pair(&mut rng, &[19, 35], -1.0, 1.0);
    let (b, rb) = rand_pair(&mut rng, &[22, 19], -1.0, 1.0);
    let got = a.t().unwrap().matmul(&b.t().unwrap()).unwrap();
    assert_close(
        "matmul a^T b^T",
        &got,
        &ra.permute(&[1, 0]).matmul(&rb.permute(&[1, 0])),
        1e-5,
        1e-5,
    );
    let (c, rc) = rand_pair(&mut rng, &[4, 6, 3], -1.0, 1.0);
    let got = c.transpose(1, 2).unwrap().matmul(&c).unwrap();
    assert_close(
        "batched c^T c",
        &got,
        &rc.permute(&[0, 2, 1]).matmul(&rc),
        1e-5,
        1e-5,
    );
    // Narrowed (offset) operand.
    let got = a
        .narrow(0, 3, 10)
        .unwrap()
        .matmul(&Tensor::ones(&[35, 2], &dev()).unwrap())
        .unwrap();
    let want = Nd::new(&[10, 35], ra.data[3 * 35..13 * 35].to_vec())
        .matmul(&Nd::new(&[35, 2], vec![1.0; 70]));
    assert_close("narrowed", &got, &want, 1e-5, 1e-5);
}

/// A single product with few output tiles and a long reduction splits k into parts, summed
/// afterwards (on software adapters, where the cores would otherwise idle): aligned and not,
/// with b read transposed and a narrowed (offset) operand, against the f64 reference.
#[test]
fn split_reductions_match_the_reference() {
    let d = own_device();
    let mut rng = Rng::new(7);
    // (m, k, n, a transposed, b transposed): 3136 = 4 * 8 * 98 splits in 8; 1032 in 3 (not a
    // multiple of 16).
    let cases = [
        (16, 3136, 128, false, false),
        (16, 3136, 128, false, true),
        (16, 3136, 128, true, false),
        (5, 1032, 7, false, false),
        (3, 1032, 9, false, true),
        (6, 1032, 5, true, true),
    ];
    for (m, k, n, at, bt) in cases {
        let what = format!("{m}x{k}x{n} a^T {at} b^T {bt}");
        let av = rng.vec((m + 1) * k, -1.0, 1.0);
        let bv = rng.vec(k * n, -1.0, 1.0);
        // a = rows 1.. of an (m + 1, k) matrix: an offset view, transposed from a (k, m + 1) one
        // when `at`.
        let a = if at {
            let t: Vec<f32> = (0..k * (m + 1))
                .map(|e| av[(e % (m + 1)) * k + e / (m + 1)])
                .collect();
            Tensor::from_slice(&t, &[k, m + 1], &d)
                .unwrap()
                .t()
                .unwrap()
        } else {
            Tensor::from_slice(&av, &[m + 1, k], &d).unwrap()
        }
        .narrow(0, 1, m)
        .unwrap();
        let b = if bt {
            Tensor::from_slice(&bv, &[n, k], &d).unwrap().t().unwrap()
        } else {
            Tensor::from_slice(&bv, &[k, n], &d).unwrap()
        };
        let ra = Nd::new(&[m, k], av[k..].iter().map(|&v| v as f64).collect());
        let shape = if bt { [n, k] } else { [k, n] };
        let rb = Nd::new(&shape, bv.iter().map(|&v| v as f64).collect());
        let rb = if bt { rb.permute(&[1, 0]) } else { rb };
        d.set_profiling(true);
        let got = a.matmul(&b).unwrap();
        assert_close(&what, &got, &ra.matmul(&rb), 1e-4, 1e-4);
        let ran: Vec<String> = d.profile().into_iter().map(|k| k.kernel).collect();
        d.set_profiling(false);
        if d.adapter_info().device_type == kiln::wgpu::DeviceType::Cpu {
            assert!(
                ran.iter().any(|r| r.starts_with("reduce")),
                "{what}: {ran:?}"
            );
        }
    }
}

/// Sizes that take the shared-memory tiled kernel, with partial edge tiles, batches,
/// transposed operands and a fused bias-free path; and one large enough to be autotuned.
#[test]
fn matmul_tiled_kernel_edges() {
    let mut rng = Rng::new(31);
    let (a, ra) = rand_pair(&mut rng, &[2, 130, 67], -1.0, 1.0);
    let (b, rb) = rand_pair(&mut rng, &[67, 71], -1.0, 1.0);
    assert_close(
        "tiled batched",
        &a.matmul(&b).unwrap(),
        &ra.matmul(&rb),
        1e-5,
        1e-5,
    );
    let (c, rc) = rand_pair(&mut rng, &[83, 130], -1.0, 1.0);
    let (e, re) = rand_pair(&mut rng, &[97, 83], -1.0, 1.0);
    let got = c.t().unwrap().matmul(&e.t().unwrap()).unwrap();
    assert_close(
        "tiled transposed",
        &got,
        &rc.permute(&[1, 0]).matmul(&re.permute(&[1, 0])),
        1e-5,
        1e-5,
    );
    // 160 x 144 x 100 x 2 passes the autotuning threshold: whichever kernel wins, same answer.
    let (f, rf) = rand_pair(&mut rng, &[2, 160, 100], -1.0, 1.0);
    let (g, rg) = rand_pair(&mut rng, &[100, 144], -1.0, 1.0);
    assert_close(
        "autotuned",
        &f.matmul(&g).unwrap(),
        &rf.matmul(&rg),
        1e-5,
        1e-5,
    );
    assert_close(
        "autotuned again",
        &f.matmul(&g).unwrap(),
        &rf.matmul(&rg),
        1e-5,
        1e-5,
    );
}

/// Every matmul kernel on its own, on edge tiles and transposed operands.
#[test]
fn each_matmul_kernel_is_correct() {
    use kiln::kernels::Kernel;
    let mut rng = Rng::new(41);
    let (a, ra) = rand_pair(&mut rng, &[133, 77], -1.0, 1.0);
    let (b, rb) = rand_pair(&mut rng, &[77, 150], -1.0, 1.0);
    let (bt, rbt) = rand_pair(&mut rng, &[150, 77], -1.0, 1.0);
    for k in [
        Kernel::MatmulFwd,
        Kernel::MatmulTiledFwd,
        Kernel::MatmulTiled128Fwd,
        Kernel::MatmulReg8Fwd,
    ] {
        assert_close(
            &format!("{k:?}"),
            &a.matmul_with_kernel(&b, k).unwrap(),
            &ra.matmul(&rb),
            1e-5,
            1e-5,
        );
        let got = a.matmul_with_kernel(&bt.t().unwrap(), k).unwrap();
        assert_close(
            &format!("{k:?} b^T"),
            &got,
            &ra.matmul(&rbt.permute(&[1, 0])),
            1e-5,
            1e-5,
        );
    }
    assert!(a.matmul_with_kernel(&b, Kernel::UnaryFwd).is_err());
}

/// The vec4-reading kernels need aligned operands: each of their three layouts against the
/// reference, with sizes that leave partial tiles (m = 36, n = 140, k = 52: not multiples of
/// 16 or 128, and a last k step of 4 in the 128-tile kernels), batches with a broadcast
/// operand, views at an offset, and refusal of a layout they do not fit.
#[test]
fn vec4_matmul_kernels() {
    use kiln::kernels::Kernel;
    let mut rng = Rng::new(43);
    let (m, k, n) = (36, 52, 140);
    let (a, ra) = rand_pair(&mut rng, &[m, k], -1.0, 1.0);
    let (at, rat) = rand_pair(&mut rng, &[k, m], -1.0, 1.0);
    let (b, rb) = rand_pair(&mut rng, &[k, n], -1.0, 1.0);
    let (bt, rbt) = rand_pair(&mut rng, &[n, k], -1.0, 1.0);
    let cases = [
        (
            [
                Kernel::MatmulVec4NnFwd,
                Kernel::MatmulT128v4NnFwd,
                Kernel::MatmulSg8NnFwd,
                Kernel::MatmulSg32NnFwd,
            ],
            false,
            false,
        ),
        (
            [
                Kernel::MatmulVec4NtFwd,
                Kernel::MatmulT128v4NtFwd,
                Kernel::MatmulSg8NtFwd,
                Kernel::MatmulSg32NtFwd,
            ],
            false,
            true,
        ),
        (
            [
                Kernel::MatmulVec4TnFwd,
                Kernel::MatmulT128v4TnFwd,
                Kernel::MatmulSg8TnFwd,
                Kernel::MatmulSg32TnFwd,
            ],
            true,
            false,
        ),
    ];
    // The subgroup kernels need subgroups of 8 or more (lavapipe on AVX2 has 8); elsewhere
    // they are refused.
    let subgroups = a.device().subgroups_of_at_least(8);
    for (kernels, ta, tb) in cases {
        let vec4 = kernels[0];
        let (x, rx) = if ta {
            (at.t().unwrap(), rat.permute(&[1, 0]))
        } else {
            (a.clone(), ra.clone())
        };
        let (y, ry) = if tb {
            (bt.t().unwrap(), rbt.permute(&[1, 0]))
        } else {
            (b.clone(), rb.clone())
        };
        let want = rx.matmul(&ry);
        for kernel in kernels {
            if !subgroups && kernel.file() == kiln::kernels::ShaderFile::MatmulSubgroup {
                assert!(x.matmul_with_kernel(&y, kernel).is_err());
                continue;
            }
            let got = x.matmul_with_kernel(&y, kernel).unwrap();
            assert_close(&format!("{kernel:?}"), &got, &want, 1e-5, 1e-5);
        }
        // The same product through the public path, which may choose these kernels.
        assert_close(
            &format!("{vec4:?} matmul"),
            &x.matmul(&y).unwrap(),
            &want,
            1e-5,
            1e-5,
        );
    }
    // The nn kernel refuses a transposed operand and unaligned sizes.
    assert!(a
        .matmul_with_kernel(&bt.t().unwrap(), Kernel::MatmulVec4NnFwd)
        .is_err());
    let (odd, _) = rand_pair(&mut rng, &[k, n - 1], -1.0, 1.0);
    assert!(a.matmul_with_kernel(&odd, Kernel::MatmulVec4NnFwd).is_err());

    // Batches (3 x 2, the right operand broadcast over the first axis) at an aligned offset.
    let (big, rbig) = rand_pair(&mut rng, &[4 + 3 * 2 * 20 * 8], -1.0, 1.0);
    let x = big
        .narrow(0, 4, 3 * 2 * 20 * 8)
        .unwrap()
        .reshape(&[3, 2, 20, 8])
        .unwrap();
    let rx = Nd::new(&[3, 2, 20, 8], rbig.data[4..].to_vec());
    let (y, ry) = rand_pair(&mut rng, &[2, 8, 12], -1.0, 1.0);
    let want = rx.matmul(&Nd::new(&[1, 2, 8, 12], ry.data.clone()));
    assert_close("vec4 batched", &x.matmul(&y).unwrap(), &want, 1e-5, 1e-5);
    // An unaligned offset (1) takes another kernel, with the same answer.
    let x1 = big
        .narrow(0, 1, 3 * 2 * 20 * 8)
        .unwrap()
        .reshape(&[3, 2, 20, 8])
        .unwrap();
    let rx1 = Nd::new(&[3, 2, 20, 8], rbig.data[1..1 + 3 * 2 * 20 * 8].to_vec());
    let want1 = rx1.matmul(&Nd::new(&[1, 2, 8, 12], ry.data));
    assert_close(
        "unaligned offset",
        &x1.matmul(&y).unwrap(),
        &want1,
        1e-5,
        1e-5,
    );
    // The transposed layouts, batched: x @ w^T with w (2, 12, 8) broadcast over the first
    // axis, and x^T @ y with x stored (3, 2, 8, 20).
    let (w, rw) = rand_pair(&mut rng, &[2, 12, 8], -1.0, 1.0);
    let wt = w.transpose(-1, -2).unwrap();
    let rwt = Nd::new(&[1, 2, 12, 8], rw.data).permute(&[0, 1, 3, 2]);
    assert_close(
        "vec4 batched a @ b^T",
        &x.matmul(&wt).unwrap(),
        &rx.matmul(&rwt),
        1e-5,
        1e-5,
    );
    let (s, rs) = rand_pair(&mut rng, &[3, 2, 8, 20], -1.0, 1.0);
    let (y2, ry2) = rand_pair(&mut rng, &[3, 2, 8, 12], -1.0, 1.0);
    assert_close(
        "vec4 batched a^T @ b",
        &s.transpose(-1, -2).unwrap().matmul(&y2).unwrap(),
        &rs.permute(&[0, 1, 3, 2]).matmul(&ry2),
        1e-5,
        1e-5,
    );
}

#[test]
fn matmul_vectors() {
    let mut rng = Rng::new(2);
    let (v, rv) = rand_pair(&mut rng, &[7], -1.0, 1.0);
    let (w, rw) = rand_pair(&mut rng, &[7], -1.0, 1.0);
    let (m, rm) = rand_pair(&mut rng, &[7, 4], -1.0, 1.0);
    let dot = v.matmul(&w).unwrap();
    assert_eq!(dot.dims(), &[] as &[usize]);
    let want: f64 = rv.data.iter().zip(&rw.data).map(|(a, b)| a * b).sum();
    assert_close_slice("dot", &dot.to_vec().unwrap(), &[want], 1e-6, 1e-5);
    let vm = v.matmul(&m).unwrap();
    assert_close(
        "vector x matrix",
        &vm,
        &Nd::new(&[4], Nd::new(&[1, 7], rv.data.clone()).matmul(&rm).data),
        1e-6,
        1e-5,
    );
    let mv = m.t().unwrap().matmul(&v).unwrap();
    assert_close(
        "matrix x vector",
        &mv,
        &Nd::new(
            &[4],
            rm.permute(&[1, 0]).matmul(&Nd::new(&[7, 1], rv.data)).data,
        ),
        1e-6,
        1e-5,
    );
}

#[test]
fn matmul_errors() {
    let d = dev();
    let a = Tensor::zeros(&[3, 4], &d).unwrap();
    let e = a
        .matmul(&Tensor::zeros(&[5, 2], &d).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("matmul") && e.contains("[3, 4]") && e.contains("[5, 2]"),
        "{e}"
    );
    assert!(a.matmul(&Tensor::scalar(1.0, &d).unwrap()).is_err());
    let b1 = Tensor::zeros(&[2, 3, 4], &d).unwrap();
    let b2 = Tensor::zeros(&[3, 4, 5], &d).unwrap();
    assert!(b1.matmul(&b2).is_err(), "batch 2 vs 3 must not broadcast");
}

#[test]
fn concat_and_stack() {
    let mut rng = Rng::new(3);
    let (a, ra) = rand_pair(&mut rng, &[2, 3, 4], -1.0, 1.0);
    let (b, rb) = rand_pair(&mut rng, &[2, 5, 4], -1.0, 1.0);
    let (e, _) = rand_pair(&mut rng, &[2, 0, 4], -1.0, 1.0);
    let got = Tensor::concat(&[&a, &e, &b], 1).unwrap();
    let want = Nd::new(
        &[2, 8, 4],
        (0..64)
            .map(|i| {
                let idx = unravel(i, &[2, 8, 4]);
                if idx[1] < 3 {
                    ra.at(&idx)
                } else {
                    rb.at(&[idx[0], idx[1] - 3, idx[2]])
                }
            })
            .collect(),
    );
    assert_close("concat axis 1", &got, &want, 0.0, 0.0);
    // Non-contiguous inputs along the last axis.
    let got = Tensor::concat(
        &[&a.transpose(0, 2).unwrap(), &a.transpose(0, 2).unwrap()],
        -1,
    )
    .unwrap();
    let at = ra.permute(&[2, 1, 0]);
    let want = Nd::new(
        &[4, 3, 4],
        (0..48)
            .map(|i| {
                let idx = unravel(i, &[4, 3, 4]);
                at.at(&[idx[0], idx[1], idx[2] % 2])
            })
            .collect(),
    );
    assert_close("concat transposed", &got, &want, 0.0, 0.0);
    let s = Tensor::stack(&[&a, &a, &a], 1).unwrap();
    assert_eq!(s.dims(), &[2, 3, 3, 4]);
    let want = Nd::new(
        &[2, 3, 3, 4],
        (0..72)
            .map(|i| {
                let idx = unravel(i, &[2, 3, 3, 4]);
                ra.at(&[idx[0], idx[2], idx[3]])
            })
            .collect(),
    );
    assert_close("stack", &s, &want, 0.0, 0.0);
    assert!(Tensor::concat(&[&a, &b], 0).is_err());
    assert!(Tensor::concat(&[], 0).is_err());
    assert!(Tensor::stack(&[&a, &b], 0).is_err());
    assert!(Tensor::concat(&[&a], 3).is_err());
}

#[test]
fn index_select_and_gather() {
    // A device of its own: the bad indices below set the device's fault word.
    let d = own_device();
    let mut rng = Rng::new(4);
    let tv = rng.vec(55, -1.0, 1.0);
    let (table, rt) = (
        Tensor::from_slice(&tv, &[11, 5], &d).unwrap(),
        Nd::from_f32(&[11, 5], &tv),
    );
    let ids: Vec<usize> = (0..9).map(|_| rng.below(11)).collect();
    let got = table.index_select_slice(0, &ids).unwrap();
    let want = Nd::new(
        &[9, 5],
        ids.iter()
            .flat_map(|&i| rt.data[i * 5..i * 5 + 5].to_vec())
            .collect(),
    );
    assert_close("embedding lookup", &got, &want, 0.0, 0.0);
    // Along axis 1 of a transposed view.
    let cols = [4usize, 0, 4];
    let got = table.t().unwrap().index_select_slice(1, &cols).unwrap();
    let want = Nd::new(
        &[5, 3],
        (0..15).map(|i| rt.at(&[cols[i % 3], i / 3])).collect(),
    );
    assert_close("index_select axis 1", &got, &want, 0.0, 0.0);
    assert!(table.index_select_slice(0, &[11]).is_err());
    let idx2 = Tensor::from_slice(&[1.0, 0.0], &[1, 2], &d).unwrap();
    assert!(table.index_select(0, &idx2).is_err(), "indices must be 1-D");

    // gather along axis 1 (the cross-entropy pattern) and axis 0, with a smaller index tensor.
    let picks: Vec<f32> = (0..11 * 2).map(|_| rng.below(5) as f32).collect();
    let index = Tensor::from_slice(&picks, &[11, 2], &d).unwrap();
    let got = table.gather(1, &index).unwrap();
    let want = Nd::new(
        &[11, 2],
        (0..22)
            .map(|i| rt.at(&[i / 2, picks[i] as usize]))
            .collect(),
    );
    assert_close("gather axis 1", &got, &want, 0.0, 0.0);
    let rows: Vec<f32> = (0..3 * 5).map(|_| rng.below(11) as f32).collect();
    let index = Tensor::from_slice(&rows, &[3, 5], &d).unwrap();
    let got = table.gather(0, &index).unwrap();
    let want = Nd::new(
        &[3, 5],
        (0..15).map(|i| rt.at(&[rows[i] as usize, i % 5])).collect(),
    );
    assert_close("gather axis 0", &got, &want, 0.0, 0.0);
    assert!(table
        .gather(0, &Tensor::zeros(&[3, 6], &d).unwrap())
        .is_err());
    // Out-of-range tensor indices make the next readback an Err naming one (documented).
    let bad = Tensor::from_slice(&[11.0, -1.0], &[2], &d).unwrap();
    let e = table.index_select(0, &bad).unwrap().to_vec().unwrap_err();
    assert!(e.to_string().contains("not an integer in range"), "{e}");
}

#[test]
fn constructors() {
    let d = dev();
    assert_eq!(
        Tensor::full(&[2, 3], 2.5, &d).unwrap().to_vec().unwrap(),
        vec![2.5; 6]
    );
    assert_eq!(
        Tensor::zeros(&[0, 3], &d).unwrap().to_vec().unwrap(),
        Vec::<f32>::new()
    );
    assert_eq!(Tensor::scalar(4.0, &d).unwrap().to_scalar().unwrap(), 4.0);
    assert_eq!(
        Tensor::arange(1.0, 2.0, 0.25, &d)
            .unwrap()
            .to_vec()
            .unwrap(),
        vec![1.0, 1.25, 1.5, 1.75]
    );
    assert_eq!(
        Tensor::arange(3.0, 0.0, -1.0, &d)
            .unwrap()
            .to_vec()
            .unwrap(),
        vec![3.0, 2.0, 1.0]
    );
    assert!(Tensor::arange(0.0, 1.0, 0.0, &d).is_err());
    assert!(Tensor::arange(0.0, 1.0, -1.0, &d).is_err());
    let v: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
    let t = Tensor::from_vec(v.clone(), &[3, 4], &d).unwrap();
    assert_eq!((t.dims(), t.to_vec().unwrap()), (&[3, 4][..], v.clone()));
    assert!(Tensor::from_vec(vec![1.0; 5], &[2, 3], &d).is_err());
    let o = t.t().unwrap().ones_like().unwrap();
    assert_eq!(
        (o.dims(), o.to_vec().unwrap()),
        (&[4, 3][..], vec![1.0; 12])
    );
    let z = t.zeros_like().unwrap();
    assert_eq!(
        (z.dims(), z.to_vec().unwrap()),
        (&[3, 4][..], vec![0.0; 12])
    );
    // flatten_all of a transposed view: its elements in logical (row-major) order.
    let f = t.t().unwrap().flatten_all().unwrap();
    let want: Vec<f32> = (0..12).map(|i| v[(i % 3) * 4 + i / 3]).collect();
    assert_eq!((f.dims(), f.to_vec().unwrap()), (&[12][..], want));
    // assign writes the source's values (through a transposed source too) and nothing else.
    let target = Tensor::zeros(&[4, 3], &d).unwrap();
    target.assign(&t.t().unwrap()).unwrap();
    assert_eq!(target.to_vec().unwrap(), t.t().unwrap().to_vec().unwrap());
    assert!(target.assign(&t).is_err(), "shape mismatch");
    assert!(Tensor::from_slice(&[1.0, 2.0], &[3], &d).is_err());

    // Seeded random numbers: reproducible, seed-dependent, with the right moments.
    let n = 20000;
    let u = Tensor::rand(&[n], 5, &d).unwrap().to_vec().unwrap();
    assert_eq!(u, Tensor::rand(&[n], 5, &d).unwrap().to_vec().unwrap());
    assert_ne!(u, Tensor::rand(&[n], 6, &d).unwrap().to_vec().unwrap());
    assert!(u.iter().all(|&x| (0.0..1.0).contains(&x)));
    let m = u.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let v = u.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n as f64;
    // Standard errors: mean 0.002, variance 0.0006.
    assert!(
        (m - 0.5).abs() < 0.01 && (v - 1.0 / 12.0).abs() < 0.003,
        "uniform mean {m} var {v}"
    );
    // uniform(low, high): in range, mean (low + high) / 2, variance (high - low)^2 / 12.
    let u = Tensor::uniform(&[n], -3.0, 5.0, 8, &d)
        .unwrap()
        .to_vec()
        .unwrap();
    assert!(u.iter().all(|&x| (-3.0..5.0).contains(&x)));
    let m = u.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let v = u.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n as f64;
    // Standard errors: mean 0.016, variance 0.04.
    assert!(
        (m - 1.0).abs() < 0.08 && (v - 64.0 / 12.0).abs() < 0.2,
        "uniform(-3, 5) mean {m} var {v}"
    );
    assert!(Tensor::uniform(&[2], 1.0, 0.0, 0, &d).is_err());
    let g = Tensor::randn(&[n], 9, &d).unwrap().to_vec().unwrap();
    let m = g.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let v = g.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n as f64;
    assert!(
        m.abs() < 0.03 && (v - 1.0).abs() < 0.05,
        "normal mean {m} var {v}"
    );
    assert!(g.iter().all(|x| x.is_finite()));
    let within1 = g.iter().filter(|x| x.abs() < 1.0).count() as f64 / n as f64;
    assert!((within1 - 0.6827).abs() < 0.015, "P(|z| < 1) = {within1}");
}

#[test]
fn views_share_storage_and_contiguous_copies() {
    let d = dev();
    let t = Tensor::arange(0.0, 24.0, 1.0, &d)
        .unwrap()
        .reshape(&[2, 3, 4])
        .unwrap();
    let p = t.permute(&[2, 0, 1]).unwrap();
    assert!(p.shares_storage(&t) && !p.is_contiguous());
    let c = p.contiguous().unwrap();
    assert!(c.is_contiguous() && !c.shares_storage(&t));
    let want: Vec<f32> = (0..24)
        .map(|i| {
            let idx = unravel(i, &[4, 2, 3]);
            (idx[1] * 12 + idx[2] * 4 + idx[0]) as f32
        })
        .collect();
    assert_eq!(c.to_vec().unwrap(), want);
    assert_eq!(p.to_vec().unwrap(), want);
    let r = t.reshape(&[4, -1]).unwrap();
    assert!(r.shares_storage(&t) && r.dims() == [4, 6]);
    let r2 = p.reshape(&[-1]).unwrap();
    assert_eq!(r2.to_vec().unwrap(), want);
    assert_eq!(
        t.narrow(2, 1, 2).unwrap().squeeze(None).unwrap().dims(),
        &[2, 3, 2]
    );
    assert_eq!(t.unsqueeze(1).unwrap().dims(), &[2, 1, 3, 4]);
    assert_eq!(t.flatten(1, 2).unwrap().dims(), &[2, 12]);
    assert!(t.reshape(&[5, -1]).is_err());
    assert!(t.permute(&[0, 1]).is_err());
    assert!(t.narrow(1, 2, 2).is_err());
    assert!(t.expand(&[2, 2, 4]).is_err());
    let shown = format!("{}", Tensor::arange(0.0, 3.0, 1.0, &d).unwrap());
    assert!(shown.contains("[3]") && shown.contains("2.0000"), "{shown}");
}

/// The matmul chooser as on a hardware adapter: with autotuning on, a product of 2^21
/// multiply-adds or more times the hardware candidates once per shape class (shared-memory
/// tiles included, which software adapters never try), remembers one choice per family of
/// candidates, and gives the f64 reference's values on the first (tuning) and second (tuned)
/// run, for unaligned and vec4-aligned operands.
#[test]
fn hardware_choices_tune_the_matmuls() {
    use kiln::kernels::Kernel;
    let d = own_device();
    d.choose_as_hardware(true);
    d.set_autotune(true);
    let mut rng = Rng::new(21);
    for (m, n, k) in [(130, 129, 127), (128, 128, 128)] {
        let av = rng.vec(m * k, -1.0, 1.0);
        let bv = rng.vec(k * n, -1.0, 1.0);
        let want = Nd::from_f32(&[m, k], &av).matmul(&Nd::from_f32(&[k, n], &bv));
        for run in 0..2 {
            let a = Tensor::from_slice(&av, &[m, k], &d).unwrap();
            let b = Tensor::from_slice(&bv, &[k, n], &d).unwrap();
            d.synchronize().unwrap();
            let before = d.stats().dispatches;
            let y = a.matmul(&b).unwrap();
            d.synchronize().unwrap();
            // Tuning times each candidate 4 times (once to warm up), then runs the choice:
            // the hardware list is 4 general kernels, plus, for aligned operands, the vec4
            // and 128-tile kernels and the subgroup kernels the adapter can run.
            let subgroup = usize::from(d.subgroups_of_at_least(8))
                + usize::from(
                    d.subgroups_of_at_least(8) && d.adapter_info().subgroup_max_size >= 32,
                );
            let candidates = if m % 4 == 0 { 6 + subgroup } else { 4 };
            let dispatches = if run == 0 { 4 * candidates + 1 } else { 1 };
            assert_eq!(
                d.stats().dispatches - before,
                dispatches as u64,
                "{m}x{n}x{k} run {run}: dispatches"
            );
            assert_close(&format!("{m}x{n}x{k}, run {run}"), &y, &want, 1e-4, 1e-5);
        }
    }
    let tuned = d.tuned_kernels();
    let unaligned = [
        Kernel::MatmulFwd,
        Kernel::MatmulTiledFwd,
        Kernel::MatmulTiled128Fwd,
        Kernel::MatmulReg8Fwd,
    ];
    let mut aligned = unaligned.to_vec();
    aligned.extend([
        Kernel::MatmulVec4NnFwd,
        Kernel::MatmulT128v4NnFwd,
        Kernel::MatmulSg8NnFwd,
        Kernel::MatmulSg32NnFwd,
    ]);
    for (family, candidates) in [
        (Kernel::MatmulFwd, &unaligned[..]),
        (Kernel::MatmulVec4NnFwd, &aligned[..]),
    ] {
        let chosen: Vec<Kernel> = tuned
            .iter()
            .filter(|(f, _, _)| *f == family)
            .map(|&(_, _, k)| k)
            .collect();
        assert_eq!(chosen.len(), 1, "{family:?}: {tuned:?}");
        assert!(candidates.contains(&chosen[0]), "{family:?}: {chosen:?}");
    }
    assert_eq!(tuned.len(), 2, "one shape class each: {tuned:?}");
}

/// Transposed, batched and plain operands whose rows and columns are multiples of 4 but whose
/// inner size k is not: the vec4 kernels step through k four at a time, so these must take
/// other kernels (a transposed left operand with k = 3 once gave zeros). Against f64.
#[test]
fn inner_sizes_not_a_multiple_of_four() {
    let d = dev();
    let mut rng = Rng::new(44);
    for k in [1usize, 2, 3, 5, 6, 7, 9] {
        for batch in [vec![], vec![2], vec![3, 2]] {
            let (m, n) = (8, 4);
            let mut a_shape = batch.clone();
            a_shape.extend([k, m]);
            let mut b_shape = batch.clone();
            b_shape.extend([k, n]);
            let av = rng.vec(a_shape.iter().product(), -1.0, 1.0);
            let bv = rng.vec(b_shape.iter().product(), -1.0, 1.0);
            let r = batch.len();
            let perm: Vec<usize> = (0..r).chain([r + 1, r]).collect();
            let ra = Nd::from_f32(&a_shape, &av).permute(&perm);
            let rb = Nd::from_f32(&b_shape, &bv);
            let a = Tensor::from_slice(&av, &a_shape, &d).unwrap();
            let b = Tensor::from_slice(&bv, &b_shape, &d).unwrap();
            // a^T @ b (the weight-gradient layout), a^T @ (b^T)^T, and plain.
            let at = a.t().unwrap();
            assert_close(
                &format!("a^T b, k {k}, batch {batch:?}"),
                &at.matmul(&b).unwrap(),
                &ra.matmul(&rb),
                1e-5,
                1e-5,
            );
            let plain = at.contiguous().unwrap();
            assert_close(
                &format!("a b, k {k}, batch {batch:?}"),
                &plain.matmul(&b).unwrap(),
                &ra.matmul(&rb),
                1e-5,
                1e-5,
            );
            let bt = b.t().unwrap().contiguous().unwrap().t().unwrap();
            assert_close(
                &format!("a (b^T)^T, k {k}, batch {batch:?}"),
                &plain.matmul(&bt).unwrap(),
                &ra.matmul(&rb),
                1e-5,
                1e-5,
            );
        }
    }
}

/// The cross-check mode runs every candidate of a new shape class once against the heuristic:
/// for matmuls (unaligned, vec4-aligned, with a fused activation) and the three convolution
/// passes, every result still equals the f64 reference and the classes are remembered, so a
/// second run dispatches the product alone.
#[test]
fn cross_check_mode_runs_every_candidate() {
    use kiln::TuneMode;
    let d = own_device();
    d.set_tune_mode(TuneMode::CrossCheck);
    assert_eq!(d.tune_mode(), TuneMode::CrossCheck);
    let mut rng = Rng::new(23);
    for (m, n, k) in [(13, 9, 7), (16, 24, 12)] {
        let av = rng.vec(m * k, -1.0, 1.0);
        let bv = rng.vec(k * n, -1.0, 1.0);
        let want = Nd::from_f32(&[m, k], &av).matmul(&Nd::from_f32(&[k, n], &bv));
        let a = Tensor::from_slice(&av, &[m, k], &d).unwrap();
        let b = Tensor::from_slice(&bv, &[k, n], &d).unwrap();
        for run in 0..2 {
            d.synchronize().unwrap();
            let before = d.stats().dispatches;
            let y = a.matmul(&b).unwrap();
            d.synchronize().unwrap();
            let ran = d.stats().dispatches - before;
            assert!(
                if run == 0 { ran > 2 } else { ran == 1 },
                "{m}x{n}x{k} run {run}: {ran} dispatches"
            );
            assert_close(&format!("{m}x{n}x{k} run {run}"), &y, &want, 1e-4, 1e-5);
        }
    }
    // A convolution and both its gradients (each pass a family of its own).
    let x = Tensor::randn(&[2, 3, 7, 6], 1, &d).unwrap().requires_grad();
    let w = Tensor::randn(&[5, 3, 3, 3], 2, &d).unwrap().requires_grad();
    let y = x.conv2d(&w, None, &Default::default()).unwrap();
    y.sum_all().unwrap().backward().unwrap();
    assert!(x.grad().is_some() && w.grad().is_some());
    // A half-precision frozen graph (its outputs are compared as f32).
    let net = kiln::nn::Sequential::from_spec(
        &mut kiln::nn::Init::new(&d, 4),
        "linear(12,20) relu linear(20,8)",
    )
    .unwrap();
    let xs = Tensor::randn(&[9, 12], 5, &d).unwrap();
    let frozen = kiln::infer::freeze(net, &xs).unwrap();
    let want = frozen.predict(&xs).unwrap().to_vec().unwrap();
    if let Some(half) = to_half_or_refused(frozen) {
        let got = half.predict(&xs).unwrap().to_vec().unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 2e-2 * (1.0 + w.abs()),
                "f16 {g} against f32 {w}"
            );
        }
    }
    let families: Vec<kiln::kernels::Kernel> = d.tuned_kernels().iter().map(|t| t.0).collect();
    for f in [
        kiln::kernels::Kernel::MatmulFwd,
        kiln::kernels::Kernel::MatmulVec4NnFwd,
        kiln::kernels::Kernel::Conv2dFwd,
        kiln::kernels::Kernel::Conv2dBwdInput,
        kiln::kernels::Kernel::Conv2dBwdWeight,
    ] {
        assert!(families.contains(&f), "{f:?} not checked: {families:?}");
    }
}

/// Timed choices persist in the opt-in cache file: a second device on the same file starts
/// with them and times nothing; a file that is not a cache is an `Err` naming its line.
#[test]
fn timed_choices_persist_in_the_cache_file() {
    use kiln::{Device, DeviceOptions, TuneMode};
    let dir = std::env::temp_dir().join(format!("kiln-tune-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tune.txt");
    let _ = std::fs::remove_file(&path);
    let opts = DeviceOptions {
        tune_cache: Some(path.clone()),
        ..Default::default()
    };
    let (m, n, k) = (128, 132, 128);
    let product = |d: &Device| {
        d.set_tune_mode(TuneMode::Timed);
        let a = Tensor::randn(&[m, k], 3, d).unwrap();
        let b = Tensor::randn(&[k, n], 4, d).unwrap();
        d.synchronize().unwrap();
        let before = d.stats().dispatches;
        let y = a.matmul(&b).unwrap().to_vec().unwrap();
        (d.stats().dispatches - before, y)
    };
    let first = Device::new(&opts).unwrap();
    let (tuning, y1) = product(&first);
    assert!(
        tuning > 4,
        "the first device times the candidates: {tuning}"
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("kiln tune cache 1\n"), "{text}");
    assert_eq!(
        text.lines().count(),
        1 + first.tuned_kernels().len(),
        "{text}"
    );
    let second = Device::new(&opts).unwrap();
    assert_eq!(second.tuned_kernels().len(), first.tuned_kernels().len());
    let (tuned, y2) = product(&second);
    assert_eq!(tuned, 1, "the second device reads the choice");
    assert_eq!(y1, y2);
    assert_eq!(second.tune_cache_error(), None);
    // A file that cannot be written fails no op; the device says why.
    let unwritable = DeviceOptions {
        tune_cache: Some(dir.join("no such directory").join("tune.txt")),
        ..Default::default()
    };
    let third = Device::new(&unwritable).unwrap();
    let (tuning, y3) = product(&third);
    assert!(tuning > 4, "{tuning}");
    // Perhaps another kernel's rounding.
    assert!(y3
        .iter()
        .zip(&y1)
        .all(|(a, b)| (a - b).abs() <= 1e-4 * (1.0 + b.abs())));
    let why = third.tune_cache_error().unwrap_or_default();
    assert!(why.contains("no such directory"), "{why}");
    std::fs::write(&path, "kiln tune cache 1\nnot a line\n").unwrap();
    let e = Device::new(&opts)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("tune.txt line 2"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
