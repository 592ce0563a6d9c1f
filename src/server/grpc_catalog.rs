//! The catalog RPCs over gRPC: request → [`crate::catalog::Catalog`] call → response, with the
//! caller's role from the pipeline's call context and the catalog's errors mapped to statuses.
//!
//! `ExecuteRemotePlugin` is a unary RPC: with `stream = true` the run is the same and its whole
//! output comes in the one response (`done` is always true). `DownloadPlugin` sends the file in
//! 64 KiB chunks: the first message carries `filename` and `total_size`, every data message has
//! `done = false`, and a last message `{done: true}` carries no data.

use tonic::{Request, Response, Status};

use super::AppState;
use super::state::Prepared;
use crate::auth::Role;
use crate::catalog::{Agent, CatalogCounts, CatalogError, Settings, Skill};
use crate::proto::*;
use crate::server::pipeline::CallContext;

/// Bytes per `DownloadPlugin` data message.
pub const DOWNLOAD_CHUNK: usize = 64 * 1024;

type BoxStream<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

/// The status of a catalog error, through the core's error type.
fn to_status(e: CatalogError) -> Status {
    super::error::to_status(&crate::gateway::Error::from(e))
}

fn context<T>(req: &Request<T>) -> Option<&CallContext> {
    req.extensions().get::<CallContext>()
}

/// The config snapshot of the call, and the catalog settings of it.
fn settings<T>(state: &AppState, req: &Request<T>) -> Settings {
    let prepared = context(req).map_or_else(|| state.prepared(), |c| c.prepared.clone());
    Settings::from_config(&prepared.config)
}

/// The caller's role; a call the pipeline did not admit is readonly, never more.
fn role<T>(req: &Request<T>) -> Role {
    context(req)
        .and_then(|c| c.principal.as_ref())
        .map_or(Role::ReadOnly, |p| p.role)
}

fn note_resource<T>(req: &Request<T>, name: &str) {
    if let Some(c) = context(req) {
        c.notes.resource(name);
    }
}

fn fail<T>(req: &Request<T>, e: CatalogError) -> Status {
    if matches!(e, CatalogError::Forbidden(_))
        && let Some(c) = context(req)
    {
        c.notes.denied();
    }
    to_status(e)
}

/// The counts `GetServerInfo` and `/status` report, from the same snapshot the lists come from.
pub async fn counts(state: &AppState, prepared: &Prepared) -> CatalogCounts {
    state
        .catalog
        .counts(&Settings::from_config(&prepared.config))
        .await
}

/// For admins, one `/status` line per plugin file that is not offered, with the reason (each
/// line starts with a newline); nothing for other roles, since the lines name server paths.
pub async fn refused_lines(state: &AppState, prepared: &Prepared, role: Role) -> String {
    if role != Role::Admin {
        return String::new();
    }
    let snap = state
        .catalog
        .snapshot(&Settings::from_config(&prepared.config))
        .await;
    snap.refused
        .iter()
        .map(|r| format!("\nRefused plugin: {}: {}", r.file.display(), r.reason))
        .collect()
}

/// `ListRemotePlugins`.
pub async fn list_remote_plugins(
    state: &AppState,
    req: Request<ListRemotePluginsRequest>,
) -> Result<Response<ListRemotePluginsResponse>, Status> {
    let list = state
        .catalog
        .list_plugins(&settings(state, &req), role(&req))
        .await;
    Ok(Response::new(ListRemotePluginsResponse {
        plugins: list
            .into_iter()
            .map(|p| PluginInfo {
                name: p.name,
                description: p.description,
                usage: p.usage,
                version: p.version,
                schema: p.schema,
            })
            .collect(),
    }))
}

/// `ExecuteRemotePlugin`.
pub async fn execute_remote_plugin(
    state: &AppState,
    req: Request<ExecuteRemotePluginRequest>,
) -> Result<Response<ExecuteRemotePluginResponse>, Status> {
    note_resource(&req, &req.get_ref().plugin_name);
    let (s, r) = (settings(state, &req), role(&req));
    let body = req.get_ref();
    match state
        .catalog
        .execute(&s, r, &body.plugin_name, &body.args)
        .await
    {
        Ok(out) => Ok(Response::new(ExecuteRemotePluginResponse {
            output: out.output,
            error: out.error,
            done: true,
        })),
        Err(e) => Err(fail(&req, e)),
    }
}

