//! The synthetic-skills zoo: the trainer's differentiable forward agrees with the runtime's (which
//! is pinned to transformers' logits in `runtime_forward`), training is deterministic, and a
//! reduced zoo built from scratch has experts that beat their base on held-out items of their
//! own skills, with no model best at everything.

use std::collections::HashSet;

use candle_core::{Device, Tensor};
use modelglue::checkpoint::Checkpoint;
use modelglue::runtime::Model;
use modelglue::zoo::{self, skills, Manifest, Preset, Role, Shape, Skill, Split, TrainModel, TrainSpec};

fn spec(steps: usize) -> TrainSpec {
    TrainSpec {
        steps,
        lr: 1e-2,
        warmup: 1,
        batch: 8,
        weight_decay: 0.0,
        mixture: Skill::ALL.iter().map(|&s| (s, 1.0)).collect(),
        seed: 5,
    }
}

const SHAPE: Shape = Shape {
    hidden: 32,
    layers: 2,
    heads: 2,
    ffn: 64,
};

#[test]
fn training_forward_matches_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = TrainModel::init(SHAPE, 3).unwrap();
    m.train(&spec(3), &HashSet::new()).unwrap();
    let saved = m.save(&dir.path().join("m"), false).unwrap();
    let runtime = Model::load(&Checkpoint::open(&saved).unwrap()).unwrap();
    let rows = ["1234+5678=6802\n", "rev abcd=dcba\n\n", "dup abcd=aabbccdd"];
    let ids: Vec<u32> = rows
        .iter()
        .flat_map(|r| skills::encode(&r[..14]).unwrap())
        .collect();
    let ids = Tensor::from_vec(ids, (3, 14), &Device::Cpu).unwrap();
    let a = m
        .forward(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = runtime
        .forward(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(
        worst <= 1e-5 * scale.max(1.0),
        "trainer vs runtime logits differ by {worst} (scale {scale})"
    );
}

#[test]
fn training_is_deterministic() {
    let run = || {
        let mut m = TrainModel::init(SHAPE, 11).unwrap();
        let losses = m.train(&spec(4), &HashSet::new()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = m.save(&dir.path().join("m"), false).unwrap();
        (losses, std::fs::read(p.join("model.safetensors")).unwrap())
    };
    let (l1, w1) = run();
    let (l2, w2) = run();
    assert_eq!(l1, l2);
    assert!(w1 == w2, "two trainings from one seed wrote different weights");
    assert!(l1.last() < l1.first(), "loss did not fall: {l1:?}");
}

#[test]
fn reduced_zoo_has_experts_that_beat_their_base() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("zoo");
    let plan = zoo::synth_plan(Preset::Ci, 0);
    let built = zoo::build_synth(&plan, &out, false, &mut |l| eprintln!("{l}")).unwrap();
    let manifest = Manifest::load(&out).unwrap();
    assert_eq!(manifest.models, built.models);
    assert!(
        zoo::build_synth(&plan, &out, false, &mut |_| ()).is_err(),
        "an existing zoo must not be replaced"
    );
    let roles: HashSet<Role> = manifest.models.iter().map(|m| m.role).collect();
    for r in [Role::Base, Role::Expert, Role::Alien, Role::OtherShape] {
        assert!(roles.contains(&r), "{r:?} missing");
    }

    let report = zoo::report(&manifest, Split::Test, true).unwrap();
    eprintln!("{}", report.to_markdown());
    for m in manifest.models.iter().filter(|m| m.role == Role::Expert) {
        for s in &m.skills {
            let (e, b) = (
                report.score(&m.name, s).unwrap(),
                report.score("base", s).unwrap(),
            );
            assert!(
                e >= b + 0.15,
                "expert `{}` scores {e:.3} on its skill {s}, base {b:.3}",
                m.name
            );
        }
    }
    for row in &report.rows {
        let beaten = report.skills.iter().any(|s| {
            report
                .rows
                .iter()
                .any(|o| o.model != row.model && report.score(&o.model, s) > report.score(&row.model, s))
        });
        assert!(beaten, "`{}` is best at every skill", row.model);
    }
}
