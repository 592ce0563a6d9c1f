//! Unit tests of the layering, secrets from files, unknown keys and validation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use figment::value::Value;

use super::*;

fn sources(env: &[(&str, &str)], file: Option<&Path>, flags: Vec<FlagValue>) -> Sources {
    Sources {
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
        config_flag: file.map(Path::to_path_buf),
        default_config_path: PathBuf::from("/nonexistent/chatcli.toml"),
        flags,
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn port_flag(port: u16) -> FlagValue {
    FlagValue {
        key: "server.port",
        value: Value::serialize(port).unwrap(),
        flag: "--port",
    }
}

fn problems(s: &Sources) -> Vec<Problem> {
    match load(s) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems,
    }
}

#[test]
fn each_layer_overrides_the_one_below() {
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path(), "c.toml", "[server]\nport = 1000\n");

    let l = load(&sources(&[], None, vec![])).unwrap();
    assert_eq!(l.config.server.port, 50051);
    assert_eq!(origin(&l.figment, "server.port"), "default");

    let l = load(&sources(&[], Some(&f), vec![])).unwrap();
    assert_eq!(l.config.server.port, 1000);
    assert_eq!(
        origin(&l.figment, "server.port"),
        format!("file {}", f.display())
    );

    let env = [("CHATCLI_SERVER__PORT", "2000")];
    let l = load(&sources(&env, Some(&f), vec![])).unwrap();
    assert_eq!(l.config.server.port, 2000);
    assert_eq!(
        origin(&l.figment, "server.port"),
        "env CHATCLI_SERVER__PORT"
    );

    let env = [
        ("CHATCLI_SERVER__PORT", "2000"),
        ("CHATCLI_SERVER_PORT", "3000"),
    ];
    let l = load(&sources(&env, Some(&f), vec![])).unwrap();
    assert_eq!(l.config.server.port, 3000);
    assert_eq!(origin(&l.figment, "server.port"), "env CHATCLI_SERVER_PORT");

    let l = load(&sources(&env, Some(&f), vec![port_flag(4000)])).unwrap();
    assert_eq!(l.config.server.port, 4000);
    assert_eq!(origin(&l.figment, "server.port"), "flag --port");
}

#[test]
fn config_file_comes_from_flag_then_env_then_default_path() {
    let d = tempfile::tempdir().unwrap();
    let a = write(d.path(), "a.toml", "[server]\nport = 1\n");
    let b = write(d.path(), "b.toml", "[server]\nport = 2\n");
    let c = write(d.path(), "c.toml", "[server]\nport = 3\n");
    let env = [("CHATCLI_CONFIG", b.to_str().unwrap())];
    let mut s = sources(&env, Some(&a), vec![]);
    s.default_config_path = c.clone();
    assert_eq!(load(&s).unwrap().config.server.port, 1);
    s.config_flag = None;
    assert_eq!(load(&s).unwrap().config.server.port, 2);
    s.env.clear();
    assert_eq!(load(&s).unwrap().config.server.port, 3);
    s.default_config_path = d.path().join("missing.toml");
    let l = load(&s).unwrap();
    assert_eq!((l.config.server.port, l.file), (50051, None));
}

#[test]
fn compatible_log_level_loses_to_chatcli_log_level() {
    let l = load(&sources(&[("LOG_LEVEL", "debug")], None, vec![])).unwrap();
    assert_eq!(l.config.log.level, "debug");
    let env = [("LOG_LEVEL", "debug"), ("CHATCLI_LOG_LEVEL", "warn")];
    let l = load(&sources(&env, None, vec![])).unwrap();
    assert_eq!(l.config.log.level, "warn");
}

#[test]
fn bind_address_follows_kubernetes_and_can_be_overridden() {
    let l = load(&sources(&[], None, vec![])).unwrap();
    assert_eq!(
        l.config.server.bind_address,
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    );
    let env = [
        ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
        ("CHATCLI_SERVER_TOKEN", "t"),
    ];
    let l = load(&sources(&env, None, vec![])).unwrap();
    assert_eq!(
        l.config.server.bind_address,
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    );
    assert_eq!(
        l.config.metrics.bind_address,
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    );
    let env = [
        ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
        ("CHATCLI_BIND_ADDRESS", "127.0.0.2"),
    ];
    let l = load(&sources(&env, None, vec![])).unwrap();
    assert_eq!(
        l.config.server.bind_address,
        "127.0.0.2".parse::<IpAddr>().unwrap()
    );
}