/// `DownloadPlugin`.
pub async fn download_plugin(
    state: &AppState,
    req: Request<DownloadPluginRequest>,
) -> Result<Response<BoxStream<DownloadPluginResponse>>, Status> {
    note_resource(&req, &req.get_ref().plugin_name);
    let (s, r) = (settings(state, &req), role(&req));
    let body = req.get_ref();
    let d = state
        .catalog
        .download(&s, r, &body.plugin_name, &body.target_os, &body.target_arch)
        .await
        .map_err(|e| fail(&req, e))?;
    let total = i64::try_from(d.bytes.len()).unwrap_or(i64::MAX);
    let bytes = bytes::Bytes::from(d.bytes);
    let mut messages: Vec<Result<DownloadPluginResponse, Status>> = Vec::new();
    let mut first = Some(d.filename);
    let mut offset = 0;
    while offset < bytes.len() || first.is_some() {
        let end = (offset + DOWNLOAD_CHUNK).min(bytes.len());
        let filename = first.take();
        messages.push(Ok(DownloadPluginResponse {
            chunk: bytes.slice(offset..end).to_vec(),
            total_size: if filename.is_some() { total } else { 0 },
            filename: filename.unwrap_or_default(),
            done: false,
        }));
        offset = end;
    }
    messages.push(Ok(DownloadPluginResponse {
        done: true,
        ..Default::default()
    }));
    Ok(Response::new(Box::pin(futures::stream::iter(messages))))
}

fn agent_info(a: Agent) -> AgentInfo {
    AgentInfo {
        name: a.name,
        description: a.description,
        skills: a.skills,
        plugins: a.plugins,
        model: a.model,
        content: a.content,
        frontmatter: a.frontmatter,
        effort: a.effort,
        category: a.category,
        version: a.version,
        author: a.author,
        tags: a.tags,
    }
}

fn skill_info(s: Skill) -> SkillInfo {
    SkillInfo {
        name: s.name,
        description: s.description,
        content: s.content,
        allowed_tools: s.allowed_tools,
        subskills: s.subskills.into_iter().collect(),
        scripts: s.scripts.into_iter().collect(),
    }
}

/// `ListRemoteAgents`.
pub async fn list_remote_agents(
    state: &AppState,
    req: Request<ListRemoteAgentsRequest>,
) -> Result<Response<ListRemoteAgentsResponse>, Status> {
    let agents = state.catalog.agents(&settings(state, &req)).await;
    Ok(Response::new(ListRemoteAgentsResponse {
        agents: agents.into_iter().map(agent_info).collect(),
    }))
}

/// `GetAgentDefinition`.
pub async fn get_agent_definition(
    state: &AppState,
    req: Request<GetAgentDefinitionRequest>,
) -> Result<Response<GetAgentDefinitionResponse>, Status> {
    note_resource(&req, &req.get_ref().name);
    let a = state
        .catalog
        .agent(&settings(state, &req), &req.get_ref().name)
        .await
        .map_err(|e| fail(&req, e))?;
    Ok(Response::new(GetAgentDefinitionResponse {
        agent: Some(agent_info(a)),
    }))
}

/// `ListRemoteSkills`.
pub async fn list_remote_skills(
    state: &AppState,
    req: Request<ListRemoteSkillsRequest>,
) -> Result<Response<ListRemoteSkillsResponse>, Status> {
    let skills = state.catalog.skills(&settings(state, &req)).await;
    Ok(Response::new(ListRemoteSkillsResponse {
        skills: skills.into_iter().map(skill_info).collect(),
    }))
}

/// `GetSkillContent`.
pub async fn get_skill_content(
    state: &AppState,
    req: Request<GetSkillContentRequest>,
) -> Result<Response<GetSkillContentResponse>, Status> {
    note_resource(&req, &req.get_ref().name);
    let s = state
        .catalog
        .skill(&settings(state, &req), &req.get_ref().name)
        .await
        .map_err(|e| fail(&req, e))?;
    Ok(Response::new(GetSkillContentResponse {
        skill: Some(skill_info(s)),
    }))
}

/// The text of the remote commands `plugins list`, `agents list` and `skills list`.
pub async fn command_list(state: &AppState, prepared: &Prepared, what: &str, role: Role) -> String {
    let s = Settings::from_config(&prepared.config);
    let (title, lines): (&str, Vec<String>) = match what {
        "plugins" => (
            "Plugins",
            state
                .catalog
                .list_plugins(&s, role)
                .await
                .into_iter()
                .map(|p| match p.version.is_empty() {
                    true => format!("  - {} — {}", p.name, p.description),
                    false => format!("  - {} (v{}) — {}", p.name, p.version, p.description),
                })
                .collect(),
        ),
        "agents" => (
            "Agents",
            state
                .catalog
                .agents(&s)
                .await
                .into_iter()
                .map(|a| format!("  - {} — {}", a.name, a.description))
                .collect(),
        ),
        _ => (
            "Skills",
            state
                .catalog
                .skills(&s)
                .await
                .into_iter()
                .map(|k| format!("  - {} — {}", k.name, k.description))
                .collect(),
        ),
    };
    match lines.is_empty() {
        true => format!("No {} available.", title.to_lowercase()),
        false => format!("=== {title} ({}) ===\n{}", lines.len(), lines.join("\n")),
    }
}
