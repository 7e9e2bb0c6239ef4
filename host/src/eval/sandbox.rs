//! Running untrusted generated programs: one child process per program, in a fresh temporary
//! directory (removed afterwards) with an almost empty environment, a wall-clock limit (the
//! whole process group is killed when it runs out), an address-space limit (`RLIMIT_AS`), no
//! core dumps, stdin closed, stdout and stderr captured and truncated, and, where the kernel
//! allows it, no network: the child enters new user and network namespaces (`unshare(2)`, as
//! `unshare -rn` does) in which only a loopback interface exists, and it is down.
//!
//! This is the isolation bigcode-evaluation-harness gets from its `reliability_guard` plus a
//! process boundary, not a security boundary against a determined attacker: the program still
//! sees the file system with the user's permissions. Network isolation needs unprivileged user
//! namespaces or root; where neither is available (some containers and hardened kernels) the
//! programs run with the network, and a warning says so once per process.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::EvalError;

/// The limits a sandboxed program runs under.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxLimits {
    /// Wall-clock limit; the process group is killed when it is reached.
    pub timeout: Duration,
    /// Address-space limit (`RLIMIT_AS`) in bytes; `None`: unlimited.
    pub memory_bytes: Option<u64>,
    /// Bytes kept of stdout and of stderr each; the rest is read and dropped.
    pub output_bytes: usize,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        SandboxLimits {
            timeout: Duration::from_secs(3),
            memory_bytes: Some(1 << 30),
            output_bytes: 16 * 1024,
        }
    }
}

/// How a sandboxed program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "code")]
pub enum Termination {
    /// It exited with this status.
    Exited(i32),
    /// A signal ended it (e.g. 9 after the kernel's OOM killer, 11 for a crash).
    Signaled(i32),
    /// It ran out of time and its process group was killed.
    TimedOut,
}

/// What a sandboxed program did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunOutcome {
    /// How it ended.
    pub termination: Termination,
    /// Its standard output (lossy UTF-8), truncated to [`SandboxLimits::output_bytes`].
    pub stdout: String,
    /// Its standard error, truncated the same way.
    pub stderr: String,
    /// Whether either stream was longer than what was kept.
    pub truncated: bool,
    /// Wall time, milliseconds.
    pub millis: u64,
}

impl RunOutcome {
    /// Exited with status 0.
    pub fn exited_ok(&self) -> bool {
        self.termination == Termination::Exited(0)
    }

    /// Ended on its own (not killed by the time limit or a signal) and printed nothing on
    /// either stream.
    pub fn silent(&self) -> bool {
        matches!(self.termination, Termination::Exited(_))
            && self.stdout.is_empty()
            && self.stderr.is_empty()
            && !self.truncated
    }

    /// One line for logs and results: how it ended, with the error line of its output.
    pub fn summary(&self) -> String {
        // The last line naming an error (Python's and node's tracebacks put it at different
        // ends), else the last line.
        let tail = |s: &str| {
            let mut lines = s.lines().rev().filter(|l| !l.trim().is_empty());
            let line = lines
                .clone()
                .find(|l| l.contains("Error") || l.contains("error"))
                .or_else(|| lines.next())
                .unwrap_or("");
            line.trim().chars().take(200).collect::<String>()
        };
        match self.termination {
            Termination::TimedOut => "timed out".to_string(),
            Termination::Signaled(s) => format!("killed by signal {s}"),
            Termination::Exited(0) if self.stderr.is_empty() && self.stdout.is_empty() => "exit 0".into(),
            Termination::Exited(c) => {
                let msg = if self.stderr.is_empty() {
                    tail(&self.stdout)
                } else {
                    tail(&self.stderr)
                };
                format!("exit {c}: {msg}")
            }
        }
    }
}

/// Whether children are cut off from the network, decided once per process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkIsolation {
    /// New user and network namespaces (no root needed).
    UserAndNetNamespace,
    /// A new network namespace (the process is root).
    NetNamespace,
    /// No isolation; why.
    Unavailable(String),
}