#[test]
fn data_dir_defaults_to_home_and_env_overrides() {
    let l = load(&sources(&[("HOME", "/home/u")], None, vec![])).unwrap();
    assert_eq!(l.config.state.data_dir, PathBuf::from("/home/u/.chatcli"));
    let env = [
        ("HOME", "/home/u"),
        ("CHATCLI_DATA_DIR", "/var/lib/chatcli"),
    ];
    let l = load(&sources(&env, None, vec![])).unwrap();
    assert_eq!(
        l.config.sessions_dir(),
        PathBuf::from("/var/lib/chatcli/sessions")
    );
}

#[test]
fn secrets_are_read_from_files() {
    let d = tempfile::tempdir().unwrap();
    let tok = write(d.path(), "token", "from-file\n");
    let env = [("CHATCLI_SERVER_TOKEN_FILE", tok.to_str().unwrap())];
    let l = load(&sources(&env, None, vec![])).unwrap();
    assert_eq!(
        l.config.auth.token.as_ref().map(Secret::expose),
        Some("from-file")
    );

    let key = write(d.path(), "openai", "sk-test\n");
    let f = write(
        d.path(),
        "c.toml",
        &format!(
            "[[llm.providers]]\nname = \"o\"\nkind = \"echo\"\napi_key_file = \"{}\"\n",
            key.display()
        ),
    );
    let l = load(&sources(&[], Some(&f), vec![])).unwrap();
    assert_eq!(
        l.config.llm.providers[0]
            .api_key
            .as_ref()
            .map(Secret::expose),
        Some("sk-test")
    );

    // A relative name is looked up in systemd's credentials directory.
    write(d.path(), "cred-token", "from-credentials");
    let env = [
        ("CREDENTIALS_DIRECTORY", d.path().to_str().unwrap()),
        ("CHATCLI_AUTH__TOKEN_FILE", "cred-token"),
    ];
    let l = load(&sources(&env, None, vec![])).unwrap();
    assert_eq!(
        l.config.auth.token.as_ref().map(Secret::expose),
        Some("from-credentials")
    );
}

#[test]
fn every_provider_secret_variable_has_a_file_twin() {
    let d = tempfile::tempdir().unwrap();
    let names: Vec<&str> = super::env_providers::secret_variables().collect();
    for must in [
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "GOOGLEAI_API_KEY",
        "XAI_API_KEY",
        "OPENROUTER_API_KEY",
        "GITHUB_COPILOT_TOKEN",
        "CLIENT_ID",
        "CLIENT_KEY",
    ] {
        assert!(names.contains(&must), "{must} is not in {names:?}");
    }
    for name in names.iter().filter(|n| !n.starts_with("CLIENT_")) {
        // A relative name is looked up in systemd's credentials directory.
        write(d.path(), name, &format!("secret-of-{name}\n"));
        let file_var = format!("{name}_FILE");
        let env = [
            ("CREDENTIALS_DIRECTORY", d.path().to_str().unwrap()),
            (file_var.as_str(), *name),
        ];
        let l = load(&sources(&env, None, vec![])).unwrap();
        let keys: Vec<Option<&str>> = l
            .config
            .llm
            .providers
            .iter()
            .map(|p| p.api_key.as_ref().map(Secret::expose))
            .collect();
        let expected = format!("secret-of-{name}");
        assert_eq!(keys, vec![Some(expected.as_str())], "{file_var}");
        // It is the provider's key file, which a reload re-reads and the reloader watches.
        assert_eq!(
            l.config.llm.providers[0].api_key_file,
            Some(d.path().join(name)),
            "{file_var}"
        );
    }
    // StackSpot's id and key, here as absolute paths.
    let id = write(d.path(), "ss-id", "client-id-1\n");
    let key = write(d.path(), "ss-key", "client-key-1\n");
    let env = [
        ("CLIENT_ID_FILE", id.to_str().unwrap()),
        ("CLIENT_KEY_FILE", key.to_str().unwrap()),
    ];
    let l = load(&sources(&env, None, vec![])).unwrap();
    let p = &l.config.llm.providers[0];
    assert_eq!(p.name, "STACKSPOT");
    assert_eq!(p.client_id.as_deref(), Some("client-id-1"));
    assert_eq!(
        p.client_key.as_ref().map(Secret::expose),
        Some("client-key-1")
    );
    assert_eq!(p.client_key_file.as_deref(), Some(key.as_path()));
}

