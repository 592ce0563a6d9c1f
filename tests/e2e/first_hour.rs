//! What a new user meets first, through the real binary: a misspelt log level is a config error
//! naming the accepted words, `config show` prints TOML that `config check` accepts with each
//! value's real origin, and the server logs which files its config was built from.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use predicates::prelude::*;

use crate::support::{BinaryServer, HANG_GUARD, chatcli_command, demo_config};

fn cli(home: &Path) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::from_std(chatcli_command(home));
    cmd.timeout(HANG_GUARD);
    cmd
}

fn repo_file(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Writes `text` to `path` and asserts that `config check` accepts it.
fn assert_checks_clean(home: &Path, path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    cli(home)
        .args(["config", "check", "--config"])
        .arg(path)
        .assert()
        .code(0);
}

#[test]
fn a_misspelt_log_level_is_a_config_error_naming_the_accepted_words() {
    let home = tempfile::tempdir().unwrap();
    for (how, level) in [
        ("file", "verbose"),
        ("file", "chatcli=loud"),
        ("env", "verbose"),
    ] {
        let config = home.path().join("level.toml");
        let body = match how {
            "file" => format!("[log]\nlevel = \"{level}\"\n"),
            _ => String::new(),
        };
        std::fs::write(&config, body).unwrap();
        for sub in [
            &["config", "check"][..],
            &["server", "--port", "0", "--metrics-port", "0"],
        ] {
            let mut cmd = cli(home.path());
            if how == "env" {
                cmd.env("CHATCLI_LOG_LEVEL", level);
            }
            cmd.args(sub)
                .arg("--config")
                .arg(&config)
                .assert()
                .code(78)
                .stderr(
                    predicate::str::contains("`log.level`")
                        .and(predicate::str::contains(format!("`{level}`")))
                        .and(predicate::str::contains(
                            "accepted levels are trace, debug, info, warn (or warning), error and off",
                        )),
                );
        }
    }
}

/// `warning` is the documented alias of `warn`: the server starts and its warnings are written.
#[test]
fn the_warning_alias_keeps_warnings_in_the_log() {
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("warning.toml");
    // No provider: the server warns about it at start.
    std::fs::write(&config, "[log]\nlevel = \"warning\"\n").unwrap();
    let mut child = chatcli_command(home.path())
        .env("CHATCLI_DATA_DIR", home.path().join("data"))
        .args(["server", "--port", "0", "--metrics-port", "0", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let pipe = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let found = loop {
        match rx.recv_timeout(HANG_GUARD) {
            Ok(line) if line.contains("no LLM provider is configured") => break Some(line),
            Ok(line) => seen.push(line),
            Err(_) => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let line = found.unwrap_or_else(|| panic!("no warning logged at level `warning`: {seen:?}"));
    assert!(line.contains("WARN"), "{line}");
    // Info lines are filtered out at this level.
    assert!(
        !seen.iter().any(|l| l.contains("starting chatcli server")),
        "{seen:?}"
    );
}

/// `config show` of the demo config (with its drop-in) and of the example config is valid input,
/// and a value no file sets is credited to the default.
#[test]
fn config_show_output_round_trips_through_config_check() {
    let home = tempfile::tempdir().unwrap();
    for source in ["config/demo.toml", "config/chatcli.example.toml"] {
        let out = cli(home.path())
            .args(["config", "show", "--config"])
            .arg(repo_file(source))
            .output()
            .unwrap();
        assert!(out.status.success(), "{source}: {out:?}");
        let shown = String::from_utf8(out.stdout).unwrap();
        // The shown file lives apart from conf.d/, so the drop-ins are not merged twice.
        let copy = home.path().join("shown.toml");
        assert_checks_clean(home.path(), &copy, &shown);
        // Showing the shown file again gives the same values.
        let again = cli(home.path())
            .args(["config", "show", "--config"])
            .arg(&copy)
            .output()
            .unwrap();
        let values = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| l.split("  # ").next().unwrap_or_default().to_string())
                .collect()
        };
        assert_eq!(
            values(&shown),
            values(&String::from_utf8(again.stdout).unwrap()),
            "{source}"
        );
    }
    let out = cli(home.path())
        .args(["config", "show", "--config"])
        .arg(demo_config())
        .output()
        .unwrap();
    let shown = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = shown.lines().collect();
    // The demo file sets no provider timeout: it is the default, not the file's.
    assert!(lines.contains(&"timeout = \"2m\"  # default"), "{shown}");
    assert!(!shown.contains("[llm.providers.0"), "{shown}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("name = \"echo-slow\"") && l.ends_with("50-echo-slow.toml")),
        "{shown}"
    );
}

/// Tables keyed by names the user chooses load from the file and from variables, and `config show`
/// writes them back as valid TOML.
#[test]
fn user_keyed_tables_load_and_show_as_valid_toml() {
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("maps.toml");
    std::fs::write(
        &config,
        "[auth.mtls.roles]\n\"client.example.com\" = \"readonly\"\n\n\
         [limits.roles.readonly]\nrate_limit_rps = 1.0\n\n\
         [llm.fallback_models]\necho = \"echo-2\"\n\n\
         [[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\n\n\
         [llm.providers.headers]\nHTTP-Referer = \"https://example.com\"\n",
    )
    .unwrap();
    let out = cli(home.path())
        .env("CHATCLI_LIMITS__ROLES__USER__RATE_LIMIT_BURST", "7")
        .args(["config", "show", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("unknown"), "{stderr}");
    let shown = String::from_utf8(out.stdout).unwrap();
    let file = format!("# file {}", config.display());
    for want in [
        format!("\"client.example.com\" = \"readonly\"  {file}"),
        format!("rate_limit_rps = 1.0  {file}"),
        format!("echo = \"echo-2\"  {file}"),
        format!("HTTP-Referer = \"https://example.com\"  {file}"),
        "rate_limit_burst = 7  # env CHATCLI_LIMITS__ROLES__USER__RATE_LIMIT_BURST".to_string(),
    ] {
        assert!(
            shown.lines().any(|l| l == want),
            "{want:?} missing:\n{shown}"
        );
    }
    let copy = home.path().join("copy/shown.toml");
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    assert_checks_clean(home.path(), &copy, &shown);
    // A misspelt key inside a role's table is still refused.
    std::fs::write(&config, "[limits.roles.readonly]\nrate_limit_rsp = 1.0\n").unwrap();
    cli(home.path())
        .args(["config", "check", "--config"])
        .arg(&config)
        .assert()
        .code(78)
        .stderr(predicate::str::contains(
            "limits.roles.readonly.rate_limit_rsp",
        ));
}

/// The start and every reload name the files the config was built from, drop-ins included.
#[tokio::test]
async fn the_files_of_the_config_are_logged_at_start_and_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("chatcli.toml");
    std::fs::write(
        &config,
        "[[llm.providers]]\nname = \"echo\"\nkind = \"echo\"\n",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("conf.d")).unwrap();
    let drop_in = dir.path().join("conf.d/50-more.toml");
    std::fs::write(
        &drop_in,
        "[[llm.providers]]\nname = \"echo-2\"\nkind = \"echo\"\n",
    )
    .unwrap();
    let server = BinaryServer::start(&config, &[]);
    let both = format!(
        "config loaded from {}, {}",
        config.display(),
        drop_in.display()
    );
    assert!(server.stderr().contains(&both), "{}", server.stderr());

    let second = dir.path().join("conf.d/60-late.toml");
    std::fs::write(&second, "[limits]\nrate_limit_burst = 40\n").unwrap();
    let after = format!("configuration reloaded; {both}, {}", second.display());
    tokio::time::timeout(Duration::from_secs(20), server.wait_for_log(&after))
        .await
        .unwrap_or_else(|_| panic!("no reload line naming {after:?}:\n{}", server.stderr()));
}

/// The README and docs/ link only to files that a clone has, and the README shows the client.
#[test]
fn the_docs_link_only_inside_the_repository_and_show_the_client() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    assert!(pages.len() >= 4, "README.md and the docs/ pages: {pages:?}");
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        assert!(
            !text.contains("../shared"),
            "{} links outside the repository",
            page.display()
        );
        // Every relative Markdown link `](target)` names a file of the repository.
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let target = &rest[..rest.find(')').unwrap_or(rest.len())];
            let target = target.split('#').next().unwrap_or_default();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let resolved = page.parent().unwrap().join(target);
            assert!(
                resolved.exists(),
                "{} links to {target}, which is not in the repository",
                page.display()
            );
        }
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for needle in [
        "## Use the client",
        "chatcli connect",
        "--json",
        "/session save",
    ] {
        assert!(
            readme.contains(needle),
            "the README does not show {needle:?}"
        );
    }
}

