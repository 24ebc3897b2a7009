//! Diagnostics: an error with a primary span, secondary labels, notes and a hint,
//! rendered rustc-style (file:line:col, the source line, a caret under the span).

use crate::source::{SourceMap, Span};
use codespan_reporting::diagnostic::{Diagnostic as CsDiagnostic, Label as CsLabel};
use codespan_reporting::term::{self, termcolor};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub span: Span,
    pub message: String,
}

/// Whether a diagnostic stops the command (an error) or only informs (a warning).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Severity {
    #[default]
    Error,
    Warning,
}

/// A user-facing error or warning. `span` is where the caret goes; `None` only for
/// diagnostics that have no place in any source (a file that cannot be read, a bad
/// command-line flag).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub message: String,
    pub span: Option<Span>,
    /// What the caret says (defaults to nothing beyond the caret).
    pub label: String,
    pub secondary: Vec<Label>,
    pub notes: Vec<String>,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn error(message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            message: message.into(),
            span: None,
            label: String::new(),
            secondary: Vec::new(),
            notes: Vec::new(),
            hint: None,
        }
    }

    /// A warning: rendered as `warning: …`; the command goes on.
    pub fn warning(message: impl Into<String>) -> Diagnostic {
        Diagnostic { severity: Severity::Warning, ..Diagnostic::error(message) }
    }

    pub fn at(message: impl Into<String>, span: Span) -> Diagnostic {
        Diagnostic { span: Some(span), ..Diagnostic::error(message) }
    }

    pub fn with_label(mut self, label: impl Into<String>) -> Diagnostic {
        self.label = label.into();
        self
    }

    pub fn with_secondary(mut self, span: Span, message: impl Into<String>) -> Diagnostic {
        self.secondary.push(Label { span, message: message.into() });
        self
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Diagnostic {
        self.notes.push(note.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Diagnostic {
        self.hint = Some(hint.into());
        self
    }

    /// Attach a span if the diagnostic has none yet (errors raised deep inside shape
    /// inference get the span of the expression that caused them).
    pub fn or_at(mut self, span: Span) -> Diagnostic {
        if self.span.is_none() {
            self.span = Some(span);
        }
        self
    }

    /// Render without colour, for terminals that are not ttys and for snapshot tests.
    pub fn render(&self, sources: &SourceMap) -> String {
        let mut out = termcolor::NoColor::new(Vec::new());
        self.emit(sources, &mut out);
        String::from_utf8_lossy(&out.into_inner()).into_owned()
    }

    pub fn emit(&self, sources: &SourceMap, out: &mut dyn termcolor::WriteColor) {
        let mut cs = match self.severity {
            Severity::Error => CsDiagnostic::error(),
            Severity::Warning => CsDiagnostic::warning(),
        }
        .with_message(&self.message);
        let mut labels = Vec::new();
        if let Some(span) = self.span {
            if (span.file.0 as usize) < sources.len() {
                labels.push(CsLabel::primary(span.file, clamp(span, sources)).with_message(&self.label));
            }
        }
        for l in &self.secondary {
            if (l.span.file.0 as usize) < sources.len() {
                labels.push(CsLabel::secondary(l.span.file, clamp(l.span, sources)).with_message(&l.message));
            }
        }
        cs = cs.with_labels(labels);
        let mut notes = self.notes.clone();
        if let Some(h) = &self.hint {
            notes.push(format!("hint: {h}"));
        }
        cs = cs.with_notes(notes);
        let config = term::Config::default();
        if term::emit(out, &config, sources, &cs).is_err() {
            // Rendering only fails on I/O errors of `out`; fall back to the bare message.
            let level = if self.severity == Severity::Warning { "warning" } else { "error" };
            let _ = std::io::Write::write_fmt(out, format_args!("{level}: {}\n", self.message));
        }
    }
}

/// Keep a span inside its file and on character boundaries so rendering never fails.
fn clamp(span: Span, sources: &SourceMap) -> std::ops::Range<usize> {
    let text = &sources.file(span.file).text;
    let mut start = (span.start as usize).min(text.len());
    let mut end = (span.end as usize).clamp(start, text.len());
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    while !text.is_char_boundary(end) {
        end += 1;
    }
    start..end
}

/// The closest candidate by edit distance, for "did you mean ...?" hints.
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = edit_distance(name, c);
        let limit = ((name.len().max(c.len()) + 2) / 3).max(1);
        if d <= limit && best.is_none_or(|(bd, bc)| d < bd || (d == bd && c < bc)) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| format!("did you mean `{c}`?"))
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        prev = cur;
    }
    prev[b.len()]
}
