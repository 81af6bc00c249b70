//! Optimizers against PyTorch trajectories (tests/fixtures/gen_optim.py): every parameter after
//! every one of 5 steps within 1e-5 relative error; plus schedules and misuse.

mod common;

use common::*;
use kiln::optim::{
    clip_grad_norm, Adam, AdamOptions, CosineAnnealing, LinearWarmup, LrSchedule, Optimizer, Sgd,
    SgdOptions, StepDecay,
};
use kiln::Tensor;

struct Step {
    lr: f64,
    grads: Vec<Nd>,
    after: Vec<Nd>,
}

struct Case {
    name: String,
    init: Vec<Nd>,
    steps: Vec<Step>,
}

fn load() -> Vec<Case> {
    let mut cases: Vec<Case> = Vec::new();
    for line in include_str!("fixtures/optim.txt")
        .lines()
        .filter(|l| !l.starts_with('#'))
    {
        let f: Vec<&str> = line.split(' ').collect();
        match f[0] {
            "case" => cases.push(Case {
                name: f[1].into(),
                init: vec![],
                steps: vec![],
            }),
            "init" => cases.last_mut().unwrap().init.push(parse_array(&f[1..])),
            "step" => cases.last_mut().unwrap().steps.push(Step {
                lr: f[3].parse().unwrap(),
                grads: vec![],
                after: vec![],
            }),
            "grad" => cases
                .last_mut()
                .unwrap()
                .steps
                .last_mut()
                .unwrap()
                .grads
                .push(parse_array(&f[1..])),
            "after" => cases
                .last_mut()
                .unwrap()
                .steps
                .last_mut()
                .unwrap()
                .after
                .push(parse_array(&f[1..])),
            other => panic!("unknown line {other}"),
        }
    }
    cases
}

fn optimizer(name: &str, params: Vec<Tensor>) -> Box<dyn Optimizer> {
    let sgd = |o: SgdOptions| Box::new(Sgd::new(params.clone(), o).unwrap()) as Box<dyn Optimizer>;
    let adam =
        |o: AdamOptions| Box::new(Adam::new(params.clone(), o).unwrap()) as Box<dyn Optimizer>;
    match name {
        "sgd" => sgd(SgdOptions {
            lr: 0.1,
            ..Default::default()
        }),
        "sgd_momentum" => sgd(SgdOptions {
            lr: 0.05,
            momentum: 0.9,
            ..Default::default()
        }),
        "sgd_momentum_dampening_wd" => sgd(SgdOptions {
            lr: 0.05,
            momentum: 0.9,
            dampening: 0.1,
            weight_decay: 0.01,
            ..Default::default()
        }),
        "sgd_nesterov_wd" => sgd(SgdOptions {
            lr: 0.05,
            momentum: 0.8,
            nesterov: true,
            weight_decay: 0.001,
            ..Default::default()
        }),
        "sgd_maximize" => sgd(SgdOptions {
            lr: 0.05,
            momentum: 0.5,
            maximize: true,
            ..Default::default()
        }),
        "sgd_momentum_cosine_clip" => sgd(SgdOptions {
            lr: 0.1,
            momentum: 0.9,
            ..Default::default()
        }),
        "adam" => adam(AdamOptions {
            lr: 0.01,
            ..Default::default()
        }),
        "adam_wd_betas_eps" => adam(AdamOptions {
            lr: 0.02,
            betas: (0.8, 0.99),
            eps: 1e-6,
            weight_decay: 0.1,
            ..Default::default()
        }),
        // Through the AdamW constructor, which sets decoupled weight decay itself.
        "adamw" => Box::new(
            Adam::adamw(
                params,
                AdamOptions {
                    lr: 0.01,
                    weight_decay: 0.1,
                    ..Default::default()
                },
            )
            .unwrap(),
        ),
        "adam_maximize" => adam(AdamOptions {
            lr: 0.01,
            maximize: true,
            ..Default::default()
        }),
        "adamw_cosine_clip" => adam(AdamOptions {
            lr: 0.01,
            ..AdamOptions::adamw()
        }),
        other => panic!("no optimizer for {other}"),
    }
}

#[test]
fn optimizers_follow_pytorch_for_five_steps() {
    let cases = load();
    assert_eq!(cases.len(), 11, "cases in optim.txt");
    for c in &cases {
        let params: Vec<Tensor> = c.init.iter().map(|v| tensor(v).requires_grad()).collect();
        let mut opt = optimizer(&c.name, params.clone());
        let base = opt.lr();
        for (k, s) in c.steps.iter().enumerate() {
            if c.name.contains("cosine") {
                let lr = CosineAnnealing {
                    base_lr: base,
                    t_max: 5,
                    eta_min: 0.001,
                }
                .lr_at(k);
                assert!(
                    (lr as f64 - s.lr).abs() <= 1e-7 + 1e-6 * s.lr,
                    "{}: schedule lr {lr} vs {}",
                    c.name,
                    s.lr
                );
                opt.set_lr(lr);
            }
            for (p, g) in params.iter().zip(&s.grads) {
                p.set_grad(Some(tensor(g))).unwrap();
            }
            if c.name.ends_with("_clip") {
                let max = if c.name.starts_with("sgd") { 0.5 } else { 1.0 };
                clip_grad_norm(&params, max).unwrap();
            }
            opt.step().unwrap();
            for (i, (p, want)) in params.iter().zip(&s.after).enumerate() {
                assert_close(
                    &format!("{} step {k} param {i}", c.name),
                    p,
                    want,
                    1e-6,
                    1e-5,
                );
            }
        }
        assert_eq!(opt.steps(), 5);
    }
}

