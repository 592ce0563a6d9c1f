//! Agents (`<agents_dir>/*.md`) and skills (`<skills_dir>/<name>.md` or `<name>/SKILL.md`):
//! markdown with an optional YAML front matter between `---` lines. A file whose front matter does
//! not parse is skipped with a warning naming the file and the line; the others still load.
//! In a folder skill, the other `.md` files are its subskills (file name → text) and the files of
//! `scripts/` its scripts (file name → absolute path).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// One agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Agent {
    /// Name (front matter `name`, else the file name without `.md`).
    pub name: String,
    /// Description.
    pub description: String,
    /// Skills it uses.
    pub skills: Vec<String>,
    /// Plugins it uses.
    pub plugins: Vec<String>,
    /// Preferred model.
    pub model: String,
    /// The markdown body (its system prompt).
    pub content: String,
    /// The raw front matter YAML.
    pub frontmatter: String,
    /// Effort ("low", "medium", "high", "max" or empty).
    pub effort: String,
    /// Category.
    pub category: String,
    /// Version.
    pub version: String,
    /// Author.
    pub author: String,
    /// Tags.
    pub tags: Vec<String>,
}

/// One skill.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Skill {
    /// Name (front matter `name`, else the file or folder name).
    pub name: String,
    /// Description.
    pub description: String,
    /// The markdown body.
    pub content: String,
    /// Front matter `allowed-tools`.
    pub allowed_tools: Vec<String>,
    /// Other `.md` files of a folder skill: file name → text.
    pub subskills: BTreeMap<String, String>,
    /// Files of a folder skill's `scripts/`: file name → absolute path.
    pub scripts: BTreeMap<String, String>,
}

/// A list written as a YAML sequence or as one comma-separated string.
#[derive(Debug, Default)]
struct List(Vec<String>);

impl<'de> Deserialize<'de> for List {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = List;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of strings or a comma-separated string")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<List, E> {
                Ok(List(
                    s.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect(),
                ))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<List, E> {
                Ok(List::default())
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<List, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = a.next_element::<String>()? {
                    v.push(s);
                }
                Ok(List(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct AgentFront {
    name: Option<String>,
    description: Option<String>,
    skills: List,
    plugins: List,
    model: Option<String>,
    effort: Option<String>,
    category: Option<String>,
    version: Option<String>,
    author: Option<String>,
    tags: List,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SkillFront {
    name: Option<String>,
    description: Option<String>,
    #[serde(rename = "allowed-tools", alias = "allowed_tools")]
    allowed_tools: List,
}

/// The front matter (YAML text, the line of the file it starts on) and the body of a markdown file.
fn split(text: &str) -> (Option<(&str, usize)>, &str) {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let Some(rest) = text
        .strip_prefix("---\n")
        .or_else(|| text.strip_prefix("---\r\n"))
    else {
        return (None, text);
    };
    let mut offset = 0;
    for line in rest.split_inclusive('\n') {
        if line.trim_end() == "---" {
            let yaml = &rest[..offset];
            let body = &rest[offset + line.len()..];
            return (Some((yaml, 2)), body.trim_start_matches(['\r', '\n']));
        }
        offset += line.len();
    }
    (None, text)
}

/// Parses the front matter of `path`; the error names the file and the line.
fn front<T: Default + for<'de> Deserialize<'de>>(
    path: &Path,
    text: &str,
) -> Result<(T, String, String), String> {
    let (fm, body) = split(text);
    match fm {
        None => Ok((T::default(), String::new(), body.to_string())),
        Some((yaml, _)) if yaml.trim().is_empty() => {
            Ok((T::default(), yaml.to_string(), body.to_string()))
        }
        Some((yaml, first_line)) => match serde_saphyr::from_str::<T>(yaml) {
            Ok(v) => Ok((v, yaml.to_string(), body.to_string())),
            Err(e) => {
                let line = e
                    .location()
                    .map(|l| l.line() as usize + first_line - 1)
                    .unwrap_or(first_line);
                let msg = e.to_string();
                let msg = msg.lines().next().unwrap_or("invalid front matter");
                Err(format!("{}:{line}: {msg}", path.display()))
            }
        },
    }
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn or_default(v: Option<String>) -> String {
    v.unwrap_or_default()
}

fn md_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<_> = entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("md")))
        .collect();
    v.sort();
    v
}

/// Reads one agent file.
pub fn read_agent(path: &Path) -> Result<Agent, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (f, frontmatter, content): (AgentFront, _, _) = front(path, &text)?;
    Ok(Agent {
        name: f
            .name
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| stem(path)),
        description: or_default(f.description),
        skills: f.skills.0,
        plugins: f.plugins.0,
        model: or_default(f.model),
        content,
        frontmatter,
        effort: or_default(f.effort),
        category: or_default(f.category),
        version: or_default(f.version),
        author: or_default(f.author),
        tags: f.tags.0,
    })
}

/// The agents of `dir`, sorted by name; malformed files skipped with a warning.
pub fn load_agents(dir: &Path) -> Vec<Agent> {
    let mut agents: Vec<Agent> = md_files(dir)
        .iter()
        .filter_map(|p| {
            read_agent(p)
                .map_err(|e| tracing::warn!("agent file skipped: {e}"))
                .ok()
        })
        .collect();
    agents.sort_by(|a, b| a.name.cmp(&b.name));
    agents.dedup_by(|b, a| {
        let dup = a.name == b.name;
        if dup {
            tracing::warn!(agent = %a.name, "two agent files give the same name; the first is kept");
        }
        dup
    });
    agents
}

/// Reads one skill: a `<name>.md` file or a `<name>/` folder with `SKILL.md`.
pub fn read_skill(path: &Path) -> Result<Skill, String> {
    let folder = path.is_dir();
    let main = match folder {
        true => path.join("SKILL.md"),
        false => path.to_path_buf(),
    };
    let text = std::fs::read_to_string(&main).map_err(|e| format!("{}: {e}", main.display()))?;
    let (f, _, content): (SkillFront, _, _) = front(&main, &text)?;
    let mut skill = Skill {
        name: f
            .name
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| stem(path)),
        description: or_default(f.description),
        content,
        allowed_tools: f.allowed_tools.0,
        ..Skill::default()
    };
    if folder {
        for p in md_files(path) {
            let Some(name) = p.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            if name == "SKILL.md" {
                continue;
            }
            match std::fs::read_to_string(&p) {
                Ok(t) => {
                    skill.subskills.insert(name, t);
                }
                Err(e) => tracing::warn!(file = %p.display(), "subskill skipped: {e}"),
            }
        }
        if let Ok(entries) = std::fs::read_dir(path.join("scripts")) {
            for e in entries.filter_map(Result::ok) {
                let name = e.file_name().to_string_lossy().into_owned();
                let p = e.path();
                if name.starts_with('.') || !p.is_file() {
                    continue;
                }
                let abs = std::path::absolute(&p).unwrap_or(p);
                skill
                    .scripts
                    .insert(name, abs.to_string_lossy().into_owned());
            }
        }
    }
    Ok(skill)
}

