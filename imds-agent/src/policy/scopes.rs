//! What cluster admins allow each namespace, on the `Namespace` object itself: tenants may
//! create `AzureIdentity` and `AzureIdentityBinding` objects in their namespace, but not (with
//! ordinary RBAC) change the namespace's annotations.
//!
//! - [`IDENTITY_SCOPE_ANNOTATION`]: the identities the namespace's pods may be served, as
//!   client ids and ARM resource ids, exact or glob (`*` and `?` within one `/`-separated part,
//!   `**` across parts), case-insensitive, separated by commas or white space. Without it, the
//!   cluster default applies ([`DefaultScope`]).
//! - [`PATHS_ANNOTATION`]: metadata path prefixes the namespace's pods may read, on top of the
//!   node-wide rules.
//! - [`MODE_ANNOTATION`]: `audit` logs what would be refused in this namespace and forwards it.
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::Identity;

pub const IDENTITY_SCOPE_ANNOTATION: &str = "imds-filter.io/identity-scope";
pub const PATHS_ANNOTATION: &str = "imds-filter.io/metadata-paths";
pub const MODE_ANNOTATION: &str = "imds-filter.io/mode";

/// For namespaces without an identity scope annotation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DefaultScope {
    /// Every identity (as before scopes): for migrating clusters.
    #[default]
    Open,
    /// None: a namespace's pods get tokens only once an admin scopes it.
    Closed,
}

/// The identities a namespace may use, as its annotation lists them.
#[derive(Clone, Debug)]
pub struct Scope {
    /// The patterns as written, for explanations.
    patterns: Vec<String>,
    matcher: GlobSet,
}

impl PartialEq for Scope {
    fn eq(&self, other: &Self) -> bool {
        self.patterns == other.patterns
    }
}

impl Eq for Scope {}

impl Scope {
    /// Parses an annotation's value.
    ///
    /// # Errors
    /// A pattern that is not a valid glob, said in a sentence.
    pub fn parse(text: &str) -> Result<Scope, String> {
        let patterns: Vec<String> =
            text.split(|c: char| c == ',' || c.is_whitespace()).filter(|p| !p.is_empty()).map(str::to_owned).collect();
        let mut set = GlobSetBuilder::new();
        for pattern in &patterns {
            let glob = GlobBuilder::new(pattern)
                .case_insensitive(true)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| format!("{IDENTITY_SCOPE_ANNOTATION}: {pattern:?} is not a pattern: {}", e.kind()))?;
            set.add(glob);
        }
        let matcher = set.build().map_err(|e| format!("{IDENTITY_SCOPE_ANNOTATION}: {e}"))?;
        Ok(Scope { patterns, matcher })
    }

    /// Whether the scope allows the client id `client_id`, or the identity whose resource id is
    /// `resource_id`.
    #[must_use]
    pub fn permits(&self, client_id: &str, resource_id: &str) -> bool {
        self.matcher.is_match(client_id) || (!resource_id.is_empty() && self.matcher.is_match(resource_id))
    }

    /// Whether it allows every identity (a lone `**`, or `*`… that also crosses `/`).
    #[must_use]
    pub fn is_everything(&self) -> bool {
        self.patterns.iter().any(|p| p == "**")
    }

    /// The patterns, as the annotation lists them.
    #[must_use]
    pub fn describe(&self) -> String {
        if self.patterns.is_empty() {
            "none".to_owned()
        } else {
            self.patterns.join(", ")
        }
    }
}

/// What a namespace's annotations allow it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceRules {
    pub name: String,
    /// [`IDENTITY_SCOPE_ANNOTATION`], if set.
    pub scope: Option<Scope>,
    /// [`PATHS_ANNOTATION`]: path prefixes, each starting with `/`.
    pub paths: Vec<String>,
    /// [`MODE_ANNOTATION`] is `audit`.
    pub audit: bool,
}

/// Which scope decides for a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeRule<'a> {
    /// Every identity: the cluster default is open and the namespace has no scope.
    Open,
    /// None: the cluster default is closed and the namespace has no scope.
    Closed,
    /// The namespace's own scope.
    Annotated(&'a Scope),
}

impl ScopeRule<'_> {
    /// Whether it allows `identity`.
    #[must_use]
    pub fn permits(&self, client_id: &str, resource_id: &str) -> bool {
        match self {
            ScopeRule::Open => true,
            ScopeRule::Closed => false,
            ScopeRule::Annotated(scope) => scope.permits(client_id, resource_id),
        }
    }

    pub fn permits_identity(&self, identity: &Identity) -> bool {
        self.permits(&identity.client_id, &identity.resource_id)
    }

    /// Whether it allows every identity there is: only then is an exception honoured (an
    /// exception's pods reach the metadata service directly, with every identity of the node).
    #[must_use]
    pub fn is_everything(&self) -> bool {
        match self {
            ScopeRule::Open => true,
            ScopeRule::Closed => false,
            ScopeRule::Annotated(scope) => scope.is_everything(),
        }
    }

    /// Which scope this is, for refusals and `explain`.
    #[must_use]
    pub fn describe(&self, namespace: &str) -> String {
        match self {
            ScopeRule::Open => {
                format!("namespace {namespace} has no {IDENTITY_SCOPE_ANNOTATION}; the cluster default is open")
            }
            ScopeRule::Closed => {
                format!("namespace {namespace} has no {IDENTITY_SCOPE_ANNOTATION}; the cluster default is closed")
            }
            ScopeRule::Annotated(scope) => {
                format!("namespace {namespace}'s {IDENTITY_SCOPE_ANNOTATION} allows {}", scope.describe())
            }
        }
    }
}

