//! The report as text: tables, sections with figures and notes, rendered to
//! a self-contained HTML file (PNGs as data URIs) and to Markdown (PNGs as
//! links to the files beside it).
use base64::Engine;

/// One figure: its PNG and what it shows.
#[derive(Debug, Clone)]
pub struct Figure {
    /// File name in the output folder.
    pub file: String,
    /// Short description (HTML alt text).
    pub alt: String,
    /// What the figure shows and how it was made.
    pub caption: String,
    pub size: (u32, u32),
    pub png: Vec<u8>,
}

/// A table; `id` marks it for tests and styles.
#[derive(Debug, Clone)]
pub struct Table {
    pub id: &'static str,
    pub caption: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct Section {
    pub title: String,
    pub text: String,
    pub tables: Vec<Table>,
    pub figures: Vec<Figure>,
    /// Visible notes: what is missing here and why.
    pub notes: Vec<String>,
}

impl Section {
    pub fn new(title: &str, text: &str) -> Self {
        Section {
            title: title.into(),
            text: text.into(),
            tables: Vec::new(),
            figures: Vec::new(),
            notes: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Document {
    pub title: String,
    pub intro: String,
    /// Shown at the top: everything missing from the inputs.
    pub notes: Vec<String>,
    pub sections: Vec<Section>,
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

/// A Markdown table cell: `|` would end the cell, a newline the row.
fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

const STYLE: &str = "body{font-family:'DejaVu Sans',Helvetica,Arial,sans-serif;max-width:1100px;\
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}\
table{border-collapse:collapse;margin:0.6em 0 1.4em;font-size:0.92em}\
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}\
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}\
p.caption{font-weight:bold;margin:1em 0 0.2em}\
figure{margin:1em 0 2em}figure img{max-width:100%;height:auto;border:1px solid #ddd}\
figcaption{font-size:0.9em;color:#444;max-width:900px}\
.note{background:#fff4e5;border-left:4px solid #f0a030;padding:6px 10px;margin:6px 0}\
code{background:#f4f4f4;padding:0 3px}";

impl Document {
    pub fn to_html(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut s = String::new();
        s.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
        s.push_str(&format!("<title>{}</title>\n", esc(&self.title)));
        s.push_str(&format!("<style>{STYLE}</style>\n</head>\n<body>\n"));
        s.push_str(&format!(
            "<h1>{}</h1>\n<p>{}</p>\n",
            esc(&self.title),
            esc(&self.intro)
        ));
        if !self.notes.is_empty() {
            s.push_str("<h2>Missing inputs</h2>\n");
            for n in &self.notes {
                s.push_str(&format!("<div class=\"note\">{}</div>\n", esc(n)));
            }
        }
        for sec in &self.sections {
            s.push_str(&format!("<h2>{}</h2>\n", esc(&sec.title)));
            if !sec.text.is_empty() {
                s.push_str(&format!("<p>{}</p>\n", esc(&sec.text)));
            }
            for n in &sec.notes {
                s.push_str(&format!("<div class=\"note\">{}</div>\n", esc(n)));
            }
            for t in &sec.tables {
                // A paragraph, not <caption>: a caption wraps to the table's width.
                s.push_str(&format!(
                    "<p class=\"caption\">{}</p>\n<table id=\"{}\">\n<thead><tr>",
                    esc(&t.caption),
                    t.id
                ));
                for h in &t.header {
                    s.push_str(&format!("<th>{}</th>", esc(h)));
                }
                s.push_str("</tr></thead>\n<tbody>\n");
                for row in &t.rows {
                    s.push_str("<tr>");
                    for c in row {
                        s.push_str(&format!("<td>{}</td>", esc(c)));
                    }
                    s.push_str("</tr>\n");
                }
                s.push_str("</tbody>\n</table>\n");
            }
            for f in &sec.figures {
                s.push_str(&format!(
                    "<figure>\n<img src=\"data:image/png;base64,{}\" alt=\"{}\" width=\"{}\" height=\"{}\" data-file=\"{}\">\n<figcaption>{}</figcaption>\n</figure>\n",
                    b64.encode(&f.png),
                    esc(&f.alt),
                    f.size.0,
                    f.size.1,
                    esc(&f.file),
                    esc(&f.caption)
                ));
            }
        }
        s.push_str("</body>\n</html>\n");
        s
    }

    pub fn to_markdown(&self) -> String {
        let mut s = format!("# {}\n\n{}\n\n", self.title, self.intro);
        if !self.notes.is_empty() {
            s.push_str("## Missing inputs\n\n");
            for n in &self.notes {
                s.push_str(&format!("> **Note:** {n}\n>\n"));
            }
            s.push('\n');
        }
        for sec in &self.sections {
            s.push_str(&format!("## {}\n\n", sec.title));
            if !sec.text.is_empty() {
                s.push_str(&format!("{}\n\n", sec.text));
            }
            for n in &sec.notes {
                s.push_str(&format!("> **Note:** {n}\n\n"));
            }
            for t in &sec.tables {
                s.push_str(&format!("**{}**\n\n", t.caption));
                s.push_str(&format!(
                    "| {} |\n|{}\n",
                    t.header
                        .iter()
                        .map(|h| md_cell(h))
                        .collect::<Vec<_>>()
                        .join(" | "),
                    "---|".repeat(t.header.len())
                ));
                for row in &t.rows {
                    s.push_str(&format!(
                        "| {} |\n",
                        row.iter()
                            .map(|c| md_cell(c))
                            .collect::<Vec<_>>()
                            .join(" | ")
                    ));
                }
                s.push('\n');
            }
            for f in &sec.figures {
                s.push_str(&format!("![{}]({})\n\n*{}*\n\n", f.alt, f.file, f.caption));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_escapes_pipes_and_html_escapes_markup() {
        let mut sec = Section::new("S", "");
        sec.tables.push(Table {
            id: "t",
            caption: "c".into(),
            header: vec!["tau".into()],
            rows: vec![vec!["|dW| > 0.01".into()]],
        });
        let doc = Document {
            title: "a <b> & c".into(),
            intro: String::new(),
            notes: vec![],
            sections: vec![sec],
        };
        assert!(doc.to_markdown().contains("| \\|dW\\| > 0.01 |"));
        let html = doc.to_html();
        assert!(html.contains("<title>a &lt;b&gt; &amp; c</title>"));
        assert!(html.contains("<td>|dW| &gt; 0.01</td>"));
    }
}
