//! Providers registered from the existing ChatCLI's environment variables, so a deployment that
//! sets `OPENAI_API_KEY` or `OLLAMA_ENABLED=true` keeps working unchanged. They are named with the
//! existing ChatCLI's provider names (`OPENAI`, `CLAUDEAI`, …), come after the TOML providers in
//! alphabetical order, and never replace a TOML provider of the same name. `<PROVIDER>_MODEL` sets
//! the model of each.

use std::collections::{BTreeMap, HashMap};

use super::types::ProviderConfig;
use super::values::Secret;

/// One rule: the provider name, its kind, the variables that enable it (the first one set wins),
/// the base-URL variables, and the model variables.
struct Rule {
    name: &'static str,
    kind: &'static str,
    keys: &'static [&'static str],
    urls: &'static [&'static str],
    models: &'static [&'static str],
}

const RULES: &[Rule] = &[
    Rule {
        name: "CLAUDEAI",
        kind: "anthropic",
        keys: &["ANTHROPIC_API_KEY", "CLAUDEAI_API_KEY"],
        urls: &["ANTHROPIC_BASE_URL"],
        models: &["CLAUDEAI_MODEL", "ANTHROPIC_MODEL"],
    },
    Rule {
        name: "COPILOT",
        kind: "copilot",
        keys: &["GITHUB_COPILOT_TOKEN"],
        urls: &["COPILOT_API_BASE_URL"],
        models: &["COPILOT_MODEL"],
    },
    Rule {
        name: "GITHUB_MODELS",
        kind: "github-models",
        keys: &["GITHUB_MODELS_TOKEN", "GITHUB_TOKEN", "GH_TOKEN"],
        urls: &[],
        models: &["GITHUB_MODELS_MODEL"],
    },
    Rule {
        name: "GOOGLEAI",
        kind: "gemini",
        keys: &["GOOGLEAI_API_KEY"],
        urls: &[],
        models: &["GOOGLEAI_MODEL"],
    },
    Rule {
        name: "MOONSHOT",
        kind: "moonshot",
        keys: &["MOONSHOT_API_KEY"],
        urls: &[],
        models: &["MOONSHOT_MODEL"],
    },
    Rule {
        name: "OPENAI",
        kind: "openai",
        keys: &["OPENAI_API_KEY"],
        urls: &["OPENAI_API_URL"],
        models: &["OPENAI_MODEL"],
    },
    Rule {
        name: "OPENROUTER",
        kind: "openrouter",
        keys: &["OPENROUTER_API_KEY"],
        urls: &["OPENROUTER_API_URL"],
        models: &["OPENROUTER_MODEL"],
    },
    Rule {
        name: "XAI",
        kind: "xai",
        keys: &["XAI_API_KEY"],
        urls: &[],
        models: &["XAI_MODEL"],
    },
    Rule {
        name: "ZAI",
        kind: "zai",
        keys: &["ZAI_API_KEY"],
        urls: &[],
        models: &["ZAI_MODEL"],
    },
];

/// The variables that hold a provider's secret: every key variable of [`RULES`], then StackSpot's
/// client id and key. Each may be given instead as a file named by `<NAME>_FILE` (read by the
/// loader before the providers are registered).
pub fn secret_variables() -> impl Iterator<Item = &'static str> {
    RULES
        .iter()
        .flat_map(|r| r.keys.iter().copied())
        .chain(["CLIENT_ID", "CLIENT_KEY"])
}

fn get<'a>(env: &'a HashMap<String, String>, names: &[&str]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|n| env.get(*n).map(|v| v.trim()).filter(|v| !v.is_empty()))
}

