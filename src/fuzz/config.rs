//! Config loading ([`crate::config::load`]) of hostile TOML files, drop-ins and environments: no
//! panic; a config that fails names its problems; a loaded config written back as TOML loads to
//! the same config.

use std::collections::HashMap;
use std::path::Path;

use proptest::prelude::*;

use crate::config::{Config, Sources, load};

/// The environment variables the loader maps onto keys, plus unknown `CHATCLI_*` names.
const ENV_NAMES: &[&str] = &[
    "CHATCLI_LOG_LEVEL",
    "CHATCLI_LOG_FORMAT",
    "CHATCLI_LOG_MAX_SIZE_MB",
    "CHATCLI_LOG_COMPRESS",
    "CHATCLI_SERVER_PORT",
    "CHATCLI_BIND_ADDRESS",
    "CHATCLI_SHUTDOWN_GRACE",
    "CHATCLI_MAX_RECV_MSG_SIZE",
    "CHATCLI_MAX_SEND_MSG_SIZE",
    "CHATCLI_MAX_CONCURRENT_STREAMS",
    "CHATCLI_ALLOW_NO_AUTH",
    "CHATCLI_METRICS_PORT",
    "CHATCLI_SERVER_TOKEN",
    "CHATCLI_JWT_SECRET",
    "CHATCLI_JWT_ISSUER",
    "CHATCLI_JWT_AUDIENCE",
    "CHATCLI_RATE_LIMIT_RPS",
    "CHATCLI_RATE_LIMIT_BURST",
    "CHATCLI_FALLBACK_PROVIDERS",
    "CHATCLI_FALLBACK_MAX_RETRIES",
    "CHATCLI_FALLBACK_COOLDOWN_BASE",
    "CHATCLI_FALLBACK_COOLDOWN_MAX",
    "CHATCLI_ALLOW_HTTP_PROVIDERS",
    "CHATCLI_WATCH_INTERVAL",
    "CHATCLI_WATCH_WINDOW",
    "CHATCLI_WATCH_MAX_LOG_LINES",
    "CHATCLI_ALLOW_UNSIGNED_PLUGINS",
    "LOG_LEVEL",
    "CHATCLI_UNKNOWN_SETTING",
    "CHATCLI_",
    "OPENAI_API_KEY",
    "LLM_PROVIDER",
];

/// Every dotted key of the default config with its default value, the skeleton of the generated
/// files.
fn default_keys() -> Vec<(String, toml::Value)> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<(String, toml::Value)>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
    let mut out = Vec::new();
    walk(
        "",
        &toml::Value::try_from(Config::default()).unwrap(),
        &mut out,
    );
    out
}

/// A TOML value of any type, mostly small, sometimes extreme.
fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(toml::Value::Integer),
        prop_oneof![
            Just(0i64),
            Just(-1),
            Just(1),
            Just(65535),
            Just(65536),
            Just(i64::MAX)
        ]
        .prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
        "[^\u{0}]{0,20}".prop_map(toml::Value::String),
        prop_oneof![
            Just("1s"),
            Just("0s"),
            Just("-5s"),
            Just("999999999999h"),
            Just("1.5m"),
            Just("")
        ]
        .prop_map(|s| toml::Value::String(s.into())),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        proptest::collection::vec(inner, 0..3).prop_map(toml::Value::Array)
    })
}

/// TOML text setting `edits` keys (indexes into `keys`) to generated values.
fn toml_file(keys: &[(String, toml::Value)], edits: &[(usize, toml::Value)]) -> String {
    let mut doc = toml::Table::new();
    for (i, value) in edits {
        let (key, _) = &keys[i % keys.len()];
        let mut table = &mut doc;
        let parts: Vec<&str> = key.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            let entry = table
                .entry((*p).to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => table = t,
                _ => return String::new(),
            }
        }
        table.insert(parts[parts.len() - 1].to_string(), value.clone());
    }
    toml::to_string(&doc).unwrap_or_default()
}

fn sources(dir: &Path, env: HashMap<String, String>) -> Sources {
    Sources {
        env,
        config_flag: Some(dir.join("chatcli.toml")),
        default_config_path: dir.join("absent.toml"),
        flags: Vec::new(),
    }
}

/// Loads a config file (and drop-ins) under a fresh folder: a failure must name problems.
fn load_texts(main: &[u8], drop_ins: &[Vec<u8>], env: HashMap<String, String>) -> Option<Config> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("chatcli.toml"), main).unwrap();
    if !drop_ins.is_empty() {
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        for (i, d) in drop_ins.iter().enumerate() {
            std::fs::write(dir.path().join(format!("conf.d/{i:02}.toml")), d).unwrap();
        }
    }
    match load(&sources(dir.path(), env)) {
        Ok(loaded) => Some(loaded.config),
        Err(e) => {
            assert!(!e.problems.is_empty(), "a failed load names no problem");
            for p in &e.problems {
                assert!(!p.to_string().is_empty());
            }
            None
        }
    }
}

fn edits() -> impl Strategy<Value = Vec<(usize, toml::Value)>> {
    proptest::collection::vec((any::<usize>(), toml_value()), 0..6)
}

proptest! {
    #![proptest_config(super::config(48))]

    #[test]
    fn arbitrary_config_bytes_never_panic(
        main in proptest::collection::vec(any::<u8>(), 0..1024),
        drop_in in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        load_texts(&main, &[drop_in], HashMap::new());
    }

    #[test]
    fn mistyped_settings_fail_with_problems_never_panic(
        main in edits(),
        drop_ins in proptest::collection::vec(edits(), 0..3),
    ) {
        let keys = default_keys();
        let drop_ins: Vec<Vec<u8>> = drop_ins.iter().map(|d| toml_file(&keys, d).into_bytes()).collect();
        load_texts(toml_file(&keys, &main).as_bytes(), &drop_ins, HashMap::new());
    }

    #[test]
    fn hostile_environments_never_panic(
        env in proptest::collection::vec(
            (proptest::sample::select(ENV_NAMES), prop_oneof![
                "[^\u{0}]{0,24}",
                Just(String::new()),
                "-?[0-9]{1,25}(\\.[0-9]{0,4})?[a-z]{0,2}",
            ]),
            0..8,
        ),
    ) {
        let env: HashMap<String, String> = env.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        load_texts(b"", &[], env);
    }

    #[test]
    fn loaded_configs_written_back_load_the_same(main in edits()) {
        let keys = default_keys();
        if let Some(config) = load_texts(toml_file(&keys, &main).as_bytes(), &[], HashMap::new()) {
            let text = toml::to_string(&config).unwrap();
            let again = load_texts(text.as_bytes(), &[], HashMap::new())
                .unwrap_or_else(|| panic!("a loaded config written back fails to load:\n{text}"));
            prop_assert_eq!(toml::to_string(&again).unwrap(), text);
        }
    }
}

/// Corpus: each file is a config file, loaded alone and as a drop-in of an empty file.
#[test]
fn config_corpus() {
    for (_name, bytes) in super::corpus("config") {
        load_texts(&bytes, &[], HashMap::new());
        load_texts(b"", &[bytes], HashMap::new());
    }
}
