//! `cargo xtask man` and `render`: the generated docs and the manifests rendered from the Helm
//! chart.
use super::*;

// ---- man pages and completions ---------------------------------------------------------------

/// Runs the built agent's `generate-docs` into target/dist/ and checks what it wrote.
pub(crate) fn man() -> Result<()> {
    let target = workspace_root().join("target");
    generate_docs(&target.join("debug/imds-agent"), &target.join("dist"))
}

/// Runs `agent generate-docs` into `out` (man/ and completions/) and checks what it wrote.
pub(crate) fn generate_docs(agent: &Path, out: &Path) -> Result<()> {
    run(Command::new(agent).arg("generate-docs").arg("--out").arg(out))?;
    let pages =
        ["imds-agent.1", "imds-agent-run.1", "imds-agent-status.1", "imds-agent-explain.1", "imds-agent-doctor.1"];
    let completions = ["imds-agent.bash", "_imds-agent", "imds-agent.fish"];
    let expected = pages
        .iter()
        .map(|p| out.join("man").join(p))
        .chain(completions.iter().map(|c| out.join("completions").join(c)));
    for file in expected {
        let size = fs::metadata(&file).map_or(0, |m| m.len());
        if size == 0 {
            bail!("{} was not written", file.display());
        }
    }
    Ok(())
}

// ---- deploy/: the plain manifests, rendered from the chart -----------------------------------

const CHART: &str = "deploy/helm/imds-filter";

/// One rendering of the chart: where it is committed, what it is for, and the settings that
/// make it.
struct Render {
    path: &'static str,
    about: &'static str,
    helm_args: &'static [&'static str],
}

const RENDERS: [Render; 4] = [
    Render {
        path: "deploy/kubernetes/imds-filter.yaml",
        about: "# The namespace, least-privilege RBAC and the agent's DaemonSet. Apply after the CRDs\n\
                # (../crds/). docs/deploy.md says what each setting is for.",
        helm_args: &["--set", "createNamespace=true"],
    },
    Render {
        path: "deploy/kubernetes/uninstall.yaml",
        about: "# The node-wide uninstaller: apply it once the agent's DaemonSet is deleted. docs/deploy.md has\n\
                # the steps.",
        helm_args: &["--set", "uninstall=true", "--show-only", "templates/uninstall.yaml"],
    },
    Render {
        path: "deploy/kubernetes/service-principal-secrets.yaml",
        about: "# Only if pods use aad-pod-identity service principals (AzureIdentity type 1 or 2). An\n\
                # example for one namespace: edit the namespace and resourceNames (or render the chart\n\
                # with your own servicePrincipalSecrets), then `kubectl apply -f` it. See docs/deploy.md.",
        helm_args: &[
            "--set-json",
            r#"servicePrincipalSecrets=[{"namespace":"shop","names":["blob-writer-secret"]}]"#,
            "--show-only",
            "templates/secrets-rbac.yaml",
        ],
    },
    Render {
        path: "tests/fixtures/helm/every-option.yaml",
        about: "# Every setting away from its default (every-option.values.yaml), for the tests: strict schema\n\
                # validation, and the agent's own argument parser on the DaemonSet's arguments.",
        helm_args: &["--values", "tests/fixtures/helm/every-option.values.yaml"],
    },
];

/// Lints the chart, then renders each of [`RENDERS`] where it is committed (or, with `check`,
/// fails where a committed file differs from its rendering, showing the diff).
pub(crate) fn render(check: bool) -> Result<()> {
    let root = workspace_root();
    let helm = sdk_python()?.with_file_name("helm");
    ensure!(helm.exists(), "{} is missing: run `cargo xtask setup`", helm.display());
    for values in [&[][..], &["--values", "tests/fixtures/helm/every-option.values.yaml"]] {
        run(Command::new(&helm).args(["lint", "--strict", "--quiet", CHART]).args(values).current_dir(&root))?;
    }
    let scratch = root.join("target/helm");
    fs::create_dir_all(&scratch)?;
    let mut drifted = Vec::new();
    for Render { path, about, helm_args } in &RENDERS {
        let rendered = output(
            Command::new(&helm)
                .args(["template", "imds-filter", CHART, "--namespace", "imds-filter"])
                .args(*helm_args)
                .current_dir(&root),
        )?;
        let text = format!(
            "# Rendered from {CHART}/ by `cargo xtask render` (helm template {}).\n\
             # Edit the chart and render again: the test command fails when the two differ.\n{about}\n{rendered}",
            helm_args.join(" ")
        );
        let committed = root.join(path);
        if !check {
            fs::write(&committed, text).with_context(|| format!("writing {}", committed.display()))?;
            println!("    wrote {}", committed.display());
        } else if fs::read_to_string(&committed).ok().as_deref() != Some(text.as_str()) {
            let fresh = scratch.join(Path::new(path).file_name().context("a file")?);
            fs::write(&fresh, text)?;
            // The diff is for the reader; its exit status is not the verdict.
            let _ = Command::new("diff").arg("-u").arg(&committed).arg(&fresh).status();
            drifted.push(*path);
        }
    }
    ensure!(drifted.is_empty(), "not the chart's rendering: {}; run `cargo xtask render`", drifted.join(", "));
    Ok(())
}