#[test]
fn optimizer_state_and_skipped_parameters() {
    let d = own_device();
    let a = Tensor::ones(&[3], &d).unwrap().requires_grad();
    let b = Tensor::ones(&[2], &d).unwrap().requires_grad();
    let mut opt = Adam::new(vec![a.clone(), b.clone()], AdamOptions::default()).unwrap();
    a.set_grad(Some(Tensor::ones(&[3], &d).unwrap())).unwrap();
    opt.step().unwrap();
    // b had no gradient: untouched, and no state for it.
    assert_eq!(b.to_vec().unwrap(), vec![1.0, 1.0]);
    let names: Vec<String> = opt.state().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec!["0.exp_avg", "0.exp_avg_sq", "0.step"]);
    let before = d.stats().readbacks;
    opt.step().unwrap();
    assert_eq!(d.stats().readbacks, before, "a step reads nothing back");
}

#[test]
fn misuse_is_err() {
    let d = dev();
    let plain = Tensor::ones(&[2], &d).unwrap();
    // No parameters (a module that never listed its tensors): nothing would ever train.
    for e in [
        Sgd::new(vec![], SgdOptions::default()).err(),
        Adam::new(vec![], AdamOptions::default()).err(),
        Adam::adamw(vec![], AdamOptions::adamw()).err(),
    ] {
        let e = e
            .expect("an optimizer over no parameters is an Err")
            .to_string();
        assert!(e.contains("no parameters"), "{e}");
    }
    assert!(
        Sgd::new(vec![plain.clone()], SgdOptions::default()).is_err(),
        "not a leaf that requires grad"
    );
    let w = plain.requires_grad();
    assert!(Sgd::new(
        vec![w.clone()],
        SgdOptions {
            nesterov: true,
            ..Default::default()
        }
    )
    .is_err());
    assert!(Sgd::new(
        vec![w.clone()],
        SgdOptions {
            lr: -1.0,
            ..Default::default()
        }
    )
    .is_err());
    assert!(Adam::new(
        vec![w.clone()],
        AdamOptions {
            betas: (1.0, 0.9),
            ..Default::default()
        }
    )
    .is_err());
    assert!(
        clip_grad_norm(std::slice::from_ref(&w), 1.0).is_err(),
        "no gradients to clip"
    );
    assert!(clip_grad_norm(&[w], -1.0).is_err());
}

/// clip_grad_norm returns the total L2 norm before clipping, over every parameter's gradient
/// (skipping parameters without one), and scales by max_norm / (norm + 1e-6) only above it.
#[test]
fn clip_grad_norm_returns_the_norm_before_clipping() {
    let d = dev();
    let mut rng = Rng::new(3);
    let (ga, gb) = (rng.vec(7, -2.0, 2.0), rng.vec(3, -2.0, 2.0));
    let norm: f64 = ga
        .iter()
        .chain(&gb)
        .map(|&g| (g as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    for max in [0.5 * norm, 2.0 * norm] {
        let a = Tensor::zeros(&[7], &d).unwrap().requires_grad();
        let b = Tensor::zeros(&[3], &d).unwrap().requires_grad();
        let none = Tensor::zeros(&[2], &d).unwrap().requires_grad();
        a.set_grad(Some(Tensor::from_slice(&ga, &[7], &d).unwrap()))
            .unwrap();
        b.set_grad(Some(Tensor::from_slice(&gb, &[3], &d).unwrap()))
            .unwrap();
        let got = clip_grad_norm(&[a.clone(), none, b.clone()], max as f32).unwrap();
        assert_close("returned norm", &got, &Nd::new(&[], vec![norm]), 1e-6, 1e-6);
        let scale = if max < norm { max / (norm + 1e-6) } else { 1.0 };
        for (t, g) in [(&a, &ga), (&b, &gb)] {
            let want: Vec<f64> = g.iter().map(|&v| v as f64 * scale).collect();
            assert_close(
                "clipped gradient",
                &t.grad().unwrap(),
                &Nd::new(&[g.len()], want),
                1e-6,
                1e-5,
            );
        }
    }
}

#[test]
fn schedules_match_pytorch_formulas() {
    let s = StepDecay {
        base_lr: 0.1,
        step_size: 3,
        gamma: 0.1,
    };
    let want = [0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001];
    for (t, w) in want.iter().enumerate() {
        assert!((s.lr_at(t) - w).abs() < 1e-9);
    }
    let w = LinearWarmup {
        base_lr: 0.3,
        start_factor: 1.0 / 3.0,
        end_factor: 1.0,
        total_iters: 4,
    };
    let got: Vec<f32> = (0..6).map(|t| w.lr_at(t)).collect();
    let want = [0.1, 0.15, 0.2, 0.25, 0.3, 0.3];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{got:?}");
    }
    let c = CosineAnnealing {
        base_lr: 1.0,
        t_max: 4,
        eta_min: 0.0,
    };
    assert!(
        (c.lr_at(0) - 1.0).abs() < 1e-7
            && (c.lr_at(2) - 0.5).abs() < 1e-7
            && c.lr_at(4).abs() < 1e-7
    );
}
