//! Configuration layers: a flag beats its environment variable, which beats
//! the config file (`--config ferry.toml`), which beats the default.
//!
//! Every flag except `--json`, `--force`, `--rotate`, `--help` and `--version` has an environment
//! variable named `FERRY_` + the flag's long name in upper case with `-`
//! replaced by `_` (`--max-rate` is `FERRY_MAX_RATE`). The config file uses
//! the flags' long names as keys (`max-rate = "100M"`; `max_rate` is accepted
//! too). clap resolves flag against environment; the file is applied
//! underneath by setting, before parsing, the variable of each key whose
//! variable is not already set.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

/// A mistake in how ferry was invoked: exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A usage error as an `anyhow::Error`.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// The environment variable of the flag `--long`.
pub fn env_name(long: &str) -> String {
    format!("FERRY_{}", long.to_ascii_uppercase().replace('-', "_"))
}

/// The config file named by `--config FILE` / `--config=FILE` in `args`, or
/// by `FERRY_CONFIG`.
pub fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let Some(s) = a.to_str() else { continue };
        if s == "--" {
            break;
        }
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os("FERRY_CONFIG").map(PathBuf::from)
}

/// Reads `path` and returns the environment variables it sets: for each
/// key, the variable of the flag it names and the value as clap reads it.
/// Keys that name no flag of `cmd` (or a flag without a variable) are errors.
pub fn file_layer(path: &Path, cmd: &clap::Command) -> Result<Vec<(String, String)>, UsageError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| UsageError(format!("read the config file {}: {e}", path.display())))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| UsageError(format!("config file {}: {e}", path.display())))?;
    let mut known = Vec::new();
    collect_envs(cmd, &mut known);
    let mut out = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let var = env_name(&long);
        if !known.contains(&var) {
            return Err(UsageError(format!(
                "config file {}: unknown key {key:?} (keys are the long names of ferry's flags, e.g. max-rate)",
                path.display()
            )));
        }
        let v = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .into_iter()
                .map(|i| match i {
                    toml::Value::String(s) => Ok(s),
                    toml::Value::Integer(i) => Ok(i.to_string()),
                    other => Err(UsageError(format!(
                        "config file {}: {key}: unsupported list item {other}",
                        path.display()
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            other => {
                return Err(UsageError(format!(
                    "config file {}: {key}: unsupported value {other}",
                    path.display()
                )))
            }
        };
        out.push((var, v));
    }
    Ok(out)
}

fn collect_envs(cmd: &clap::Command, out: &mut Vec<String>) {
    for a in cmd.get_arguments() {
        if let Some(e) = a.get_env().and_then(|e| e.to_str()) {
            out.push(e.to_owned());
        }
    }
    for s in cmd.get_subcommands() {
        collect_envs(s, out);
    }
}

/// Applies the config file named on the command line (if any) beneath the
/// environment. Call before parsing, while the process is single-threaded.
pub fn apply(args: &[OsString], cmd: &clap::Command) -> Result<(), UsageError> {
    let Some(path) = config_path(args) else {
        return Ok(());
    };
    for (var, value) in file_layer(&path, cmd)? {
        if std::env::var_os(&var).is_none() {
            std::env::set_var(var, value);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag of every command follows the naming rule the README states.
    #[test]
    fn every_flag_has_its_environment_variable() {
        fn walk(cmd: &clap::Command, path: &str, bad: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let Some(long) = a.get_long() else { continue };
                if matches!(long, "json" | "force" | "rotate" | "help" | "version") {
                    continue;
                }
                let want = env_name(long);
                let got = a.get_env().and_then(|e| e.to_str()).map(str::to_owned);
                if got.as_deref() != Some(want.as_str()) {
                    bad.push(format!("{path} --{long}: env {got:?}, want {want}"));
                }
            }
            for s in cmd.get_subcommands() {
                walk(s, &format!("{path} {}", s.get_name()), bad);
            }
        }
        let mut bad = Vec::new();
        walk(&crate::Cli::command(), "ferry", &mut bad);
        assert!(
            bad.is_empty(),
            "flags off the naming rule:\n{}",
            bad.join("\n")
        );
    }

    #[test]
    fn file_keys_map_to_variables_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("ferry.toml");
        std::fs::write(
            &p,
            "max-rate = \"100M\"\nwal_ttl_secs = 60\nno-busy-limit = true\nfollow = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n",
        )
        .expect("write");
        let mut got = file_layer(&p, &crate::Cli::command()).expect("valid file");
        got.sort();
        assert_eq!(
            got,
            vec![
                ("FERRY_FOLLOW".into(), "127.0.0.1:1,127.0.0.1:2".into()),
                ("FERRY_MAX_RATE".into(), "100M".into()),
                ("FERRY_NO_BUSY_LIMIT".into(), "true".into()),
                ("FERRY_WAL_TTL_SECS".into(), "60".into()),
            ]
        );
        std::fs::write(&p, "max-rat = 1\n").expect("write");
        let e = file_layer(&p, &crate::Cli::command()).expect_err("unknown key");
        assert!(e.0.contains("unknown key \"max-rat\""), "{e}");
        std::fs::write(&p, "max-rate = \n").expect("write");
        assert!(file_layer(&p, &crate::Cli::command()).is_err());
    }

    #[test]
    fn config_path_from_args() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            config_path(&a(&["ferry", "serve", "--config", "x.toml"])),
            Some(PathBuf::from("x.toml"))
        );
        assert_eq!(
            config_path(&a(&["ferry", "--config=y.toml", "serve"])),
            Some(PathBuf::from("y.toml"))
        );
    }
}
