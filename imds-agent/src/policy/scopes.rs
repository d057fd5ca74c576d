//! What cluster admins allow each namespace, on the `Namespace` object itself: tenants may
//! create `AzureIdentity` and `AzureIdentityBinding` objects in their namespace, but not (with
//! ordinary RBAC) change the namespace's annotations.
//!
//! - [`IDENTITY_SCOPE_ANNOTATION`]: the identities the namespace's pods may be served, as
//!   client ids and ARM resource ids, exact or glob (`*` and `?` within one `/`-separated part,
//!   `**` across parts), case-insensitive, separated by commas or white space (so a `{a,b}`
//!   alternation is two broken patterns: refused, never widened). Without it, the cluster
//!   default applies ([`DefaultScope`]).
//! - [`MODE_ANNOTATION`]: `audit` logs what would be refused in this namespace and forwards it.
//! - [`super::METADATA_PATHS_ANNOTATION`]: metadata paths its pods may read ([`super::paths`]).
//!
//! A scope is checked against what the agent asks the metadata service for, never against a
//! field it does not use: an identity allowed by its client id is fetched by client id; one
//! allowed only by its resource id is fetched by that resource id ([`FetchBy`]), so an
//! `AzureIdentity` pairing an in-scope resource id with another tenant's client id gets the
//! in-scope identity's token, or none.
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::{Identity, IdentityType};

pub const IDENTITY_SCOPE_ANNOTATION: &str = "imds-filter.io/identity-scope";
pub const MODE_ANNOTATION: &str = "imds-filter.io/mode";

/// How the agent names a managed identity to the metadata service.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FetchBy {
    ClientId(String),
    /// Its ARM resource id (`msi_res_id`).
    ResourceId(String),
}

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

    /// Whether the scope allows the client id `client_id`.
    #[must_use]
    pub fn permits_client(&self, client_id: &str) -> bool {
        self.matcher.is_match(client_id)
    }

    /// Whether the scope allows the resource id `resource_id`: only a plain ARM id (ASCII, no
    /// empty, `.` or `..` part), so that no spelling can match a pattern and mean another
    /// resource to the metadata service.
    #[must_use]
    pub fn permits_resource(&self, resource_id: &str) -> bool {
        plain_arm_id(resource_id) && self.matcher.is_match(resource_id)
    }

    /// Whether it allows every identity (a `**` pattern).
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

/// `/subscriptions/…`-shaped: ASCII, starting with `/`, and no empty, `.` or `..` part.
fn plain_arm_id(id: &str) -> bool {
    id.is_ascii()
        && id.strip_prefix('/').is_some_and(|rest| rest.split('/').all(|part| !matches!(part, "" | "." | "..")))
}

/// What a namespace's annotations allow it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceRules {
    pub name: String,
    /// [`IDENTITY_SCOPE_ANNOTATION`], if set.
    pub scope: Option<Scope>,
    /// [`MODE_ANNOTATION`] is `audit`.
    pub audit: bool,
    /// [`super::METADATA_PATHS_ANNOTATION`]: path prefixes its pods may read.
    pub paths: super::PathGrants,
    /// Why its annotations cannot be read, if they cannot ([`NamespaceRules::unreadable`]).
    pub problem: Option<String>,
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
    /// None: the namespace's annotations cannot be read (this says why).
    Unreadable(&'a str),
}

impl ScopeRule<'_> {
    /// Whether it allows the client id `client_id` (workload identity).
    #[must_use]
    pub fn permits_client(&self, client_id: &str) -> bool {
        match self {
            ScopeRule::Open => true,
            ScopeRule::Closed | ScopeRule::Unreadable(_) => false,
            ScopeRule::Annotated(scope) => scope.permits_client(client_id),
        }
    }

    /// How `identity` is fetched if the scope allows it: by client id when that is allowed,
    /// else, for a managed identity, by its resource id when that is (`None`: not allowed).
    #[must_use]
    pub fn fetch_by(&self, identity: &Identity) -> Option<FetchBy> {
        if self.permits_client(&identity.client_id) {
            return Some(FetchBy::ClientId(identity.client_id.clone()));
        }
        let ScopeRule::Annotated(scope) = self else { return None };
        (identity.kind == IdentityType::UserAssignedMsi && scope.permits_resource(&identity.resource_id))
            .then(|| FetchBy::ResourceId(identity.resource_id.clone()))
    }

    /// Whether it allows every identity there is: only then is an exception honoured (an
    /// exception's pods reach the metadata service directly, with every identity of the node).
    #[must_use]
    pub fn is_everything(&self) -> bool {
        match self {
            ScopeRule::Open => true,
            ScopeRule::Closed | ScopeRule::Unreadable(_) => false,
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
            ScopeRule::Unreadable(problem) => {
                format!(
                    "namespace {namespace}'s imds-filter annotations cannot be read ({problem}), so it has no identity"
                )
            }
        }
    }
}

