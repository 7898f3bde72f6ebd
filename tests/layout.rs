//! The source tree's shape, checked: no two files of `src/` import each other, directly or
//! around a loop (issue #18), so a reader can follow each part from its `mod.rs` down.
//!
//! A file depends on another when it names it: a `use` of `crate::…`, `super::…`,
//! `self::…` or a child module, or such a path written in code. Unit-test modules
//! (`#[cfg(test)] mod tests`, inline or in `tests.rs`) are left out, and so are paths to
//! the crate root, which only re-exports. The catalog and the stores are exempt for now:
//! the cluster-mode work reshapes them (a cycle that lies wholly inside them is allowed).
//! `cargo modules` would tell the same; this needs nothing but the sources.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

/// Every module of `src/` and its file's text.
fn modules(dir: &Path, prefix: &[String], out: &mut BTreeMap<Module, String>) {
    for entry in std::fs::read_dir(dir).expect("src/ readable") {
        let path = entry.expect("a directory entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            let mut p = prefix.to_vec();
            p.push(name);
            modules(&path, &p, out);
        } else if let Some(stem) = name.strip_suffix(".rs") {
            if stem == "tests" {
                continue; // a unit-test module in a file of its own
            }
            let mut module = prefix.to_vec();
            if stem != "mod" && !(prefix.is_empty() && (stem == "lib" || stem == "main")) {
                module.push(stem.to_string());
            }
            let text = std::fs::read_to_string(&path).expect("a source file");
            out.insert(module, text);
        }
    }
}

/// The text without line comments and without its inline unit-test module (`mod tests`
/// under a `#[cfg(…test…)]`, at the end of a file).
fn code_of(text: &str) -> String {
    let mut end = text.len();
    let mut at = 0;
    while let Some(i) = text[at..].find("\nmod tests") {
        let i = at + i;
        let line_start = text[..i].rfind('\n').map_or(0, |j| j + 1);
        let attr = &text[line_start..i];
        if attr.starts_with("#[cfg(") && attr.contains("test") {
            end = line_start;
            break;
        }
        at = i + 1;
    }
    text[..end]
        .lines()
        .map(|l| match l.find("//") {
            // `://` is a URL inside a string, not a comment.
            Some(i) if !l[..i].ends_with(':') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let (Some(open), Some(close)) = (tree.find('{'), tree.rfind('}')) else {
        return vec![tree];
    };
    if close < open {
        return vec![tree];
    }
    let (prefix, rest) = (&tree[..open], &tree[open + 1..close]);
    let (mut parts, mut depth, mut cur) = (Vec::new(), 0, String::new());
    for c in rest.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if c == ',' && depth == 0 {
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| expand(&format!("{prefix}{p}")))
        .collect()
}

/// The module a path names from `module`, if it is one of `all` (the longest prefix).
fn target(module: &Module, path: &str, all: &BTreeMap<Module, String>) -> Option<Module> {
    let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base: Module = match segs.first().copied() {
        Some("crate") => {
            segs.remove(0);
            Vec::new()
        }
        Some("super") => {
            let mut b = module.clone();
            while segs.first() == Some(&"super") {
                segs.remove(0);
                b.pop();
            }
            b
        }
        Some("self") => {
            segs.remove(0);
            module.clone()
        }
        Some(first) => {
            let mut child = module.clone();
            child.push(first.to_string());
            if !all.contains_key(&child) {
                return None;
            }
            module.clone()
        }
        None => return None,
    };
    base.extend(segs.iter().map(|s| s.to_string()));
    (0..=base.len())
        .rev()
        .map(|n| base[..n].to_vec())
        .find(|m| all.contains_key(m))
        // The crate root only re-exports; a path to it is no edge.
        .filter(|m| m != module && !m.is_empty())
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// What each module depends on.
fn edges(all: &BTreeMap<Module, String>) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut edges = BTreeMap::new();
    for (module, text) in all {
        let code = code_of(text);
        let mut deps = BTreeSet::new();
        // `use` trees: statements that start a line (`use`, `pub use`, `pub(crate) use`).
        let lines: Vec<&str> = code.lines().collect();
        let mut k = 0;
        while k < lines.len() {
            let line = lines[k].trim_start();
            let after_vis = line
                .strip_prefix("pub ")
                .or_else(|| {
                    line.strip_prefix("pub(")
                        .and_then(|l| Some(l.split_once(") ")?.1))
                })
                .unwrap_or(line);
            if let Some(tree) = after_vis.strip_prefix("use ") {
                let mut stmt = tree.to_string();
                while !stmt.contains(';') && k + 1 < lines.len() {
                    k += 1;
                    stmt.push_str(lines[k]);
                }
                let stmt = stmt.split(';').next().unwrap_or("");
                for path in expand(stmt) {
                    deps.extend(target(module, &path, all));
                }
            }
            k += 1;
        }
        // Paths in code: `crate::a::b`, `super::x`, `child::x`.
        let bytes: Vec<char> = code.chars().collect();
        let mut i = 0;
        while i < bytes.len() {
            if is_ident(bytes[i]) && (i == 0 || !(is_ident(bytes[i - 1]) || bytes[i - 1] == ':')) {
                let mut j = i;
                while j < bytes.len() && (is_ident(bytes[j]) || bytes[j] == ':') {
                    j += 1;
                }
                let path: String = bytes[i..j].iter().collect();
                // `a::{…}` and `a::*` are `use` trees, read above.
                if path.contains("::") && !path.ends_with("::") {
                    deps.extend(target(module, &path, all));
                }
                i = j;
            } else {
                i += 1;
            }
        }
        edges.insert(module.clone(), deps);
    }
    edges
}

/// The strongly connected components with more than one module (Tarjan).
fn cycles(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct Walk<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on: BTreeSet<&'a Module>,
        found: Vec<Vec<Module>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a Module) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on.insert(v);
            for w in &self.edges[v] {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.on.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    comp.push(w.clone());
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    self.found.push(comp);
                }
            }
        }
    }
    let mut walk = Walk {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !walk.index.contains_key(v) {
            walk.visit(v);
        }
    }
    walk.found
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

