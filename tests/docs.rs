//! The documentation checked against the code, so a page cannot drift from it:
//!
//! - every `XZEPR_*` variable named in the source is in
//!   `docs/reference/environment.md`, and every one there is in the source;
//! - every setting of `PipelineConfig` (and of its `retry` and `decoder`)
//!   is in `docs/reference/settings.md`;
//! - every variant of every public error enum is in `docs/reference/errors.md`,
//!   and every variant there is in the code (the same both ways for the
//!   settings);
//! - the architecture page's diagram and stage table are the crate docs';
//! - links between the pages (and the README) resolve, `#anchors` included,
//!   every `docs/….md` path the docs or the source mention exists, and the
//!   README links every page;
//! - every page is compiled by the doctests (listed in `src/lib.rs`), and every
//!   fenced block says what language it is (a bare fence would be compiled as
//!   Rust, or a Rust one silently skipped);
//! - `docs/reference/cli.md` holds each subcommand's `--help` verbatim
//!   (with feature `cli`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use regex::Regex;
use xzepr_consumer::pipeline::PipelineConfig;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every file under `dir` whose name ends with one of `exts`, sorted.
fn files(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                // Build output and virtual environments are not the project's.
                if !matches!(name.as_str(), "target" | ".venv" | "__pycache__") {
                    dirs.push(path);
                }
            } else if exts.iter().any(|e| name.ends_with(e)) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The pages the checks cover: README.md and everything under docs/.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    pages.extend(files(&root().join("docs"), &[".md"]));
    pages
}

/// `text` without its fenced blocks (kept as blank lines, so line numbers hold).
fn prose(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// The source a variable name can be read or set in: the crate, the bindings
/// (Rust and Python), without their unit tests (which may make names up).
fn source_files() -> Vec<PathBuf> {
    let mut out = files(&root().join("src"), &[".rs"]);
    out.extend(files(&root().join("python/src"), &[".rs"]));
    out.extend(files(
        &root().join("python/xzepr_consumer"),
        &[".py", ".pyi"],
    ));
    out.retain(|p| p.file_name().is_some_and(|n| n != "tests.rs"));
    out
}

fn without_unit_tests(text: &str) -> &str {
    // An inline `mod tests { .. }` only: `#[cfg(test)] mod tests;` at the top of a
    // file is a declaration, and what follows it is the module itself.
    match text.find("#[cfg(test)]\nmod tests {") {
        Some(at) => &text[..at],
        None => text,
    }
}

#[test]
fn environment_reference_names_every_variable_the_code_reads() {
    // A quoted name: `"XZEPR_"` alone is a prefix (run --exec strips it), not a variable.
    let quoted = Regex::new(r#""(XZEPR_[A-Z0-9_]*[A-Z0-9])""#).unwrap();
    let mut in_code = BTreeSet::new();
    for path in source_files() {
        let text = read(&path);
        for c in quoted.captures_iter(without_unit_tests(&text)) {
            in_code.insert(c[1].to_owned());
        }
    }
    assert!(
        in_code.contains("XZEPR_KAFKA_BROKERS") && in_code.contains("XZEPR_API_TOKEN"),
        "the scan found too little: {in_code:?}"
    );

    let page = root().join("docs/reference/environment.md");
    let in_docs = first_cells(&page, &Regex::new(r"`(XZEPR_[A-Z0-9_]*[A-Z0-9])`").unwrap());

    let undocumented: Vec<_> = in_code.difference(&in_docs).collect();
    let unknown: Vec<_> = in_docs.difference(&in_code).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "docs/reference/environment.md is out of step with the code:\n  \
         read or set by the code, not in the reference: {undocumented:?}\n  \
         in the reference, not in the code: {unknown:?}"
    );
}

/// The backticked names in the first cell of each table row of `page`.
fn first_cells(page: &Path, name: &Regex) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in prose(&read(page)).lines() {
        let Some(first) = line.strip_prefix('|').and_then(|l| l.split('|').next()) else {
            continue;
        };
        for c in name.captures_iter(first) {
            names.insert(c[1].to_owned());
        }
    }
    names
}