impl NamespaceRules {
    /// The rules of a namespace whose annotations cannot be read (`problem` says why): no
    /// identity, enforced. Never wider than what the annotations could have meant.
    #[must_use]
    pub fn unreadable(name: &str, problem: String) -> NamespaceRules {
        NamespaceRules { name: name.to_owned(), problem: Some(problem), ..NamespaceRules::default() }
    }

    /// A namespace's rules from its annotations (`None`: not set).
    ///
    /// # Errors
    /// An annotation the agent cannot read, said in a sentence.
    pub fn parse(name: &str, annotations: NamespaceAnnotations<'_>) -> Result<Self, String> {
        let NamespaceAnnotations { scope, mode, paths } = annotations;
        let scope = scope.map(Scope::parse).transpose()?;
        let paths = paths.map(super::PathGrants::parse).transpose()?.unwrap_or_default();
        let audit = match mode.map(str::trim) {
            None | Some("enforce") => false,
            Some("audit") => true,
            Some(other) => return Err(format!("{MODE_ANNOTATION}: {other:?} is neither enforce nor audit")),
        };
        Ok(NamespaceRules { name: name.to_owned(), scope, audit, paths, problem: None })
    }
}

/// The values of a namespace's annotations the agent reads (`None`: not set).
#[derive(Clone, Copy, Debug, Default)]
pub struct NamespaceAnnotations<'a> {
    /// [`IDENTITY_SCOPE_ANNOTATION`].
    pub scope: Option<&'a str>,
    /// [`MODE_ANNOTATION`].
    pub mode: Option<&'a str>,
    /// [`super::METADATA_PATHS_ANNOTATION`].
    pub paths: Option<&'a str>,
}

