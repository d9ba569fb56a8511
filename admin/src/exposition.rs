//! exposition: series a process writes beside its metrics recorder's page, in the Prometheus
//! text format (0.0.4). For families whose series follow something that comes and goes (the
//! proxy's gateways, the gateway's apps): the recorder keeps a series once touched, these
//! leave the page with what they describe. One writer, so that every such series is escaped
//! alike, whatever named what it labels (DNS, the admin API, an uploaded app).

use std::borrow::Cow;
use std::fmt::{Display, Write};

/// Starts a family: its HELP and TYPE lines, after a blank line unless the page is empty or
/// already ends with one. `help` is the program's own text, written as it is.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    if !out.is_empty() {
        if !out.ends_with('\n') {
            out.push('\n');
        }
        if !out.ends_with("\n\n") {
            out.push('\n');
        }
    }
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One series of `name`: its labels in the order given, their values escaped.
pub fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl Display) {
    out.push_str(name);
    if let Some(((k, v), rest)) = labels.split_first() {
        let _ = write!(out, "{{{k}=\"{}\"", label_value(v));
        for (k, v) in rest {
            let _ = write!(out, ",{k}=\"{}\"", label_value(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// A label value as the text format writes it: `\\`, `\"` and `\n` escaped.
pub fn label_value(v: &str) -> Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return v.into();
    }
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A family on an empty page starts it; one after a page ending in a blank line, or in no
    /// newline at all, follows one blank line.
    #[test]
    fn a_family_follows_one_blank_line_whatever_the_page_ended_with() {
        for (page, joined) in [
            ("", ""),
            ("up 1", "up 1\n\n"),
            ("up 1\n", "up 1\n\n"),
            ("up 1\n\n", "up 1\n\n"),
        ] {
            let mut out = String::from(page);
            family(&mut out, "y", "gauge", "Ys.");
            assert_eq!(
                out,
                format!("{joined}# HELP y Ys.\n# TYPE y gauge\n"),
                "after {page:?}"
            );
        }
    }

    /// Families separated by one blank line; labels in order, values escaped; none, no braces.
    #[test]
    fn families_and_samples_as_the_text_format_writes_them() {
        let mut out = String::from("up 1\n");
        family(&mut out, "x_total", "counter", "Xs.");
        sample(
            &mut out,
            "x_total",
            &[("gateway", "a\"b\\c\nd"), ("to", "up")],
            3,
        );
        sample(&mut out, "x_total", &[], 0);
        family(&mut out, "y", "gauge", "Ys.");
        assert_eq!(
            out,
            "up 1\n\n# HELP x_total Xs.\n# TYPE x_total counter\n\
             x_total{gateway=\"a\\\"b\\\\c\\nd\",to=\"up\"} 3\nx_total 0\n\n\
             # HELP y Ys.\n# TYPE y gauge\n"
        );
    }
}
