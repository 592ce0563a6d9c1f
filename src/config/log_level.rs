//! `log.level`: the `EnvFilter` directives chatcli accepts, checked strictly (a misspelt level is
//! an error, not a silently enabled target) and spelt the way `EnvFilter` wants them.

use tracing_subscriber::EnvFilter;

/// Parses `log.level` into a filter. The error is the reason alone, without the value.
pub fn log_filter(level: &str) -> Result<EnvFilter, String> {
    if level.trim().is_empty() {
        return Err(format!("empty; {ACCEPTED_LEVELS}"));
    }
    let directives = normalize_directives(level)?;
    EnvFilter::try_new(directives).map_err(|e| e.to_string())
}

/// What `log.level` accepts, quoted in every error about it.
const ACCEPTED_LEVELS: &str = "accepted levels are trace, debug, info, warn (or warning), error and off, \
                               alone or per target (`info,chatcli=debug`)";

/// Checks each comma-separated directive and spells aliases the way `EnvFilter` wants them.
/// `EnvFilter` reads a bare word that is not a level as a target name enabled at every level, so a
/// misspelt level (`verbose`) would silently turn off every other log line; here a bare word must be
/// a level. A target is enabled with an explicit level (`chatcli=trace`).
fn normalize_directives(level: &str) -> Result<String, String> {
    let mut out = Vec::new();
    for directive in level.split(',').map(str::trim) {
        if directive.is_empty() {
            continue;
        }
        let (target, word) = match directive.rsplit_once('=') {
            // A span field filter (`target[span{field=value}]`) keeps its own syntax.
            Some((_, word)) if word.contains([']', '}']) => {
                out.push(directive.to_owned());
                continue;
            }
            Some((target, word)) => (Some(target), word),
            None if directive.contains('[') => {
                out.push(directive.to_owned());
                continue;
            }
            None => (None, directive),
        };
        let Some(word) = level_word(word) else {
            return Err(format!("`{word}` is not a log level; {ACCEPTED_LEVELS}"));
        };
        out.push(match target {
            Some(t) => format!("{t}={word}"),
            None => word.to_owned(),
        });
    }
    Ok(out.join(","))
}

/// The level `word` names (case-insensitive; `warning` is accepted for `warn`), as `EnvFilter`
/// spells it.
fn level_word(word: &str) -> Option<&'static str> {
    Some(match word.trim().to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warn" | "warning" => "warn",
        "error" => "error",
        "off" => "off",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(level: &str) -> Result<(), String> {
        log_filter(level).map(|_| ())
    }

    #[test]
    fn validate_level_accepts_directives_and_rejects_garbage() {
        assert_eq!(check("info,chatcli=debug"), Ok(()));
        assert_eq!(check("warn"), Ok(()));
        assert!(check("=[").is_err());
        assert!(check("chatcli=loud").is_err());
        assert!(check("  ").is_err());
    }

    #[test]
    fn misspelt_levels_are_refused_naming_the_accepted_words() {
        for bad in ["verbose", "chatcli=verbose", "info,loud", "warnings"] {
            let err = check(bad).err().unwrap_or_default();
            assert!(
                err.contains("accepted levels are trace, debug"),
                "{bad}: {err}"
            );
        }
        assert_eq!(check("WARNING"), Ok(()));
        assert_eq!(
            normalize_directives("Warning, chatcli=Debug ,hyper=off").as_deref(),
            Ok("warn,chatcli=debug,hyper=off")
        );
        assert_eq!(
            normalize_directives("chatcli[req{id=1}]").as_deref(),
            Ok("chatcli[req{id=1}]")
        );
    }
}
