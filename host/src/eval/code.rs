//! Code tasks as bigcode-evaluation-harness scores them: a greedy generation, cut by the task's
//! post-processing, completed into a program by the task's template (prompt + completion +
//! tests), run in the [`super::sandbox`]; pass@1 over the items.

use std::time::Duration;

use super::sandbox::{run_parallel, run_program, RunOutcome, SandboxLimits};
use super::task::{CodeSpec, PassRule, Postprocess, Task};
use super::EvalError;

/// Runs a code task's programs.
#[derive(Debug, Clone)]
pub struct CodeRunner {
    command: Vec<String>,
    file_name: String,
    pass_if: PassRule,
    limits: SandboxLimits,
    jobs: usize,
}

/// One program run: whether it passed and what it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeRun {
    /// It passed under the task's [`PassRule`].
    pub passed: bool,
    /// What the sandbox saw.
    pub outcome: RunOutcome,
}

impl CodeRunner {
    /// The runner of a `[code]` table: its interpreter, limits and pass rule.
    pub fn new(spec: &CodeSpec) -> CodeRunner {
        let jobs = spec
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        CodeRunner {
            command: spec.command.clone(),
            file_name: spec.file_name.clone(),
            pass_if: spec.pass_if,
            limits: SandboxLimits {
                timeout: Duration::from_secs_f64(spec.timeout_s),
                memory_bytes: (spec.memory_mb > 0).then_some(spec.memory_mb << 20),
                ..SandboxLimits::default()
            },
            jobs: jobs.max(1),
        }
    }

    /// The runner of a code task.
    pub fn for_task(task: &Task) -> Result<CodeRunner, EvalError> {
        task.spec()
            .code
            .as_ref()
            .map(CodeRunner::new)
            .ok_or_else(|| EvalError::TaskInvalid {
                task: task.name().to_string(),
                reason: "not a code task (no [code] table)".into(),
            })
    }

    /// The limits each program runs under.
    pub fn limits(&self) -> &SandboxLimits {
        &self.limits
    }

    /// The same runner with other limits.
    pub fn with_limits(mut self, limits: SandboxLimits) -> CodeRunner {
        self.limits = limits;
        self
    }

    /// The same runner with `jobs` programs at a time.
    pub fn with_jobs(mut self, jobs: usize) -> CodeRunner {
        self.jobs = jobs.max(1);
        self
    }

    /// Runs one program.
    pub fn run(&self, program: &str) -> Result<CodeRun, EvalError> {
        let outcome = run_program(&self.command, &self.file_name, program, &self.limits)?;
        let passed = match self.pass_if {
            PassRule::ExitZero => outcome.exited_ok(),
            PassRule::Silent => outcome.silent(),
        };
        Ok(CodeRun { passed, outcome })
    }

    /// Runs programs, several at a time; results in order.
    pub fn run_all(&self, programs: &[String]) -> Result<Vec<CodeRun>, EvalError> {
        run_parallel(programs.len(), self.jobs, |i| self.run(&programs[i]))
            .into_iter()
            .collect()
    }

    /// Runs the reference solution of the items at `indices`: the check that the task, its
    /// tests and the sandbox agree.
    pub fn run_references(&self, task: &Task, indices: &[usize]) -> Result<Vec<CodeRun>, EvalError> {
        let programs = indices
            .iter()
            .map(|&i| task.program(i, None))
            .collect::<Result<Vec<_>, _>>()?;
        self.run_all(&programs)
    }
}

/// A generation cut as the task says (the stop strings have already cut it for
/// [`Postprocess::Stop`]).
pub(crate) fn postprocess(spec: &CodeSpec, generation: &str) -> String {
    match spec.postprocess {
        Postprocess::Stop => generation.to_string(),
        Postprocess::BraceBalance => brace_balanced_prefix(generation.trim_end(), spec.open_braces),
    }
}

/// Whether `text` already contains the point where the braces balance (generation can stop).
pub(crate) fn braces_balance(text: &str, open: usize) -> bool {
    balance_point(text, open).is_some()
}

fn balance_point(code: &str, open: usize) -> Option<usize> {
    let mut depth = open as i64;
    for (i, c) in code.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if depth == 0 {
            return Some(i + c.len_utf8());
        }
    }
    None
}

/// HumanEvalPack's `remove_last_block` for brace languages: `code` up to and including the `}`
/// where the braces balance, starting `open` deep; if they never do, up to the last `}`; with
/// no `}` at all, `code` unchanged.
pub fn brace_balanced_prefix(code: &str, open: usize) -> String {
    if let Some(end) = balance_point(code, open) {
        return code[..end].to_string();
    }
    match code.rfind('}') {
        Some(i) => code[..=i].to_string(),
        None => code.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_cut_where_the_function_closes() {
        let gen = "\n  if (x) { return 1 }\n  return 2\n}\n\nconsole.log(f(3))\n}";
        assert_eq!(
            brace_balanced_prefix(gen, 1),
            "\n  if (x) { return 1 }\n  return 2\n}"
        );
        assert!(braces_balance(gen, 1));
        assert!(!braces_balance("\n  if (x) {", 1));
        assert_eq!(brace_balanced_prefix("{ a } b { c", 2), "{ a }");
        assert_eq!(brace_balanced_prefix("return 1;", 1), "return 1;");
    }
}
