//! The demo job end to end: `mglue demo --preset ci` trains the reduced synthetic zoo, merges its
//! experts with the real plugins loaded from their `.so` files, and scores every model and merge
//! on the held-out split. The experts add their skills to the base, averaging them keeps the
//! base's skills, and the model of another shape is refused by the merge plan.

use modelglue_e2e::{run_mglue, text};

#[test]
fn demo_trains_merges_and_scores_the_zoo() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let o = run_mglue(&["demo", "--preset", "ci", "--out", out.to_str().unwrap()]);
    let stdout = text(&o);
    assert!(o.status.success(), "{stdout}");
    eprintln!("{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let col = |skill: &str| {
        report["skills"]
            .as_array()
            .unwrap()
            .iter()
            .position(|s| s == skill)
            .unwrap_or_else(|| panic!("no column {skill}"))
    };
    let score = |model: &str, skill: &str| {
        let row = report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["model"] == model)
            .unwrap_or_else(|| panic!("no row {model}"));
        row["scores"][col(skill)].as_f64().unwrap()
    };
    let rows = report["rows"].as_array().unwrap();
    for name in [
        "base",
        "rev",
        "swap",
        "alien",
        "wide",
        "linear (mean)",
        "task_arithmetic λ=0.50",
        "ties d=0.5",
    ] {
        assert!(
            rows.iter().any(|r| r["model"] == name),
            "no row `{name}` in {report}"
        );
    }
    // Each expert adds its skill to the base.
    for skill in ["rev", "swap"] {
        let (e, b) = (score(skill, skill), score("base", skill));
        assert!(
            e >= b + 0.15,
            "expert `{skill}` scores {e:.3} on it, the base {b:.3}"
        );
    }
    // Averaging the experts keeps what the base knew (they stayed near it).
    for skill in ["pred", "succ", "dup"] {
        let (m, b) = (score("linear (mean)", skill), score("base", skill));
        assert!(
            m >= b - 0.1,
            "the linear merge scores {m:.3} on {skill}, the base {b:.3}"
        );
    }
    assert!(stdout.contains("is refused"), "{stdout}");
    assert!(stdout.contains("best single model"), "{stdout}");
}
