//! Terminal output of the interactive client: a spinner on stderr until the first token, and the
//! answer on stdout, either as it arrives (plain) or rendered as Markdown line by line (when stdout
//! is a terminal and `NO_COLOR` is not set): the unfinished line shows raw as tokens arrive and is
//! redrawn styled once its newline comes.

use std::io::Write;
use std::time::Duration;

use termimad::MadSkin;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use unicode_width::UnicodeWidthStr as _;

/// A spinner drawn on stderr; [`Spinner::stop`] erases it.
#[derive(Debug)]
pub struct Spinner {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Spinner {
    /// Starts drawing `label` when `enabled` (stderr is a terminal); otherwise does nothing.
    pub fn start(enabled: bool, label: &str) -> Self {
        if !enabled {
            return Self {
                stop: None,
                task: None,
            };
        }
        let (tx, mut rx) = oneshot::channel();
        let label = label.to_string();
        let task = tokio::spawn(async move {
            const FRAMES: [&str; 10] = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];
            let mut i = 0;
            // Wait a moment first: a fast answer should not flash a spinner.
            let mut tick = tokio::time::interval(Duration::from_millis(90));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    _ = tick.tick() => {
                        let mut err = std::io::stderr().lock();
                        let _ = write!(err, "\r{} {label}", FRAMES[i % FRAMES.len()]);
                        let _ = err.flush();
                        i += 1;
                    }
                }
            }
            if i > 0 {
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[2K");
                let _ = err.flush();
            }
        });
        Self {
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops and erases the spinner; returns once the line is clean.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Prints a streamed answer.
pub enum AnswerPrinter {
    /// Text as it arrives.
    Plain {
        /// Whether the last byte written was a newline (or nothing was written).
        at_line_start: bool,
    },
    /// Markdown, line by line.
    Markdown(Box<MarkdownStream>),
}

impl std::fmt::Debug for AnswerPrinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Plain { .. } => f.write_str("AnswerPrinter::Plain"),
            Self::Markdown(_) => f.write_str("AnswerPrinter::Markdown"),
        }
    }
}

impl AnswerPrinter {
    /// Markdown when `markdown`, else plain.
    pub fn new(markdown: bool) -> Self {
        if markdown {
            Self::Markdown(Box::default())
        } else {
            Self::Plain {
                at_line_start: true,
            }
        }
    }

    /// Prints a chunk and flushes.
    pub fn push(&mut self, chunk: &str) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        match self {
            Self::Plain { at_line_start } => {
                out.write_all(chunk.as_bytes())?;
                if let Some(c) = chunk.chars().last() {
                    *at_line_start = c == '\n';
                }
            }
            Self::Markdown(md) => md.push(&mut out, chunk)?,
        }
        out.flush()
    }

    /// Ends the answer: renders what is left and makes sure the cursor is on a new line.
    pub fn finish(&mut self) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        match self {
            Self::Plain { at_line_start } => {
                if !*at_line_start {
                    out.write_all(b"\n")?;
                    *at_line_start = true;
                }
            }
            Self::Markdown(md) => md.finish(&mut out)?,
        }
        out.flush()
    }
}

/// Line-by-line Markdown rendering of a stream.
pub struct MarkdownStream {
    skin: MadSkin,
    /// The unfinished line, shown raw so far.
    partial: String,
    in_fence: bool,
}

impl Default for MarkdownStream {
    fn default() -> Self {
        Self::new()
    }
}

fn term_width() -> usize {
    let (w, _) = termimad::terminal_size();
    let w = usize::from(w);
    if w < 20 { 80 } else { w }
}

impl MarkdownStream {
    /// A renderer with termimad's default skin.
    pub fn new() -> Self {
        Self {
            skin: MadSkin::default(),
            partial: String::new(),
            in_fence: false,
        }
    }