#[test]
fn settings_reference_names_every_setting() {
    let defaults = serde_json::to_value(PipelineConfig::default()).unwrap();
    let mut settings: BTreeSet<String> = PipelineConfig::setting_names().into_iter().collect();
    for nested in ["retry", "decoder"] {
        let fields = defaults[nested].as_object().expect(nested);
        settings.extend(fields.keys().map(|k| format!("{nested}.{k}")));
    }
    assert!(settings.len() > 30, "too few settings: {settings:?}");
    let page = root().join("docs/reference/settings.md");
    let documented = first_cells(&page, &Regex::new(r"`([a-z_]+(?:\.[a-z_]+)?)`").unwrap());
    let missing: Vec<_> = settings.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "docs/reference/settings.md lacks these PipelineConfig settings: {missing:?}"
    );
    // And the other way: the sections of `PipelineConfig`'s settings name no
    // setting it does not have (one renamed or removed in the code).
    let text = read(&page);
    let name = Regex::new(r"`([a-z_]+(?:\.[a-z_]+)?)`").unwrap();
    let mut unknown = Vec::new();
    let mut in_config = false;
    for line in prose(&text).lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            in_config = ["Pipeline", "Retry", "Decoder"].contains(&heading);
            continue;
        }
        let first = line.strip_prefix("| ").and_then(|l| l.split('|').next());
        if let (true, Some(first)) = (in_config, first) {
            unknown.extend(
                name.captures_iter(first)
                    .map(|c| c[1].to_owned())
                    .filter(|n| !settings.contains(n)),
            );
        }
    }
    assert!(
        unknown.is_empty(),
        "docs/reference/settings.md documents settings PipelineConfig does not have: {unknown:?}"
    );
}

/// The variants of each `pub enum` deriving `thiserror::Error` in `text`:
/// (enum, variant) pairs, read from the enum's body at one indentation.
fn error_variants(text: &str) -> Vec<(String, String)> {
    let head = Regex::new(
        r"(?m)^#\[derive\([^)]*thiserror::Error[^)]*\)\]\n(?:#\[.*\]\n)*pub enum (\w+) \{\n",
    )
    .unwrap();
    let variant = Regex::new(r"^    ([A-Z]\w*)\b").unwrap();
    let mut out = Vec::new();
    for c in head.captures_iter(text) {
        let body = &text[c.get(0).unwrap().end()..];
        for line in body.lines().take_while(|l| *l != "}") {
            if let Some(v) = variant.captures(line) {
                out.push((c[1].to_owned(), v[1].to_owned()));
            }
        }
    }
    out
}

#[test]
fn errors_reference_names_every_variant() {
    let page = read(&root().join("docs/reference/errors.md"));
    let mut seen = 0;
    let mut missing = Vec::new();
    for path in files(&root().join("src"), &[".rs"]) {
        for (en, v) in error_variants(without_unit_tests(&read(&path))) {
            seen += 1;
            if !page.contains(&format!("`{v}")) && !page.contains(&format!("{en}::{v}")) {
                missing.push(format!("{en}::{v} ({})", rel(&path)));
            }
        }
    }
    assert!(seen > 50, "only {seen} error variants found");
    assert!(
        missing.is_empty(),
        "docs/reference/errors.md lacks these error variants:\n{}",
        missing.join("\n")
    );
}

