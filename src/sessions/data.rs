//! The in-memory shape of a saved session ([`SessionData`], [`StoredMessage`], [`StoredMeta`]) and
//! the title derived from it at save time.
//!
//! These types are independent of both the proto types (see `convert.rs`) and the JSON file layout
//! (see `format.rs`), so the wire protocol and the on-disk format can evolve separately.

/// Current version of the session file format; every file this store writes carries it.
pub const SESSION_FORMAT_VERSION: i32 = 2;

/// Titles are long enough to state a topic and short enough for one list line (the local CLI uses
/// the same cap).
const TITLE_MAX_CHARS: usize = 60;

/// One saved session: the chat history plus the agent/coder scoped histories of the local CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionData {
    /// Format version; [`SESSION_FORMAT_VERSION`] (2) whenever written, whatever the caller sets.
    pub version: i32,
    /// Topic label. When empty at save, it is derived from the first non-empty user message.
    pub title: String,
    pub chat_history: Vec<StoredMessage>,
    pub agent_history: Vec<StoredMessage>,
    pub coder_history: Vec<StoredMessage>,
    pub shared_memory: Vec<StoredMessage>,
}

impl Default for SessionData {
    fn default() -> Self {
        Self {
            version: SESSION_FORMAT_VERSION,
            title: String::new(),
            chat_history: Vec::new(),
            agent_history: Vec::new(),
            coder_history: Vec::new(),
            shared_memory: Vec::new(),
        }
    }
}

/// One turn of a stored history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredMessage {
    pub role: String,
    pub content: String,
    /// `None` on normal turns; never `Some` of an all-zero meta once read or converted.
    pub meta: Option<StoredMeta>,
}

/// Compaction/mode flags of a turn.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredMeta {
    /// The turn is a compaction summary.
    pub is_summary: bool,
    /// How many turns the summary replaced.
    pub summary_of: i32,
    /// `"chat"`, `"agent"` or `"coder"`.
    pub mode: String,
}

impl StoredMeta {
    /// True when every field has its zero value, i.e. the meta carries no information.
    pub fn is_empty(&self) -> bool {
        !self.is_summary && self.summary_of == 0 && self.mode.is_empty()
    }

    /// `None` for an all-zero meta, so "absent" has one representation.
    pub(crate) fn non_empty(self) -> Option<Self> {
        (!self.is_empty()).then_some(self)
    }
}

impl SessionData {
    /// The title to write: an explicitly set title wins (as in the local CLI), otherwise one is
    /// derived from the first non-empty user message.
    pub(crate) fn title_for_save(&self) -> String {
        if self.title.trim().is_empty() {
            derive_title(self)
        } else {
            self.title.clone()
        }
    }
}

/// The first non-empty user message of the chat, then agent, then coder history (the local CLI's
/// order), whitespace collapsed to single spaces, trimmed, cut to at most 60 characters. Empty when
/// there is no user turn with visible content.
pub fn derive_title(data: &SessionData) -> String {
    let histories = [&data.chat_history, &data.agent_history, &data.coder_history];
    for message in histories.into_iter().flatten() {
        if message.role != "user" {
            continue;
        }
        let collapsed = message
            .content
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if collapsed.is_empty() {
            continue;
        }
        let cut: String = collapsed.chars().take(TITLE_MAX_CHARS).collect();
        // A cut can land right after a word boundary; a trailing space is never part of a title.
        return cut.trim_end().to_owned();
    }
    String::new()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> StoredMessage {
        StoredMessage {
            role: role.into(),
            content: content.into(),
            meta: None,
        }
    }

    #[test]
    fn title_collapses_whitespace_and_skips_blank_and_non_user_turns() {
        let data = SessionData {
            chat_history: vec![
                msg("assistant", "I am not the title"),
                msg("user", " \n\t "),
                msg("user", "  fix\tthe \n\n build   please "),
                msg("user", "second"),
            ],
            ..SessionData::default()
        };
        assert_eq!(derive_title(&data), "fix the build please");
    }

    #[test]
    fn title_is_cut_at_60_chars_not_bytes() {
        // 'é' is 2 bytes and '日' 3 bytes in UTF-8: a byte cut would split a char or stop early.
        let content = "é日".repeat(40);
        let data = SessionData {
            chat_history: vec![msg("user", &content)],
            ..SessionData::default()
        };
        let title = derive_title(&data);
        assert_eq!(title.chars().count(), 60);
        assert_eq!(title, "é日".repeat(30));
        assert!(title.len() > 60);
    }

    #[test]
    fn title_cut_does_not_end_in_a_space() {
        let content = format!("{} tail", "a".repeat(59));
        let data = SessionData {
            chat_history: vec![msg("user", &content)],
            ..SessionData::default()
        };
        assert_eq!(derive_title(&data), "a".repeat(59));
    }

    #[test]
    fn title_falls_back_to_agent_then_coder_history() {
        let data = SessionData {
            chat_history: vec![msg("assistant", "hi")],
            agent_history: vec![msg("user", "agent   task")],
            coder_history: vec![msg("user", "coder task")],
            ..SessionData::default()
        };
        assert_eq!(derive_title(&data), "agent task");
        let none = SessionData {
            shared_memory: vec![msg("user", "memory is not a conversation")],
            ..SessionData::default()
        };
        assert_eq!(derive_title(&none), "");
    }

    #[test]
    fn explicit_title_wins_over_derived() {
        let mut data = SessionData {
            chat_history: vec![msg("user", "derived")],
            ..SessionData::default()
        };
        assert_eq!(data.title_for_save(), "derived");
        data.title = "kept".into();
        assert_eq!(data.title_for_save(), "kept");
        data.title = "   ".into();
        assert_eq!(data.title_for_save(), "derived");
    }
}