#[test]
fn a_secret_variable_and_its_file_twin_cannot_both_be_set() {
    let d = tempfile::tempdir().unwrap();
    let key = write(d.path(), "openai", "sk-file");
    let env = [
        ("OPENAI_API_KEY", "sk-env"),
        ("OPENAI_API_KEY_FILE", key.to_str().unwrap()),
    ];
    let p = problems(&sources(&env, None, vec![]));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].origin, "env OPENAI_API_KEY_FILE");
    assert!(
        p[0].message
            .contains("OPENAI_API_KEY and OPENAI_API_KEY_FILE"),
        "{}",
        p[0]
    );

    let env = [("XAI_API_KEY_FILE", "/nonexistent/xai")];
    let p = problems(&sources(&env, None, vec![]));
    assert_eq!(p[0].origin, "env XAI_API_KEY_FILE");
    assert!(
        p[0].message.contains("cannot read /nonexistent/xai"),
        "{}",
        p[0]
    );
    let empty = write(d.path(), "empty", "\n");
    let env = [("XAI_API_KEY_FILE", empty.to_str().unwrap())];
    assert!(
        problems(&sources(&env, None, vec![]))[0]
            .message
            .contains("is empty")
    );
}

#[test]
fn relative_tls_files_are_looked_up_in_the_credentials_directory() {
    let d = tempfile::tempdir().unwrap();
    let creds = d.path().to_str().unwrap();
    let with_creds = [
        ("CREDENTIALS_DIRECTORY", creds),
        ("CHATCLI_SERVER_TLS_CERT", "tls_cert"),
        ("CHATCLI_SERVER_TLS_KEY", "tls_key"),
        ("CHATCLI_TLS_CLIENT_CA", "/etc/chatcli/clients.pem"),
    ];
    let tls = load(&sources(&with_creds, None, vec![]))
        .unwrap()
        .config
        .server
        .tls;
    assert_eq!(tls.cert_file, Some(d.path().join("tls_cert")));
    assert_eq!(tls.key_file, Some(d.path().join("tls_key")));
    assert_eq!(
        tls.client_ca_file,
        Some(PathBuf::from("/etc/chatcli/clients.pem")),
        "an absolute path stays as written"
    );

    // Without the directory a relative path stays relative (to the working directory).
    let without = [
        ("CHATCLI_SERVER_TLS_CERT", "tls_cert"),
        ("CHATCLI_SERVER_TLS_KEY", "tls_key"),
    ];
    let tls = load(&sources(&without, None, vec![]))
        .unwrap()
        .config
        .server
        .tls;
    assert_eq!(tls.key_file, Some(PathBuf::from("tls_key")));
}

#[test]
fn secret_file_problems_name_the_key() {
    let d = tempfile::tempdir().unwrap();
    let env = [("CHATCLI_SERVER_TOKEN_FILE", "/nonexistent/token")];
    let p = problems(&sources(&env, None, vec![]));
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].key, "auth.token_file");
    assert_eq!(p[0].origin, "env CHATCLI_SERVER_TOKEN_FILE");
    assert!(
        p[0].message.contains("cannot read /nonexistent/token"),
        "{}",
        p[0].message
    );

    let empty = write(d.path(), "empty", "\n");
    let env = [("CHATCLI_SERVER_TOKEN_FILE", empty.to_str().unwrap())];
    assert!(
        problems(&sources(&env, None, vec![]))[0]
            .message
            .contains("is empty")
    );

    let tok = write(d.path(), "token", "x");
    let env = [
        ("CHATCLI_SERVER_TOKEN_FILE", tok.to_str().unwrap()),
        ("CHATCLI_SERVER_TOKEN", "y"),
    ];
    let p = problems(&sources(&env, None, vec![]));
    assert!(p[0].message.contains("keep one"), "{}", p[0].message);
}