/// Every one-shot `chatcli connect` command the README shows runs as written against the demo
/// config (the address and the binary swapped for the test's).
#[tokio::test]
async fn the_readmes_one_shot_client_commands_work() {
    let readme = std::fs::read_to_string(repo_file("README.md")).unwrap();
    let commands: Vec<&str> = readme
        .lines()
        .map(|l| l.split("  #").next().unwrap_or_default().trim())
        .filter(|l| l.contains("chatcli connect 127.0.0.1:50051") && l.contains(" -p "))
        .collect();
    assert!(commands.len() >= 3, "{commands:?}");
    let server = BinaryServer::start(&demo_config(), &[]);
    let home = tempfile::tempdir().unwrap();
    for command in commands {
        let line = command.replace("127.0.0.1:50051", &server.addr.to_string());
        let (stdin, line) = match line.split_once(" | ") {
            Some((producer, consumer)) => {
                let text = producer.strip_prefix("echo ").unwrap_or(producer);
                (
                    Some(text.trim_matches('"').to_string() + "\n"),
                    consumer.to_string(),
                )
            }
            None => (None, line),
        };
        let words = split_words(line.strip_prefix("chatcli ").unwrap());
        let mut cmd = cli(home.path());
        cmd.args(&words);
        if let Some(input) = stdin {
            cmd.write_stdin(input);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{command}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stdout.is_empty(), "{command}: no answer");
    }
}

/// Splits a shell command line of plain words and double-quoted strings.
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}