impl NetworkIsolation {
    /// Whether programs run without network.
    pub fn is_isolated(&self) -> bool {
        !matches!(self, NetworkIsolation::Unavailable(_))
    }

    fn flags(&self) -> Option<libc::c_int> {
        match self {
            NetworkIsolation::UserAndNetNamespace => Some(libc::CLONE_NEWUSER | libc::CLONE_NEWNET),
            NetworkIsolation::NetNamespace => Some(libc::CLONE_NEWNET),
            NetworkIsolation::Unavailable(_) => None,
        }
    }
}

/// What this process can do, probed on first use by starting `/bin/sh -c exit` in each kind of
/// namespace; the fallback is logged once as a warning.
pub fn network_isolation() -> &'static NetworkIsolation {
    static PROBE: OnceLock<NetworkIsolation> = OnceLock::new();
    PROBE.get_or_init(|| {
        if std::env::var_os("MGLUE_SANDBOX_NO_NETNS").is_some() {
            let why = "MGLUE_SANDBOX_NO_NETNS is set".to_string();
            tracing::warn!("code sandbox: programs run WITH network access ({why})");
            return NetworkIsolation::Unavailable(why);
        }
        let mut errors = Vec::new();
        for candidate in [
            NetworkIsolation::UserAndNetNamespace,
            NetworkIsolation::NetNamespace,
        ] {
            let flags = candidate.flags().expect("candidates isolate");
            let mut cmd = Command::new("/bin/sh");
            cmd.args(["-c", "exit 0"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // SAFETY: unshare is async-signal-safe and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::unshare(flags) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            match cmd.status() {
                Ok(s) if s.success() => return candidate,
                Ok(s) => errors.push(format!("{candidate:?}: probe exited with {s}")),
                Err(e) => errors.push(format!("{candidate:?}: {e}")),
            }
        }
        let why = format!(
            "the kernel refused new network namespaces ({}); enable unprivileged user namespaces \
             (sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces) or run as root",
            errors.join("; ")
        );
        tracing::warn!("code sandbox: programs run WITH network access: {why}");
        NetworkIsolation::Unavailable(why)
    })
}

/// Runs `interpreter args… FILE` where FILE (named `file_name`) holds `source`, in a fresh
/// temporary directory, under `limits`.
pub fn run_program(
    interpreter: &[String],
    file_name: &str,
    source: &str,
    limits: &SandboxLimits,
) -> Result<RunOutcome, EvalError> {
    let (program, args) = interpreter.split_first().ok_or_else(|| EvalError::Sandbox {
        reason: "empty interpreter command".into(),
    })?;
    let dir = tempfile::Builder::new()
        .prefix("mglue-sandbox-")
        .tempdir()
        .map_err(|e| EvalError::io("create directory", &std::env::temp_dir(), e))?;
    let path = dir.path().join(file_name);
    std::fs::write(&path, source).map_err(|e| EvalError::io("write", &path, e))?;
    let outcome = spawn_and_wait(program, args, file_name, dir.path(), limits);
    // Files the program left behind go with the directory.
    let _ = std::fs::remove_dir_all(dir.path());
    outcome
}