#[test]
fn unknown_toml_keys_are_errors_all_listed() {
    let d = tempfile::tempdir().unwrap();
    let f = write(
        d.path(),
        "c.toml",
        "typo = 1\n[server]\nprot = 1\n[server.tls]\ncert = \"x\"\n[[llm.providers]]\nname = \"e\"\nkind = \"echo\"\nkey = \"k\"\n",
    );
    let mut keys: Vec<String> = problems(&sources(&[], Some(&f), vec![]))
        .into_iter()
        .map(|p| {
            assert_eq!(p.message, "unknown key");
            p.key
        })
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "llm.providers.0.key",
            "server.prot",
            "server.tls.cert",
            "typo"
        ]
    );
}

#[test]
fn unknown_chatcli_variables_are_warnings() {
    let env = [
        ("CHATCLI_SERVER__PROT", "1"),
        ("CHATCLI_NOT_A_THING", "1"),
        ("CHATCLI_REMOTE_ADDR", "x:1"),
        ("CHATCLI_FALLBACK_MODEL_OPENAI", "gpt"),
        ("OTHER_VAR", "1"),
    ];
    let l = load(&sources(&env, None, vec![])).unwrap();
    assert_eq!(l.warnings.len(), 2, "{:?}", l.warnings);
    assert!(
        l.warnings
            .iter()
            .any(|w| w.contains("CHATCLI_SERVER__PROT"))
    );
    assert!(l.warnings.iter().any(|w| w.contains("CHATCLI_NOT_A_THING")));
}

#[test]
fn every_problem_is_reported_at_once() {
    let d = tempfile::tempdir().unwrap();
    let f = write(
        d.path(),
        "c.toml",
        "[server]\nport = \"abc\"\nbogus = 1\n[log]\nlevel = \"=[\"\n[llm]\ndefault = \"nope\"\n[[llm.providers]]\nname = \"a\"\nkind = \"zzz\"\n",
    );
    let env = [("CHATCLI_METRICS_PORT", "x")];
    let mut keys: Vec<String> = problems(&sources(&env, Some(&f), vec![]))
        .into_iter()
        .map(|p| p.key)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "llm.default",
            "llm.providers.0.kind",
            "log.level",
            "metrics.port",
            "server.bogus",
            "server.port"
        ]
    );
}

#[test]
fn model_lists_are_checked() {
    let d = tempfile::tempdir().unwrap();
    let f = write(
        d.path(),
        "c.toml",
        "[[llm.providers]]\nname = \"e\"\nkind = \"echo\"\ndiscover_models = true\n\
         [[llm.providers]]\nname = \"o\"\nkind = \"ollama\"\nmodels = [\"a\", \" \"]\n\
         discover_models = true\nmodels_refresh = \"0s\"\n\
         [[llm.providers]]\nname = \"r\"\nkind = \"openrouter\"\napi_key = \"k\"\n\
         models = [\"anthropic/claude-x\"]\ndiscover_models = true\n",
    );
    let mut found: Vec<(String, String)> = problems(&sources(&[], Some(&f), vec![]))
        .into_iter()
        .map(|p| (p.key, p.message))
        .collect();
    found.sort();
    let keys: Vec<&str> = found.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "llm.providers.0.discover_models",
            "llm.providers.1.models",
            "llm.providers.1.models_refresh"
        ],
        "{found:?}"
    );
    assert!(found[0].1.contains("`echo`"), "{found:?}");
}

#[test]
fn invalid_toml_is_one_clear_problem() {
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path(), "c.toml", "[server\nport = 1\n");
    let p = problems(&sources(&[], Some(&f), vec![]));
    assert_eq!(p.len(), 1);
    assert!(p[0].message.starts_with("invalid TOML"), "{}", p[0].message);
    assert_eq!(p[0].origin, format!("file {}", f.display()));
}