    /// Erases the raw unfinished line from the screen.
    fn erase_partial(&self, out: &mut impl Write, width: usize) -> std::io::Result<()> {
        if self.partial.is_empty() {
            return Ok(());
        }
        let cols = self.partial.width().max(1);
        let rows_up = (cols - 1) / width;
        out.write_all(b"\r")?;
        if rows_up > 0 {
            write!(out, "\x1b[{rows_up}A")?;
        }
        out.write_all(b"\x1b[J")
    }

    fn render_line(
        &mut self,
        out: &mut impl Write,
        line: &str,
        width: usize,
    ) -> std::io::Result<()> {
        let fence = line.trim_start().starts_with("```");
        if fence {
            self.in_fence = !self.in_fence;
            return writeln!(out, "{}", self.skin.inline_code.apply_to(line));
        }
        if self.in_fence {
            // One line of a code block, styled as one.
            let block = format!("```\n{line}\n```");
            return write!(out, "{}", self.skin.text(&block, Some(width)));
        }
        if line.trim().is_empty() {
            return writeln!(out);
        }
        write!(out, "{}", self.skin.text(line, Some(width)))
    }

    /// Takes a chunk: complete lines are redrawn styled, the rest is shown raw.
    pub fn push(&mut self, out: &mut impl Write, chunk: &str) -> std::io::Result<()> {
        let width = term_width();
        for piece in chunk.split_inclusive('\n') {
            if let Some(text) = piece.strip_suffix('\n') {
                self.erase_partial(out, width)?;
                let mut line = std::mem::take(&mut self.partial);
                line.push_str(text);
                let line = line.trim_end_matches('\r').to_string();
                self.render_line(out, &line, width)?;
            } else {
                out.write_all(piece.as_bytes())?;
                self.partial.push_str(piece);
            }
        }
        Ok(())
    }

    /// Renders the unfinished last line.
    pub fn finish(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        if self.partial.is_empty() {
            return Ok(());
        }
        let width = term_width();
        self.erase_partial(out, width)?;
        let line = std::mem::take(&mut self.partial);
        self.render_line(out, &line, width)?;
        self.in_fence = false;
        Ok(())
    }

    /// Forgets the unfinished line (the answer was cancelled): leaves it raw and ends the line.
    pub fn abandon(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        if !self.partial.is_empty() {
            out.write_all(b"\n")?;
        }
        self.partial.clear();
        self.in_fence = false;
        Ok(())
    }
}

impl AnswerPrinter {
    /// Ends a cancelled answer without rendering the unfinished line.
    pub fn abandon(&mut self) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        match self {
            Self::Plain { at_line_start } => {
                if !*at_line_start {
                    out.write_all(b"\n")?;
                    *at_line_start = true;
                }
            }
            Self::Markdown(md) => md.abandon(&mut out)?,
        }
        out.flush()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn markdown_lines_are_redrawn_once_complete() {
        let mut md = MarkdownStream::new();
        let mut out = Vec::new();
        md.push(&mut out, "Hello **wor").unwrap();
        assert_eq!(String::from_utf8_lossy(&out), "Hello **wor");
        md.push(&mut out, "ld**\nnext").unwrap();
        let text = String::from_utf8_lossy(&out).to_string();
        // The raw partial line was erased and the styled line drawn without the asterisks.
        assert!(text.contains("\r\x1b[J"), "{text:?}");
        let after = &text[text.find("\r\x1b[J").unwrap()..];
        assert!(after.contains("Hello "), "{after:?}");
        assert!(!after.contains("**"), "{after:?}");
        assert!(after.ends_with("next"), "{after:?}");
        md.finish(&mut out).unwrap();
        assert!(String::from_utf8_lossy(&out).ends_with("next\n"));
    }

    #[test]
    fn code_fences_span_lines() {
        let mut md = MarkdownStream::new();
        let mut out = Vec::new();
        md.push(&mut out, "```rust\nlet **x** = 1;\n```\n").unwrap();
        let text = String::from_utf8_lossy(&out).to_string();
        // Inside a fence, Markdown marks are kept verbatim.
        assert!(text.contains("let **x** = 1;"), "{text:?}");
        assert!(!md.in_fence);
    }
}