#[test]
fn errors_reference_names_no_variant_the_code_lacks() {
    // Every enum's variants, by the enum's own name (`decode::Error` and the
    // crate's `Error` are both `Error`: a variant must be in one of them).
    let mut variants: BTreeSet<(String, String)> = BTreeSet::new();
    for path in files(&root().join("src"), &[".rs"]) {
        variants.extend(error_variants(without_unit_tests(&read(&path))));
    }
    let page = read(&root().join("docs/reference/errors.md"));
    let heading = Regex::new(r"^## `(?:\w+::)*(\w+)`").unwrap();
    // A table row's first cell: `Variant`, `Variant { .. }`, `Variant(..)` or
    // `Enum::Variant`.
    let cell = Regex::new(r"^\| `(?:(\w+)::)?([A-Z]\w*)").unwrap();
    let (mut current, mut checked, mut unknown) = (None::<String>, 0, Vec::new());
    for line in prose(&page).lines() {
        if line.starts_with("## ") {
            current = heading.captures(line).map(|c| c[1].to_owned());
            continue;
        }
        let (Some(en), Some(c)) = (&current, cell.captures(line)) else {
            continue;
        };
        let en = c.get(1).map_or(en.as_str(), |e| e.as_str());
        checked += 1;
        if !variants.contains(&(en.to_owned(), c[2].to_owned())) {
            unknown.push(format!("{en}::{}", &c[2]));
        }
    }
    assert!(checked > 40, "only {checked} documented variants read");
    assert!(
        unknown.is_empty(),
        "docs/reference/errors.md documents variants the code does not have: {unknown:?}"
    );
}

#[test]
fn architecture_page_is_the_crate_docs_map() {
    // The crate docs' lines from the diagram to the end of the stage table,
    // intra-doc links as plain code, as the page shows them.
    let intra = Regex::new(r"\[(`[^`]+`)\]").unwrap();
    let lib = read(&root().join("src/lib.rs"));
    let docs: Vec<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| {
            intra
                .replace_all(l.strip_prefix(' ').unwrap_or(l), "$1")
                .into_owned()
        })
        .skip_while(|l| !l.starts_with("```text"))
        .collect();
    let map_end = docs
        .iter()
        .rposition(|l| l.starts_with('|'))
        .expect("the crate docs have a stage table");
    let map = docs[..=map_end].join("\n");
    let page = read(&root().join("docs/explanation/architecture.md"));
    assert!(
        page.contains(&map),
        "docs/explanation/architecture.md should hold the crate docs' map (src/lib.rs, from the diagram to the stage table) verbatim:\n\n{map}"
    );
}

/// GitHub's anchor for a heading: lower case, punctuation dropped (but `-`
/// and `_`), spaces as `-`; repeats get `-1`, `-2`, ...
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for line in prose(markdown).lines() {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let title = heading.trim_start_matches('#').trim();
        let slug: String = title
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                '-' | '_' => Some(c),
                c if c.is_alphanumeric() => Some(c.to_ascii_lowercase()),
                _ => None,
            })
            .collect();
        let mut anchor = slug.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{slug}-{n}");
        }
        seen.insert(anchor);
    }
    seen
}