#[test]
fn compatible_values_are_converted() {
    let env = [
        ("CHATCLI_MAX_RECV_MSG_SIZE", "0"),
        ("CHATCLI_MAX_SEND_MSG_SIZE", "2048"),
        ("CHATCLI_FALLBACK_COOLDOWN_BASE", "10s"),
        ("CHATCLI_GRPC_REFLECTION", "true"),
        ("CHATCLI_JWT_AUDIENCE", "a, b"),
    ];
    let s = sources(&env, None, vec![]);
    // An audience without any JWT key is a problem; check it is read as a list on the way.
    let e = load(&s).unwrap_err();
    assert_eq!(e.problems.len(), 1);
    assert_eq!(e.problems[0].key, "auth.jwt");
    let mut s = s;
    s.env.insert("CHATCLI_JWT_SECRET".into(), "k".into());
    let l = load(&s).unwrap();
    assert_eq!(l.config.auth.jwt.audience, vec!["a", "b"]);
    assert_eq!(l.config.server.max_recv_msg_size, 52_428_800);
    assert!(
        l.warnings
            .iter()
            .any(|w| w.contains("CHATCLI_MAX_RECV_MSG_SIZE"))
    );
    assert_eq!(l.config.server.max_send_msg_size, 2048);
    assert_eq!(
        l.config.llm.fallback_cooldown_base,
        std::time::Duration::from_secs(10)
    );
    assert!(l.config.server.reflection_env);
    assert!(!l.config.server.reflection);
}

#[test]
fn the_interactive_idle_timeout_comes_from_the_file_or_its_variable() {
    let l = load(&sources(&[], None, vec![])).unwrap();
    assert_eq!(
        l.config.limits.interactive_idle_timeout,
        std::time::Duration::from_secs(15 * 60)
    );
    let d = tempfile::tempdir().unwrap();
    let f = write(
        d.path(),
        "c.toml",
        "[limits]\ninteractive_idle_timeout = \"2m\"\n",
    );
    let l = load(&sources(&[], Some(&f), vec![])).unwrap();
    assert_eq!(
        l.config.limits.interactive_idle_timeout,
        std::time::Duration::from_secs(120)
    );
    let env = [("CHATCLI_LIMITS__INTERACTIVE_IDLE_TIMEOUT", "90s")];
    let l = load(&sources(&env, Some(&f), vec![])).unwrap();
    assert_eq!(
        l.config.limits.interactive_idle_timeout,
        std::time::Duration::from_secs(90)
    );
    assert_eq!(
        origin(&l.figment, "limits.interactive_idle_timeout"),
        "env CHATCLI_LIMITS__INTERACTIVE_IDLE_TIMEOUT"
    );
}

#[test]
fn fallback_list_from_env_is_comma_separated_and_checked() {
    let d = tempfile::tempdir().unwrap();
    let f = write(
        d.path(),
        "c.toml",
        "[[llm.providers]]\nname = \"a\"\nkind = \"echo\"\n[[llm.providers]]\nname = \"b\"\nkind = \"echo\"\n",
    );
    let env = [("CHATCLI_FALLBACK_PROVIDERS", "a, B")];
    let l = load(&sources(&env, Some(&f), vec![])).unwrap();
    assert_eq!(l.config.llm.fallback, vec!["a", "B"]);
    let env = [("CHATCLI_FALLBACK_PROVIDERS", "a,c")];
    let p = problems(&sources(&env, Some(&f), vec![]));
    assert_eq!(p[0].key, "llm.fallback");
    assert!(p[0].message.contains("`c`"));
}

#[test]
fn no_auth_on_a_public_address_is_refused_unless_allowed() {
    let env = [("CHATCLI_BIND_ADDRESS", "0.0.0.0")];
    let p = problems(&sources(&env, None, vec![]));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, "server.bind_address");
    assert!(p[0].message.contains("--allow-no-auth"), "{}", p[0].message);
    let env = [
        ("CHATCLI_BIND_ADDRESS", "0.0.0.0"),
        ("CHATCLI_ALLOW_NO_AUTH", "true"),
    ];
    assert!(load(&sources(&env, None, vec![])).is_ok());
    let env = [
        ("CHATCLI_BIND_ADDRESS", "0.0.0.0"),
        ("CHATCLI_SERVER_TOKEN", "t"),
    ];
    assert!(load(&sources(&env, None, vec![])).is_ok());
    let env = [("CHATCLI_TLS_CLIENT_CA", "/ca.pem")];
    assert_eq!(
        problems(&sources(&env, None, vec![]))[0].key,
        "server.tls.client_ca_file"
    );
}