impl NamespaceAnnotations<'_> {
    /// Whether none is set.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.scope.is_none() && self.mode.is_none() && self.paths.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOB: &str =
        "/subscriptions/s1/resourceGroups/team-a/providers/Microsoft.ManagedIdentity/userAssignedIdentities/blob";

    fn msi(client_id: &str, resource_id: &str) -> Identity {
        Identity {
            namespace: "app".into(),
            name: "x".into(),
            kind: IdentityType::UserAssignedMsi,
            client_id: client_id.into(),
            resource_id: resource_id.into(),
            object_id: None,
            service_principal: None,
        }
    }

    #[test]
    fn scopes_match_client_ids_and_resource_ids_exactly_or_by_glob() {
        let scope = Scope::parse(
            "8d3b1f8e-7c1a-4b5e-9f2d-0a1b2c3d4e5f, c0ffee00-*\n/subscriptions/s1/resourceGroups/team-a/providers/Microsoft.ManagedIdentity/userAssignedIdentities/*",
        )
        .unwrap();
        for (client_id, permitted) in [
            ("8d3b1f8e-7c1a-4b5e-9f2d-0a1b2c3d4e5f", true),
            ("8D3B1F8E-7C1A-4B5E-9F2D-0A1B2C3D4E5F", true), // GUIDs ignore case
            ("8d3b1f8e-7c1a-4b5e-9f2d-0a1b2c3d4e5", false), // a prefix is not a match
            ("c0ffee00-1111-2222-3333-444444444444", true),
            ("d0ffee00-1111-2222-3333-444444444444", false),
        ] {
            assert_eq!(scope.permits_client(client_id), permitted, "{client_id}");
        }
        for (resource_id, permitted) in [
            (BLOB.to_owned(), true),
            (BLOB.to_uppercase(), true),
            // `*` stays within one part: another resource group's identity, or a nested path.
            (BLOB.replace("team-a", "team-b"), false),
            (format!("{BLOB}/nested"), false),
            (String::new(), false),
            // Spellings that match a pattern but could name something else upstream.
            (BLOB.replace("/blob", "/../blob"), false),
            (BLOB.replace("team-a", "team-a/../team-b"), false),
            (BLOB.replace("/providers", "//providers"), false),
            (BLOB.replace("blob", "\u{212a}ey"), false), // the Kelvin sign folds to `k`
        ] {
            assert_eq!(scope.permits_resource(&resource_id), permitted, "{resource_id}");
        }
        assert!(!scope.is_everything());
        assert!(Scope::parse("**").unwrap().is_everything());
        assert!(Scope::parse("**").unwrap().permits_resource(BLOB));
        let team = Scope::parse("/subscriptions/s1/resourceGroups/team-a/**").unwrap();
        assert!(team.permits_resource(BLOB) && !team.permits_resource(&BLOB.replace("team-a", "team-b")));
        assert!(!team.permits_resource("/subscriptions/s1/resourceGroups/team-a/../team-b/x"));
        // An empty scope allows nothing.
        let none = Scope::parse(" , ").unwrap();
        assert!(!none.permits_client("8d3b1f8e-7c1a-4b5e-9f2d-0a1b2c3d4e5f") && !none.permits_resource(BLOB));
        assert_eq!(none.describe(), "none");
        assert!(Scope::parse("a[").unwrap_err().contains("\"a[\" is not a pattern"));
    }

    #[test]
    fn an_identity_is_fetched_by_the_field_its_scope_allowed() {
        let other_tenant = "b0b0b0b0-0000-0000-0000-000000000000";
        let by_group = Scope::parse("/subscriptions/s1/resourceGroups/team-a/**").unwrap();
        let rule = ScopeRule::Annotated(&by_group);
        // Allowed by resource id only: fetched by that resource id, whatever client id the
        // AzureIdentity claims (another tenant's, here), so only the in-scope identity's token
        // can come back.
        assert_eq!(rule.fetch_by(&msi(other_tenant, BLOB)), Some(FetchBy::ResourceId(BLOB.into())));
        assert_eq!(rule.fetch_by(&msi(other_tenant, &BLOB.replace("team-a", "team-b"))), None);
        // A service principal has no resource id the metadata service would use.
        let principal = Identity { kind: IdentityType::ServicePrincipal, ..msi(other_tenant, BLOB) };
        assert_eq!(rule.fetch_by(&principal), None);
        // Allowed by client id: fetched by client id.
        let by_client = Scope::parse("c-*").unwrap();
        let rule = ScopeRule::Annotated(&by_client);
        assert_eq!(rule.fetch_by(&msi("c-1", "/subscriptions/elsewhere/x")), Some(FetchBy::ClientId("c-1".into())));
        assert_eq!(ScopeRule::Open.fetch_by(&msi("c-1", BLOB)), Some(FetchBy::ClientId("c-1".into())));
        assert_eq!(ScopeRule::Closed.fetch_by(&msi("c-1", BLOB)), None);
    }

    #[test]
    fn the_rule_for_a_namespace_without_a_scope_is_the_cluster_default() {
        assert!(ScopeRule::Open.permits_client("c") && ScopeRule::Open.is_everything());
        assert!(!ScopeRule::Closed.permits_client("c") && !ScopeRule::Closed.is_everything());
        assert!(ScopeRule::Closed.describe("shop").contains("cluster default is closed"));
        let scope = Scope::parse("c-*").unwrap();
        let rule = ScopeRule::Annotated(&scope);
        assert!(rule.permits_client("c-1") && !rule.permits_client("d-1"));
        assert_eq!(rule.describe("shop"), format!("namespace shop's {IDENTITY_SCOPE_ANNOTATION} allows c-*"));
        let unreadable = ScopeRule::Unreadable("imds-filter.io/mode: \"x\" is neither enforce nor audit");
        assert!(!unreadable.permits_client("c") && !unreadable.is_everything());
        assert!(
            unreadable.describe("shop").contains("cannot be read (imds-filter.io/mode"),
            "{}",
            unreadable.describe("shop")
        );
    }

    #[test]
    fn namespace_annotations_are_read_strictly() {
        let set = NamespaceAnnotations { scope: Some("c-*"), mode: Some("audit"), paths: Some("/metadata/instance") };
        let rules = NamespaceRules::parse("shop", set).unwrap();
        assert!(rules.audit && rules.scope.is_some() && rules.problem.is_none());
        assert_eq!(rules.paths.covering("/metadata/instance/compute"), Some("/metadata/instance"));
        assert_eq!(
            NamespaceRules::parse("shop", NamespaceAnnotations::default()).unwrap(),
            NamespaceRules { name: "shop".into(), ..NamespaceRules::default() }
        );
        let mode = NamespaceAnnotations { mode: Some("permissive"), ..NamespaceAnnotations::default() };
        assert!(NamespaceRules::parse("shop", mode).unwrap_err().contains("neither enforce nor audit"));
        let paths = NamespaceAnnotations { paths: Some("/metadata/identity"), ..NamespaceAnnotations::default() };
        assert!(NamespaceRules::parse("shop", paths).unwrap_err().contains("never granted"));
        let unreadable = NamespaceRules::unreadable("shop", "why".into());
        assert!(!unreadable.audit && unreadable.problem.as_deref() == Some("why"));
    }
}
