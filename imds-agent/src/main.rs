//! `imds-agent`: installs the in-kernel IMDS filter and serves the connections it redirects.
//! This file parses the command line, sets up logging and dispatches: the agent itself is
//! `imds_agent::agent`, the operator commands `imds_agent::operator`.
use anyhow::Context as _;
use clap::Parser as _;
use imds_agent::{
    agent,
    cli::{listen_address, Cli, Command, LogFormat},
    guard,
    operator::{self, control::client::Client, doctor, explain, print_and_exit, status, uninstall},
};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli)?;
    match cli.command {
        Command::Run(args) => {
            let config = agent::Config::try_from(*args)?;
            tokio::runtime::Runtime::new()?.block_on(agent::run(config))
        }
        Command::Status { bpffs, agent_socket, output } => {
            let status = tokio::runtime::Runtime::new()?.block_on(status::gather(&bpffs, &agent_socket));
            print_and_exit(output, status, |s| s.protection.exit_code())
        }
        Command::Explain(args) => {
            let explanation = tokio::runtime::Runtime::new()?.block_on(explain::gather(&args));
            print_and_exit(args.output, explanation, explain::Explanation::exit_code)
        }
        Command::Doctor { bpffs, attach_cgroup, listen, upstream, output } => {
            let listen = listen.or_else(|| listen_address(None).ok());
            let report = doctor::run(&doctor::Setup { pin_dir: bpffs, attach_cgroup, listen, upstream });
            print_and_exit(output, Ok(report), doctor::Report::exit_code)
        }
        Command::Health { ready, agent_socket } => {
            // A probe runs every few seconds: one thread is plenty.
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let answer = runtime.block_on(Client::new(&agent_socket).health(ready));
            match answer {
                Ok((healthy, sentence)) => {
                    println!("{sentence}");
                    std::process::exit(i32::from(!healthy));
                }
                Err(why) => {
                    println!("{why}");
                    std::process::exit(1);
                }
            }
        }
        Command::GenerateDocs { out } => operator::generate_docs(&out),
        Command::Guard(args) => {
            match guard::run(&args)? {
                guard::Guarded::Installed { cgroup, created } => println!(
                    "filter in place on {}{}, refusing every redirect until the agent listens",
                    cgroup.display(),
                    if created { " (created it)" } else { "" }
                ),
                guard::Guarded::AgentServing => println!("an agent holds this node's filter: nothing to guard"),
            }
            Ok(())
        }
        Command::InstallGuard(args) => {
            let paths = guard::InstallPaths { root: args.root };
            for file in guard::install(&paths, args.host_ip, &args.guard_args)? {
                println!("wrote {}", file.display());
            }
            Ok(())
        }
        Command::Uninstall(args) => {
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(uninstall::run(&args))?;
            if args.wait {
                println!("uninstalled; idle until terminated");
                loop {
                    std::thread::park();
                }
            }
            Ok(())
        }
    }
}

fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&cli.log).with_context(|| format!("invalid --log filter {:?}", cli.log))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
    .map_err(|e| anyhow::anyhow!("installing the logger: {e}"))
}