#[test]
fn show_prints_origins_and_redacts_secrets() {
    let env = [
        ("CHATCLI_SERVER_TOKEN", "topsecret"),
        ("CHATCLI_SERVER_PORT", "6000"),
    ];
    let l = load(&sources(&env, None, vec![])).unwrap();
    let text = render_show(&l).unwrap();
    assert!(!text.contains("topsecret"), "{text}");
    assert!(
        text.contains("token = \"[redacted]\"  # env CHATCLI_SERVER_TOKEN"),
        "{text}"
    );
    assert!(
        text.contains("port = 6000  # env CHATCLI_SERVER_PORT"),
        "{text}"
    );
    assert!(text.contains("port = 9090  # default"), "{text}");
    // The output is TOML that loads back to the same values (comments aside).
    let back: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(back["server"]["port"].as_integer(), Some(6000));
}

#[test]
fn drop_ins_merge_in_name_order_and_append_providers() {
    let d = tempfile::tempdir().unwrap();
    let main = write(
        d.path(),
        "chatcli.toml",
        "[server]\nport = 1\n[[llm.providers]]\nname = \"a\"\nkind = \"echo\"\n",
    );
    std::fs::create_dir(d.path().join("conf.d")).unwrap();
    write(
        &d.path().join("conf.d"),
        "20-port.toml",
        "[server]\nport = 3\n",
    );
    write(
        &d.path().join("conf.d"),
        "10-port.toml",
        "[server]\nport = 2\n",
    );
    write(
        &d.path().join("conf.d"),
        "30-provider.toml",
        "[[llm.providers]]\nname = \"b\"\nkind = \"echo\"\n",
    );
    write(&d.path().join("conf.d"), "notes.txt", "ignored");
    let l = load(&sources(&[], Some(&main), vec![])).unwrap();
    assert_eq!(l.config.server.port, 3);
    let names: Vec<&str> = l
        .config
        .llm
        .providers
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, vec!["a", "b"]);
    assert_eq!(l.files.len(), 4);
    // Each value is credited to the file that set it, list items included.
    assert!(
        origin(&l.figment, "server.port").ends_with("20-port.toml"),
        "{}",
        origin(&l.figment, "server.port")
    );
    assert!(origin(&l.figment, "llm.providers.0.name").ends_with("chatcli.toml"));
    assert!(
        origin(&l.figment, "llm.providers.1.name").ends_with("30-provider.toml"),
        "{}",
        origin(&l.figment, "llm.providers.1.name")
    );
    assert!(origin(&l.figment, "llm.providers.1").ends_with("30-provider.toml"));
    write(
        &d.path().join("conf.d"),
        "40-bad.toml",
        "[server]\nprot = 1\n",
    );
    let p = problems(&sources(&[], Some(&main), vec![]));
    assert_eq!(p[0].key, "server.prot");
    assert!(p[0].origin.ends_with("40-bad.toml"), "{}", p[0].origin);
}

#[test]
fn trusted_proxies_are_a_list_of_addresses_or_cidrs_from_the_file_or_the_environment() {
    let l = load(&sources(&[], None, vec![])).unwrap();
    assert!(l.config.server.trusted_proxies.is_empty());

    let d = tempfile::tempdir().unwrap();
    let f = write(
        d.path(),
        "c.toml",
        "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\"]\n",
    );
    let l = load(&sources(&[], Some(&f), vec![])).unwrap();
    assert_eq!(
        l.config.server.trusted_proxies,
        vec!["10.0.0.0/8", "192.0.2.7"]
    );

    let env = [(
        "CHATCLI_SERVER__TRUSTED_PROXIES",
        "127.0.0.1/32, 2001:db8::/32",
    )];
    let l = load(&sources(&env, Some(&f), vec![])).unwrap();
    assert_eq!(
        l.config.server.trusted_proxies,
        vec!["127.0.0.1/32", "2001:db8::/32"]
    );
    assert_eq!(
        origin(&l.figment, "server.trusted_proxies"),
        "env CHATCLI_SERVER__TRUSTED_PROXIES"
    );

    let env = [(
        "CHATCLI_SERVER__TRUSTED_PROXIES",
        "10.0.0.0/8,ten,1.2.3.4/40",
    )];
    let p = problems(&sources(&env, None, vec![]));
    assert_eq!(p.len(), 2, "{p:?}");
    for problem in &p {
        assert_eq!(problem.key, "server.trusted_proxies");
        assert_eq!(problem.origin, "env CHATCLI_SERVER__TRUSTED_PROXIES");
    }
    assert!(p[0].message.contains("entry 1: `ten`"), "{}", p[0].message);
    assert!(
        p[1].message.contains("entry 2: `1.2.3.4/40`"),
        "{}",
        p[1].message
    );
}