#[test]
fn links_between_pages_resolve() {
    let link = Regex::new(r"\]\(([^)\s]+)\)").unwrap();
    let mut broken = Vec::new();
    for page in pages() {
        let text = prose(&read(&page));
        for (n, line) in text.lines().enumerate() {
            for c in link.captures_iter(line) {
                let target = &c[1];
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
                let file = if path.is_empty() {
                    page.clone()
                } else {
                    page.parent().unwrap().join(path)
                };
                let at = format!("{}:{}: {target}", rel(&page), n + 1);
                if !file.exists() {
                    broken.push(format!("{at} (no such file)"));
                } else if !anchor.is_empty()
                    && file.extension().is_some_and(|e| e == "md")
                    && !anchors(&read(&file)).contains(anchor)
                {
                    broken.push(format!("{at} (no such heading)"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_links_every_page() {
    let readme = read(&root().join("README.md"));
    let unlinked: Vec<String> = files(&root().join("docs"), &[".md"])
        .into_iter()
        .map(|p| rel(&p))
        .filter(|page| !readme.contains(&format!("]({page})")))
        .collect();
    assert!(
        unlinked.is_empty(),
        "pages the README's documentation map does not link: {unlinked:?}"
    );
}

#[test]
fn every_docs_path_mentioned_exists() {
    // a page path in prose, code spans or doc comments: a moved page leaves these behind.
    let mention = Regex::new(r"\bdocs/[A-Za-z0-9_./-]+\.md\b").unwrap();
    let mut sources = pages();
    sources.extend(source_files());
    sources.extend(files(&root().join("tests"), &[".rs"]));
    sources.push(root().join("CHANGELOG.md"));
    sources.push(root().join("python/README.md"));
    let mut missing = Vec::new();
    for file in sources {
        for (n, line) in read(&file).lines().enumerate() {
            for m in mention.find_iter(line) {
                if !root().join(m.as_str()).exists() {
                    missing.push(format!("{}:{}: {}", rel(&file), n + 1, m.as_str()));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "mentions of pages that do not exist:\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_page_is_compiled_by_the_doctests() {
    let lib = read(&root().join("src/lib.rs"));
    let mut missing = Vec::new();
    for page in files(&root().join("docs"), &[".md"]) {
        let under_docs = page.strip_prefix(root().join("docs")).unwrap();
        let listed = format!("\"{}\"", under_docs.display());
        if !lib.contains(&listed) {
            missing.push(rel(&page));
        }
    }
    assert!(
        missing.is_empty(),
        "pages not included as doctests in src/lib.rs (mod doc_pages): {missing:?}"
    );
}

#[test]
fn every_fenced_block_names_its_language() {
    // Rustdoc compiles a bare fence as Rust; `ignore` compiles nothing.
    let mut wrong = Vec::new();
    for page in pages() {
        let mut fenced = false;
        for (n, line) in read(&page).lines().enumerate() {
            let Some(info) = line.trim_start().strip_prefix("```") else {
                continue;
            };
            if !fenced {
                let info = info.trim();
                if info.is_empty() {
                    wrong.push(format!(
                        "{}:{}: a fence with no language",
                        rel(&page),
                        n + 1
                    ));
                } else if info.starts_with("rust") && info.contains("ignore") {
                    wrong.push(format!(
                        "{}:{}: `{info}` compiles nothing (no_run, with hidden setup lines)",
                        rel(&page),
                        n + 1
                    ));
                }
            }
            fenced = !fenced;
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// `--help` of `path` (a subcommand and its sub-subcommands).
#[cfg(feature = "cli")]
fn help(path: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xzepr-consumer"))
        .args(path)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{path:?} --help: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The subcommands listed under `Commands:` in a help text.
#[cfg(feature = "cli")]
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

#[cfg(feature = "cli")]
#[test]
fn cli_reference_holds_each_subcommands_help() {
    let page = read(&root().join("docs/reference/cli.md"));
    let mut commands: Vec<Vec<String>> = subcommands(&help(&[]))
        .into_iter()
        .map(|c| vec![c])
        .collect();
    let mut checked = 0;
    while let Some(path) = commands.pop() {
        let path_refs: Vec<&str> = path.iter().map(String::as_str).collect();
        let text = help(&path_refs);
        let nested = subcommands(&text);
        commands.extend(nested.iter().map(|c| {
            let mut p = path.clone();
            p.push(c.clone());
            p
        }));
        if !nested.is_empty() {
            continue; // a group: its subcommands carry the options
        }
        let marker = format!("<!-- help: {} -->\n```text\n", path.join(" "));
        let Some(at) = page.find(&marker) else {
            panic!(
                "docs/reference/cli.md has no `{}` block; add after its section:\n\n{marker}{text}```\n",
                marker.lines().next().unwrap()
            );
        };
        let body = &page[at + marker.len()..];
        let block = &body[..body.find("```\n").expect("the block is closed")];
        assert!(
            block == text,
            "docs/reference/cli.md: `xzepr-consumer {} --help` changed; the block should be:\n\n{text}",
            path.join(" ")
        );
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} subcommands found");
}
