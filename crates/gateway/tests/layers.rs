//! The gateway's modules form layers a reader can climb (issue 18): configuration as plain
//! data → the compiled runtime → the phases → the server. No module may import, directly or
//! through others, a module that imports it back. Read from the sources: a `crate::x` path
//! outside comments and unit tests counts as an import of `x`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn modules() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_owned();
            if top == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            let deps = graph.entry(top.clone()).or_default();
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (i, _) in line.match_indices("crate::") {
                    let name: String = line[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != top {
                        deps.insert(name);
                    }
                }
            }
        }
    }
    graph
}

/// Every module `from` reaches by its imports.
fn reach(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<&str> = graph[from].iter().map(String::as_str).collect();
    while let Some(m) = todo.pop() {
        if seen.insert(m.to_owned())
            && let Some(next) = graph.get(m)
        {
            todo.extend(next.iter().map(String::as_str));
        }
    }
    seen
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = modules();
    assert!(graph.len() > 15, "the sources were read: {graph:?}");
    let cycles: Vec<&String> = graph
        .keys()
        .filter(|m| reach(&graph, m).contains(*m))
        .collect();
    assert!(
        cycles.is_empty(),
        "modules on an import cycle: {cycles:?}\nimports: {graph:#?}"
    );
}

#[test]
fn configuration_and_the_wire_are_leaves() {
    let graph = modules();
    // The configuration is plain data: it may read only what a worker is.
    assert_eq!(
        graph["config"].iter().collect::<Vec<_>>(),
        ["worker"],
        "config.rs imports"
    );
    for leaf in ["wire", "worker"] {
        assert!(
            graph[leaf].is_empty(),
            "{leaf}.rs imports {:?}",
            graph[leaf]
        );
    }
    // Nothing below the server reaches up into it.
    for (m, _) in graph.iter().filter(|(m, _)| *m != "server") {
        assert!(
            !reach(&graph, m).contains("server"),
            "{m} reaches the server"
        );
    }
}