#[test]
fn proxy_protocol_without_trusted_proxies_is_a_warning() {
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path(), "c.toml", "[server]\nproxy_protocol = true\n");
    let l = load(&sources(&[], Some(&f), vec![])).unwrap();
    assert!(l.config.server.proxy_protocol);
    assert!(
        l.warnings
            .iter()
            .any(|w| w.contains("server.proxy_protocol") && w.contains("trusted_proxies")),
        "{:?}",
        l.warnings
    );
    let f = write(
        d.path(),
        "c.toml",
        "[server]\nproxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\"]\n",
    );
    let l = load(&sources(&[], Some(&f), vec![])).unwrap();
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
}

#[test]
fn static_tokens_shorter_than_32_characters_are_warned_about() {
    let d = tempfile::tempdir().unwrap();
    let short = "short-token-1234";
    let long = "a-token-of-exactly-32-characters";
    assert_eq!(long.len(), 32);
    let short_warnings = |w: &[String]| -> Vec<String> {
        w.iter()
            .filter(|w| w.contains("shorter than 32 characters"))
            .cloned()
            .collect()
    };

    // The shared token, from the environment or a file.
    let l = load(&sources(&[("CHATCLI_SERVER_TOKEN", short)], None, vec![])).unwrap();
    let w = short_warnings(&l.warnings);
    assert_eq!(w.len(), 1, "{:?}", l.warnings);
    assert!(
        w[0].starts_with("auth.token: the token is 16 characters long"),
        "{w:?}"
    );
    let l = load(&sources(&[("CHATCLI_SERVER_TOKEN", long)], None, vec![])).unwrap();
    assert!(short_warnings(&l.warnings).is_empty(), "{:?}", l.warnings);
    let token_file = write(d.path(), "token", &format!("{short}\n"));
    let env = [("CHATCLI_SERVER_TOKEN_FILE", token_file.to_str().unwrap())];
    let l = load(&sources(&env, None, vec![])).unwrap();
    let w = short_warnings(&l.warnings);
    assert_eq!(w.len(), 1, "{:?}", l.warnings);
    assert!(w[0].starts_with("auth.token_file:"), "{w:?}");

    // Named tokens read from a file (relative names in the credentials directory); a `sha256`
    // entry cannot be measured.
    write(d.path(), "team-short", short);
    write(d.path(), "team-long", &format!("{long}\n"));
    let f = write(
        d.path(),
        "c.toml",
        &format!(
            "[[auth.tokens]]\nname = \"a\"\nfile = \"team-short\"\n\n\
             [[auth.tokens]]\nname = \"b\"\nfile = \"team-long\"\n\n\
             [[auth.tokens]]\nname = \"c\"\nsha256 = \"{}\"\n",
            "0".repeat(64)
        ),
    );
    let env = [("CREDENTIALS_DIRECTORY", d.path().to_str().unwrap())];
    let l = load(&sources(&env, Some(&f), vec![])).unwrap();
    let w = short_warnings(&l.warnings);
    assert_eq!(w.len(), 1, "{:?}", l.warnings);
    assert!(
        w[0].starts_with("auth.tokens.0.file (\"a\"): the token is 16"),
        "{w:?}"
    );
    for warning in &l.warnings {
        assert!(
            !warning.contains(short) && !warning.contains(long),
            "{warning}"
        );
    }
}

