//! The operator commands' glue: `status`, `explain`, `generate-docs`. The judging lives in
//! the library ([`imds_agent::status`], [`imds_agent::explain`]); this gathers its inputs
//! (pins, cgroupfs, the agent's control socket) and nothing else.
use std::path::Path;

use anyhow::{bail, Context as _};
use imds_agent::{
    caller::CgroupResolver,
    control, explain,
    kernel::{self, cgroup},
    policy::WorkloadSettings,
    sources::{kube as kube_source, manifests},
    status,
};

use imds_agent::cli::{ExplainArgs, Output};

/// Prints `result` as `output` asks and exits: with `exit` of the answer, or 3 (and the
/// error on stderr) when there is none.
pub fn answer<T: std::fmt::Display + serde::Serialize>(
    output: Output,
    result: anyhow::Result<T>,
    exit: impl FnOnce(&T) -> i32,
) -> ! {
    let code = match result {
        Ok(answer) => {
            match output {
                Output::Text => print!("{answer}"),
                Output::Json => match serde_json::to_string_pretty(&answer) {
                    Ok(json) => println!("{json}"),
                    Err(e) => eprintln!("error: {e}"),
                },
            }
            exit(&answer)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            3
        }
    };
    std::process::exit(code)
}

/// Everything `imds-agent status` reports.
pub async fn node_status(pin_dir: &Path, agent_socket: &Path) -> anyhow::Result<status::NodeStatus> {
    let state = kernel::inspect::inspect(pin_dir).with_context(|| format!("reading {}", pin_dir.display()))?;
    let root = cgroup::cgroup2_root().ok();
    let attach_cgroup = match (state.attach_cgroup_id(), &root) {
        (Some(id), Some(root)) => CgroupResolver::new(root).ok().and_then(|r| r.resolve(id).ok().flatten()),
        _ => None,
    };
    let attached = match (&attach_cgroup, &root) {
        (Some(cg), Some(root)) => kernel::attached_programs(&root.join(cg.path.trim_start_matches('/')))
            .map_err(|e| format!("{:#}", anyhow::Error::from(e))),
        _ => Err("the attach cgroup was not found".to_owned()),
    };
    let agent = control::ask(agent_socket, "/status").await;
    let backstop = kernel::backstop::inspect(pin_dir).map_err(|e| format!("{:#}", anyhow::Error::from(e)));
    Ok(status::assess(status::Inputs {
        pin_dir: &pin_dir.display().to_string(),
        state: &state,
        attach_cgroup: attach_cgroup.map(|c| c.path),
        attached,
        backstop,
        agent_asked: Some(agent_socket.display().to_string()),
        agent,
    }))
}

/// `imds-agent explain`.
pub async fn explain(args: &ExplainArgs) -> anyhow::Result<explain::Explanation> {
    let mut request = args.path.clone().unwrap_or_else(|| explain::DEFAULT_REQUEST.to_owned());
    for (name, value) in
        [("client_id", &args.client_id), ("object_id", &args.object_id), ("mi_res_id", &args.mi_res_id)]
    {
        if let Some(value) = value {
            let sep = if request.contains('?') { '&' } else { '?' };
            let value: String = form_urlencoded::byte_serialize(value.as_bytes()).collect();
            request = format!("{request}{sep}{name}={value}");
        }
    }
    let (pod, cgroup_step) = match (&args.pod, &args.cgroup) {
        (Some(pod), _) => (explain::PodRef::parse(pod).map_err(anyhow::Error::msg)?, None),
        (None, Some(cgroup)) => {
            let (uid, step) = pod_of_cgroup(cgroup)?;
            (explain::PodRef::Uid(uid), Some(step))
        }
        (None, None) => bail!("give --pod NAMESPACE/NAME or --cgroup PATH|ID"),
    };
    let settings = explain::Settings { deny_unbound: args.deny_unbound, ..explain::Settings::default() };
    let mut explanation = if let Some(dir) = &args.manifests {
        let snapshot = manifests::load_dir(dir).with_context(|| format!("loading {}", dir.display()))?;
        explain::explain(&snapshot, &settings, &pod, &request)
    } else if let Some(kubeconfig) = &args.kubeconfig {
        let explain::PodRef::Named { namespace, name } = &pod else {
            bail!("--kubeconfig needs --pod NAMESPACE/NAME");
        };
        let client = imds_agent::sources::kube_client(Some(kubeconfig)).await?;
        let snapshot = kube_source::snapshot_for_pod(client, namespace, name, WorkloadSettings::default())
            .await
            .context("listing the pod and the aad-pod-identity objects")?;
        explain::explain(&snapshot, &settings, &pod, &request)
    } else {
        let who = match &pod {
            explain::PodRef::Named { namespace, name } => format!("pod={namespace}/{name}"),
            explain::PodRef::Uid(uid) => format!("uid={uid}"),
        };
        let request: String = form_urlencoded::byte_serialize(request.as_bytes()).collect();
        control::ask(&args.agent_socket, &format!("/explain?{who}&request={request}"))
            .await
            .map_err(|e| anyhow::anyhow!("{e} (or decide over a directory with --manifests DIR)"))?
    };
    if let Some(step) = cgroup_step {
        explanation.steps.insert(0, step);
    }
    Ok(explanation)
}

/// The pod UID a cgroup (path or id) belongs to, and the step that says so.
fn pod_of_cgroup(cgroup: &str) -> anyhow::Result<(String, explain::Step)> {
    let root = cgroup::cgroup2_root()?;
    let resolver = CgroupResolver::new(&root).context("opening the cgroup2 filesystem")?;
    let id = if let Ok(id) = cgroup.parse::<u64>() {
        id
    } else {
        let path = Path::new(cgroup);
        let full = if path.starts_with(&root) { path.to_owned() } else { root.join(cgroup.trim_start_matches('/')) };
        cgroup::cgroup_id(&full)?
    };
    let info = resolver.resolve(id)?.ok_or_else(|| anyhow::anyhow!("no cgroup with id {id}"))?;
    let uid = info.pod_uid.clone().ok_or_else(|| {
        anyhow::anyhow!("cgroup {} (id {id}) is not a pod's: the kubelet names pod cgroups pod<UID>", info.path)
    })?;
    let finding = format!("{} (id {id}) belongs to pod {uid}", info.path);
    Ok((uid, explain::Step { step: "cgroup".into(), finding }))
}

/// Man pages (one per command) and bash, zsh and fish completions, from the clap definitions.
pub fn generate_docs(out: &Path) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    let (man, completions) = (out.join("man"), out.join("completions"));
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    clap_mangen::generate_to(super::Cli::command(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
        clap_complete::generate_to(shell, &mut super::Cli::command(), "imds-agent", &completions)
            .with_context(|| format!("writing {shell} completions to {}", completions.display()))?;
    }
    println!("man pages in {}, completions in {}", man.display(), completions.display());
    Ok(())
}