#[test]
fn no_two_files_of_src_import_each_other() {
    let mut all = BTreeMap::new();
    modules(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &[],
        &mut all,
    );
    assert!(all.len() > 50, "read {} modules of src/", all.len());
    let edges = edges(&all);
    // The checker sees what it must: the API's router names its handlers.
    assert!(
        edges[&vec!["api".to_string()]].contains(&vec!["api".to_string(), "handlers".to_string()]),
        "api -> api::handlers not seen: the checker is blind"
    );
    let exempt = |m: &Module| matches!(m.first().map(String::as_str), Some("catalog" | "store"));
    let found: Vec<String> = cycles(&edges)
        .into_iter()
        .filter(|comp| !comp.iter().all(exempt))
        .map(|comp| {
            let members: BTreeSet<&Module> = comp.iter().collect();
            let lines: Vec<String> = comp
                .iter()
                .map(|m| {
                    let to: Vec<String> = edges[m]
                        .iter()
                        .filter(|d| members.contains(d))
                        .map(name)
                        .collect();
                    format!("  {} -> {}", name(m), to.join(", "))
                })
                .collect();
            lines.join("\n")
        })
        .collect();
    assert!(
        found.is_empty(),
        "files of src/ that import each other (move what they share into a file both \
         import):\n{}",
        found.join("\n\n")
    );
}

#[test]
fn use_trees_expand() {
    assert_eq!(
        expand("a::{b, c::{d, e}, f}"),
        ["a::b", "a::c::d", "a::c::e", "a::f"]
    );
    assert_eq!(expand("crate::x::Y"), ["crate::x::Y"]);
}