impl NamespaceRules {
    /// The rules of a namespace whose annotations cannot be read: no identity, no extra path,
    /// enforced. Never wider than what the annotations could have meant.
    #[must_use]
    pub fn unreadable(name: &str) -> NamespaceRules {
        let nothing = Scope { patterns: Vec::new(), matcher: GlobSet::empty() };
        NamespaceRules { name: name.to_owned(), scope: Some(nothing), paths: Vec::new(), audit: false }
    }

    /// A namespace's rules from its annotations (`None`: not set).
    ///
    /// # Errors
    /// An annotation the agent cannot read, said in a sentence: the namespace's pods then get
    /// nothing the annotation could have widened (the caller decides what that means).
    pub fn parse(name: &str, scope: Option<&str>, paths: Option<&str>, mode: Option<&str>) -> Result<Self, String> {
        let scope = scope.map(Scope::parse).transpose()?;
        let paths: Vec<String> = paths
            .into_iter()
            .flat_map(|p| p.split(|c: char| c == ',' || c.is_whitespace()))
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(bad) = paths.iter().find(|p| !p.starts_with('/')) {
            return Err(format!("{PATHS_ANNOTATION}: {bad:?} is not a path (it must start with /)"));
        }
        let audit = match mode.map(str::trim) {
            None | Some("enforce") => false,
            Some("audit") => true,
            Some(other) => return Err(format!("{MODE_ANNOTATION}: {other:?} is neither enforce nor audit")),
        };
        Ok(NamespaceRules { name: name.to_owned(), scope, paths, audit })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOB: &str =
        "/subscriptions/s1/resourceGroups/team-a/providers/Microsoft.ManagedIdentity/userAssignedIdentities/blob";

    #[test]
    fn scopes_match_client_ids_and_resource_ids_exactly_or_by_glob() {
        let scope = Scope::parse(
            "8d3b1f8e-7c1a-4b5e-9f2d-0a1b2c3d4e5f, c0ffee00-*\n/subscriptions/s1/resourceGroups/team-a/providers/Microsoft.ManagedIdentity/userAssignedIdentities/*",
        )
        .unwrap();
        for (client_id, resource_id, permitted) in [
            ("8d3b1f8e-7c1a-4b5e-9f2d-0a1b2c3d4e5f", "", true),
            ("8D3B1F8E-7C1A-4B5E-9F2D-0A1B2C3D4E5F", "", true), // GUIDs ignore case
            ("8d3b1f8e-7c1a-4b5e-9f2d-0a1b2c3d4e5", "", false), // a prefix is not a match
            ("c0ffee00-1111-2222-3333-444444444444", "", true),
            ("d0ffee00-1111-2222-3333-444444444444", "", false),
            ("other", BLOB, true),
            ("other", &BLOB.to_uppercase(), true),
            // `*` stays within one part: another resource group's identity, or a nested path.
            ("other", &BLOB.replace("team-a", "team-b"), false),
            ("other", &format!("{BLOB}/nested"), false),
            ("other", "", false),
        ] {
            assert_eq!(scope.permits(client_id, resource_id), permitted, "{client_id} {resource_id}");
        }
        assert!(!scope.is_everything());
        assert!(Scope::parse("**").unwrap().is_everything());
        assert!(Scope::parse("**").unwrap().permits("anything", BLOB));
        let team = Scope::parse("/subscriptions/s1/resourceGroups/team-a/**").unwrap();
        assert!(team.permits("x", BLOB) && !team.permits("x", &BLOB.replace("team-a", "team-b")));
        // An empty scope allows nothing.
        let none = Scope::parse(" , ").unwrap();
        assert!(!none.permits("8d3b1f8e-7c1a-4b5e-9f2d-0a1b2c3d4e5f", BLOB));
        assert_eq!(none.describe(), "none");
        assert!(Scope::parse("a[").unwrap_err().contains("\"a[\" is not a pattern"));
    }

    #[test]
    fn the_rule_for_a_namespace_without_a_scope_is_the_cluster_default() {
        assert!(ScopeRule::Open.permits("c", "") && ScopeRule::Open.is_everything());
        assert!(!ScopeRule::Closed.permits("c", BLOB) && !ScopeRule::Closed.is_everything());
        assert!(ScopeRule::Closed.describe("shop").contains("cluster default is closed"));
        let scope = Scope::parse("c-*").unwrap();
        let rule = ScopeRule::Annotated(&scope);
        assert!(rule.permits("c-1", "") && !rule.permits("d-1", ""));
        assert_eq!(rule.describe("shop"), format!("namespace shop's {IDENTITY_SCOPE_ANNOTATION} allows c-*"));
    }

    #[test]
    fn namespace_annotations_are_read_strictly() {
        let rules = NamespaceRules::parse(
            "shop",
            Some("c-*"),
            Some("/metadata/instance/compute, /metadata/scheduledevents"),
            Some("audit"),
        )
        .unwrap();
        assert_eq!(rules.paths, ["/metadata/instance/compute", "/metadata/scheduledevents"]);
        assert!(rules.audit && rules.scope.is_some());
        assert_eq!(
            NamespaceRules::parse("shop", None, None, None).unwrap(),
            NamespaceRules { name: "shop".into(), ..NamespaceRules::default() }
        );
        assert!(NamespaceRules::parse("shop", None, Some("metadata/x"), None)
            .unwrap_err()
            .contains("must start with /"));
        assert!(NamespaceRules::parse("shop", None, None, Some("permissive"))
            .unwrap_err()
            .contains("neither enforce nor audit"));
    }
}
