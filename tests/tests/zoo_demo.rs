//! The demo job end to end: `mglue demo --preset ci` trains the reduced synthetic zoo, merges its
//! experts with the real plugins loaded from their `.so` files, and scores every model and merge
//! on the held-out split. The experts add their skills to the base, averaging them beats the
//! base, and the model of another shape is refused by the merge plan.

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
    let role = |r: &serde_json::Value| r["role"].as_str().unwrap().to_string();
    for name in ["base", "alien", "wide", "linear (mean)", "ties d=0.5"] {
        assert!(
            rows.iter().any(|r| r["model"] == name),
            "no row `{name}` in {report}"
        );
    }
    assert!(rows.iter().filter(|r| role(r) == "merged").count() >= 3);
    // Each expert adds its skills to the base.
    let experts: Vec<&serde_json::Value> = rows.iter().filter(|r| role(r) == "expert").collect();
    assert!(experts.len() >= 2, "{report}");
    for e in experts {
        let name = e["model"].as_str().unwrap();
        for skill in e["speciality"].as_array().unwrap() {
            let skill = skill.as_str().unwrap();
            let (x, b) = (score(name, skill), score("base", skill));
            assert!(
                x >= b + 0.15,
                "expert `{name}` scores {x:.3} on {skill}, the base {b:.3}"
            );
        }
    }
    // Averaging the experts is better than the base they came from.
    let mean = |model: &str| {
        rows.iter().find(|r| r["model"] == model).unwrap()["mean"]
            .as_f64()
            .unwrap()
    };
    assert!(
        mean("linear (mean)") > mean("base") + 0.05,
        "the linear merge (mean {:.3}) is not above the base ({:.3})",
        mean("linear (mean)"),
        mean("base")
    );
    assert!(stdout.contains("is refused"), "{stdout}");
    assert!(stdout.contains("best single model"), "{stdout}");
}