#[test]
fn catalog_settings_layer_and_validate() {
    let d = tempfile::tempdir().unwrap();
    let l = load(&sources(&[("HOME", "/home/u")], None, vec![])).unwrap();
    let c = &l.config;
    assert!(!c.catalog.allow_unsigned);
    assert_eq!(
        c.trusted_keys_dir(),
        PathBuf::from("/home/u/.chatcli/trusted-keys")
    );
    assert_eq!(c.catalog.exec_timeout, std::time::Duration::from_secs(900));
    assert_eq!(c.catalog.max_output_bytes, 8 * 1024 * 1024);
    assert!(c.catalog.env_allow.contains(&"PATH".to_string()));

    let f = write(
        d.path(),
        "c.toml",
        "[catalog]\ntrusted_keys_dir = \"/keys\"\nexec_timeout = \"30s\"\nmax_output_bytes = 1024\nenv_allow = [\"PATH\", \"MY_TOKEN\"]\n",
    );
    let env = [
        ("HOME", "/home/u"),
        ("CHATCLI_ALLOW_UNSIGNED_PLUGINS", "true"),
    ];
    let l = load(&sources(&env, Some(&f), vec![])).unwrap();
    let cat = &l.config.catalog;
    assert!(cat.allow_unsigned);
    assert_eq!(l.config.trusted_keys_dir(), PathBuf::from("/keys"));
    assert_eq!(cat.exec_timeout, std::time::Duration::from_secs(30));
    assert_eq!(cat.max_output_bytes, 1024);
    assert_eq!(cat.env_allow, ["PATH", "MY_TOKEN"]);

    let f = write(
        d.path(),
        "bad.toml",
        "[catalog]\nexec_timeout = \"16m\"\nmax_output_bytes = 0\nenv_allow = [\"A=B\"]\n",
    );
    let keys: Vec<String> = problems(&sources(&[], Some(&f), vec![]))
        .into_iter()
        .map(|p| p.key)
        .collect();
    for key in [
        "catalog.exec_timeout",
        "catalog.max_output_bytes",
        "catalog.env_allow",
    ] {
        assert!(keys.contains(&key.to_string()), "{key} not in {keys:?}");
    }
}

#[test]
fn state_defaults_to_local_and_redis_settings_are_checked() {
    let l = load(&sources(&[], None, vec![])).unwrap();
    assert_eq!(l.config.state.backend, StateBackend::Local);
    assert_eq!(l.config.state.on_unavailable, OnUnavailable::Local);
    assert!(!l.config.state.required);
    assert_eq!(l.config.state.redis.key_prefix, "chatcli:");

    let env = [
        ("CHATCLI_STATE_BACKEND", "redis"),
        ("CHATCLI_STATE_REDIS_URL", "rediss://cache.internal:6380/2"),
    ];
    let l = load(&sources(&env, None, vec![])).unwrap();
    assert_eq!(l.config.state.backend, StateBackend::Redis);
    assert_eq!(
        l.config.state.redis.url.as_deref(),
        Some("rediss://cache.internal:6380/2")
    );

    let d = tempfile::tempdir().unwrap();
    let f = write(
        d.path(),
        "c.toml",
        "[state]\nbackend = \"redis\"\non_unavailable = \"deny\"\n[state.redis]\nsentinels = [\"s1\"]\nresponse_timeout = \"0s\"\n",
    );
    let mut keys: Vec<String> = problems(&sources(&[], Some(&f), vec![]))
        .into_iter()
        .map(|p| p.key)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "state.redis.master_name",
            "state.redis.response_timeout",
            "state.redis.sentinels"
        ]
    );
    let f = write(d.path(), "c2.toml", "[state]\nbackend = \"redis\"\n");
    let p = problems(&sources(&[], Some(&f), vec![]));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, "state.redis.url");
    assert!(p[0].message.contains("must be set"), "{}", p[0].message);
    let f = write(
        d.path(),
        "c3.toml",
        "[state.redis]\nurl = \"http://user:hunter2@host\"\n",
    );
    let p = problems(&sources(&[], Some(&f), vec![]));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, "state.redis.url");
    assert!(!p[0].message.contains("hunter2"), "{}", p[0].message);
    let f = write(d.path(), "c4.toml", "[state]\nbackend = \"memcached\"\n");
    let p = problems(&sources(&[], Some(&f), vec![]));
    assert_eq!(p[0].key, "state.backend", "{p:?}");
}
