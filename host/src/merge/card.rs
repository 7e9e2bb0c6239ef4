//! The model card written beside every merge: what was merged, how, and the exact config.

use crate::config::MergeConfig;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Renders README.md for a merged model.
pub fn model_card(
    config: &MergeConfig,
    method: &str,
    provenance: &str,
    models: &[PathBuf],
    base: Option<&Path>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "---\nlibrary_name: transformers\ntags:\n- modelglue\n- merge\n---"
    );
    let _ = writeln!(s, "# Merged model\n");
    let _ = writeln!(
        s,
        "Made with modelglue (`mglue {}`) using the `{method}` merge method ({provenance}).\n",
        env!("CARGO_PKG_VERSION"),
    );
    if let Some(b) = base {
        let _ = writeln!(s, "Base model: `{}`\n", b.display());
    }
    let _ = writeln!(s, "## Models merged\n");
    for m in models {
        let _ = writeln!(s, "* `{}`", m.display());
    }
    let _ = writeln!(
        s,
        "\n## Configuration\n\nThe exact configuration that produced this model:\n\n```yaml"
    );
    let _ = writeln!(s, "{}", config.source_text.trim_end());
    let _ = writeln!(s, "```");
    s
}
