//! The command line as an operator meets it: usage errors exit 2 with a
//! message, and configuration layers as the README says (flag, then
//! environment, then `--config` file).

use std::process::Command;

use ferry_tests::ferry_bin;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut c = Command::new(ferry_bin());
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    for k in ["FERRY_HTTP", "FERRY_TOKEN", "FERRY_CONFIG", "FERRY_DATA"] {
        if !env.iter().any(|(e, _)| e == &k) {
            c.env_remove(k);
        }
    }
    ferry_tests::code_and_text(&c.output().expect("run ferry"))
}

#[test]
fn usage_errors_exit_2_with_a_message() {
    let d = tempfile::tempdir().expect("tempdir");
    let empty = d.path().join("empty");
    let (code, out) = run(&["token", "--data", empty.to_str().expect("utf-8")], &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no ferry node at"), "{out}");
    assert!(!empty.exists(), "ferry token creates nothing");

    let (code, out) = run(
        &[
            "seed",
            "--leader",
            "127.0.0.1:9",
            "--data",
            d.path().join("s").to_str().expect("utf-8"),
        ],
        &[],
    );
    assert_eq!(code, 2, "missing credentials: {out}");
    assert!(out.contains("join token"), "{out}");

    let (code, out) = run(&["serve", "--no-such-flag"], &[]);
    assert_eq!(code, 2, "{out}");

    let long = "n".repeat(65);
    let data = d.path().join("n");
    let (code, out) = run(
        &[
            "serve",
            "--data",
            data.to_str().expect("utf-8"),
            "--node-id",
            &long,
        ],
        &[],
    );
    assert_eq!(code, 2, "a too-long node id is a usage error: {out}");
    assert!(out.contains("node id"), "{out}");
}

#[test]
fn a_flag_beats_its_variable_which_beats_the_config_file() {
    let d = tempfile::tempdir().expect("tempdir");
    let file = d.path().join("ferry.toml");
    std::fs::write(&file, "http = \"127.0.0.1:1\"\n").expect("write");
    let f = file.to_str().expect("utf-8");
    // Nothing listens on these ports: the error names the address used.
    let (code, out) = run(&["status", "--config", f], &[]);
    assert_eq!(code, 1);
    assert!(out.contains("127.0.0.1:1/"), "the file applies: {out}");
    let (_, out) = run(&["status", "--config", f], &[("FERRY_HTTP", "127.0.0.1:2")]);
    assert!(
        out.contains("127.0.0.1:2/"),
        "the variable beats the file: {out}"
    );
    let (_, out) = run(
        &["status", "--config", f, "--http", "127.0.0.1:3"],
        &[("FERRY_HTTP", "127.0.0.1:2")],
    );
    assert!(out.contains("127.0.0.1:3/"), "the flag beats both: {out}");
    let (_, out) = run(&["status"], &[("FERRY_CONFIG", f)]);
    assert!(
        out.contains("127.0.0.1:1/"),
        "FERRY_CONFIG names the file: {out}"
    );

    std::fs::write(&file, "htp = \"127.0.0.1:1\"\n").expect("write");
    let (code, out) = run(&["status", "--config", f], &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("unknown key \"htp\""), "{out}");
}