/// The providers the environment asks for, alphabetically, each with the variable that enabled it.
pub fn from_env(env: &HashMap<String, String>) -> Vec<(ProviderConfig, &'static str)> {
    let mut out: Vec<(ProviderConfig, &'static str)> = Vec::new();
    for r in RULES {
        let Some((var, key)) = r.keys.iter().find_map(|n| {
            env.get(*n)
                .map(|v| (*n, v.trim()))
                .filter(|(_, v)| !v.is_empty())
        }) else {
            continue;
        };
        let mut p = ProviderConfig {
            name: r.name.into(),
            kind: r.kind.into(),
            api_key: Some(Secret::new(key)),
            base_url: get(env, r.urls).map(String::from),
            model: get(env, r.models).map(String::from),
            ..Default::default()
        };
        if r.name == "OPENROUTER" {
            let mut h = BTreeMap::new();
            if let Some(v) = get(env, &["OPENROUTER_HTTP_REFERER"]) {
                h.insert("HTTP-Referer".to_string(), v.to_string());
            }
            if let Some(v) = get(env, &["OPENROUTER_APP_TITLE"]) {
                h.insert("X-Title".to_string(), v.to_string());
            }
            p.headers = h;
        }
        out.push((p, var));
    }
    if get(env, &["OLLAMA_ENABLED"])
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
    {
        out.push((
            ProviderConfig {
                name: "OLLAMA".into(),
                kind: "ollama".into(),
                base_url: get(env, &["OLLAMA_BASE_URL"]).map(String::from),
                model: get(env, &["OLLAMA_MODEL"]).map(String::from),
                ..Default::default()
            },
            "OLLAMA_ENABLED",
        ));
    }
    if let (Some(id), Some(key)) = (get(env, &["CLIENT_ID"]), get(env, &["CLIENT_KEY"])) {
        out.push((
            ProviderConfig {
                name: "STACKSPOT".into(),
                kind: "stackspot".into(),
                client_id: Some(id.to_string()),
                client_key: Some(Secret::new(key)),
                realm: get(env, &["STACKSPOT_REALM"]).map(String::from),
                agent_id: get(env, &["STACKSPOT_AGENT_ID"]).map(String::from),
                model: get(env, &["STACKSPOT_MODEL"]).map(String::from),
                ..Default::default()
            },
            "CLIENT_ID",
        ));
    }
    out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    out
}

/// `CHATCLI_FALLBACK_MODEL_<PROVIDER>=model` as lower-case provider name → model.
pub fn fallback_models(env: &HashMap<String, String>) -> BTreeMap<String, String> {
    env.iter()
        .filter_map(|(k, v)| {
            let p = k.strip_prefix("CHATCLI_FALLBACK_MODEL_")?;
            (!p.is_empty() && !v.trim().is_empty())
                .then(|| (p.to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect()
}

/// `<NAME>_MODEL` for a TOML provider that sets no model itself.
pub fn model_for(env: &HashMap<String, String>, provider_name: &str) -> Option<String> {
    let var = format!(
        "{}_MODEL",
        provider_name.to_ascii_uppercase().replace('-', "_")
    );
    get(env, &[var.as_str()]).map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn chatcli_variables_register_providers_alphabetically() {
        let e = env(&[
            ("OPENAI_API_KEY", "sk-o"),
            ("OPENAI_MODEL", "gpt-x"),
            ("CLAUDEAI_API_KEY", "sk-a"),
            ("OLLAMA_ENABLED", "true"),
            ("OLLAMA_BASE_URL", "http://gpu:11434"),
            ("CLIENT_ID", "id"),
            ("CLIENT_KEY", "k"),
            ("STACKSPOT_AGENT_ID", "agent"),
            ("OPENROUTER_API_KEY", "or"),
            ("OPENROUTER_HTTP_REFERER", "https://me"),
        ]);
        let ps = from_env(&e);
        let names: Vec<&str> = ps.iter().map(|(p, _)| p.name.as_str()).collect();
        assert_eq!(
            names,
            vec!["CLAUDEAI", "OLLAMA", "OPENAI", "OPENROUTER", "STACKSPOT"]
        );
        let openai = &ps[2].0;
        assert_eq!(openai.model.as_deref(), Some("gpt-x"));
        assert_eq!(openai.api_key.as_ref().map(Secret::expose), Some("sk-o"));
        assert_eq!(ps[0].1, "CLAUDEAI_API_KEY");
        assert_eq!(ps[1].0.base_url.as_deref(), Some("http://gpu:11434"));
        assert_eq!(
            ps[3].0.headers.get("HTTP-Referer").map(String::as_str),
            Some("https://me")
        );
        assert_eq!(ps[4].0.agent_id.as_deref(), Some("agent"));
        assert!(from_env(&env(&[("OPENAI_API_KEY", " ")])).is_empty());
    }

    #[test]
    fn fallback_models_and_model_vars() {
        let e = env(&[
            ("CHATCLI_FALLBACK_MODEL_OPENAI", "gpt-mini"),
            ("MY_LLM_MODEL", "m"),
        ]);
        assert_eq!(
            fallback_models(&e).get("openai").map(String::as_str),
            Some("gpt-mini")
        );
        assert_eq!(model_for(&e, "my-llm").as_deref(), Some("m"));
    }
}
