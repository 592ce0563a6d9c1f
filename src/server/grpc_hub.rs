//! The conversation hub's seven RPCs over [`crate::hub::Hub`]: each takes the caller and the
//! config snapshot from the call's context, converts the request, calls the hub and converts the
//! answer; [`status`] maps a [`HubError`] to its gRPC status.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::AppState;
use super::error;
use super::pipeline::CallContext;
use crate::gateway::Error;
use crate::hub::{AppendRequest, Caller, HubError, HubLimits};
use crate::proto::*;
use crate::state::{Binding, StoredEvent};

/// The stream `SubscribeConversation` answers with.
pub(super) type EventStream = Pin<Box<dyn Stream<Item = Result<ConversationEvent, Status>> + Send>>;

/// The gRPC status of a hub error, through the core's one mapping; a refusal is noted for the
/// audit record and a store failure is logged here, where it is handled.
fn status<T>(req: &Request<T>, e: HubError) -> Status {
    match &e {
        HubError::PermissionDenied(_) => {
            if let Some(c) = context(req) {
                c.notes.denied();
            }
        }
        HubError::Store(_) => tracing::error!("{e}"),
        _ => {}
    }
    error::to_status(&Error::from(e))
}

/// The status a subscriber's stream ends with.
fn stream_status(e: HubError) -> Status {
    if !matches!(
        e,
        HubError::SubscriberLagged { .. } | HubError::ConversationNotFound(_)
    ) {
        tracing::error!("hub subscription failed: {e}");
    }
    error::to_status(&Error::from(e))
}

fn context<T>(req: &Request<T>) -> Option<&CallContext> {
    req.extensions().get::<CallContext>()
}

/// The hub caller of an admitted call; a call that was not admitted has no subject.
fn caller<T>(req: &Request<T>) -> Caller {
    match context(req).and_then(|c| c.principal.as_ref()) {
        Some(p) => Caller::from_principal(p),
        None => Caller {
            subject: String::new(),
            admin: false,
            can_write: false,
        },
    }
}

fn limits<T>(state: &AppState, req: &Request<T>) -> HubLimits {
    match context(req) {
        Some(c) => HubLimits::from(&c.prepared.config.limits),
        None => HubLimits::from(&state.prepared().config.limits),
    }
}

fn event(e: StoredEvent) -> ConversationEvent {
    ConversationEvent {
        conv_id: e.conv_id,
        seq: e.seq,
        principal: e.principal,
        channel: e.channel,
        role: e.role,
        content: e.content,
        client_msg_id: e.client_msg_id,
        ts: e.ts,
    }
}

/// `ResolveActiveConversation`.
pub(super) async fn resolve_active_conversation(
    state: &AppState,
    req: Request<ResolveActiveConversationRequest>,
) -> Result<Response<ResolveActiveConversationResponse>, Status> {
    let (conv_id, principal) = state
        .hub
        .resolve_active(&caller(&req), &req.get_ref().principal)
        .await
        .map_err(|e| status(&req, e))?;
    Ok(Response::new(ResolveActiveConversationResponse {
        conv_id,
        principal,
    }))
}

/// `NewConversation`.
pub(super) async fn new_conversation(
    state: &AppState,
    req: Request<NewConversationRequest>,
) -> Result<Response<NewConversationResponse>, Status> {
    let conv_id = state
        .hub
        .new_conversation(&caller(&req), &req.get_ref().principal)
        .await
        .map_err(|e| status(&req, e))?;
    Ok(Response::new(NewConversationResponse { conv_id }))
}

/// `AppendEvent`.
pub(super) async fn append_event(
    state: &AppState,
    req: Request<AppendEventRequest>,
) -> Result<Response<AppendEventResponse>, Status> {
    let r = req.get_ref();
    let append = AppendRequest {
        conv_id: r.conv_id.clone(),
        channel: r.channel.clone(),
        role: r.role.clone(),
        content: r.content.clone(),
        client_msg_id: r.client_msg_id.clone(),
    };
    let stored = state
        .hub
        .append(&caller(&req), limits(state, &req), append)
        .await
        .map_err(|e| status(&req, e))?;
    Ok(Response::new(AppendEventResponse {
        event: Some(event(stored)),
    }))
}

/// `ReadConversation`.
pub(super) async fn read_conversation(
    state: &AppState,
    req: Request<ReadConversationRequest>,
) -> Result<Response<ReadConversationResponse>, Status> {
    let r = req.get_ref();
    let events = state
        .hub
        .read(&caller(&req), &r.conv_id, r.since_seq, r.limit)
        .await
        .map_err(|e| status(&req, e))?;
    Ok(Response::new(ReadConversationResponse {
        events: events.into_iter().map(event).collect(),
    }))
}

/// `SubscribeConversation`.
pub(super) async fn subscribe_conversation(
    state: &AppState,
    req: Request<SubscribeConversationRequest>,
) -> Result<Response<EventStream>, Status> {
    let r = req.get_ref();
    let events = state
        .hub
        .subscribe(&caller(&req), &r.conv_id, r.since_seq)
        .await
        .map_err(|e| status(&req, e))?;
    let stream: EventStream = Box::pin(events.map(|r| r.map(event).map_err(stream_status)));
    Ok(Response::new(stream))
}

/// `SetBinding`.
pub(super) async fn set_binding(
    state: &AppState,
    req: Request<SetBindingRequest>,
) -> Result<Response<SetBindingResponse>, Status> {
    let r = req.get_ref();
    let binding = Binding {
        platform: r.platform.clone(),
        user_id: r.user_id.clone(),
        principal: r.principal.clone(),
    };
    state
        .hub
        .set_binding(&caller(&req), limits(state, &req), binding)
        .await
        .map_err(|e| status(&req, e))?;
    Ok(Response::new(SetBindingResponse { success: true }))
}

/// `ListBindings`.
pub(super) async fn list_bindings(
    state: &AppState,
    req: Request<ListBindingsRequest>,
) -> Result<Response<ListBindingsResponse>, Status> {
    let bindings = state
        .hub
        .list_bindings(&caller(&req), &req.get_ref().principal)
        .await
        .map_err(|e| status(&req, e))?;
    Ok(Response::new(ListBindingsResponse {
        bindings: bindings
            .into_iter()
            .map(|b| HubBinding {
                platform: b.platform,
                user_id: b.user_id,
                principal: b.principal,
            })
            .collect(),
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn each_hub_error_has_its_grpc_code() {
        let req = Request::new(());
        let table = [
            (HubError::Disabled, tonic::Code::Unavailable),
            (HubError::Unavailable("x".into()), tonic::Code::Unavailable),
            (HubError::Unauthenticated, tonic::Code::Unauthenticated),
            (
                HubError::PermissionDenied("x".into()),
                tonic::Code::PermissionDenied,
            ),
            (
                HubError::InvalidArgument("x".into()),
                tonic::Code::InvalidArgument,
            ),
            (
                HubError::ConversationNotFound("c".into()),
                tonic::Code::NotFound,
            ),
            (
                HubError::SubscriberLagged {
                    behind: 1,
                    last_seq: 2,
                    tail_buffer: 3,
                },
                tonic::Code::Aborted,
            ),
            (HubError::Store("x".into()), tonic::Code::Internal),
        ];
        for (e, code) in table {
            let message = e.to_string();
            let s = status(&req, e);
            assert_eq!(s.code(), code, "{message}");
            assert_eq!(s.message(), message);
        }
        assert_eq!(
            stream_status(HubError::SubscriberLagged {
                behind: 1,
                last_seq: 2,
                tail_buffer: 3
            })
            .code(),
            tonic::Code::Aborted
        );
    }
}
