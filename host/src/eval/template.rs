//! Prompt templates: Jinja, configured as lm-eval configures jinja2 (trailing newlines kept,
//! undefined variables are errors, no auto-escaping), with Python's `str` methods
//! (`question.strip()`, `subject.replace('_', ' ')`) so lm-eval task YAMLs paste unchanged.

use minijinja::syntax::SyntaxConfig;
use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value};

/// The compiled templates of one task, by name.
#[derive(Debug)]
pub(crate) struct Templates {
    env: Environment<'static>,
}

impl Templates {
    pub(crate) fn new() -> Templates {
        let mut env = Environment::new();
        if let Ok(syntax) = SyntaxConfig::builder().keep_trailing_newline(true).build() {
            env.set_syntax(syntax);
        }
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        Templates { env }
    }

    /// Compiles `source` under `name`.
    pub(crate) fn add(&mut self, name: &str, source: &str) -> Result<(), minijinja::Error> {
        self.env.add_template_owned(name.to_string(), source.to_string())
    }

    /// Renders template `name` with the fields of `doc`.
    pub(crate) fn render(&self, name: &str, doc: &Value) -> Result<String, minijinja::Error> {
        self.env.get_template(name)?.render(doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::value::Serde;

    fn doc() -> Value {
        Value::from(Serde(serde_json::json!({
            "question": "  Why?  ",
            "subject": "high_school_physics",
            "choices": ["a", "b"],
        })))
    }

    #[test]
    fn python_string_methods_and_indexing_render_as_in_jinja2() {
        let mut t = Templates::new();
        t.add("q", "{{question.strip()}}\nA. {{choices[0]}}\nAnswer:")
            .expect("compiles");
        t.add("d", "about {{subject.replace('_', ' ')}}.\n\n")
            .expect("compiles");
        assert_eq!(t.render("q", &doc()).expect("renders"), "Why?\nA. a\nAnswer:");
        assert_eq!(
            t.render("d", &doc()).expect("renders"),
            "about high school physics.\n\n"
        );
    }

    #[test]
    fn undefined_fields_are_errors_not_empty_strings() {
        let mut t = Templates::new();
        t.add("x", "{{nope}}").expect("compiles");
        assert!(t.render("x", &doc()).is_err());
    }

    #[test]
    fn html_is_not_escaped() {
        let mut t = Templates::new();
        t.add("x.html", "{{s}}").expect("compiles");
        let v = Value::from(Serde(serde_json::json!({"s": "a < b & \"c\""})));
        assert_eq!(t.render("x.html", &v).expect("renders"), "a < b & \"c\"");
    }
}