/// The skills of `dir`, sorted by name; malformed ones skipped with a warning.
pub fn load_skills(dir: &Path) -> Vec<Skill> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<_> = entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .filter(|p| {
            (p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("md")))
                || (p.is_dir() && p.join("SKILL.md").is_file())
        })
        .collect();
    paths.sort();
    let mut skills: Vec<Skill> = paths
        .iter()
        .filter_map(|p| {
            read_skill(p)
                .map_err(|e| tracing::warn!("skill skipped: {e}"))
                .ok()
        })
        .collect();
    skills.sort_by(|a, b| a.name.cmp(&b.name));
    skills.dedup_by(|b, a| a.name == b.name);
    skills
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn agents_parse_front_matter_and_skip_malformed_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("ops.md"),
            "---\nname: ops\ndescription: Runs things\nskills: [k8s, logs]\nplugins: kubectl, helm\nmodel: gpt-4o\neffort: high\ntags:\n  - infra\n---\n\nYou are ops.\n",
        )
        .unwrap();
        std::fs::write(d.path().join("plain.md"), "Just a prompt.\n").unwrap();
        std::fs::write(
            d.path().join("broken.md"),
            "---\nname: broken\ndescription: [unclosed\n---\nbody\n",
        )
        .unwrap();
        let agents = load_agents(d.path());
        let names: Vec<_> = agents.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["ops", "plain"]);
        let ops = &agents[0];
        assert_eq!(ops.description, "Runs things");
        assert_eq!(ops.skills, ["k8s", "logs"]);
        assert_eq!(ops.plugins, ["kubectl", "helm"]);
        assert_eq!(ops.effort, "high");
        assert_eq!(ops.tags, ["infra"]);
        assert_eq!(ops.content, "You are ops.\n");
        assert!(ops.frontmatter.contains("model: gpt-4o"));
        assert_eq!(agents[1].content, "Just a prompt.\n");

        let err = read_agent(&d.path().join("broken.md")).unwrap_err();
        assert!(err.contains("broken.md:"), "{err}");
        let line: usize = err
            .split("broken.md:")
            .nth(1)
            .and_then(|r| r.split(':').next())
            .unwrap()
            .parse()
            .unwrap();
        assert!((2..=4).contains(&line), "{err}");
    }

    #[test]
    fn skills_from_files_and_folders() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("flat.md"),
            "---\ndescription: Flat one\nallowed-tools: [Read, Grep]\n---\nFlat body\n",
        )
        .unwrap();
        let deep = d.path().join("deep");
        std::fs::create_dir_all(deep.join("scripts")).unwrap();
        std::fs::write(
            deep.join("SKILL.md"),
            "---\nname: deep-skill\ndescription: Deep\n---\nDeep body\n",
        )
        .unwrap();
        std::fs::write(deep.join("extra.md"), "Extra text").unwrap();
        std::fs::write(deep.join("scripts/run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::create_dir_all(d.path().join("nothing")).unwrap();
        std::fs::write(d.path().join("bad.md"), "---\n: : :\n  - [\n---\n").unwrap();
        let skills = load_skills(d.path());
        let names: Vec<_> = skills.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["deep-skill", "flat"]);
        let deep_s = &skills[0];
        assert_eq!(deep_s.content, "Deep body\n");
        assert_eq!(deep_s.subskills.get("extra.md").unwrap(), "Extra text");
        let script = deep_s.scripts.get("run.sh").unwrap();
        assert!(Path::new(script).is_absolute() && script.ends_with("deep/scripts/run.sh"));
        assert_eq!(skills[1].allowed_tools, ["Read", "Grep"]);
        assert_eq!(skills[1].description, "Flat one");
    }
}
