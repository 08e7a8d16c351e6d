//! Route groups: named parts of the API (path prefix + methods) that
//! detectors are scoped to. Matching is on the path without its query.

use crate::policy::Mode;
use serde::Deserialize;

// ---- configuration (`route_groups[]`) ----

/// A named part of the API: a path prefix and optionally some methods.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RouteGroup {
    pub name: String,
    pub path_prefix: String,
    /// Empty means every method.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Overrides the global `mode` for requests on this group (e.g. try a
    /// stricter policy in monitor mode on one route first).
    #[serde(default)]
    pub mode: Option<Mode>,
}


/// Set of matching route groups, as a bit set over their config order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RouteMatch(u64);

impl RouteMatch {
    pub fn contains(self, group: usize) -> bool {
        group < 64 && self.0 & (1u64 << group) != 0
    }

    /// The first matching group (in config order), if any.
    pub fn first(self) -> Option<usize> {
        (self.0 != 0).then(|| self.0.trailing_zeros() as usize)
    }
}

#[derive(Debug, Clone)]
pub struct RouteTable {
    groups: Vec<RouteGroup>,
}

impl RouteTable {
    pub fn new(groups: &[RouteGroup]) -> RouteTable {
        RouteTable { groups: groups.to_vec() }
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.groups.iter().position(|g| g.name == name)
    }

    /// The mode of the first matching group that overrides it.
    pub fn mode_for(&self, routes: RouteMatch) -> Option<Mode> {
        self.groups
            .iter()
            .enumerate()
            .find_map(|(i, g)| if routes.contains(i) { g.mode } else { None })
    }

    pub fn matches(&self, method: &str, path: &str) -> RouteMatch {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        let mut set = 0u64;
        for (i, g) in self.groups.iter().enumerate().take(64) {
            let method_ok = g.methods.is_empty() || g.methods.iter().any(|m| m == method);
            if method_ok && path.starts_with(&g.path_prefix) {
                set |= 1u64 << i;
            }
        }
        RouteMatch(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_and_method() {
        let t = RouteTable::new(&[
            RouteGroup { name: "login".into(), path_prefix: "/api/login".into(), methods: vec!["POST".into()], mode: None },
            RouteGroup { name: "api".into(), path_prefix: "/api/".into(), methods: vec![], mode: None },
        ]);
        let m = t.matches("POST", "/api/login?x=1");
        assert!(m.contains(0) && m.contains(1));
        let m = t.matches("GET", "/api/login");
        assert!(!m.contains(0) && m.contains(1));
        assert_eq!(t.matches("GET", "/health"), RouteMatch::default());
        assert_eq!(t.index_of("api"), Some(1));
        assert!(!m.contains(99));
    }
}