fn spawn_and_wait(
    program: &str,
    args: &[String],
    file_name: &str,
    dir: &Path,
    limits: &SandboxLimits,
) -> Result<RunOutcome, EvalError> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .arg(file_name)
        .current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", dir)
        .env("TMPDIR", dir)
        .env("LANG", "C.UTF-8")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONHASHSEED", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let memory = limits.memory_bytes;
    let netns = network_isolation().flags();
    // SAFETY: only async-signal-safe syscalls between fork and exec, no allocation.
    unsafe {
        cmd.pre_exec(move || {
            let set = |resource, value: u64| {
                let lim = libc::rlimit {
                    rlim_cur: value as libc::rlim_t,
                    rlim_max: value as libc::rlim_t,
                };
                if libc::setrlimit(resource, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            set(libc::RLIMIT_CORE, 0)?;
            if let Some(bytes) = memory {
                set(libc::RLIMIT_AS, bytes)?;
            }
            if let Some(flags) = netns {
                if libc::unshare(flags) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| EvalError::Sandbox {
        reason: format!("cannot start `{program}`: {e} (is it installed and on PATH?)"),
    })?;
    let pgid = child.id() as libc::pid_t;
    let keep = limits.output_bytes;
    let reader = |stream: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || -> (Vec<u8>, bool) {
            let mut kept = Vec::new();
            let mut truncated = false;
            if let Some(mut s) = stream {
                let mut buf = [0u8; 8192];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let room = keep.saturating_sub(kept.len());
                            kept.extend_from_slice(&buf[..n.min(room)]);
                            truncated |= n > room;
                        }
                    }
                }
            }
            (kept, truncated)
        })
    };
    let out = reader(child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let err = reader(child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
    let mut timed_out = false;
    let status: ExitStatus = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() >= limits.timeout => {
                timed_out = true;
                kill_group(pgid);
                break child.wait().map_err(|e| EvalError::Sandbox {
                    reason: format!("cannot wait for `{program}`: {e}"),
                })?;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => {
                kill_group(pgid);
                return Err(EvalError::Sandbox {
                    reason: format!("cannot wait for `{program}`: {e}"),
                });
            }
        }
    };
    // Whatever the program started in the background goes too (and closes the pipes).
    kill_group(pgid);
    let millis = start.elapsed().as_millis() as u64;
    let (stdout, t1) = out.join().unwrap_or_default();
    let (stderr, t2) = err.join().unwrap_or_default();
    let termination = if timed_out {
        Termination::TimedOut
    } else if let Some(code) = status.code() {
        Termination::Exited(code)
    } else {
        Termination::Signaled(status.signal().unwrap_or(0))
    };
    Ok(RunOutcome {
        termination,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        truncated: t1 || t2,
        millis,
    })
}

fn kill_group(pgid: libc::pid_t) {
    // SAFETY: plain syscall; a group that no longer exists gives ESRCH, which is fine.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Runs `f(i)` for `i in 0..n` on `jobs` threads (each usually waiting on a child process);
/// results in index order.
pub fn run_parallel<T: Send>(n: usize, jobs: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<T>>> = (0..n).map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, n.max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let value = f(i);
                *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
            });
        }
    });
    slots
        .into_iter()
        .filter_map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(source: &str, limits: &SandboxLimits) -> RunOutcome {
        run_program(&["/bin/sh".to_string()], "prog.sh", source, limits).expect("runs")
    }

    #[test]
    fn captures_output_and_status_in_a_fresh_empty_directory() {
        let o = sh(
            "echo out; echo err >&2; ls -A | grep -v prog.sh; echo \"[$FOO]\"; exit 3",
            &SandboxLimits::default(),
        );
        assert_eq!(o.termination, Termination::Exited(3));
        assert_eq!(o.stdout, "out\n[]\n", "no other files, no inherited environment");
        assert_eq!(o.stderr, "err\n");
        assert_eq!(o.summary(), "exit 3: err");
    }

    #[test]
    fn output_is_truncated_to_the_limit() {
        let limits = SandboxLimits {
            output_bytes: 10,
            ..SandboxLimits::default()
        };
        let o = sh(
            "i=0; while [ $i -lt 1000 ]; do echo 0123456789; i=$((i+1)); done",
            &limits,
        );
        assert_eq!(o.stdout.len(), 10);
        assert!(o.truncated && !o.silent());
    }

    #[test]
    fn a_background_child_is_killed_with_the_group_at_the_time_limit() {
        let limits = SandboxLimits {
            timeout: Duration::from_millis(300),
            ..SandboxLimits::default()
        };
        let t = Instant::now();
        let o = sh("sleep 30 & sleep 30", &limits);
        assert_eq!(o.termination, Termination::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn parallel_results_keep_their_order() {
        assert_eq!(run_parallel(7, 3, |i| i * i), vec![0, 1, 4, 9, 16, 25, 36]);
        assert!(run_parallel(0, 3, |i| i).is_empty());
    }
}
